"""Fuzzing the token metadata parser (issue 11, "Deliver"): arbitrary bytes, mutated valid
metadata files (checksums recomputed, so the parser gets past them), arbitrary JSON as the
authenticated metadata, and whole tokens re-sealed with the key around it.

Every input must end in the store's own errors (IntegrityError, StoreError, WrongKeyError; a
ValueError from Metadata.from_json, which open_token reports as IntegrityError) or a valid parse:
never another exception, never a hang. Bounded for `make test`: a few hundred examples per
property, each parse at most a few KiB."""

from __future__ import annotations

import hashlib
import json
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
    MANIFEST_ENTRY,
    Header,
    Metadata,
    build_file,
    manifest_digest,
    metadata_size_limit,
    parse_file,
)
from vhsmfs.keyfile import StaticKeyProvider
from vhsmfs.store import TokenStore
from vhsmfs.tokencrypto import TokenKeys

TOKEN = uuid.UUID("00000000-0000-4000-8000-000000000001")
KEY = bytes(range(32))
SALT = bytes(32)
STORE_ERRORS = (IntegrityError, StoreError, WrongKeyError)
FUZZ = settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _seal(doc: bytes, chunks: int = 3, chunk_size: int = 512) -> bytes:
    """A metadata file of TOKEN under KEY whose encrypted JSON is `doc`."""
    keys = TokenKeys(KEY, SALT, TOKEN)
    manifest = b"".join(
        MANIFEST_ENTRY.pack(0, i * 540, 540, hashlib.sha256(bytes([i])).digest())
        for i in range(chunks)
    )
    header = Header(
        TOKEN, SALT, keys.key_check, 1, chunk_size, chunks, 1, manifest_digest(manifest)
    )
    nonce, ct = keys.seal_metadata(doc, header.pack())
    return build_file(header, manifest, nonce, ct)


VALID = _seal(Metadata(name="doc.txt", size=1500, sha256=None).to_json())


def _refix(data: bytes) -> bytes:
    """Recompute what an attacker without the key can: the manifest digest (where the header's
    lengths fit the data) and the trailing SHA-256."""
    buf = bytearray(data)
    if len(buf) >= FIXED_HEADER.size + 32:
        count, kref = struct.unpack_from(">Q", buf, 102)[0], struct.unpack_from(">H", buf, 146)[0]
        start = FIXED_HEADER.size + kref
        end = start + count * MANIFEST_ENTRY.size
        if end <= len(buf) - 32:
            buf[114:146] = manifest_digest(bytes(buf[start:end]))
        buf[-32:] = hashlib.sha256(buf[:-32]).digest()
    return bytes(buf)


def _parse_checked(data: bytes) -> None:
    """parse_file, plus the bound the store reads with: whatever parses is within it."""
    try:
        parsed = parse_file(data, TOKEN)
    except STORE_ERRORS:
        return
    assert len(data) <= metadata_size_limit(data[: FIXED_HEADER.size], TOKEN)
    assert parsed.header.token_id == TOKEN


@FUZZ
@given(st.binary(max_size=700), st.booleans())
def test_parse_file_arbitrary_bytes(data: bytes, with_trailer: bool) -> None:
    _parse_checked(data + hashlib.sha256(data).digest() if with_trailer else data)
    try:
        metadata_size_limit(data[: FIXED_HEADER.size], TOKEN)
    except STORE_ERRORS:
        pass


_MUTATION = st.tuples(
    st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
    st.integers(0, len(VALID) - 1),
    st.binary(min_size=1, max_size=9),
)


@FUZZ
@given(st.lists(_MUTATION, min_size=1, max_size=4), st.booleans())
def test_parse_file_mutated_valid_file(mutations: list[tuple[str, int, bytes]], refix: bool):
    buf = bytearray(VALID)
    for op, at, blob in mutations:
        if not buf:
            break
        at %= len(buf)
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
    _parse_checked(_refix(bytes(buf)) if refix else bytes(buf))


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
_DOCS = (
    _JSON
    | st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=9)
    | st.fixed_dictionaries(
        {"v": st.just(1), "name": st.text(max_size=8)}, optional={k: _JSON for k in _FIELDS[2:]}
    )
)


def _raw(doc: object, extra: bytes) -> bytes:
    return json.dumps(doc).encode() + extra if extra != b"\xff" else extra * 3


@FUZZ
@given(_DOCS, st.sampled_from([b"", b"\xff", b"[" * 50_000, b" 1e999"]))
def test_metadata_json_never_raises_anything_else(doc: object, extra: bytes) -> None:
    try:
        meta = Metadata.from_json(_raw(doc, extra))
    except ValueError:
        return
    assert isinstance(meta.name, str) and isinstance(meta.size, int)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TokenStore, Path]]:
    root = tmp_path_factory.mktemp("fuzz") / "store"
    yield TokenStore(LocalBackend(root), StaticKeyProvider(KEY)), root


@FUZZ
@given(_DOCS, st.integers(0, 4))
def test_whole_token_resealed_with_the_key(store, doc: object, chunks: int) -> None:  # type: ignore[no-untyped-def]
    """Authenticated but hostile metadata (as someone holding the key could write): open_token
    and list's summary raise the store's errors or return a token, nothing else."""
    ts, root = store
    (root / f"{TOKEN}.metadata").write_bytes(_seal(_raw(doc, b""), chunks=chunks))
    try:
        t = ts.open_token(TOKEN)
    except STORE_ERRORS:
        return
    assert t.header.chunk_count == chunks
    ts.summary(TOKEN)
