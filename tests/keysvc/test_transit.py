"""Vault-transit parity (issue 14 part 5): `vhsm key datakey`, `vhsm key rewrap`, and
`vhsm key info --json` with every version's state and fingerprint. The real CLI as a
subprocess; rewrap also through the real daemon, whose reply is checked on the wire."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from ksutil import Daemon, Work

from keysvc import protocol
from keysvc.client import DaemonClient
from keysvc.errors import InvalidInputError


def _version_tag(blob: bytes) -> int:
    """The key version a wrap/encrypt blob carries (keysvc.keytypes: magic, u32 version)."""
    return struct.unpack(">I", blob[4:8])[0]


def _assert_not_in_log(work: Work, secret: bytes) -> None:
    log = work.log.read_text()
    for form in (secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode()):
        assert form not in log


def _openssh_line(pem: Path) -> str:
    key = serialization.load_pem_public_key(pem.read_bytes())
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


def _one_line_error(p: object, *needles: str) -> None:
    assert p.returncode != 0  # type: ignore[attr-defined]
    lines = p.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    for n in needles:
        assert n in lines[0], lines[0]


def test_datakey_plaintext_unwraps_wrapped_only_has_none(work: Work) -> None:
    work.vhsm("key", "generate", "kek", "--type", "aes-256-gcm")
    p = work.vhsm("key", "datakey", "kek", "-o", "dk", "-w", "dk.wrapped")
    assert p.stdout == "" and "32 bytes, wrapped with kek version 1" in p.stderr
    dk = (work.path / "dk").read_bytes()
    assert len(dk) == 32 and (work.path / "dk").stat().st_mode & 0o077 == 0
    work.vhsm("key", "unwrap", "kek", "-i", "dk.wrapped", "-o", "dk.out")
    assert (work.path / "dk.out").read_bytes() == dk

    # --json: both as base64; the plaintext is the wrapped key's content
    j = json.loads(work.vhsm("key", "datakey", "kek", "--bytes", "16", "--json").stdout)
    assert set(j) == {"key", "version", "bytes", "wrapped", "plaintext"}
    assert (j["key"], j["version"], j["bytes"]) == ("kek", 1, 16)
    (work.path / "j.wrapped").write_bytes(base64.b64decode(j["wrapped"]))
    out = work.vhsm("key", "unwrap", "kek", "-i", "j.wrapped", "--json").stdout
    assert json.loads(out)["plaintext"] == j["plaintext"]

    # --wrapped-only: no plaintext anywhere (stdout is the wrapped blob; JSON lacks the field)
    raw = work.run(
        "sh", "-c", "vhsm key datakey kek --wrapped-only -q | od -An -tx1 | tr -d ' \\n'"
    ).stdout
    blob = bytes.fromhex(raw)
    assert blob[:4] == b"VHW1" and len(blob) == 4 + 4 + 12 + 32 + 16
    j2 = json.loads(work.vhsm("key", "datakey", "kek", "--wrapped-only", "--json").stdout)
    assert "plaintext" not in j2 and base64.b64decode(j2["wrapped"])[:4] == b"VHW1"
    p = work.vhsm("key", "datakey", "kek", "--wrapped-only", "-o", "x", "-w", "y", check=False)
    assert p.returncode == 2 and not (work.path / "x").exists()

    # audited like wrap, sizes and versions only: no form of any plaintext key in the log
    lines = [e for e in work.events("ENCRYPTION") if "Data key of" in e[4]]
    assert len(lines) == 4 and all(e[5] == "SUCCESS" for e in lines)
    assert "wrapped only" in lines[-1][4]
    for secret in (dk, base64.b64decode(j["plaintext"])):
        _assert_not_in_log(work, secret)


def test_datakey_size_is_validated_in_the_service() -> None:
    """The daemon refuses what the CLI's option range would (any client may send anything)."""
    for bad in (15, 1025, "32", 3.5):
        with pytest.raises(InvalidInputError, match="bytes must be a whole number from 16"):
            protocol.check_request({"op": "datakey", "key": "k", "bytes": bad})
    protocol.check_request({"op": "datakey", "key": "k", "bytes": 1024, "wrapped_only": True})


def test_rewrap_through_daemon_after_rotate(work: Work, daemon: Daemon) -> None:
    """Rewrap re-encrypts under the newest version inside the service: the reply carries a
    blob tagged with the new version and no plaintext; old blobs still open until retired."""
    work.vhsm("key", "generate", "kek", "--type", "aes-256-gcm")
    dek = bytes(range(1, 33))
    (work.path / "dek").write_bytes(dek)
    (work.path / "doc").write_bytes(b"the quarterly numbers")
    work.vhsm("key", "wrap", "kek", "-i", "dek", "-o", "dek.v1")
    work.vhsm("key", "encrypt", "kek", "-i", "doc", "-o", "doc.v1", "--aad", "ctx")
    work.vhsm("key", "rotate", "kek")
    old = (work.path / "dek.v1").read_bytes()

    with DaemonClient(daemon.sock, timeout=30) as c:  # the wire: what a caller gets back
        reply, blob = c.call({"op": "rewrap", "key": "kek"}, old)
    assert reply["ok"] and reply["version"] == 2 and reply["old_version"] == 1
    assert set(reply) == {"ok", "version", "old_version", "kind"}
    assert blob[:4] == b"VHW1" and _version_tag(blob) == 2 and len(blob) == len(old)
    assert dek not in blob

    p = work.vhsm("key", "rewrap", "kek", "-i", "dek.v1", "-o", "dek.v2")
    assert p.stderr == "" and "wrapped version 1 -> 2" in p.stdout
    assert _version_tag((work.path / "dek.v2").read_bytes()) == 2
    work.vhsm("key", "unwrap", "kek", "-i", "dek.v2", "-o", "dek.out")
    assert (work.path / "dek.out").read_bytes() == dek

    # a ciphertext: its AAD passes through and is bound to the new one
    j = json.loads(
        work.vhsm("key", "rewrap", "kek", "-i", "doc.v1", "--aad", "ctx", "--json").stdout
    )
    assert set(j) == {"key", "version", "old_version", "kind", "blob"}
    assert (j["kind"], j["version"], j["old_version"]) == ("ciphertext", 2, 1)
    (work.path / "doc.v2").write_bytes(base64.b64decode(j["blob"]))
    out = work.vhsm("key", "decrypt", "kek", "-i", "doc.v2", "--aad", "ctx", "--json").stdout
    assert base64.b64decode(json.loads(out)["plaintext"]) == b"the quarterly numbers"
    p = work.vhsm("key", "rewrap", "kek", "-i", "doc.v1", "-o", "nope", check=False)
    _one_line_error(p, "decryption failed")
    assert not (work.path / "nope").exists()

    rewraps = [e for e in work.events("ENCRYPTION") if e[4].startswith("Rewrapped")]
    assert [e[5] for e in rewraps] == ["SUCCESS", "SUCCESS", "SUCCESS"]
    assert "wrapped key v1 -> v2" in rewraps[0][4] and "ciphertext v1 -> v2" in rewraps[2][4]
    _assert_not_in_log(work, dek)
    status = json.loads(
        work.vhsm("keysvc", "status", "--socket", str(daemon.sock), "--json").stdout
    )
    assert status["running"] and status["requests"] >= 8  # it really went through the daemon


def test_rewrap_tampered_or_retired_refused(work: Work) -> None:
    work.vhsm("key", "generate", "kek", "--type", "aes-256-gcm")
    (work.path / "dek").write_bytes(b"k" * 32)
    work.vhsm("key", "wrap", "kek", "-i", "dek", "-o", "w1")
    blob = bytearray((work.path / "w1").read_bytes())
    blob[-1] ^= 1
    (work.path / "bad").write_bytes(bytes(blob))
    p = work.vhsm("key", "rewrap", "kek", "-i", "bad", "-o", "out", check=False)
    _one_line_error(p, "decryption failed: wrong key, wrong AAD or tampered data")
    assert not (work.path / "out").exists()
    (work.path / "junk").write_bytes(b"not a blob at all, not at all....")
    p = work.vhsm("key", "rewrap", "kek", "-i", "junk", "-o", "out", check=False)
    _one_line_error(p, "neither a vhsm wrapped key nor a vhsm ciphertext")

    work.vhsm("key", "rotate", "kek")
    work.vhsm("key", "retire", "kek", "--min-version", "2")
    p = work.vhsm("key", "rewrap", "kek", "-i", "w1", "-o", "out", check=False)
    _one_line_error(p, "key kek version 1 is retired or unknown")
    assert not (work.path / "out").exists()
    fails = [e for e in work.events("ENCRYPTION") if e[5] == "FAILURE"]
    assert len(fails) == 3 and all("rewrap failed" in e[4] for e in fails)


@pytest.mark.parametrize("key_type", ["ed25519", "ecdsa-p256", "rsa-3072"])
def test_info_json_versions_and_ssh_fingerprints(work: Work, key_type: str) -> None:
    """Every version with its state, and the fingerprint `ssh-keygen -l` prints for the
    exported public key; a retired version has none left to show."""
    work.vhsm("key", "generate", "k", "--type", key_type)
    work.vhsm("key", "rotate", "k")
    work.vhsm("key", "rotate", "k")
    work.vhsm("key", "retire", "k", "--min-version", "2")
    info = json.loads(work.vhsm("key", "info", "k", "--json").stdout)
    assert (info["name"], info["type"], info["version"], info["min_version"]) == (
        "k",
        key_type,
        3,
        2,
    )
    versions = info["versions"]
    assert [v["version"] for v in versions] == [1, 2, 3]
    assert [(v["state"], v["usable"]) for v in versions] == [
        ("retired", False),
        ("previous", True),
        ("current", True),
    ]
    assert versions[0]["fingerprint"] is None and versions[0]["spki_sha256"] is None
    for v in versions[1:]:
        pem = work.path / f"v{v['version']}.pem"
        work.vhsm("key", "export-public", "k", "--version", str(v["version"]), "-o", pem.name)
        if key_type == "ed25519":  # this ssh-keygen's -i -m PKCS8 knows only RSA and ECDSA
            ssh_pub = _openssh_line(pem)
        else:
            ssh_pub = work.run("ssh-keygen", "-i", "-m", "PKCS8", "-f", str(pem)).stdout
        (work.path / "k.pub").write_text(ssh_pub)
        listed = work.run("ssh-keygen", "-l", "-f", "k.pub").stdout.split()
        assert v["fingerprint"] == listed[1]
        der = serialization.load_pem_public_key(pem.read_bytes()).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert v["spki_sha256"] == hashlib.sha256(der).hexdigest()
    assert versions[1]["fingerprint"] != versions[2]["fingerprint"]


def test_info_json_symmetric_has_no_fingerprint(work: Work) -> None:
    work.vhsm("key", "generate", "kek", "--type", "aes-256-gcm")
    info = json.loads(work.vhsm("key", "info", "kek", "--json").stdout)
    [v] = info["versions"]
    assert set(v) == {"version", "created", "state", "usable"}
    assert (v["state"], v["usable"]) == ("current", True)
