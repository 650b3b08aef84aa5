"""The SSH wire encoding (RFC 4251 section 5) of public keys and signatures, for the formats that
carry them: OpenSSH public keys, SSHSIG signatures (PROTOCOL.sshsig) and the ssh-agent protocol
(draft-miller-ssh-agent). Only what those need: strings, uint32, mpints, and the key and
signature blobs of the three asymmetric key types the key service holds.

Parsing is strict and bounded (everything here may come from an attacker): a length that runs
past the end, trailing bytes or a negative mpint raise SshWireError (one line).

Signature blobs, per key type (RFC 8709, RFC 5656, RFC 8332):

- ed25519     string "ssh-ed25519",          string sig (64 bytes)
- ecdsa-p256  string "ecdsa-sha2-nistp256",  string (mpint r || mpint s)   over SHA-256
- rsa-3072    string "rsa-sha2-256" / "rsa-sha2-512", string sig (PKCS#1 v1.5)
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from keysvc import keytypes

# the SSH algorithm name of each key type's public key
KEY_ALGORITHMS = {
    keytypes.ED25519: "ssh-ed25519",
    keytypes.ECDSA_P256: "ecdsa-sha2-nistp256",
    keytypes.RSA_3072: "ssh-rsa",
}
# signature algorithm name -> (key type, hash the daemon signs with)
SIGNATURE_ALGORITHMS = {
    "ssh-ed25519": (keytypes.ED25519, None),
    "ecdsa-sha2-nistp256": (keytypes.ECDSA_P256, "sha256"),
    "rsa-sha2-256": (keytypes.RSA_3072, "sha256"),
    "rsa-sha2-512": (keytypes.RSA_3072, "sha512"),
}
MAX_STRING = 1 << 20  # far above any key or signature; bounds what one field may claim


class SshWireError(ValueError):
    """Malformed SSH wire data."""


def string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def uint32(n: int) -> bytes:
    return struct.pack(">I", n)


def mpint(n: int) -> bytes:
    """RFC 4251 mpint of a non-negative integer: big-endian, a leading zero byte when the top
    bit is set, zero as the empty string."""
    if n < 0:
        raise SshWireError("negative mpint")
    if n == 0:
        return string(b"")
    raw = n.to_bytes((n.bit_length() + 8) // 8, "big")  # one spare bit keeps it positive
    return string(raw)


class Reader:
    """Reads fields from a bytes buffer; every read is bounded by what is left."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def uint32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise SshWireError("truncated uint32")
        (n,) = struct.unpack_from(">I", self.data, self.pos)
        self.pos += 4
        return int(n)

    def byte(self) -> int:
        if self.pos + 1 > len(self.data):
            raise SshWireError("truncated byte")
        self.pos += 1
        return int(self.data[self.pos - 1])

    def string(self, limit: int = MAX_STRING) -> bytes:
        n = self.uint32()
        if n > limit or self.pos + n > len(self.data):
            raise SshWireError("string length out of range")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def text(self, limit: int = 4096) -> str:
        try:
            return self.string(limit).decode("utf-8")
        except UnicodeDecodeError:
            raise SshWireError("name is not UTF-8") from None

    def mpint(self) -> int:
        raw = self.string(16384)
        if raw and raw[0] & 0x80:
            raise SshWireError("negative mpint")
        if len(raw) > 1 and raw[0] == 0 and not raw[1] & 0x80:
            raise SshWireError("mpint with a superfluous leading zero")
        return int.from_bytes(raw, "big")

    def rest(self) -> bytes:
        out = bytes(self.data[self.pos :])
        self.pos = len(self.data)
        return out

    def end(self) -> None:
        if self.pos != len(self.data):
            raise SshWireError("trailing bytes")


def public_key_type(public_key: Any) -> str:
    """The key type (keytypes.*) of a cryptography public key object."""
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return keytypes.ED25519
    if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(
        public_key.curve, ec.SECP256R1
    ):
        return keytypes.ECDSA_P256
    if isinstance(public_key, rsa.RSAPublicKey):
        return keytypes.RSA_3072
    raise SshWireError("unsupported public key type")


def public_line(public_key: Any) -> str:
    """`<algorithm> <base64 blob>` (an authorized_keys / .pub line without comment)."""
    return public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode("ascii")


def public_blob(public_key: Any) -> bytes:
    """The SSH wire blob of a public key (what `ssh-keygen -l` fingerprints)."""
    return base64.b64decode(public_line(public_key).split()[1])


def load_public_blob(blob: bytes) -> Any:
    """A cryptography public key from its SSH wire blob (Ed25519, ECDSA P-256 or RSA)."""
    r = Reader(blob)
    alg = r.text(64)
    if alg not in KEY_ALGORITHMS.values():
        raise SshWireError(f"unsupported SSH key algorithm {alg!r}")
    try:
        key = serialization.load_ssh_public_key(alg.encode() + b" " + base64.b64encode(blob))
    except (ValueError, TypeError):
        raise SshWireError("malformed SSH public key") from None
    public_key_type(key)
    return key


def fingerprint(public_key: Any) -> str:
    """`SHA256:<unpadded base64>`, as `ssh-keygen -l` prints it."""
    digest = hashlib.sha256(public_blob(public_key)).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def signature_algorithm(key_type: str, rsa_hash: str = "sha512") -> str:
    """The signature algorithm name for a key type (RSA: by hash)."""
    if key_type == keytypes.RSA_3072:
        return "rsa-sha2-512" if rsa_hash == "sha512" else "rsa-sha2-256"
    try:
        return KEY_ALGORITHMS[key_type]
    except KeyError:
        raise SshWireError(f"a {key_type} key has no SSH signature") from None


def signature_blob(algorithm: str, raw: bytes) -> bytes:
    """The SSH signature blob from a signature as keytypes.sign returns it (ECDSA: DER)."""
    if algorithm == "ecdsa-sha2-nistp256":
        r, s = decode_dss_signature(raw)
        return string(algorithm.encode()) + string(mpint(r) + mpint(s))
    if algorithm not in SIGNATURE_ALGORITHMS:
        raise SshWireError(f"unsupported SSH signature algorithm {algorithm!r}")
    return string(algorithm.encode()) + string(raw)


def parse_signature_blob(blob: bytes) -> tuple[str, bytes]:
    """(algorithm, signature as keytypes.verify takes it: ECDSA as DER)."""
    r = Reader(blob)
    alg = r.text(64)
    if alg not in SIGNATURE_ALGORITHMS:
        raise SshWireError(f"unsupported SSH signature algorithm {alg!r}")
    sig = r.string(4096)
    r.end()
    if alg == "ecdsa-sha2-nistp256":
        inner = Reader(sig)
        rr, ss = inner.mpint(), inner.mpint()
        inner.end()
        return alg, encode_dss_signature(rr, ss)
    if alg == "ssh-ed25519" and len(sig) != 64:
        raise SshWireError("an Ed25519 signature is 64 bytes")
    return alg, sig
