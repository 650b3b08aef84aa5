"""Binary layout of a token's metadata file and of encrypted chunk records (docs/FORMAT.md).

Everything here is pure: bytes in, values out. No keys, no I/O beyond the `pread` of a reader
handed in. Version 2 is written; version 1 is read forever.

Version 2 puts the small parts first (fixed header, key_ref, encrypted metadata, a checksum of
those) and the two tables last (objects, then the chunk manifest), so a reader streams the
manifest instead of holding it, and a writer spools it. Record and object checksums are
XXH3-128: they find damage without the key; with the key, the tables are authenticated through
`tables_digest` (SHA-256) in the header, which is the AAD of the metadata ciphertext.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import xxhash

from vhsmfs.errors import IntegrityError, StoreError

MAGIC = b"VHSMTOK\x00"
FORMAT_V1 = 1
FORMAT_V2 = 2
FORMAT_VERSION = FORMAT_V2  # what writers write
CHUNK_AAD_MAGIC = b"VHSMCHK\x00"

NONCE_LEN = 12
TAG_LEN = 16
RECORD_OVERHEAD = NONCE_LEN + TAG_LEN  # each stored chunk is nonce || ciphertext || tag
SALT_LEN = 32
KEY_CHECK_LEN = 32
DIGEST_LEN = 32  # SHA-256
CHECKSUM_LEN = 16  # XXH3-128

DEFAULT_CHUNK_SIZE = 8192
MIN_CHUNK_SIZE = 512
MAX_CHUNK_SIZE = 16 * 1024 * 1024

# v1: magic, version, token id, salt, key check, generation, chunk size, chunk count,
# next object id, manifest digest, key-ref length
FIXED_HEADER_V1 = struct.Struct(">8sH16s32s32sQIQI32sH")
# object id, offset within the object, record length, SHA-256 of the record
MANIFEST_ENTRY_V1 = struct.Struct(">IQI32s")
# v2: magic, version, token id, salt, key check, generation, commit time (ns), chunk size,
# chunk count, next object id, object count, tables digest, key-ref length
FIXED_HEADER = struct.Struct(">8sH16s32s32sQQIQII32sH")
# object id, offset within the object, record length, XXH3-128 of the record
MANIFEST_ENTRY = struct.Struct(">IQI16s")
# object id, object length, XXH3-128 of the whole object
OBJECT_ENTRY = struct.Struct(">IQ16s")
META_LEN = struct.Struct(">I")
CHUNK_AAD_TAIL = struct.Struct(">QB")
_VERSION = struct.Struct(">H")

# Bounds a reader enforces before it allocates anything (docs/FORMAT.md section 3): a metadata
# file may be at most as large as its fixed header says, and the header's fields are capped, so
# a planted sparse 100 GB "metadata" file is refused after reading the fixed header.
MAX_MANIFEST_BYTES = 1 << 30
MAX_CHUNK_COUNT = MAX_MANIFEST_BYTES // MANIFEST_ENTRY.size  # 33554432
MAX_CHUNK_COUNT_V1 = MAX_MANIFEST_BYTES // MANIFEST_ENTRY_V1.size  # 22369621
MAX_OBJECT_COUNT = 1 << 20  # an object table of at most 28 MiB
MAX_META_JSON = 1 << 20  # the encrypted metadata JSON (a name, sizes, times, a few extras)
MAX_META_LEN = NONCE_LEN + MAX_META_JSON + TAG_LEN
MANIFEST_BLOCK = 1 << 15  # entries per block when a manifest is streamed (1 MiB in v2)


def record_checksum(version: int) -> Callable[[Any], bytes]:
    """The per-record digest function of a format version: bytes-like -> digest bytes."""
    if version == FORMAT_V1:
        return lambda b: hashlib.sha256(b).digest()
    return xxhash.xxh3_128_digest


def object_hasher() -> Any:
    """The running XXH3-128 of a whole object (v2's object table)."""
    return xxhash.xxh3_128()


def chunk_aad_prefix(token_id: uuid.UUID, version: int = FORMAT_VERSION) -> bytes:
    """The constant part of every chunk's AAD for one token: magic, version, token id."""
    return CHUNK_AAD_MAGIC + _VERSION.pack(version) + token_id.bytes


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
    tables_digest: bytes  # v2: SHA-256(manifest || object table); v1: SHA-256(manifest)
    key_ref: bytes = b""
    version: int = FORMAT_VERSION
    commit_time_ns: int = 0  # v2 only
    object_count: int = 0  # v2 only

    def pack(self) -> bytes:
        """The header bytes (the AAD of the metadata ciphertext). Writers write version 2."""
        if self.version != FORMAT_V2:
            raise StoreError("only format version 2 is written")
        fixed = FIXED_HEADER.pack(
            MAGIC,
            FORMAT_V2,
            self.token_id.bytes,
            self.salt,
            self.key_check,
            self.generation,
            self.commit_time_ns,
            self.chunk_size,
            self.chunk_count,
            self.next_object_id,
            self.object_count,
            self.tables_digest,
            len(self.key_ref),
        )
        return fixed + self.key_ref


_META_KEYS = {
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


@dataclass
class Metadata:
    """The encrypted part: everything about the file that is not sizes."""

    name: str
    size: int
    sha256: str | None = None  # v1 tokens carry one; v2 computes it on demand (info --digest)
    mode: int = 0o600
    mtime_ns: int = 0
    atime_ns: int = 0
    ctime_ns: int = 0
    created: int = 0  # unix seconds of the first commit
    parallel_chunks: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        """Version 2 JSON: sorted keys, no whitespace, no whole-file digest."""
        doc: dict[str, Any] = {
            "v": FORMAT_V2,
            "name": self.name,
            "size": self.size,
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
    def from_json(cls, raw: bytes, version: int = FORMAT_VERSION) -> Metadata:
        """Parse authenticated metadata JSON of format `version`. ValueError for anything that
        is not what a writer writes (wrong types, NaN, numbers out of range, deep nesting)."""
        try:
            doc = json.loads(raw, parse_constant=_no_constant)
        except RecursionError:
            raise ValueError("metadata nests too deep") from None
        if not isinstance(doc, dict):
            raise ValueError("metadata is not an object")
        if doc.get("v") != version:
            raise ValueError("metadata version")
        extra = {k: v for k, v in doc.items() if k not in _META_KEYS and k != "v"}
        name, sha = doc.get("name"), doc.get("sha256")
        if version != FORMAT_V1:
            sha = None  # v2 keeps no whole-file digest: one found here would go unchecked
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


class Reader(Protocol):
    size: int

    def pread(self, offset: int, length: int) -> bytes: ...


class ClosableReader(Reader, Protocol):
    def close(self) -> None: ...


@dataclass
class ParsedFile:
    """A metadata file split into its parts; the small parts checked (checksum, lengths, token
    id), nothing authenticated yet. The manifest is read on demand (manifest_blocks)."""

    header: Header
    header_bytes: bytes  # AAD of the metadata ciphertext
    meta_nonce: bytes
    meta_ciphertext: bytes
    objects: dict[int, tuple[int, bytes]]  # v2 object table: id -> (length, XXH3-128)
    object_table: bytes  # its bytes (part of tables_digest)
    manifest_offset: int  # where the manifest starts in the file
    head: bytes  # every byte before the manifest, as parsed
    file_size: int
    opener: Callable[[], ClosableReader] | None  # opens the file again, for the manifest
    manifest: bytes | None = None  # v1: read whole at parse time (digest checked)
    note: str | None = None  # why not the current metadata was chosen (set by the store)
    damage: str | None = None  # damage found in a candidate passed over (set by the store)

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def entry(self) -> struct.Struct:
        return MANIFEST_ENTRY_V1 if self.version == FORMAT_V1 else MANIFEST_ENTRY

    def manifest_blocks(self, block: int = MANIFEST_BLOCK) -> Iterator[tuple[int, bytes]]:
        """(index of the first entry, entries bytes) in order, `block` entries at a time.
        For v2 the tables digest is checked as the last block is read: a caller must consume
        the iterator to the end before it trusts anything it derived (IntegrityError then)."""
        count, size = self.header.chunk_count, self.entry.size
        if self.manifest is not None:
            for first in range(0, count, block):
                yield first, self.manifest[first * size : (first + block) * size]
            return
        assert self.opener is not None
        h = hashlib.sha256()
        tid = self.header.token_id
        reader = self.opener()
        try:
            # the same file as parsed (a current-metadata file may have been replaced since)
            if reader.size != self.file_size or reader.pread(0, len(self.head)) != self.head:
                raise IntegrityError(f"token {tid}: metadata changed while it was read; retry")
            for first in range(0, count, block):
                want = min(block, count - first) * size
                data = reader.pread(self.manifest_offset + first * size, want)
                if len(data) != want:
                    raise IntegrityError(f"token {tid}: metadata is truncated")
                h.update(data)
                if first + block >= count:
                    _check_tables(h, self)
                yield first, data
            if count == 0:
                _check_tables(h, self)
        finally:
            reader.close()

    def load_manifest(self) -> bytes:
        """The whole manifest, its digest checked (for readers that need random access)."""
        if self.manifest is None:
            self.manifest = b"".join(b for _, b in self.manifest_blocks())
        return self.manifest

    def object_ids(self) -> set[int]:
        """The objects this metadata refers to (v1: read from the manifest)."""
        if self.version != FORMAT_V1:
            return set(self.objects)
        assert self.manifest is not None
        return {e[0] for e in MANIFEST_ENTRY_V1.iter_unpack(self.manifest)}


def _check_tables(manifest_hash: Any, parsed: ParsedFile) -> None:
    """tables_digest = SHA-256(manifest || object table): the manifest is hashed as it streams
    past, the object table (read with the head) last."""
    manifest_hash.update(parsed.object_table)
    if manifest_hash.digest() != parsed.header.tables_digest:
        raise IntegrityError(
            f"token {parsed.header.token_id}: chunk manifest does not match its digest"
        )


def pack_object_table(objects: dict[int, tuple[int, bytes]]) -> bytes:
    """The object table in ascending id order."""
    return b"".join(OBJECT_ENTRY.pack(o, n, d) for o, (n, d) in sorted(objects.items()))


def build_head(header: Header, meta_nonce: bytes, meta_ct: bytes, object_table: bytes) -> bytes:
    """Everything before the manifest: header, key_ref, sealed metadata, its checksum, object
    table. The manifest follows, then the file ends."""
    head = header.pack() + META_LEN.pack(len(meta_nonce) + len(meta_ct)) + meta_nonce + meta_ct
    return head + hashlib.sha256(head).digest() + object_table


def _check_magic(data: bytes, tid: str) -> int:
    """Magic and version: the checks that come before any other. Returns the version."""
    if len(data) < 10 or data[:8] != MAGIC:
        if data[:8] == MAGIC or (len(data) < 8 and MAGIC.startswith(data)):
            raise IntegrityError(f"token {tid}: metadata is truncated")
        raise IntegrityError(f"token {tid}: metadata is not a vhsm token file (bad magic)")
    version = _VERSION.unpack_from(data, 8)[0]
    if version not in (FORMAT_V1, FORMAT_V2):
        raise StoreError(f"token {tid}: format version {version} is not supported by this vhsm")
    return version


def parse(
    reader: Reader,
    expected_token: uuid.UUID,
    opener: Callable[[], ClosableReader] | None = None,
) -> ParsedFile:
    """Read and split a metadata file through `reader`, reading no more than its fixed header
    allows (a planted huge or endless file is refused before anything is allocated). Checks all
    that can be checked without the key except, in v2, the tables digest, which
    ParsedFile.manifest_blocks checks as it reads the manifest through a reader from `opener`
    (the same file opened again). IntegrityError names the token."""
    tid = str(expected_token)
    first = reader.pread(0, FIXED_HEADER.size)
    version = _check_magic(first, tid)
    if version == FORMAT_V1:
        return _parse_v1(reader, first, expected_token)
    if len(first) < FIXED_HEADER.size:
        raise IntegrityError(f"token {tid}: metadata is truncated")
    (_, _, tok, salt, kcv, gen, ctime, csize, count, next_obj, nobj, tdig, kref_len) = (
        FIXED_HEADER.unpack(first)
    )
    if count > MAX_CHUNK_COUNT or nobj > MAX_OBJECT_COUNT:
        raise IntegrityError(
            f"token {tid}: metadata claims {count} chunks and {nobj} objects, more than the "
            f"format allows ({MAX_CHUNK_COUNT}, {MAX_OBJECT_COUNT})"
        )
    hsize = FIXED_HEADER.size + kref_len
    small = reader.pread(0, hsize + META_LEN.size)
    if len(small) != hsize + META_LEN.size:
        raise IntegrityError(f"token {tid}: metadata is truncated")
    (meta_len,) = META_LEN.unpack_from(small, hsize)
    if not NONCE_LEN + TAG_LEN <= meta_len <= MAX_META_LEN:
        raise IntegrityError(f"token {tid}: metadata is malformed")
    head_end = hsize + META_LEN.size + meta_len
    man_off = head_end + DIGEST_LEN + nobj * OBJECT_ENTRY.size
    expected_size = man_off + count * MANIFEST_ENTRY.size
    if reader.size != expected_size:
        raise IntegrityError(
            f"token {tid}: metadata file is {reader.size} bytes, its header says "
            f"{expected_size} (truncated or extended)"
        )
    head = reader.pread(0, man_off)
    if len(head) != man_off:
        raise IntegrityError(f"token {tid}: metadata is truncated")
    if hashlib.sha256(memoryview(head)[:head_end]).digest() != head[head_end : head_end + 32]:
        raise IntegrityError(f"token {tid}: metadata checksum mismatch (modified or truncated)")
    if not (MIN_CHUNK_SIZE <= csize <= MAX_CHUNK_SIZE):
        raise IntegrityError(f"token {tid}: metadata is malformed")
    if uuid.UUID(bytes=tok) != expected_token:
        raise IntegrityError(f"token {tid}: metadata belongs to another token")
    table = head[head_end + DIGEST_LEN : man_off]
    objects: dict[int, tuple[int, bytes]] = {}
    for obj, length, digest in OBJECT_ENTRY.iter_unpack(table):
        if obj in objects or obj >= next_obj:
            raise IntegrityError(f"token {tid}: metadata is malformed (object table)")
        objects[obj] = (length, digest)
    header = Header(
        uuid.UUID(bytes=tok),
        salt,
        kcv,
        gen,
        csize,
        count,
        next_obj,
        tdig,
        head[FIXED_HEADER.size : hsize],
        FORMAT_V2,
        ctime,
        nobj,
    )
    pos = hsize + META_LEN.size
    return ParsedFile(
        header,
        head[:hsize],
        head[pos : pos + NONCE_LEN],
        head[pos + NONCE_LEN : head_end],
        objects,
        table,
        man_off,
        head,
        expected_size,
        opener,
    )


def metadata_size_limit_v1(head: bytes, tid: str) -> int:
    """The largest v1 metadata file its fixed header permits."""
    if len(head) < FIXED_HEADER_V1.size:
        raise IntegrityError(f"token {tid}: metadata is truncated")
    fields = FIXED_HEADER_V1.unpack_from(head, 0)
    count, kref_len = fields[7], fields[10]
    if count > MAX_CHUNK_COUNT_V1:
        raise IntegrityError(
            f"token {tid}: metadata claims {count} chunks, more than the format allows "
            f"({MAX_CHUNK_COUNT_V1})"
        )
    return (
        FIXED_HEADER_V1.size
        + kref_len
        + count * MANIFEST_ENTRY_V1.size
        + META_LEN.size
        + MAX_META_LEN
        + DIGEST_LEN
    )


def _parse_v1(reader: Reader, first: bytes, token: uuid.UUID) -> ParsedFile:
    """Version 1: header || manifest || meta || SHA-256 trailer, read whole (bounded)."""
    tid = str(token)
    limit = metadata_size_limit_v1(first, tid)
    if reader.size > limit:
        raise IntegrityError(
            f"token {tid}: metadata file is {reader.size} bytes, more than its header "
            f"allows ({limit})"
        )
    data = reader.pread(0, reader.size)
    if len(data) < FIXED_HEADER_V1.size + DIGEST_LEN:
        raise IntegrityError(f"token {tid}: metadata is truncated")
    body = memoryview(data)[:-DIGEST_LEN]
    if hashlib.sha256(body).digest() != data[-DIGEST_LEN:]:
        raise IntegrityError(f"token {tid}: metadata checksum mismatch (modified or truncated)")
    (_, _, tok, salt, kcv, gen, csize, count, next_obj, mdig, kref_len) = (
        FIXED_HEADER_V1.unpack_from(body, 0)
    )
    pos = FIXED_HEADER_V1.size
    key_ref = bytes(body[pos : pos + kref_len])
    pos += kref_len
    header_bytes = bytes(body[:pos])
    man_len = count * MANIFEST_ENTRY_V1.size
    if (
        not (MIN_CHUNK_SIZE <= csize <= MAX_CHUNK_SIZE)
        or count > MAX_CHUNK_COUNT_V1
        or pos + man_len + META_LEN.size > len(body)
    ):
        raise IntegrityError(f"token {tid}: metadata is malformed")
    manifest = bytes(body[pos : pos + man_len])
    man_off = pos
    pos += man_len
    (meta_len,) = META_LEN.unpack_from(body, pos)
    pos += META_LEN.size
    if pos + meta_len != len(body) or not NONCE_LEN + TAG_LEN <= meta_len <= MAX_META_LEN:
        raise IntegrityError(f"token {tid}: metadata is malformed")
    if uuid.UUID(bytes=tok) != token:
        raise IntegrityError(f"token {tid}: metadata belongs to another token")
    if hashlib.sha256(manifest).digest() != mdig:
        raise IntegrityError(f"token {tid}: chunk manifest does not match its digest")
    header = Header(
        uuid.UUID(bytes=tok), salt, kcv, gen, csize, count, next_obj, mdig, key_ref, FORMAT_V1
    )
    return ParsedFile(
        header,
        header_bytes,
        bytes(body[pos : pos + NONCE_LEN]),
        bytes(body[pos + NONCE_LEN :]),
        {},
        b"",
        man_off,
        b"",
        len(data),
        None,
        manifest,
    )


class BytesReader:
    """A Reader over bytes in memory (tests, fuzzers, a file read whole)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)

    def pread(self, offset: int, length: int) -> bytes:
        return self._data[offset : offset + length]

    def close(self) -> None:
        pass


def parse_bytes(data: bytes, expected_token: uuid.UUID) -> ParsedFile:
    """parse() of a metadata file held in memory; the v2 manifest digest is checked too."""
    parsed = parse(BytesReader(data), expected_token, lambda: BytesReader(data))
    parsed.load_manifest()
    return parsed


def first_bad_record(
    records: bytes | bytearray | memoryview,
    lengths: Sequence[int],
    digests: Sequence[bytes],
    checksum: Callable[[memoryview], bytes],
) -> int | None:
    """The position in the run of the first record (laid back to back in `records`) whose
    checksum differs from the manifest's (constant-time compares), or None if all match."""
    view = memoryview(records)
    pos = 0
    for k, (n, want) in enumerate(zip(lengths, digests, strict=True)):
        if not hmac.compare_digest(checksum(view[pos : pos + n]), want):
            return k
        pos += n
    return None


def record_len(chunk_size: int, size: int, index: int, count: int) -> int:
    """Stored length of chunk `index` of a file of `size` bytes."""
    if index < count - 1:
        return chunk_size + RECORD_OVERHEAD
    return size - (count - 1) * chunk_size + RECORD_OVERHEAD


def chunk_count_for(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)
