"""Binary layout of a token's metadata file and of encrypted chunk records (docs/FORMAT.md).

Everything here is pure: bytes in, values out. No keys, no I/O.
"""

from __future__ import annotations

import hashlib
import json
import struct
import uuid
from dataclasses import dataclass, field
from typing import Any

from vhsmfs.errors import IntegrityError, StoreError

MAGIC = b"VHSMTOK\x00"
FORMAT_VERSION = 1
CHUNK_AAD_MAGIC = b"VHSMCHK\x00"

NONCE_LEN = 12
TAG_LEN = 16
RECORD_OVERHEAD = NONCE_LEN + TAG_LEN  # each stored chunk is nonce || ciphertext || tag
SALT_LEN = 32
KEY_CHECK_LEN = 32
DIGEST_LEN = 32

DEFAULT_CHUNK_SIZE = 8192
MIN_CHUNK_SIZE = 512
MAX_CHUNK_SIZE = 16 * 1024 * 1024

# magic, version, token id, salt, key check, generation, chunk size, chunk count,
# next object id, manifest digest, key-ref length
FIXED_HEADER = struct.Struct(">8sH16s32s32sQIQI32sH")
# object id, offset within the object, record length, SHA-256 of the record
MANIFEST_ENTRY = struct.Struct(">IQI32s")
META_LEN = struct.Struct(">I")
CHUNK_AAD_TAIL = struct.Struct(">QB")

# Bounds a reader enforces before it allocates anything (docs/FORMAT.md section 3): a metadata
# file may be at most as large as its fixed header says, and the header's fields are capped, so
# a planted sparse 100 GB "metadata" file is refused after reading 148 bytes.
MAX_MANIFEST_BYTES = 1 << 30
MAX_CHUNK_COUNT = MAX_MANIFEST_BYTES // MANIFEST_ENTRY.size  # 22369621
MAX_META_JSON = 1 << 20  # the encrypted metadata JSON (a name, sizes, times, a few extras)
MAX_META_LEN = NONCE_LEN + MAX_META_JSON + TAG_LEN


def chunk_aad_prefix(token_id: uuid.UUID) -> bytes:
    """The constant part of every chunk's AAD for one token: magic, version, token id."""
    return CHUNK_AAD_MAGIC + struct.pack(">H", FORMAT_VERSION) + token_id.bytes


def chunk_aad(prefix: bytes, index: int, final: bool) -> bytes:
    """AAD = prefix || chunk index (u64) || final marker (u8). Binds a record to its token, its
    position and to whether it ends the file, so reordering, splicing and truncation fail."""
    return prefix + CHUNK_AAD_TAIL.pack(index, 1 if final else 0)


@dataclass
class Header:
    token_id: uuid.UUID
    salt: bytes
    key_check: bytes
    generation: int
    chunk_size: int
    chunk_count: int
    next_object_id: int
    manifest_digest: bytes
    key_ref: bytes = b""

    def pack(self) -> bytes:
        fixed = FIXED_HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            self.token_id.bytes,
            self.salt,
            self.key_check,
            self.generation,
            self.chunk_size,
            self.chunk_count,
            self.next_object_id,
            self.manifest_digest,
            len(self.key_ref),
        )
        return fixed + self.key_ref


@dataclass
class Metadata:
    """The encrypted part: everything about the file that is not sizes."""

    name: str
    size: int
    sha256: str | None
    mode: int = 0o600
    mtime_ns: int = 0
    atime_ns: int = 0
    ctime_ns: int = 0
    created: int = 0  # unix seconds of the first commit
    parallel_chunks: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        doc = {
            "v": FORMAT_VERSION,
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "mode": self.mode,
            "mtime_ns": self.mtime_ns,
            "atime_ns": self.atime_ns,
            "ctime_ns": self.ctime_ns,
            "created": self.created,
            "parallel_chunks": self.parallel_chunks,
        }
        doc.update(self.extra)
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Metadata:
        """Parse authenticated metadata JSON. ValueError for anything that is not what to_json
        writes (wrong types, NaN, numbers out of range, nesting too deep)."""
        try:
            doc = json.loads(raw, parse_constant=_no_constant)
        except RecursionError:
            raise ValueError("metadata nests too deep") from None
        if not isinstance(doc, dict):
            raise ValueError("metadata is not an object")
        known = {
            "name",
            "size",
            "sha256",
            "mode",
            "mtime_ns",
            "atime_ns",
            "ctime_ns",
            "created",
            "parallel_chunks",
        }
        if doc.get("v") != FORMAT_VERSION:
            raise ValueError("metadata version")
        extra = {k: v for k, v in doc.items() if k not in known and k != "v"}
        name, sha = doc.get("name"), doc.get("sha256")
        if not isinstance(name, str) or not (sha is None or isinstance(sha, str)):
            raise ValueError("metadata name or sha256")
        return cls(
            name=name,
            size=_int(doc, "size", None),
            sha256=sha,
            mode=_int(doc, "mode", 0o600),
            mtime_ns=_int(doc, "mtime_ns", 0),
            atime_ns=_int(doc, "atime_ns", 0),
            ctime_ns=_int(doc, "ctime_ns", 0),
            created=_int(doc, "created", 0),
            parallel_chunks=_int(doc, "parallel_chunks", 1),
            extra=extra,
        )


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} in metadata")


def _int(doc: dict[str, Any], key: str, default: int | None) -> int:
    """A whole number that fits a signed 64-bit field (what to_json wrote)."""
    value = doc.get(key, default)
    if type(value) is not int or not -(1 << 63) <= value < 1 << 63:
        raise ValueError(f"metadata field {key}")
    return value


@dataclass
class ParsedFile:
    """A metadata file split into its parts; nothing authenticated yet except the trailer."""

    header: Header
    header_bytes: bytes  # AAD of the metadata ciphertext
    manifest: bytes  # chunk_count * MANIFEST_ENTRY.size bytes
    meta_nonce: bytes
    meta_ciphertext: bytes


def manifest_digest(manifest: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(manifest).digest()


def build_parts(
    header: Header, manifest: bytes | bytearray, meta_nonce: bytes, meta_ct: bytes
) -> list[bytes | bytearray]:
    """The metadata file as a list of buffers (header, manifest, meta, trailer), so a large
    manifest is written without being copied into one big bytes object."""
    parts: list[bytes | bytearray] = [
        header.pack(),
        manifest,
        META_LEN.pack(len(meta_nonce) + len(meta_ct)) + meta_nonce + meta_ct,
    ]
    trailer = hashlib.sha256()
    for part in parts:
        trailer.update(part)
    parts.append(trailer.digest())
    return parts


def build_file(
    header: Header, manifest: bytes | bytearray, meta_nonce: bytes, meta_ct: bytes
) -> bytes:
    """Serialize: header || manifest || meta length || nonce || ciphertext || SHA-256 trailer."""
    return b"".join(build_parts(header, manifest, meta_nonce, meta_ct))


def metadata_size_limit(head: bytes, expected_token: uuid.UUID) -> int:
    """The largest metadata file the fixed header `head` (the file's first FIXED_HEADER.size
    bytes, fewer if it is shorter) permits. Raises as parse_file does for a bad magic or
    version, a truncated header, or a chunk count past MAX_CHUNK_COUNT."""
    tid = str(expected_token)
    _check_magic(head, tid, FIXED_HEADER.size)
    fields = FIXED_HEADER.unpack_from(head, 0)
    count, kref_len = fields[7], fields[10]
    if count > MAX_CHUNK_COUNT:
        raise IntegrityError(
            f"token {tid}: metadata claims {count} chunks, more than the format allows "
            f"({MAX_CHUNK_COUNT})"
        )
    return (
        FIXED_HEADER.size
        + kref_len
        + count * MANIFEST_ENTRY.size
        + META_LEN.size
        + MAX_META_LEN
        + DIGEST_LEN
    )


def _check_magic(data: bytes, tid: str, need: int) -> None:
    """Magic, version and a minimum length: the checks that come before any other."""
    if len(data) < need or data[:8] != MAGIC:
        if data[:8] == MAGIC:
            raise IntegrityError(f"token {tid}: metadata is truncated")
        raise IntegrityError(f"token {tid}: metadata is not a vhsm token file (bad magic)")
    version = struct.unpack_from(">H", data, 8)[0]
    if version != FORMAT_VERSION:
        raise StoreError(f"token {tid}: format version {version} is not supported by this vhsm")


def parse_file(data: bytes, expected_token: uuid.UUID) -> ParsedFile:
    """Split a metadata file, checking everything that can be checked without the key: magic,
    version, the SHA-256 trailer, lengths, the manifest digest and the token id. Raises
    IntegrityError naming the token on any mismatch."""
    tid = str(expected_token)
    _check_magic(data, tid, FIXED_HEADER.size + DIGEST_LEN)
    body = memoryview(data)[:-DIGEST_LEN]  # a view: no copy of a large manifest
    if hashlib.sha256(body).digest() != data[-DIGEST_LEN:]:
        raise IntegrityError(f"token {tid}: metadata checksum mismatch (modified or truncated)")
    (_, _, tok, salt, kcv, gen, csize, count, next_obj, mdig, kref_len) = FIXED_HEADER.unpack_from(
        body, 0
    )
    pos = FIXED_HEADER.size
    key_ref = bytes(body[pos : pos + kref_len])
    pos += kref_len
    header_bytes = bytes(body[:pos])
    man_len = count * MANIFEST_ENTRY.size
    if (
        not (MIN_CHUNK_SIZE <= csize <= MAX_CHUNK_SIZE)
        or count > MAX_CHUNK_COUNT
        or pos + man_len + META_LEN.size > len(body)
    ):
        raise IntegrityError(f"token {tid}: metadata is malformed")
    manifest = bytes(body[pos : pos + man_len])
    pos += man_len
    (meta_len,) = META_LEN.unpack_from(body, pos)
    pos += META_LEN.size
    if pos + meta_len != len(body) or not NONCE_LEN + TAG_LEN <= meta_len <= MAX_META_LEN:
        raise IntegrityError(f"token {tid}: metadata is malformed")
    if uuid.UUID(bytes=tok) != expected_token:
        raise IntegrityError(f"token {tid}: metadata belongs to another token")
    if manifest_digest(manifest) != mdig:
        raise IntegrityError(f"token {tid}: chunk manifest does not match its digest")
    header = Header(uuid.UUID(bytes=tok), salt, kcv, gen, csize, count, next_obj, mdig, key_ref)
    return ParsedFile(
        header,
        header_bytes,
        manifest,
        bytes(body[pos : pos + NONCE_LEN]),
        bytes(body[pos + NONCE_LEN :]),
    )


def record_len(chunk_size: int, size: int, index: int, count: int) -> int:
    """Stored length of chunk `index` of a file of `size` bytes."""
    if index < count - 1:
        return chunk_size + RECORD_OVERHEAD
    return size - (count - 1) * chunk_size + RECORD_OVERHEAD


def chunk_count_for(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)
