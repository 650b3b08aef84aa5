"""The SSH wire encoding against ssh-keygen, and prehashed signing against the plain one."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from keysvc import keytypes, sshwire
from keysvc.errors import InvalidInputError

TYPES = (keytypes.ED25519, keytypes.ECDSA_P256, keytypes.RSA_3072)


@pytest.fixture(scope="module")
def keys() -> dict[str, object]:
    return {t: keytypes.load(t, keytypes.generate(t)) for t in TYPES}


@pytest.mark.parametrize("kt", TYPES)
def test_public_line_and_fingerprint_match_ssh_keygen(
    kt: str, keys: dict[str, object], tmp_path: Path
) -> None:
    pub = keys[kt].public_key()  # type: ignore[attr-defined]
    f = tmp_path / "k.pub"
    f.write_text(sshwire.public_line(pub) + " test\n")
    out = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(f)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert out.split()[1] == sshwire.fingerprint(pub)
    blob = sshwire.public_blob(pub)
    assert sshwire.public_line(sshwire.load_public_blob(blob)) == sshwire.public_line(pub)
    assert sshwire.public_key_type(pub) == kt


@pytest.mark.parametrize("kt", TYPES)
def test_signature_blob_round_trip(kt: str, keys: dict[str, object]) -> None:
    k = keys[kt]
    alg = sshwire.signature_algorithm(kt, "sha512")
    h = sshwire.SIGNATURE_ALGORITHMS[alg][1]
    raw = keytypes.sign(kt, k, b"message", h)
    got_alg, got = sshwire.parse_signature_blob(sshwire.signature_blob(alg, raw))
    assert got_alg == alg
    assert keytypes.verify(kt, k, b"message", got, h)
    assert not keytypes.verify(kt, k, b"other", got, h)
    if kt == keytypes.ECDSA_P256:  # r and s as mpints: a high bit gets a leading zero
        r, s = decode_dss_signature(raw)
        assert sshwire.mpint(r)[4:] == r.to_bytes((r.bit_length() + 8) // 8, "big")


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x00\x00\x00",
        b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x40" + b"x" * 63,  # truncated
        b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x03abc",  # wrong length
        b"\x00\x00\x00\x07ssh-dss\x00\x00\x00\x00",
        b"\xff\xff\xff\xff",
        b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x40" + b"x" * 64 + b"junk",
    ],
)
def test_hostile_signature_blobs_refused(blob: bytes) -> None:
    with pytest.raises(sshwire.SshWireError):
        sshwire.parse_signature_blob(blob)


def test_hostile_mpints_refused() -> None:
    with pytest.raises(sshwire.SshWireError):
        sshwire.Reader(sshwire.string(b"\x80")).mpint()  # negative
    with pytest.raises(sshwire.SshWireError):
        sshwire.Reader(sshwire.string(b"\x00\x01")).mpint()  # superfluous zero
    with pytest.raises(sshwire.SshWireError):
        sshwire.load_public_blob(sshwire.string(b"ssh-ed25519") + sshwire.string(b"short"))


@pytest.mark.parametrize(
    ("kt", "h"),
    [(keytypes.ECDSA_P256, "sha256"), (keytypes.RSA_3072, "sha256"), (keytypes.RSA_3072, "sha512")],
)
def test_prehashed_signature_is_the_plain_one(kt: str, h: str, keys: dict[str, object]) -> None:
    k = keys[kt]
    msg = b"a large file" * 1000
    digest = hashlib.new(h, msg).digest()
    sig = keytypes.sign(kt, k, digest, h, prehashed=True)
    assert keytypes.verify(kt, k, msg, sig, h)
    assert keytypes.verify(kt, k, digest, sig, h, prehashed=True)
    assert not keytypes.verify(kt, k, hashlib.new(h, b"x").digest(), sig, h, prehashed=True)
    with pytest.raises(InvalidInputError):
        keytypes.sign(kt, k, digest[:-1], h, prehashed=True)


def test_hash_choices_refused_where_a_type_has_none(keys: dict[str, object]) -> None:
    with pytest.raises(InvalidInputError):
        keytypes.sign(keytypes.ED25519, keys[keytypes.ED25519], b"m", prehashed=True)
    with pytest.raises(InvalidInputError):
        keytypes.sign(keytypes.ECDSA_P256, keys[keytypes.ECDSA_P256], b"m", "sha512")
    with pytest.raises(InvalidInputError):
        keytypes.sign(keytypes.RSA_3072, keys[keytypes.RSA_3072], b"m", "md5")
