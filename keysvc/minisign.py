"""minisign and signify files (https://jedisct1.github.io/minisign/, OpenBSD signify(1)):
public keys and signatures of Ed25519 keys. Only the format, no I/O and no keys.

    public key:  untrusted comment: <text>
                 base64("Ed" || key id (8 bytes) || Ed25519 public key (32 bytes))
    signature:   untrusted comment: <text>
                 base64(algorithm (2 bytes) || key id (8 bytes) || Ed25519 signature (64 bytes))
                 trusted comment: <text>                                 (minisign only)
                 base64(Ed25519 signature of signature || trusted comment) (minisign only)

Algorithm "ED" (minisign's default): the Ed25519 signature is over BLAKE2b-512 of the file, so
the signer streams the file through the hash and only 64 bytes are signed. "Ed" (minisign's
legacy mode, and the only one signify knows): over the file itself. signify files are the first
two lines only.

Key ids: minisign and signify pick 8 random bytes when they make a key. A key service key has
no such bytes, so the id is derived: the first 8 bytes of SHA-256 of the raw 32-byte public key
(`key_id`). Each key version thus has its own stable id, and a signature's id tells which
version made it. minisign prints an id as the hexadecimal of those 8 bytes read as a
little-endian integer (`key_id_text`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

PREHASHED = b"ED"
LEGACY = b"Ed"
KEY_ID_SIZE = 8
MAX_COMMENT = 1023  # minisign: COMMENTMAXBYTES 1024 with the NUL
MAX_TRUSTED_COMMENT = 8191  # minisign: TRUSTEDCOMMENTMAXBYTES 8192 with the NUL
MAX_FILE = 16 * 1024  # a signature file with both comments at their limits is ~9.4 KiB
UNTRUSTED = "untrusted comment: "
TRUSTED = "trusted comment: "


class MinisignError(ValueError):
    """A malformed minisign or signify file (one line)."""


@dataclass(frozen=True, slots=True)
class Signature:
    algorithm: bytes  # PREHASHED or LEGACY
    key_id: bytes
    signature: bytes
    untrusted_comment: str
    trusted_comment: str | None = None  # None: a signify file (two lines)
    global_signature: bytes | None = None


def key_id(public_key: bytes) -> bytes:
    """The derived key id of a raw Ed25519 public key (see the module docstring)."""
    if len(public_key) != 32:
        raise MinisignError("an Ed25519 public key is 32 bytes")
    return hashlib.sha256(public_key).digest()[:KEY_ID_SIZE]


def key_id_text(kid: bytes) -> str:
    """The id as minisign prints it (printf %016llX of the little-endian number)."""
    return f"{int.from_bytes(kid, 'little'):016X}"


def new_hash() -> hashlib._Hash:
    """The prehash of algorithm "ED" (libsodium crypto_generichash, 64-byte output)."""
    return hashlib.blake2b(digest_size=64)


def check_comment(text: str, limit: int, what: str) -> str:
    if "\n" in text or "\r" in text:
        raise MinisignError(f"a {what} is one line")
    if len(text.encode()) > limit:
        raise MinisignError(f"a {what} is at most {limit} bytes")
    return text


def global_signed(signature: bytes, trusted_comment: str) -> bytes:
    """What the global signature covers: the file signature, then the trusted comment."""
    return (
        signature + check_comment(trusted_comment, MAX_TRUSTED_COMMENT, "trusted comment").encode()
    )


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def public_key_file(public_key: bytes, untrusted_comment: str | None = None) -> str:
    kid = key_id(public_key)
    comment = untrusted_comment or f"minisign public key {key_id_text(kid)}"
    check_comment(comment, MAX_COMMENT, "comment")
    return f"{UNTRUSTED}{comment}\n{_b64(LEGACY + kid + public_key)}\n"


def signature_file(sig: Signature) -> str:
    check_comment(sig.untrusted_comment, MAX_COMMENT, "comment")
    if len(sig.key_id) != KEY_ID_SIZE or len(sig.signature) != 64:
        raise MinisignError("a signature is an 8-byte key id and 64 bytes")
    out = (
        f"{UNTRUSTED}{sig.untrusted_comment}\n{_b64(sig.algorithm + sig.key_id + sig.signature)}\n"
    )
    if sig.trusted_comment is None:
        if sig.algorithm != LEGACY:
            raise MinisignError("a signify signature signs the file itself (Ed)")
        return out
    if sig.global_signature is None or len(sig.global_signature) != 64:
        raise MinisignError("a minisign signature needs a 64-byte global signature")
    check_comment(sig.trusted_comment, MAX_TRUSTED_COMMENT, "trusted comment")
    return out + f"{TRUSTED}{sig.trusted_comment}\n{_b64(sig.global_signature)}\n"


def is_minisign(text: bytes) -> bool:
    return text.startswith(UNTRUSTED.encode())


def _decode_b64(line: str, size: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise MinisignError(f"{what} is not valid base64") from None
    if len(raw) != size:
        raise MinisignError(f"{what} has the wrong length")
    return raw


def _lines(text: bytes) -> list[str]:
    if len(text) > MAX_FILE:
        raise MinisignError("minisign file too large")
    try:
        lines = text.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        raise MinisignError("minisign file is not UTF-8") from None
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def parse_signature(text: bytes) -> Signature:
    """A minisign (four lines) or signify (two lines) signature file."""
    lines = _lines(text)
    if len(lines) not in (2, 4) or not lines[0].startswith(UNTRUSTED):
        raise MinisignError("not a minisign or signify signature (2 or 4 lines)")
    raw = _decode_b64(lines[1], 2 + KEY_ID_SIZE + 64, "signature")
    alg, kid, sig = raw[:2], raw[2:10], raw[10:]
    if alg not in (PREHASHED, LEGACY):
        raise MinisignError(f"unsupported signature algorithm {alg!r}")
    untrusted = lines[0][len(UNTRUSTED) :]
    if len(lines) == 2:
        if alg != LEGACY:
            raise MinisignError("a prehashed (ED) signature needs its trusted comment")
        return Signature(alg, kid, sig, untrusted)
    if not lines[2].startswith(TRUSTED):
        raise MinisignError("third line is not a trusted comment")
    trusted = check_comment(lines[2][len(TRUSTED) :], MAX_TRUSTED_COMMENT, "trusted comment")
    glob = _decode_b64(lines[3], 64, "global signature")
    return Signature(alg, kid, sig, untrusted, trusted, glob)


def parse_public_key(text: bytes) -> tuple[bytes, bytes]:
    """(key id, raw public key) of a minisign or signify public key file."""
    lines = _lines(text)
    if len(lines) != 2 or not lines[0].startswith(UNTRUSTED):
        raise MinisignError("not a minisign or signify public key (2 lines)")
    raw = _decode_b64(lines[1], 2 + KEY_ID_SIZE + 32, "public key")
    if raw[:2] != LEGACY:
        raise MinisignError("not an Ed25519 public key")
    return raw[2:10], raw[10:]
