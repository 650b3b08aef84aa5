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
        doc = json.loads(raw)
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
        return cls(
            name=str(doc["name"]),
            size=int(doc["size"]),
            sha256=doc.get("sha256"),
            mode=int(doc.get("mode", 0o600)),
            mtime_ns=int(doc.get("mtime_ns", 0)),
            atime_ns=int(doc.get("atime_ns", 0)),
            ctime_ns=int(doc.get("ctime_ns", 0)),
            created=int(doc.get("created", 0)),
            parallel_chunks=int(doc.get("parallel_chunks", 1)),
            extra=extra,
        )


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


def parse_file(data: bytes, expected_token: uuid.UUID) -> ParsedFile:
    """Split a metadata file, checking everything that can be checked without the key: magic,
    version, the SHA-256 trailer, lengths, the manifest digest and the token id. Raises
    IntegrityError naming the token on any mismatch."""
    tid = str(expected_token)
    if len(data) < FIXED_HEADER.size + DIGEST_LEN or data[:8] != MAGIC:
        if data[:8] == MAGIC:
            raise IntegrityError(f"token {tid}: metadata is truncated")
        raise IntegrityError(f"token {tid}: metadata is not a vhsm token file (bad magic)")
    version = struct.unpack_from(">H", data, 8)[0]
    if version != FORMAT_VERSION:
        raise StoreError(f"token {tid}: format version {version} is not supported by this vhsm")
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
    if not (MIN_CHUNK_SIZE <= csize <= MAX_CHUNK_SIZE) or pos + man_len + META_LEN.size > len(body):
        raise IntegrityError(f"token {tid}: metadata is malformed")
    manifest = bytes(body[pos : pos + man_len])
    pos += man_len
    (meta_len,) = META_LEN.unpack_from(body, pos)
    pos += META_LEN.size
    if pos + meta_len != len(body) or meta_len < NONCE_LEN + TAG_LEN:
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
