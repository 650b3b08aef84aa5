"""Library-level round trips: sizes around chunk boundaries, several chunk sizes, parallelism,
files spread over many runs and objects. Fast enough to use hypothesis."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from token_helpers import object_paths, random_bytes, read_manifest

import vhsmfs.store as store_mod
import vhsmfs.tokenwriter as writer_mod
from vhsmfs.backend import LocalBackend
from vhsmfs.errors import IntegrityError
from vhsmfs.format import RECORD_OVERHEAD
from vhsmfs.keyfile import StaticKeyProvider
from vhsmfs.safefs import UnsafeEntryError
from vhsmfs.store import TokenStore

PROPERTY = settings(
    max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def boundary_sizes(cs: int) -> list[int]:
    return [0, 1, cs - 1, cs, cs + 1, 2 * cs - 1, 2 * cs, 2 * cs + 1, 37 * cs + 5]


def roundtrip(ts: TokenStore, data: bytes, work: Path, name: str = "f.bin") -> uuid.UUID:
    src = work / "in" / name
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(data)
    tok = ts.store_file(src)
    out = work / "out"
    dest = ts.retrieve(tok, out)
    assert dest == out / name
    assert dest.read_bytes() == data
    # nothing else released next to it (no temp files)
    assert sorted(p.name for p in out.iterdir()) == [name]
    ts.verify_full(tok)
    ts.verify_ciphertext(tok)
    cs = ts.chunk_size
    count = -(-len(data) // cs)
    s = ts.summary(tok)
    assert (s.size, s.chunk_count, s.chunk_size, s.readable) == (len(data), count, cs, True)
    # format v2 stores no whole-file digest: it is computed on demand (info --digest)
    assert s.sha256 is None
    assert ts.digest(tok) == hashlib.sha256(data).hexdigest()
    assert s.stored_bytes == len(data) + count * RECORD_OVERHEAD
    entries = read_manifest(ts.backend.root, tok)  # type: ignore[attr-defined]
    assert [e[2] - RECORD_OVERHEAD for e in entries] == [
        min(cs, len(data) - i * cs) for i in range(count)
    ]
    return tok


@pytest.mark.parametrize("cs", [512, 777, 8192])
@pytest.mark.parametrize("parallel", [1, 3])
def test_roundtrip_chunk_boundaries(make_store, tmp_path: Path, cs: int, parallel: int) -> None:
    ts = make_store(chunk_size=cs, parallel=parallel)
    for i, size in enumerate(boundary_sizes(cs)):
        work = tmp_path / f"w{i}"
        roundtrip(ts, random_bytes(size, seed=size), work)


def test_empty_file_is_a_valid_token(make_store, tmp_path: Path) -> None:
    ts = make_store()
    tok = roundtrip(ts, b"", tmp_path)
    assert ts.summary(tok).chunk_count == 0


def test_roundtrip_many_runs_and_objects(make_store, tmp_path: Path) -> None:
    """Small run and object targets: a file spans several pipeline runs and several objects,
    with runs that do and do not fall on chunk boundaries."""
    ts = make_store(chunk_size=512, parallel=3)
    with (
        mock.patch.object(store_mod, "RUN_TARGET", 1500),
        mock.patch.object(writer_mod, "OBJECT_TARGET", 3000),
    ):
        for i, size in enumerate([1023, 1024, 1025, 3 * 1024, 20_000, 20_480]):
            tok = roundtrip(ts, random_bytes(size, seed=i), tmp_path / f"w{i}")
            if size >= 20_000:
                assert len(object_paths(Path(ts.backend.root), tok)) >= 6


def test_tokens_are_independent(make_store, tmp_path: Path) -> None:
    """Same content stored twice: distinct tokens, distinct ciphertext (fresh salt and nonces)."""
    ts = make_store()
    data = random_bytes(3000, seed=7)
    a = roundtrip(ts, data, tmp_path / "a")
    b = roundtrip(ts, data, tmp_path / "b")
    assert a != b
    root = Path(ts.backend.root)
    assert (root / f"{a}.data/00000000").read_bytes() != (root / f"{b}.data/00000000").read_bytes()


def test_metadata_restored(make_store, tmp_path: Path) -> None:
    ts = make_store()
    src = tmp_path / "doc.txt"
    src.write_bytes(b"hello\n")
    src.chmod(0o640)
    os.utime(src, ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
    tok = ts.store_file(src)
    dest = ts.retrieve(tok, tmp_path / "out")
    st_ = dest.stat()
    assert dest.name == "doc.txt"
    assert st_.st_mode & 0o7777 == 0o640
    assert st_.st_mtime_ns == 1_600_000_000_123_456_789


# -- hypothesis -------------------------------------------------------------------------------

CHUNK_SIZES = [512, 513, 1000, 4096, 8192, 65536]


@st.composite
def sized_case(draw: st.DrawFn) -> tuple[int, int, int, int]:
    cs = draw(st.sampled_from(CHUNK_SIZES))
    near = st.builds(lambda k, d: max(0, k * cs + d), st.integers(0, 6), st.integers(-2, 2))
    size = draw(st.one_of(near, st.integers(0, 4 * cs + 100)))
    parallel = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32))
    return cs, size, parallel, seed


@PROPERTY
@given(case=sized_case(), small_targets=st.booleans())
def test_roundtrip_property(case: tuple[int, int, int, int], small_targets: bool) -> None:
    cs, size, parallel, seed = case
    data = random_bytes(size, seed)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        ts = TokenStore(
            LocalBackend(work / "store"),
            StaticKeyProvider(os.urandom(32)),
            chunk_size=cs,
            parallel=parallel,
        )
        run = 2 * cs + 3 if small_targets else store_mod.RUN_TARGET
        obj = 3 * cs if small_targets else writer_mod.OBJECT_TARGET
        with (
            mock.patch.object(store_mod, "RUN_TARGET", run),
            mock.patch.object(writer_mod, "OBJECT_TARGET", obj),
        ):
            roundtrip(ts, data, work)


@settings(max_examples=60, deadline=None, database=None)
@given(data=st.binary(max_size=3000), cs=st.sampled_from([512, 600, 1024]))
def test_roundtrip_arbitrary_content(data: bytes, cs: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        ts = TokenStore(
            LocalBackend(work / "store"),
            StaticKeyProvider(os.urandom(32)),
            chunk_size=cs,
            parallel=1,
        )
        roundtrip(ts, data, work)
        shutil.rmtree(work / "out")


def test_retrieve_never_writes_through_a_symlink(make_store, tmp_path: Path) -> None:
    ts = make_store()
    data = random_bytes(2000, 1)
    (tmp_path / "doc").write_bytes(data)
    tok = ts.store_file(tmp_path / "doc")
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "victim"
    target.write_bytes(b"do not touch")
    (out / "doc").symlink_to(target)
    # an existing destination that is not a regular file is never replaced, even with force
    for force in (False, True):
        with pytest.raises(UnsafeEntryError, match="symbolic link"):
            ts.retrieve(tok, out, force=force)
        assert target.read_bytes() == b"do not touch" and (out / "doc").is_symlink()
        assert sorted(os.listdir(out)) == ["doc"]
    (out / "doc").unlink()
    ts.retrieve(tok, out)
    assert (out / "doc").read_bytes() == data


def test_failed_forced_retrieve_keeps_existing_file(make_store, tmp_path: Path) -> None:
    ts = make_store()
    (tmp_path / "doc").write_bytes(random_bytes(2000, 2))
    tok = ts.store_file(tmp_path / "doc")
    (obj,) = object_paths(Path(ts.backend.root), tok)
    buf = bytearray(obj.read_bytes())
    buf[-1] ^= 1
    obj.write_bytes(buf)
    out = tmp_path / "out"
    out.mkdir()
    (out / "doc").write_bytes(b"previous version")
    with pytest.raises(IntegrityError):
        ts.retrieve(tok, out, force=True)
    assert (out / "doc").read_bytes() == b"previous version"
    assert sorted(os.listdir(out)) == ["doc"]
