"""SSH signatures (OpenSSH PROTOCOL.sshsig): what `ssh-keygen -Y sign` writes and
`ssh-keygen -Y verify` / `-Y check-novalidate` read.

Only the format, no I/O and no keys: the caller hashes the message (streaming, so any size
works), asks the key service to sign `signed_data(...)` and wraps the result with `encode`.

    signed data:  byte[6] "SSHSIG", string namespace, string reserved, string hash_algorithm,
                  string H(message)
    signature:    byte[6] "SSHSIG", uint32 1, string publickey, string namespace,
                  string reserved, string hash_algorithm, string signature
    armored:      -----BEGIN SSH SIGNATURE----- / base64, 70 columns / -----END SSH SIGNATURE-----

The key signs the signed data with its own SSH signature algorithm (sshwire): Ed25519 signs it
as is, ECDSA P-256 over SHA-256, RSA as rsa-sha2-512 (what ssh-keygen uses for RSA keys).
Parsing is strict and bounded (a signature file comes from anyone): SshWireError, one line.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from keysvc.sshwire import Reader, SshWireError, string, uint32

MAGIC = b"SSHSIG"
VERSION = 1
BEGIN = "-----BEGIN SSH SIGNATURE-----"
END = "-----END SSH SIGNATURE-----"
HASHES = ("sha256", "sha512")  # the two PROTOCOL.sshsig allows
DEFAULT_HASH = "sha512"  # what ssh-keygen writes
MAX_ARMORED = 64 * 1024  # an RSA-3072 signature armors to ~1.1 KiB
MAX_NAMESPACE = 256
_WIDTH = 70  # ssh-keygen's line width


@dataclass(frozen=True, slots=True)
class Signature:
    public_key: bytes  # SSH wire blob of the signer's public key
    namespace: str
    hash_algorithm: str
    signature: bytes  # SSH signature blob (sshwire.signature_blob)
    reserved: bytes = b""


def check_namespace(namespace: str) -> str:
    """A namespace is mandatory in PROTOCOL.sshsig (ssh-keygen refuses an empty one)."""
    if not namespace or len(namespace.encode()) > MAX_NAMESPACE:
        raise SshWireError(f"a namespace is 1-{MAX_NAMESPACE} bytes")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in namespace):
        raise SshWireError("a namespace has no control characters")
    return namespace


def new_hash(name: str = DEFAULT_HASH) -> hashlib._Hash:
    if name not in HASHES:
        raise SshWireError(f"unsupported SSHSIG hash algorithm {name!r}")
    return hashlib.new(name)


def signed_data(namespace: str, hash_algorithm: str, digest: bytes, reserved: bytes = b"") -> bytes:
    """What the key signs: the namespace and the message's digest, never the message."""
    if len(digest) != new_hash(hash_algorithm).digest_size:
        raise SshWireError("digest length does not match the hash algorithm")
    return (
        MAGIC
        + string(check_namespace(namespace).encode())
        + string(reserved)
        + string(hash_algorithm.encode())
        + string(digest)
    )


def parse_signed_data(data: bytes) -> tuple[str, str, bytes]:
    """(namespace, hash algorithm, digest) of what `signed_data` built; SshWireError if `data`
    is anything else. Lets the key service's audit line name the file's digest."""
    if data[: len(MAGIC)] != MAGIC:
        raise SshWireError("not SSHSIG signed data")
    r = Reader(data[len(MAGIC) :])
    namespace = check_namespace(r.text(MAX_NAMESPACE))
    r.string(4096)  # reserved
    hash_algorithm = r.text(64)
    digest = r.string(64)
    r.end()
    if len(digest) != new_hash(hash_algorithm).digest_size:
        raise SshWireError("digest length does not match the hash algorithm")
    return namespace, hash_algorithm, digest


def encode(sig: Signature) -> bytes:
    return (
        MAGIC
        + uint32(VERSION)
        + string(sig.public_key)
        + string(sig.namespace.encode())
        + string(sig.reserved)
        + string(sig.hash_algorithm.encode())
        + string(sig.signature)
    )


def decode(blob: bytes) -> Signature:
    if blob[: len(MAGIC)] != MAGIC:
        raise SshWireError("not an SSH signature (no SSHSIG magic)")
    r = Reader(blob[len(MAGIC) :])
    version = r.uint32()
    if version != VERSION:
        raise SshWireError(f"unsupported SSH signature version {version}")
    public_key = r.string(16384)
    try:
        namespace = check_namespace(r.text(MAX_NAMESPACE))
    except SshWireError as e:
        raise SshWireError(f"bad namespace in SSH signature: {e}") from None
    reserved = r.string(4096)
    hash_algorithm = r.text(64)
    new_hash(hash_algorithm)
    signature = r.string(4096)
    r.end()
    return Signature(public_key, namespace, hash_algorithm, signature, reserved)


def armor(sig: Signature) -> str:
    b64 = base64.b64encode(encode(sig)).decode("ascii")
    lines = [b64[i : i + _WIDTH] for i in range(0, len(b64), _WIDTH)]
    return "\n".join([BEGIN, *lines, END]) + "\n"


def is_armored(text: bytes) -> bool:
    return text.lstrip().startswith(BEGIN.encode())


def dearmor(text: bytes) -> Signature:
    """The signature in an armored file: exactly one BEGIN/END block, base64 between,
    nothing but blank lines around it."""
    if len(text) > MAX_ARMORED:
        raise SshWireError("SSH signature file too large")
    try:
        lines = [ln.strip() for ln in text.decode("ascii").splitlines()]
    except UnicodeDecodeError:
        raise SshWireError("SSH signature file is not ASCII") from None
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    if len(lines) < 3 or lines[0] != BEGIN or lines[-1] != END:
        raise SshWireError("not an armored SSH signature (BEGIN/END SSH SIGNATURE lines)")
    body = "".join(lines[1:-1])
    try:
        blob = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise SshWireError("SSH signature is not valid base64") from None
    return decode(blob)
