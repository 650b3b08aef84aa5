"""Fuzzing the token metadata parser (issue 11, "Deliver"): arbitrary bytes, mutated valid
metadata files (checksums recomputed, so the parser gets past them), arbitrary JSON as the
authenticated metadata, and whole tokens re-sealed with the key around it.

Both parsers are reachable from a store, so both are fuzzed: format version 2 (what is written)
and format version 1 (read forever; its valid file is the golden v1 vector in tests/vectors,
and the re-sealed v1 tokens are built here by _seal_v1, checked against that vector).

Every input must end in the store's own errors (IntegrityError, StoreError, WrongKeyError; a
ValueError from Metadata.from_json, which open_token reports as IntegrityError) or a valid parse:
never another exception, never a hang, never a read past the bounds the header allows. Bounded
for `make test`: a few hundred examples per property, each parse at most a few KiB."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhsmfs.backend import LocalBackend
from vhsmfs.errors import IntegrityError, StoreError, WrongKeyError
from vhsmfs.format import (
    FIXED_HEADER,
    FIXED_HEADER_V1,
    FORMAT_V1,
    FORMAT_V2,
    MAGIC,
    MANIFEST_ENTRY,
    MANIFEST_ENTRY_V1,
    MAX_CHUNK_COUNT,
    MAX_OBJECT_COUNT,
    META_LEN,
    OBJECT_ENTRY,
    BytesReader,
    Header,
    Metadata,
    build_head,
    metadata_size_limit_v1,
    object_hasher,
    pack_object_table,
    parse,
    parse_bytes,
)
from vhsmfs.keyfile import StaticKeyProvider
from vhsmfs.store import TokenStore
from vhsmfs.tokencrypto import TokenKeys

TOKEN = uuid.UUID("00000000-0000-4000-8000-000000000001")
KEY = bytes(range(32))  # the key bytes of the golden vectors too
SALT = bytes(32)
STORE_ERRORS = (IntegrityError, StoreError, WrongKeyError)
FUZZ = settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
VECTORS = Path(__file__).resolve().parent.parent / "vectors"
(_V1_META,) = (VECTORS / "v1").glob("*.metadata")
V1_TOKEN = uuid.UUID(_V1_META.name.removesuffix(".metadata"))
RECORD = 540  # a 512-byte chunk's record


def _object_bytes(chunks: int) -> bytes:
    """Object 0 of the sealed test tokens: `chunks` records' worth of bytes."""
    return bytes(range(256)) * (chunks * RECORD // 256) + bytes(chunks * RECORD % 256)


def _xxh3(data: bytes) -> bytes:
    h = object_hasher()
    h.update(data)
    return h.digest()


def _seal(doc: bytes, chunks: int = 3, chunk_size: int = 512) -> bytes:
    """A v2 metadata file of TOKEN under KEY whose encrypted JSON is `doc`; its object table
    names object 0 as _object_bytes(chunks) (none for an empty token)."""
    keys = TokenKeys(KEY, SALT, TOKEN, FORMAT_V2)
    manifest = b"".join(
        MANIFEST_ENTRY.pack(0, i * RECORD, RECORD, _xxh3(bytes([i]))) for i in range(chunks)
    )
    obj = _object_bytes(chunks)
    table = pack_object_table({0: (len(obj), _xxh3(obj))} if chunks else {})
    header = Header(
        TOKEN,
        SALT,
        keys.key_check,
        1,
        chunk_size,
        chunks,
        1,
        hashlib.sha256(manifest + table).digest(),
        commit_time_ns=1,
        object_count=1 if chunks else 0,
    )
    nonce, ct = keys.seal_metadata(doc, header.pack())
    return build_head(header, nonce, ct, table) + manifest


def _seal_v1(doc: bytes, chunks: int = 3, chunk_size: int = 512, key_ref: bytes = b"") -> bytes:
    """A format v1 metadata file of TOKEN (no v1 writer is left in vhsmfs): header || key_ref
    || manifest || meta length || nonce || ciphertext || SHA-256 of all that."""
    keys = TokenKeys(KEY, SALT, TOKEN, FORMAT_V1)
    manifest = b"".join(
        MANIFEST_ENTRY_V1.pack(0, i * RECORD, RECORD, hashlib.sha256(bytes([i])).digest())
        for i in range(chunks)
    )
    return _build_v1(keys, TOKEN, 1, chunk_size, chunks, 1, manifest, key_ref, doc)


def _build_v1(
    keys: TokenKeys | None,
    token: uuid.UUID,
    generation: int,
    chunk_size: int,
    chunks: int,
    next_object: int,
    manifest: bytes,
    key_ref: bytes,
    doc: bytes,
    *,
    salt: bytes = SALT,
    key_check: bytes | None = None,
    sealed: tuple[bytes, bytes] | None = None,
) -> bytes:
    fixed = FIXED_HEADER_V1.pack(
        MAGIC,
        FORMAT_V1,
        token.bytes,
        salt,
        key_check if key_check is not None else keys.key_check,  # type: ignore[union-attr]
        generation,
        chunk_size,
        chunks,
        next_object,
        hashlib.sha256(manifest).digest(),
        len(key_ref),
    )
    header = fixed + key_ref
    nonce, ct = sealed if sealed is not None else keys.seal_metadata(doc, header)  # type: ignore[union-attr]
    body = header + manifest + META_LEN.pack(len(nonce) + len(ct)) + nonce + ct
    return body + hashlib.sha256(body).digest()


def test_v1_builder_reproduces_the_golden_vector() -> None:
    """_build_v1 lays a file out exactly as the v1 writer did (so _seal_v1's files are what
    a v1 store holds): from the golden vector's parts it gives back the same bytes."""
    data = _V1_META.read_bytes()
    p = parse_bytes(data, V1_TOKEN)
    h = p.header
    assert p.version == FORMAT_V1
    again = _build_v1(
        None,
        V1_TOKEN,
        h.generation,
        h.chunk_size,
        h.chunk_count,
        h.next_object_id,
        p.load_manifest(),
        h.key_ref,
        b"",
        salt=h.salt,
        key_check=h.key_check,
        sealed=(p.meta_nonce, p.meta_ciphertext),
    )
    assert again == data


VALID = {
    FORMAT_V2: _seal(Metadata(name="doc.txt", size=1500).to_json()),
    FORMAT_V1: _V1_META.read_bytes(),
}
EXPECTED = {FORMAT_V2: TOKEN, FORMAT_V1: V1_TOKEN}
VERSIONS = pytest.mark.parametrize("version", [FORMAT_V2, FORMAT_V1])


def _refix(data: bytes) -> bytes:
    """Recompute what an attacker without the key can, where the header's lengths fit the
    data: v2, the tables digest and the header checksum; v1, the manifest digest and the
    trailing SHA-256."""
    buf = bytearray(data)
    if len(buf) < 10 or buf[:8] != MAGIC:
        return bytes(buf)
    if struct.unpack_from(">H", buf, 8)[0] == FORMAT_V1:
        if len(buf) >= FIXED_HEADER_V1.size + 32:
            count, kref = (
                struct.unpack_from(">Q", buf, 102)[0],
                struct.unpack_from(">H", buf, 146)[0],
            )
            start = FIXED_HEADER_V1.size + kref
            end = start + count * MANIFEST_ENTRY_V1.size
            if end <= len(buf) - 32:
                buf[114:146] = hashlib.sha256(bytes(buf[start:end])).digest()
            buf[-32:] = hashlib.sha256(buf[:-32]).digest()
        return bytes(buf)
    if len(buf) < FIXED_HEADER.size + META_LEN.size:
        return bytes(buf)
    count = struct.unpack_from(">Q", buf, 110)[0]
    nobj = struct.unpack_from(">I", buf, 122)[0]
    kref = struct.unpack_from(">H", buf, 158)[0]
    hsize = FIXED_HEADER.size + kref
    if hsize + META_LEN.size > len(buf):
        return bytes(buf)
    head_end = hsize + META_LEN.size + struct.unpack_from(">I", buf, hsize)[0]
    table_at = head_end + 32
    man_at = table_at + nobj * OBJECT_ENTRY.size
    end = man_at + count * MANIFEST_ENTRY.size
    if end <= len(buf):
        tables = bytes(buf[man_at:end]) + bytes(buf[table_at:man_at])
        buf[126:158] = hashlib.sha256(tables).digest()
    if table_at <= len(buf):
        buf[head_end:table_at] = hashlib.sha256(bytes(buf[:head_end])).digest()
    return bytes(buf)


class _BoundedReader(BytesReader):
    """A reader of `data` that records the largest read asked for."""

    def __init__(self, data: bytes, size: int | None = None) -> None:
        super().__init__(data)
        if size is not None:
            self.size = size  # a sparse file: bytes past the data read as zeros
        self.largest = 0

    def pread(self, offset: int, length: int) -> bytes:
        self.largest = max(self.largest, length)
        # far more than any parse of these files may read: fail here, before allocating it
        assert length <= _PROBE + (2 << 20), f"a read of {length} bytes was asked for"
        got = super().pread(offset, length)
        return got + bytes(max(0, min(length, self.size - offset) - len(got)))


# what a v2 parser may read before it has checked the file's size against its header: the fixed
# header, the key_ref (u16 length) and the metadata length
_PROBE = FIXED_HEADER.size + 0xFFFF + META_LEN.size


def _parse_checked(data: bytes, version: int) -> None:
    """parse, plus the bounds the store reads with: whatever parses is within them."""
    token = EXPECTED[version]
    reader = _BoundedReader(data)
    try:
        parsed = parse(reader, token, lambda: BytesReader(data))
        parsed.load_manifest()
    except STORE_ERRORS:
        assert reader.largest <= max(len(data), _PROBE)
        return
    assert reader.largest <= max(len(data), _PROBE)
    assert parsed.header.token_id == token
    if parsed.version == FORMAT_V1:
        assert len(data) <= metadata_size_limit_v1(data[: FIXED_HEADER_V1.size], str(token))
    else:
        h = parsed.header
        assert h.chunk_count <= MAX_CHUNK_COUNT and h.object_count <= MAX_OBJECT_COUNT
        assert len(data) == parsed.manifest_offset + h.chunk_count * MANIFEST_ENTRY.size
        assert len(parsed.objects) == h.object_count
        assert all(o < h.next_object_id for o in parsed.objects)


@FUZZ
@VERSIONS
@given(st.binary(max_size=700), st.booleans())
def test_parse_arbitrary_bytes(version: int, data: bytes, with_version: bool) -> None:
    """Any bytes; with_version: behind a valid magic and this version number, so the version's
    own parser is reached."""
    if with_version:
        data = MAGIC + struct.pack(">H", version) + data
    _parse_checked(data, version)
    _parse_checked(_refix(data), version)


_OPS = st.sampled_from(["flip", "set", "insert", "delete", "truncate"])


@FUZZ
@VERSIONS
@given(st.data(), st.booleans())
def test_parse_mutated_valid_file(version: int, data: st.DataObject, refix: bool) -> None:
    buf = bytearray(VALID[version])
    for _ in range(data.draw(st.integers(1, 4))):
        if not buf:
            break
        op, blob = data.draw(_OPS), data.draw(st.binary(min_size=1, max_size=9))
        at = data.draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[at] ^= blob[0] or 1
        elif op == "set":
            buf[at : at + len(blob)] = blob
        elif op == "insert":
            buf[at:at] = blob
        elif op == "delete":
            del buf[at : at + len(blob)]
        else:
            del buf[at:]
    _parse_checked(_refix(bytes(buf)) if refix else bytes(buf), version)


@VERSIONS
@pytest.mark.parametrize("refix", [False, True])
def test_parse_every_single_byte_change(version: int, refix: bool) -> None:
    """Exhaustive where the fuzzers sample: every byte of the valid file changed to a few
    values (each field's every byte, so every check behind the checksums is reached)."""
    valid = VALID[version]
    for at in range(len(valid)):
        for value in {valid[at] ^ 0x01, valid[at] ^ 0x80, 0x00, 0xFF} - {valid[at]}:
            buf = bytearray(valid)
            buf[at] = value
            _parse_checked(_refix(bytes(buf)) if refix else bytes(buf), version)


@VERSIONS
def test_valid_files_parse_and_refix_is_neutral(version: int) -> None:
    """The fuzzers' starting points are valid (else every mutation would be refused at once
    and nothing behind the first check would be reached), and _refix of a valid file is the
    same file (so it recomputes the checks where they are)."""
    data = VALID[version]
    assert _refix(data) == data
    assert parse_bytes(data, EXPECTED[version]).version == version
    bad = bytearray(data)
    bad[60] ^= 1  # inside the key check: caught by the checksum, fixed by _refix
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        parse_bytes(bytes(bad), EXPECTED[version])
    assert parse_bytes(_refix(bytes(bad)), EXPECTED[version]).header.key_check[2] == bad[60]


@FUZZ
@VERSIONS
@given(st.data(), st.binary(max_size=64), st.integers(0, 1 << 40))
def test_parse_sparse_file_claiming_any_size(
    version: int, data: st.DataObject, tail: bytes, size: int
) -> None:
    """A (sparse) metadata file of any size whose first bytes are a valid file's: refused, or
    parsed, having read no more than its header allows, never the whole claimed size."""
    valid = VALID[version]
    start = valid[: data.draw(st.integers(FIXED_HEADER.size, len(valid)))] + tail
    size = data.draw(st.sampled_from([size, len(valid), len(valid) + 1, len(valid) - 1]))
    reader = _BoundedReader(start, size=max(size, len(start)))
    try:
        parse(reader, EXPECTED[version], lambda: BytesReader(start))
    except STORE_ERRORS:
        pass
    # v1 is read whole, up to the limit its header sets (here about 1 MiB: VALID's header)
    limit = 0
    if version == FORMAT_V1:
        limit = metadata_size_limit_v1(start[: FIXED_HEADER_V1.size], str(V1_TOKEN))
        assert limit < 2 << 20
    assert reader.largest <= max(limit, _PROBE, len(start))


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)
_FIELDS = ["v", "name", "size", "sha256", "mode", "mtime_ns", "ctime_ns", "created", "kind"]


def _docs(version: int) -> st.SearchStrategy[object]:
    return (
        _JSON
        | st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=9)
        | st.fixed_dictionaries(
            {"v": st.just(version), "name": st.text(max_size=8)},
            optional={k: _JSON for k in _FIELDS[2:]},
        )
    )


_DOCS = st.one_of(_docs(FORMAT_V1), _docs(FORMAT_V2))


def _raw(doc: object, extra: bytes) -> bytes:
    return json.dumps(doc).encode() + extra if extra != b"\xff" else extra * 3


@FUZZ
@VERSIONS
@given(_DOCS, st.sampled_from([b"", b"\xff", b"[" * 50_000, b" 1e999"]))
def test_metadata_json_never_raises_anything_else(version: int, doc: object, extra: bytes) -> None:
    try:
        meta = Metadata.from_json(_raw(doc, extra), version)
    except ValueError:
        return
    assert isinstance(meta.name, str) and isinstance(meta.size, int)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TokenStore, Path]]:
    root = tmp_path_factory.mktemp("fuzz") / "store"
    yield TokenStore(LocalBackend(root), StaticKeyProvider(KEY)), root


def _plant(root: Path, version: int, doc: bytes, chunks: int) -> None:
    """TOKEN in the store as `version` with encrypted JSON `doc`, its object 0 present."""
    data = root / f"{TOKEN}.data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir()
    (data / "00000000").write_bytes(_object_bytes(chunks))
    sealed = _seal(doc, chunks=chunks) if version == FORMAT_V2 else _seal_v1(doc, chunks=chunks)
    (root / f"{TOKEN}.metadata").write_bytes(sealed)
    if version == FORMAT_V2:
        (data / "gen-0000000000000001").write_bytes(sealed)


@VERSIONS
def test_resealed_valid_metadata_opens(store, version: int) -> None:  # type: ignore[no-untyped-def]
    """What the property below starts from: a well-formed document opens, under either format
    (else the property would only ever see errors)."""
    ts, root = store
    doc = Metadata(name="doc.txt", size=1500).to_json()
    if version == FORMAT_V1:
        doc = json.dumps({**json.loads(doc), "v": 1, "sha256": "00" * 32}).encode()
    _plant(root, version, doc, 3)
    t = ts.open_token(TOKEN)
    assert (t.parsed.version, t.meta.name, t.meta.size) == (version, "doc.txt", 1500)
    assert ts.summary(TOKEN).readable


@FUZZ
@VERSIONS
@given(_DOCS, st.integers(0, 4))
def test_whole_token_resealed_with_the_key(store, version: int, doc: object, chunks: int) -> None:  # type: ignore[no-untyped-def]
    """Authenticated but hostile metadata (as someone holding the key could write): open_token
    and list's summary raise the store's errors or return a token, nothing else."""
    ts, root = store
    _plant(root, version, _raw(doc, b""), chunks)
    try:
        t = ts.open_token(TOKEN)
    except STORE_ERRORS:
        return
    assert t.header.chunk_count == chunks
    assert t.parsed.version == version
    ts.summary(TOKEN)
