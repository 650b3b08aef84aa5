"""An independent reader and keyless scrubber of vhsm token stores, written from docs/FORMAT.md.

It imports nothing of vhsm: only the standard library, `cryptography` (HKDF-SHA256, AES-256-GCM)
and `xxhash` (XXH3-128). tests/vectors/test_vectors.py runs it on the golden stores to show that
the document describes the bytes vhsm writes; run as a script it prints the "Test vectors"
section of docs/FORMAT.md from those stores:

    python tests/vectors/vectors_reader.py tests/vectors

Section numbers in comments refer to docs/FORMAT.md.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import struct
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import xxhash
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"VHSMTOK\x00"
CHUNK_MAGIC = b"VHSMCHK\x00"
# section 3: magic, version, token_id, salt, key_check, generation, commit_time_ns, chunk_size,
# chunk_count, next_object_id, object_count, tables_digest, key_ref_len
FIXED_V2 = struct.Struct(">8sH16s32s32sQQIQII32sH")
OBJECT_V2 = struct.Struct(">IQ16s")  # object_id, length, XXH3-128
ENTRY_V2 = struct.Struct(">IQI16s")  # object_id, offset, record_len, XXH3-128
# section 13 (version 1): magic, version, token_id, salt, key_check, generation, chunk_size,
# chunk_count, next_object_id, manifest_digest, key_ref_len
FIXED_V1 = struct.Struct(">8sH16s32s32sQIQI32sH")
ENTRY_V1 = struct.Struct(">IQI32s")  # object_id, offset, record_len, SHA-256
U32 = struct.Struct(">I")

OVERHEAD = 12 + 16  # nonce and tag of a record
MIN_CHUNK, MAX_CHUNK = 512, 16 * 1024 * 1024
MAX_JSON = 1 << 20
MAX_META_LEN = 12 + MAX_JSON + 16
MAX_CHUNKS_V2 = (1 << 30) // 32  # 33,554,432
MAX_CHUNKS_V1 = (1 << 30) // 48  # 22,369,621
MAX_OBJECTS = 1 << 20
UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


class FormatError(Exception):
    """The store breaks the format (damage, or a reader-side check failed)."""


@dataclass
class MetaFile:
    """A parsed metadata file (section 3 for version 2, section 13 for version 1). Every check
    that needs no key has passed; nothing is authenticated yet."""

    version: int
    token_id: uuid.UUID
    salt: bytes
    key_check: bytes
    generation: int
    chunk_size: int
    chunk_count: int
    next_object_id: int
    digest: bytes  # v2 tables_digest, v1 manifest_digest
    key_ref: bytes
    header: bytes  # bytes 0 .. H-1: the AAD of the metadata ciphertext
    meta_nonce: bytes
    meta_ct: bytes
    checksum: bytes  # v2 header_checksum, v1 trailer
    manifest: list[tuple[int, int, int, bytes]]  # (object_id, offset, record_len, checksum)
    objects: dict[int, tuple[int, bytes]] = field(default_factory=dict)  # v2: id -> len, XXH3
    commit_time_ns: int | None = None  # v2 only
    parts: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (offset, length)
    size: int = 0


def record_checksum(version: int, record: bytes) -> bytes:
    """XXH3-128 (canonical, big-endian 16 bytes) in version 2; SHA-256 in version 1."""
    if version == 2:
        return xxhash.xxh3_128_digest(record)
    return hashlib.sha256(record).digest()


def parse(data: bytes, token: uuid.UUID) -> MetaFile:
    """Parse and check a metadata file of token `token` (named by its file name)."""
    if data[:8] != MAGIC:
        raise FormatError("bad magic")
    if len(data) < 10:
        raise FormatError("truncated")
    version = int.from_bytes(data[8:10], "big")
    if version == 2:
        return _parse_v2(data, token)
    if version == 1:
        return _parse_v1(data, token)
    raise FormatError(f"format version {version} is not supported")


def _parse_v2(data: bytes, token: uuid.UUID) -> MetaFile:
    if len(data) < FIXED_V2.size:
        raise FormatError("truncated")
    (_, _, tok, salt, kcv, gen, ctime, csize, count, next_obj, nobj, tdig, klen) = (
        FIXED_V2.unpack_from(data)
    )
    if count > MAX_CHUNKS_V2 or nobj > MAX_OBJECTS:
        raise FormatError("limits: chunk_count or object_count")
    h = FIXED_V2.size + klen  # end of the header (the AAD)
    if len(data) < h + 4:
        raise FormatError("truncated")
    (meta_len,) = U32.unpack_from(data, h)
    if not OVERHEAD <= meta_len <= MAX_META_LEN:
        raise FormatError("limits: meta_len")
    e = h + 4 + meta_len  # end of meta_ct
    table_at = e + 32
    manifest_at = table_at + OBJECT_V2.size * nobj
    expected = manifest_at + ENTRY_V2.size * count
    if len(data) != expected:
        raise FormatError(f"file size: {len(data)} bytes, the header says {expected}")
    if hashlib.sha256(data[:e]).digest() != data[e:table_at]:
        raise FormatError("header_checksum mismatch")
    if not MIN_CHUNK <= csize <= MAX_CHUNK:
        raise FormatError("chunk_size out of range")
    if uuid.UUID(bytes=tok) != token:
        raise FormatError("token_id is not the file's token")
    table = data[table_at:manifest_at]
    manifest = data[manifest_at:]
    if hashlib.sha256(manifest + table).digest() != tdig:
        raise FormatError("tables_digest mismatch")
    objects: dict[int, tuple[int, bytes]] = {}
    last = -1
    for obj, length, digest in OBJECT_V2.iter_unpack(table):
        if obj <= last or obj >= next_obj:
            raise FormatError("object table: ids not ascending or not below next_object_id")
        objects[obj] = (length, digest)
        last = obj
    entries = list(ENTRY_V2.iter_unpack(manifest))
    _check_entries(entries, csize, objects)
    return MetaFile(
        version=2,
        token_id=token,
        salt=salt,
        key_check=kcv,
        generation=gen,
        chunk_size=csize,
        chunk_count=count,
        next_object_id=next_obj,
        digest=tdig,
        key_ref=data[FIXED_V2.size : h],
        header=data[:h],
        meta_nonce=data[h + 4 : h + 16],
        meta_ct=data[h + 16 : e],
        checksum=data[e:table_at],
        manifest=entries,
        objects=objects,
        commit_time_ns=ctime,
        parts={
            "fixed header": (0, FIXED_V2.size),
            "key_ref": (FIXED_V2.size, klen),
            "meta_len": (h, 4),
            "meta_nonce": (h + 4, 12),
            "meta_ct": (h + 16, meta_len - 12),
            "header_checksum": (e, 32),
            "object table": (table_at, len(table)),
            "manifest": (manifest_at, len(manifest)),
        },
        size=len(data),
    )


def _check_entries(
    entries: list[tuple[int, int, int, bytes]],
    chunk_size: int,
    objects: dict[int, tuple[int, bytes]] | None,
) -> None:
    """Record lengths as far as they are known without the key (section 4); in version 2 every
    record in an object of the table and inside its recorded length."""
    full = chunk_size + OVERHEAD
    for i, (obj, off, rlen, _) in enumerate(entries):
        if i < len(entries) - 1 and rlen != full:
            raise FormatError(f"chunk {i}: wrong record length")
        if not OVERHEAD < rlen <= full:
            raise FormatError(f"chunk {i}: wrong record length")
        if objects is not None:
            if obj not in objects:
                raise FormatError(f"chunk {i}: object {obj:08x} is not in the object table")
            if off + rlen > objects[obj][0]:
                raise FormatError(f"chunk {i} lies outside its object")


def _parse_v1(data: bytes, token: uuid.UUID) -> MetaFile:
    if len(data) < FIXED_V1.size + 32:
        raise FormatError("truncated")
    (_, _, tok, salt, kcv, gen, csize, count, next_obj, mdig, klen) = FIXED_V1.unpack_from(data)
    if count > MAX_CHUNKS_V1:
        raise FormatError("limits: chunk_count")
    limit = FIXED_V1.size + klen + ENTRY_V1.size * count + 4 + MAX_META_LEN + 32
    if len(data) > limit:
        raise FormatError("limits: file size")
    body, trailer = data[:-32], data[-32:]
    if hashlib.sha256(body).digest() != trailer:
        raise FormatError("trailer mismatch")
    h = FIXED_V1.size + klen
    manifest_end = h + ENTRY_V1.size * count
    if manifest_end + 4 > len(body):
        raise FormatError("malformed")
    (meta_len,) = U32.unpack_from(body, manifest_end)
    if manifest_end + 4 + meta_len != len(body) or not OVERHEAD <= meta_len <= MAX_META_LEN:
        raise FormatError("malformed: meta_len")
    if not MIN_CHUNK <= csize <= MAX_CHUNK:
        raise FormatError("chunk_size out of range")
    if uuid.UUID(bytes=tok) != token:
        raise FormatError("token_id is not the file's token")
    manifest = body[h:manifest_end]
    if hashlib.sha256(manifest).digest() != mdig:
        raise FormatError("manifest_digest mismatch")
    entries = list(ENTRY_V1.iter_unpack(manifest))
    _check_entries(entries, csize, None)
    m = manifest_end + 4
    return MetaFile(
        version=1,
        token_id=token,
        salt=salt,
        key_check=kcv,
        generation=gen,
        chunk_size=csize,
        chunk_count=count,
        next_object_id=next_obj,
        digest=mdig,
        key_ref=data[FIXED_V1.size : h],
        header=data[:h],
        meta_nonce=body[m : m + 12],
        meta_ct=body[m + 12 :],
        checksum=trailer,
        manifest=entries,
        parts={
            "fixed header": (0, FIXED_V1.size),
            "key_ref": (FIXED_V1.size, klen),
            "manifest": (h, len(manifest)),
            "meta_len": (manifest_end, 4),
            "meta_nonce": (m, 12),
            "meta_ct": (m + 12, meta_len - 12),
            "trailer": (len(body), 32),
        },
        size=len(data),
    )


# -- the store (sections 1 and 5) ------------------------------------------------------------------
def tokens(store: Path) -> list[uuid.UUID]:
    """Tokens are the files named <uuid>.metadata (canonical lower-case form only)."""
    return sorted(
        (
            uuid.UUID(p.name[:36])
            for p in store.iterdir()
            if re.fullmatch(UUID_RE + r"\.metadata", p.name)
        ),
        key=str,
    )


def _object_path(store: Path, token: uuid.UUID, obj: int) -> Path:
    return store / f"{token}.data" / f"{obj:08x}"


def newest_complete(store: Path, token: uuid.UUID) -> tuple[MetaFile, str]:
    """Section 5: the current metadata if it is version 1; otherwise, of the current metadata
    and the generation files, the newest generation whose objects are all present with the
    lengths its object table records. Returns it and the name of the file it came from."""
    current_path = store / f"{token}.metadata"
    data_dir = store / f"{token}.data"
    current: MetaFile | None = None
    error: FormatError | None = None
    try:
        current = parse(current_path.read_bytes(), token)  # FileNotFoundError: no such token
    except FormatError as e:
        error = e
    if current is not None and current.version == 1:
        return current, current_path.name
    gens: dict[int, Path] = {}
    if data_dir.is_dir():
        for p in data_dir.iterdir():
            if m := re.fullmatch(r"gen-([0-9a-f]{16})", p.name):
                gens[int(m.group(1), 16)] = p
    numbers = set(gens) | ({current.generation} if current is not None else set())
    for g in sorted(numbers, reverse=True):
        if current is not None and g == current.generation:
            cand, name = current, current_path.name
        else:
            cand, name = parse(gens[g].read_bytes(), token), gens[g].name  # damage: raised
            if cand.generation != g:
                raise FormatError(f"{name} holds generation {cand.generation}")
        missing = False
        for obj, (length, _) in cand.objects.items():
            p = _object_path(store, token, obj)
            if not p.exists():
                missing = True
                break
            if p.stat().st_size != length:
                raise FormatError(f"object {obj:08x} length")
        if not missing:
            return cand, name
    raise error or FormatError("no complete generation")


def scrub(store: Path, token: uuid.UUID) -> MetaFile:
    """verify --no-key (section 5): the metadata's checks, then every object of the table whole
    (length and XXH3-128), then every record (in its object, its length, its checksum)."""
    mf, _ = newest_complete(store, token)
    for obj, (length, digest) in mf.objects.items():
        data = _read_object(store, token, obj)
        if len(data) != length:
            raise FormatError(f"object {obj:08x} length")
        if xxhash.xxh3_128_digest(data) != digest:
            raise FormatError(f"object {obj:08x} checksum")
    for i, record in enumerate(_records(store, mf)):
        if record_checksum(mf.version, record) != mf.manifest[i][3]:
            raise FormatError(f"chunk {i} checksum")
    return mf


def _read_object(store: Path, token: uuid.UUID, obj: int) -> bytes:
    try:
        return _object_path(store, token, obj).read_bytes()
    except FileNotFoundError:
        raise FormatError(f"object {obj:08x} is missing") from None


def _records(store: Path, mf: MetaFile) -> list[bytes]:
    cache: dict[int, bytes] = {}
    out = []
    for i, (obj, off, rlen, _) in enumerate(mf.manifest):
        if obj not in cache:
            cache[obj] = _read_object(store, mf.token_id, obj)
        record = cache[obj][off : off + rlen]
        if len(record) != rlen:
            raise FormatError(f"chunk {i} is truncated or missing")
        out.append(record)
    return out


# -- keys and decryption (sections 2, 3 and 4) -----------------------------------------------------
@dataclass
class Keys:
    data_key: bytes
    meta_key: bytes
    key_check: bytes


def derive_keys(ikm: bytes, salt: bytes, token: uuid.UUID, version: int) -> Keys:
    bound = token.bytes + version.to_bytes(2, "big")
    prefix = b"vhsm token v%d " % version

    def hkdf(info: bytes) -> bytes:
        kdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=prefix + info + bound)
        return kdf.derive(ikm)

    return Keys(hkdf(b"chunk data key"), hkdf(b"metadata key"), hkdf(b"key check"))


def chunk_aad(version: int, token: uuid.UUID, index: int, final: bool) -> bytes:
    return (
        CHUNK_MAGIC
        + version.to_bytes(2, "big")
        + token.bytes
        + index.to_bytes(8, "big")
        + (b"\x01" if final else b"\x00")
    )


def open_metadata(mf: MetaFile, ikm: bytes) -> tuple[Keys, dict]:
    """Keys, key_check, the metadata JSON decrypted and checked against the header."""
    keys = derive_keys(ikm, mf.salt, mf.token_id, mf.version)
    if not hmac.compare_digest(keys.key_check, mf.key_check):
        raise FormatError("wrong key")
    try:
        raw = AESGCM(keys.meta_key).decrypt(mf.meta_nonce, mf.meta_ct, mf.header)
    except InvalidTag:
        raise FormatError("metadata authentication failed") from None
    if len(raw) > MAX_JSON:
        raise FormatError("limits: metadata JSON")
    meta = json.loads(raw)
    if not isinstance(meta, dict) or meta.get("v") != mf.version:
        raise FormatError("metadata JSON: v")
    if not isinstance(meta.get("name"), str):
        raise FormatError("metadata JSON: name")
    size = meta.get("size")
    if type(size) is not int or size < 0 or -(-size // mf.chunk_size) != mf.chunk_count:
        raise FormatError("metadata JSON: size and chunk_count disagree")
    if mf.chunk_count:
        last = size - (mf.chunk_count - 1) * mf.chunk_size + OVERHEAD
        if mf.manifest[-1][2] != last:
            raise FormatError(f"chunk {mf.chunk_count - 1}: wrong record length")
    return keys, meta


def read_token(store: Path, token: uuid.UUID, ikm: bytes) -> tuple[MetaFile, dict, bytes]:
    """Everything `retrieve` does (section 5), on a store held in a directory."""
    mf = scrub(store, token)
    keys, meta = open_metadata(mf, ikm)
    aead = AESGCM(keys.data_key)
    plain = bytearray()
    last = mf.chunk_count - 1
    for i, record in enumerate(_records(store, mf)):
        try:
            plain += aead.decrypt(
                record[:12], record[12:], chunk_aad(mf.version, token, i, i == last)
            )
        except InvalidTag:
            raise FormatError(f"chunk {i} authentication failed") from None
    if len(plain) != meta["size"]:
        raise FormatError("size")
    if mf.version == 1 and meta.get("sha256") is not None:
        if not hmac.compare_digest(hashlib.sha256(plain).hexdigest(), meta["sha256"]):
            raise FormatError("whole-file sha256 mismatch")
    return mf, meta, bytes(plain)


# -- docs/FORMAT.md, "Test vectors" ----------------------------------------------------------------
def _hex(b: bytes) -> str:
    return b.hex() if b else "(empty)"


def _hexdump_line(data: bytes, at: int) -> str:
    row = data[at : at + 16]
    pairs = " ".join(row[k : k + 2].hex() for k in range(0, len(row), 2))
    return f"{at:08x}: {pairs}"


def describe(vectors: Path, ikm: bytes) -> str:
    """The test-vector section of docs/FORMAT.md, from the golden stores."""
    plain = (vectors / "vector.txt").read_bytes()
    first_line = plain.split(b"\n")[0].decode()
    out = [
        "### Inputs",
        "",
        "```",
        f"plaintext    tests/vectors/vector.txt, {len(plain)} bytes, SHA-256",
        f"             {hashlib.sha256(plain).hexdigest()}",
        f"             first line: {first_line!r} + newline",
        f"IKM          {ikm.hex()}   (the key file: bytes 0x00..0x1f)",
        "chunk_size   512   (TOKEN_CHUNK_SIZE=512)",
        'name         "vector.txt"',
        "```",
    ]
    for version in ("v2", "v1"):
        store = vectors / version
        (token,) = tokens(store)
        mf, meta, got = read_token(store, token, ikm)
        assert got == plain
        keys = derive_keys(ikm, mf.salt, token, mf.version)
        raw = AESGCM(keys.meta_key).decrypt(mf.meta_nonce, mf.meta_ct, mf.header)
        files = sorted(p for p in store.rglob("*") if p.is_file())
        out += [
            "",
            f"### Version {mf.version} (`tests/vectors/{version}/`)",
            "",
            "```",
        ]
        out += [f"{p.stat().st_size:6}  {p.relative_to(store)}" for p in files]
        out += [
            "```",
            "",
            "```",
            f"token_id         {token}",
            f"                 {token.bytes.hex()}",
            f"salt             {mf.salt.hex()}",
            f"bound            {(token.bytes + mf.version.to_bytes(2, 'big')).hex()}",
            f"data_key         {keys.data_key.hex()}",
            f"meta_key         {keys.meta_key.hex()}",
            f"key_check        {keys.key_check.hex()}",
            f"generation       {mf.generation}",
        ]
        if mf.commit_time_ns is not None:
            out.append(f"commit_time_ns   {mf.commit_time_ns}")
        out += [
            f"chunk_size       {mf.chunk_size}",
            f"chunk_count      {mf.chunk_count}",
            f"next_object_id   {mf.next_object_id}",
        ]
        if mf.version == 2:
            out += [
                f"object_count     {len(mf.objects)}",
                f"tables_digest    {mf.digest.hex()}",
            ]
        else:
            out.append(f"manifest_digest  {mf.digest.hex()}")
        out += [
            f"key_ref          {_hex(mf.key_ref)}",
            f"meta_nonce       {mf.meta_nonce.hex()}",
            f"{'header_checksum' if mf.version == 2 else 'trailer':16} {mf.checksum.hex()}",
            "```",
            "",
            "Parts of the metadata file (offset, length):",
            "",
            "```",
        ]
        out += [f"{off:5} {n:5}  {name}" for name, (off, n) in mf.parts.items()]
        out += [f"{mf.size:5}        end of file", "```"]
        if mf.version == 2:
            data = (store / f"{token}.metadata").read_bytes()
            out += ["", "The whole metadata file:", "", "```"]
            out += [_hexdump_line(data, at) for at in range(0, len(data), 16)]
            out.append("```")
        if mf.objects:
            out += ["", "Object table:", "", "```"]
            out += [
                f"{obj:08x}  length {n:5}  XXH3-128 {d.hex()}" for obj, (n, d) in mf.objects.items()
            ]
            out.append("```")
        out += [
            "",
            f"Manifest ({'XXH3-128' if mf.version == 2 else 'SHA-256'} of each record) and the AAD "
            "of each chunk:",
            "",
            "```",
        ]
        for i, (obj, off, rlen, d) in enumerate(mf.manifest):
            aad = chunk_aad(mf.version, token, i, i == mf.chunk_count - 1)
            out += [
                f"chunk {i}: object {obj:08x} offset {off:5} record_len {rlen}",
                f"  checksum {d.hex()}",
                f"  AAD      {aad.hex()}",
            ]
        out += [
            "```",
            "",
            "Metadata JSON (the plaintext of `meta_ct`, "
            f"{len(raw)} bytes; `meta_len` = {12 + len(raw) + 16}):",
            "",
            "```json",
            raw.decode(),
            "```",
        ]
        assert json.loads(raw) == meta
    out += ["", *describe_key_ref(ikm)]
    return "\n".join(out) + "\n"


# An example key_ref (section 11) with fixed inputs: the vectors' IKM as the data key.
KEY_REF_EXAMPLE = {
    "wrapping_key": bytes(range(0x20, 0x40)),
    "name": "vault-key",
    "key_version": 3,
    "nonce": bytes(range(0x40, 0x4C)),
}


def wrap_data_key(
    data_key: bytes, wrapping_key: bytes, name: str, key_version: int, nonce: bytes
) -> bytes:
    """key_ref of the key service (section 11)."""
    aad = b"vhsm-wrap-v1\0" + name.encode() + b"\0" + str(key_version).encode() + b"\0"
    ct = AESGCM(wrapping_key).encrypt(nonce, data_key, aad)
    wrapped = b"VHW1" + key_version.to_bytes(4, "big") + nonce + ct
    n = name.encode()
    return b"VKS1" + len(n).to_bytes(2, "big") + n + wrapped


def unwrap_key_ref(key_ref: bytes, wrapping_key: bytes) -> tuple[str, int, bytes]:
    """(name, key_version, data key) from a key-service key_ref and its wrapping key."""
    if key_ref[:4] != b"VKS1":
        raise FormatError("key_ref: magic")
    n = int.from_bytes(key_ref[4:6], "big")
    name = key_ref[6 : 6 + n].decode()
    wrapped = key_ref[6 + n :]
    if wrapped[:4] != b"VHW1" or len(wrapped) != 68:
        raise FormatError("key_ref: wrapped key")
    version = int.from_bytes(wrapped[4:8], "big")
    aad = b"vhsm-wrap-v1\0" + name.encode() + b"\0" + str(version).encode() + b"\0"
    return name, version, AESGCM(wrapping_key).decrypt(wrapped[8:20], wrapped[20:], aad)


def describe_key_ref(data_key: bytes) -> list[str]:
    ex = KEY_REF_EXAMPLE
    ref = wrap_data_key(data_key, ex["wrapping_key"], ex["name"], ex["key_version"], ex["nonce"])
    assert unwrap_key_ref(ref, ex["wrapping_key"]) == (ex["name"], ex["key_version"], data_key)
    return [
        "### A `key_ref` of the key service (section 11)",
        "",
        "Not in the stores above (they use a key file); fixed inputs, the vectors' IKM as the "
        "data key:",
        "",
        "```",
        f"data key         {data_key.hex()}",
        f"wrapping key     {ex['wrapping_key'].hex()}   (AES-256-GCM key {ex['name']!r}, "
        f"version {ex['key_version']})",
        f"nonce            {ex['nonce'].hex()}",
        f"key_ref ({len(ref)} bytes, key_ref_len {len(ref):#06x}):",
        *[f"  {ref[k : k + 32].hex()}" for k in range(0, len(ref), 32)],
        "```",
    ]


if __name__ == "__main__":
    here = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
    sys.stdout.write(describe(here, bytes(range(32))))
