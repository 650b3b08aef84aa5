"""Signature and public key formats standard tools read: SSH signatures checked by
`ssh-keygen -Y`, minisign by `minisign -V`, signify by `signify-openbsd -V`, raw ECDSA/RSA of
files over the protocol's 256 MiB cap by `openssl dgst`; the CLI runs as a subprocess, in-process
and through the real daemon, and streams what it hashes (flat memory for 1 GiB)."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from ksutil import VHSM, Daemon, Work

from keysvc import minisign, sshsig, sshwire

MiB = 1 << 20
ASYMMETRIC = ("ed25519", "ecdsa-p256", "rsa-3072")


def one_line_failure(p: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit 1, one line on stderr naming the problem, no traceback."""
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def sparse(path: Path, size: int, tail: bytes = b"the end\n") -> Path:
    """A file of `size` zero bytes (a hole: no disk, no time) plus a tail that matters."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(size)
        f.write(tail)
    return path


def ssh_verify(work: Work, signers: Path, principal: str, ns: str, sig: Path, data: Path) -> str:
    with open(data, "rb") as stdin:
        p = subprocess.run(
            ["ssh-keygen", "-Y", "verify", "-f", str(signers), "-I", principal, "-n", ns]
            + ["-s", str(sig)],
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=work.path,
        )
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


# --- SSH signatures -------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", ASYMMETRIC)
def test_sshsig_accepted_by_ssh_keygen(work: Work, key_type: str) -> None:
    work.vhsm("key", "generate", "k", "--type", key_type)
    f = work.path / "doc.txt"
    f.write_bytes(b"release 1.0\n" * 1000)
    work.vhsm("key", "sign", "k", "-i", str(f), "-o", "doc.sig", "--format", "sshsig")
    sig = work.path / "doc.sig"
    assert sig.read_text().startswith("-----BEGIN SSH SIGNATURE-----\n")
    work.vhsm(
        "key",
        "export-public",
        "k",
        "--format",
        "allowed-signers",
        "--principal",
        "rel@example",
        "--namespace",
        "file",
        "-o",
        "allowed_signers",
    )
    out = ssh_verify(work, work.path / "allowed_signers", "rel@example", "file", sig, f)
    assert 'Good "file" signature for rel@example' in out
    with open(f, "rb") as stdin:
        novalidate = subprocess.run(
            ["ssh-keygen", "-Y", "check-novalidate", "-n", "file", "-s", str(sig)],
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert novalidate.returncode == 0, novalidate.stderr
    # the fingerprint ssh-keygen reports is the key's (export --format openssh)
    line = work.vhsm("key", "export-public", "k", "--format", "openssh").stdout
    assert line.endswith(" vhsm:k:v1\n")
    (work.path / "k.pub").write_text(line)
    fp = work.run("ssh-keygen", "-l", "-f", "k.pub").stdout.split()[1]
    assert fp in novalidate.stdout + novalidate.stderr
    v = work.vhsm("key", "verify", "k", "-i", str(f), "-s", "doc.sig")
    assert "Signature verified successfully (key k, version 1)" in v.stdout
    # the file changed: ssh-keygen and vhsm both refuse
    f.write_bytes(b"release 1.1\n" * 1000)
    with open(f, "rb") as stdin:
        bad = subprocess.run(
            ["ssh-keygen", "-Y", "verify", "-f", "allowed_signers", "-I", "rel@example"]
            + ["-n", "file", "-s", str(sig)],
            stdin=stdin,
            capture_output=True,
            timeout=60,
            cwd=work.path,
        )
    assert bad.returncode != 0
    one_line_failure(work.vhsm("key", "verify", "k", "-i", str(f), "-s", "doc.sig", check=False))


def test_sshsig_refusals_are_one_line(work: Work) -> None:
    work.vhsm("key", "generate", "k")
    work.vhsm("key", "generate", "other")
    f = work.path / "msg"
    f.write_bytes(b"payload")
    work.vhsm("key", "sign", "k", "-i", "msg", "-o", "s.sig", "--format", "sshsig")
    work.vhsm(
        "key", "sign", "k", "-i", "msg", "-o", "git.sig", "--format", "sshsig", "--namespace", "git"
    )
    text = (work.path / "s.sig").read_text()
    # wrong namespace, in both directions
    p = work.vhsm("key", "verify", "k", "-i", "msg", "-s", "git.sig", check=False)
    one_line_failure(p, "FAILED", "namespace 'git', not 'file'")
    assert (
        "version 1"
        in work.vhsm(
            "key", "verify", "k", "-i", "msg", "-s", "git.sig", "--namespace", "git"
        ).stdout
    )
    # another key's signature
    p = work.vhsm("key", "verify", "other", "-i", "msg", "-s", "s.sig", check=False)
    one_line_failure(p, "FAILED", "not a usable version of other")
    # truncated, garbage, a flipped byte inside the armor, trailing junk
    lines = text.splitlines()
    blob = base64.b64decode("".join(lines[1:-1]))
    flipped = bytearray(blob)
    flipped[-5] ^= 1
    bad_files = {
        "truncated": "\n".join(lines[:2]) + "\n",
        "cut": "\n".join([lines[0], lines[1][:-4], lines[-1]]) + "\n",
        "garbage": "-----BEGIN SSH SIGNATURE-----\n!!!!\n-----END SSH SIGNATURE-----\n",
        "junk": text + "trailing\n",
        "binary": "\x00\x01garbage",
        "flipped": sshsig.BEGIN
        + "\n"
        + base64.b64encode(bytes(flipped)).decode()
        + "\n"
        + sshsig.END
        + "\n",
        "long": sshsig.BEGIN + "\n" + "A" * 70000 + "\n" + sshsig.END + "\n",
    }
    for name, content in bad_files.items():
        (work.path / name).write_text(content)
        p = work.vhsm(
            "key", "verify", "k", "-i", "msg", "-s", name, "--format", "sshsig", check=False
        )
        one_line_failure(p)
    # keys and options that cannot make the format
    work.vhsm("key", "generate", "mac", "--type", "hmac-sha256")
    p = work.vhsm("key", "sign", "mac", "-i", "msg", "--format", "sshsig", check=False)
    one_line_failure(p, "no public key")
    p = work.vhsm("key", "sign", "k", "-i", "msg", "--namespace", "git", check=False)
    one_line_failure(p, "--format sshsig only")
    # the audit log recorded the failures that reached verification
    fails = [e for e in work.events("VERIFY_OPERATION") if e[5] == "FAILURE"]
    assert len(fails) >= 3


def test_sshsig_through_daemon_audit_names_the_digest(
    work: Work, daemon_factory: type[Daemon]
) -> None:
    """Through the real daemon: the signature verifies with ssh-keygen, and the audit lines of
    signing and verifying carry the file's SHA-512 (what `sha512sum` prints)."""
    d = daemon_factory(work).start()
    work.vhsm("key", "generate", "k", "--type", "ecdsa-p256")
    f = work.path / "artifact.tar"
    f.write_bytes(bytes(range(256)) * 4096)
    p = work.vhsm("key", "sign", "k", "-i", str(f), "--format", "sshsig", "--json")
    doc = json.loads(p.stdout)
    assert doc["key"] == "k" and doc["version"] == 1 and doc["format"] == "sshsig"
    (work.path / "a.sig").write_text(doc["signature"])
    work.vhsm("key", "export-public", "k", "--format", "allowed-signers", "-o", "signers")
    ssh_verify(work, work.path / "signers", "k", "file", work.path / "a.sig", f)
    work.vhsm("key", "verify", "k", "-i", str(f), "-s", "a.sig")
    status = work.vhsm("keysvc", "status", "--socket", str(d.sock)).stdout
    assert int(status.split("requests: ")[1].split()[0]) >= 6  # really through the daemon
    digest = hashlib.sha512(f.read_bytes()).hexdigest()
    signed = [e for e in work.events("SIGN_OPERATION") if digest in e[4]]
    verified = [e for e in work.events("VERIFY_OPERATION") if digest in e[4]]
    assert len(signed) == 1 and "SSHSIG namespace 'file' sha512" in signed[0][4]
    assert len(verified) == 1 and verified[0][5] == "SUCCESS"
    assert work.vhsm("audit", "verify").returncode == 0


def test_sshsig_one_gib_with_flat_memory(work: Work, tmp_path: Path) -> None:
    """1 GiB signed and verified in 1 MiB reads: the CLI's peak RSS stays far below the file."""
    work.vhsm("key", "generate", "k")
    big = sparse(tmp_path / "big.img", 1 << 30)
    wrapper = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[1:])\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(r.returncode)\n"
    )

    def peak_kib(*args: str) -> int:
        p = work.run(sys.executable, "-c", wrapper, VHSM, *args)
        return int(p.stderr.strip().splitlines()[-1])

    sign_peak = peak_kib("key", "sign", "k", "-i", str(big), "-o", "big.sig", "--format", "sshsig")
    verify_peak = peak_kib("key", "verify", "k", "-i", str(big), "-s", "big.sig")
    assert sign_peak < 100 * 1024 and verify_peak < 100 * 1024, (sign_peak, verify_peak)
    work.vhsm("key", "export-public", "k", "--format", "allowed-signers", "-o", "signers")
    ssh_verify(work, work.path / "signers", "k", "file", work.path / "big.sig", big)


# --- minisign and signify -------------------------------------------------------------------


def test_minisign_accepted_by_minisign(work: Work) -> None:
    work.vhsm("key", "generate", "k")
    f = work.path / "release.tar"
    f.write_bytes(b"\x00binary\xff" * 50000)
    work.vhsm("key", "export-public", "k", "--format", "minisign", "-o", "k.pub")
    kid, pk = minisign.parse_public_key((work.path / "k.pub").read_bytes())
    assert (work.path / "k.pub").read_text().splitlines()[0] == (
        f"untrusted comment: minisign public key {minisign.key_id_text(kid)}"
    )
    assert kid == hashlib.sha256(pk).digest()[:8]  # the documented derivation
    work.vhsm("key", "sign", "k", "-i", str(f), "-o", "release.tar.minisig", "--format", "minisign")
    sig = minisign.parse_signature((work.path / "release.tar.minisig").read_bytes())
    assert sig.algorithm == b"ED" and sig.key_id == kid
    assert sig.trusted_comment is not None
    assert sig.trusted_comment.endswith("file:release.tar vhsm key:k v1")
    ok = work.run("minisign", "-V", "-p", "k.pub", "-m", str(f))
    assert "vhsm key:k v1" in ok.stdout
    assert (
        "Trusted comment: timestamp:"
        in work.vhsm("key", "verify", "k", "-i", str(f), "-s", "release.tar.minisig").stdout
    )
    # a chosen trusted comment, after a rotation: signed by v2, the v1 signature still verifies
    work.vhsm("key", "rotate", "k")
    work.vhsm(
        "key",
        "sign",
        "k",
        "-i",
        str(f),
        "-o",
        "v2.minisig",
        "--format",
        "minisign",
        "--trusted-comment",
        "build 42",
    )
    work.vhsm("key", "export-public", "k", "--format", "minisign", "-o", "k2.pub")
    ok2 = work.run("minisign", "-V", "-p", "k2.pub", "-m", str(f), "-x", "v2.minisig")
    assert "Trusted comment: build 42" in ok2.stdout
    assert (
        "version 1"
        in work.vhsm("key", "verify", "k", "-i", str(f), "-s", "release.tar.minisig").stdout
    )
    assert "version 2" in work.vhsm("key", "verify", "k", "-i", str(f), "-s", "v2.minisig").stdout
    wrong_key = work.run(
        "minisign", "-V", "-p", "k.pub", "-m", str(f), "-x", "v2.minisig", check=False
    )
    assert wrong_key.returncode != 0
    # tampered file, edited trusted comment, ECDSA key: refused in one line
    text = (work.path / "v2.minisig").read_text()
    (work.path / "edited.minisig").write_text(text.replace("build 42", "build 43"))
    p = work.vhsm("key", "verify", "k", "-i", str(f), "-s", "edited.minisig", check=False)
    one_line_failure(p, "FAILED")
    f.write_bytes(b"changed")
    p = work.vhsm("key", "verify", "k", "-i", str(f), "-s", "v2.minisig", check=False)
    one_line_failure(p, "FAILED")
    assert (
        work.run(
            "minisign", "-V", "-p", "k2.pub", "-m", str(f), "-x", "v2.minisig", check=False
        ).returncode
        != 0
    )
    work.vhsm("key", "generate", "ec", "--type", "ecdsa-p256")
    for args in (
        ["sign", "ec", "-i", str(f), "--format", "minisign"],
        ["export-public", "ec", "--format", "minisign"],
    ):
        one_line_failure(work.vhsm("key", *args, check=False), "Ed25519")


def test_signify_accepted_by_signify(work: Work) -> None:
    work.vhsm("key", "generate", "k")
    f = work.path / "SHA256"
    f.write_text("SHA256 (base.tgz) = abc\n")
    work.vhsm("key", "export-public", "k", "--format", "signify", "-o", "k.pub")
    work.vhsm("key", "sign", "k", "-i", str(f), "-o", "SHA256.sig", "--format", "signify")
    ok = work.run("signify-openbsd", "-V", "-p", "k.pub", "-m", str(f), "-x", "SHA256.sig")
    assert "Signature Verified" in ok.stdout
    assert "version 1" in work.vhsm("key", "verify", "k", "-i", str(f), "-s", "SHA256.sig").stdout
    f.write_text("SHA256 (base.tgz) = abd\n")
    p = work.vhsm("key", "verify", "k", "-i", str(f), "-s", "SHA256.sig", check=False)
    one_line_failure(p, "FAILED")


# --- raw signatures over the cap ------------------------------------------------------------


def test_raw_ecdsa_rsa_any_size_ed25519_capped(work: Work, tmp_path: Path) -> None:
    """300 MiB: ECDSA and RSA are hashed by the CLI and checked by `openssl dgst`; Ed25519 must
    send the whole message, so it is refused above the cap, with the way out."""
    big = sparse(tmp_path / "big.bin", 300 * MiB)
    digest = hashlib.sha256()
    with open(big, "rb") as fh:
        while chunk := fh.read(8 * MiB):
            digest.update(chunk)
    for kt in ("ecdsa-p256", "rsa-3072"):
        work.vhsm("key", "generate", kt, "--type", kt)
        work.vhsm("key", "sign", kt, "-i", str(big), "-o", f"{kt}.sig")
        work.vhsm("key", "export-public", kt, "-o", f"{kt}.pem")
        p = work.run(
            "openssl",
            "dgst",
            "-sha256",
            "-verify",
            f"{kt}.pem",
            "-signature",
            f"{kt}.sig",
            str(big),
        )
        assert "Verified OK" in p.stdout
        assert (
            "version 1" in work.vhsm("key", "verify", kt, "-i", str(big), "-s", f"{kt}.sig").stdout
        )
        last = work.events("VERIFY_OPERATION")[-1]
        assert f"sha256 digest {digest.hexdigest()}" in last[4]
    # Ed25519: a small file is signed as before (64 raw bytes, also in --json), a big one not
    work.hsm("-generate_key_pair", "ed")
    small = work.path / "small"
    small.write_bytes(b"x" * 5000)
    work.hsm("-sign", "ed", "-i", str(small), "-o", "small.sig")
    assert len((work.path / "small.sig").read_bytes()) == 64
    doc = json.loads(work.vhsm("key", "sign", "ed", "-i", str(small), "--json").stdout)
    assert base64.b64decode(doc["signature"]) == (work.path / "small.sig").read_bytes()
    assert (doc["format"], doc["version"]) == ("raw", 1)
    p = work.vhsm("key", "sign", "ed", "-i", str(big), "-o", "ed.sig", check=False)
    one_line_failure(p, "256 MiB", "--format sshsig")
    assert not (work.path / "ed.sig").exists()
    p = work.hsm("-sign", "ed", "-i", str(big), "-o", "ed.sig", check=False)
    one_line_failure(p, "256 MiB")


# --- exported public keys -------------------------------------------------------------------


def test_export_formats(work: Work) -> None:
    work.vhsm("key", "generate", "k")
    work.vhsm("key", "rotate", "k")
    pem = work.vhsm("key", "export-public", "k").stdout
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")  # the default is unchanged
    for v in ("1", "2"):
        line = work.vhsm("key", "export-public", "k", "--format", "openssh", "--version", v).stdout
        (work.path / f"v{v}.pub").write_text(line)
        out = work.run("ssh-keygen", "-l", "-f", f"v{v}.pub").stdout
        assert out.split()[2] == f"vhsm:k:v{v}" and "(ED25519)" in out
    signers = work.vhsm("key", "export-public", "k", "--format", "allowed-signers").stdout
    rows = signers.splitlines()
    assert len(rows) == 2 and all(r.startswith("k ssh-ed25519 ") for r in rows)
    assert "namespaces=" not in signers  # no --namespace: trusted for any namespace
    one = work.vhsm(
        "key",
        "export-public",
        "k",
        "--format",
        "allowed-signers",
        "--version",
        "1",
        "--principal",
        "ci@example",
        "--namespace",
        "file",
        "--namespace",
        "git",
    )
    assert one.stdout.startswith('ci@example namespaces="file,git" ssh-ed25519 ')
    assert one.stdout.count("\n") == 1 and one.stdout.endswith(" vhsm:k:v1\n")
    # ssh-keygen reads the allowed_signers file: find-principals names the principal
    work.vhsm("key", "sign", "k", "-i", "v1.pub", "-o", "s.sig", "--format", "sshsig")
    (work.path / "signers").write_text(signers)
    fp = work.run("ssh-keygen", "-Y", "find-principals", "-f", "signers", "-s", "s.sig")
    assert fp.stdout.strip() == "k"
    for bad in (["--principal", "a b"], ["--namespace", 'x"y'], ["--principal", "a,b"]):
        p = work.vhsm("key", "export-public", "k", "--format", "allowed-signers", *bad, check=False)
        one_line_failure(p)
    p = work.vhsm("key", "export-public", "k", "--principal", "p", check=False)
    one_line_failure(p, "allowed-signers")


# --- the format modules on hostile input ----------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"-----BEGIN SSH SIGNATURE-----\n-----END SSH SIGNATURE-----\n",
        b"-----BEGIN SSH SIGNATURE-----\nU1NIU0lH\n-----END SSH SIGNATURE-----\n",
        b"-----BEGIN SSH SIGNATURE-----\n"
        + base64.b64encode(b"SSHSIG\x00\x00\x00\x02")
        + b"\n-----END SSH SIGNATURE-----\n",
        b"-----BEGIN SSH SIGNATURE-----\n"
        + base64.b64encode(b"SSHSIG\x00\x00\x00\x01\xff\xff")
        + b"\n-----END SSH SIGNATURE-----\n",
    ],
)
def test_sshsig_hostile_armor(text: bytes) -> None:
    with pytest.raises(sshwire.SshWireError):
        sshsig.dearmor(text)


def test_sshsig_round_trip_and_signed_data() -> None:
    sig = sshsig.Signature(b"pk", "file", "sha512", b"sig")
    assert sshsig.dearmor(sshsig.armor(sig).encode()) == sig
    digest = hashlib.sha512(b"m").digest()
    data = sshsig.signed_data("file", "sha512", digest)
    assert sshsig.parse_signed_data(data) == ("file", "sha512", digest)
    with pytest.raises(sshwire.SshWireError):
        sshsig.signed_data("", "sha512", digest)  # a namespace is mandatory
    with pytest.raises(sshwire.SshWireError):
        sshsig.signed_data("file", "sha512", digest[:32])


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"untrusted comment: x\n",
        b"untrusted comment: x\nRUQ=\n",
        b"untrusted comment: x\n" + base64.b64encode(b"XX" + bytes(72)) + b"\n",
        b"untrusted comment: x\n" + base64.b64encode(b"ED" + bytes(72)) + b"\n",  # no comment
        b"untrusted comment: x\n"
        + base64.b64encode(b"ED" + bytes(72))
        + b"\nnot trusted: y\n"
        + base64.b64encode(bytes(64))
        + b"\n",
        b"untrusted comment: x\n"
        + base64.b64encode(b"ED" + bytes(72))
        + b"\ntrusted comment: y\n"
        + base64.b64encode(bytes(63))
        + b"\n",
    ],
)
def test_minisign_hostile_signatures(text: bytes) -> None:
    with pytest.raises(minisign.MinisignError):
        minisign.parse_signature(text)


def test_minisign_key_id_text_matches_minisign(tmp_path: Path) -> None:
    """minisign's own public key file: its comment prints the id as key_id_text does."""
    subprocess.run(
        ["minisign", "-G", "-W", "-p", "m.pub", "-s", "m.key"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=30,
    )
    text = (tmp_path / "m.pub").read_bytes()
    kid, _ = minisign.parse_public_key(text)
    assert text.decode().splitlines()[0].endswith(" " + minisign.key_id_text(kid))
