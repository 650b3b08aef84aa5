"""Garbage collection of interrupted operations, and all-or-nothing behaviour when the disk fills
up at any point of a store or a retrieve (library level, tmpfs filled to exact levels)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from token_helpers import random_bytes, store_leftovers, store_names

from vhsmfs.errors import VhsmError
from vhsmfs.store import TokenStore


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def _store(ts: TokenStore, tmp: Path, size: int = 5000, seed: int = 1) -> uuid.UUID:
    src = tmp / f"src{seed}"
    src.write_bytes(random_bytes(size, seed))
    return ts.store_file(src)


def test_gc_finishes_interrupted_delete(make_store, tmp_path: Path) -> None:
    """State left by a delete killed right after hiding the token (metadata renamed to the
    tombstone, data not yet wiped). gc must finish it without error."""
    ts = make_store()
    keep = _store(ts, tmp_path, seed=1)
    tok = _store(ts, tmp_path, seed=2)
    root = Path(ts.backend.root)
    os.rename(root / f"{tok}.metadata", root / f".{tok}.deleting")
    assert ts.list_tokens() == [keep]
    removed = ts.backend.collect_garbage()
    assert any(str(tok) in line for line in removed)
    assert store_names(root) == sorted(["VHSM-STORE", f"{keep}.metadata", f"{keep}.data"])
    ts.verify_full(keep)


def test_gc_interrupted_delete_with_data_already_wiped(make_store, tmp_path: Path) -> None:
    ts = make_store()
    tok = _store(ts, tmp_path)
    root = Path(ts.backend.root)
    os.rename(root / f"{tok}.metadata", root / f".{tok}.deleting")
    for f in (root / f"{tok}.data").iterdir():
        f.unlink()
    (root / f"{tok}.data").rmdir()
    assert ts.backend.collect_garbage()
    assert store_names(root) == ["VHSM-STORE"]


def test_gc_removes_unfinished_store_but_not_one_in_progress(make_store, tmp_path: Path) -> None:
    ts = make_store()
    root = Path(ts.backend.root)
    dead, live = uuid.uuid4(), uuid.uuid4()
    for t in (dead, live):
        w = ts.backend.new_object(t, 0)
        w.write(b"x" * 1000)
        w.finish()
    with ts.backend.writing(live):
        removed = ts.backend.collect_garbage()
        assert any(str(dead) in line for line in removed)
        assert not (root / f"{dead}.data").exists()
        assert (root / f"{live}.data/00000000").stat().st_size == 1000
    ts.backend.collect_garbage()
    assert store_names(root) == ["VHSM-STORE"]


def test_gc_removes_stale_temp_metadata_only(make_store, tmp_path: Path) -> None:
    ts = make_store()
    root = Path(ts.backend.root)
    tok = uuid.uuid4()
    stale = root / f".{tok}.metadata.{_dead_pid()}.abcd1234"
    alive = root / f".{tok}.metadata.{os.getpid()}.abcd1234"
    stale.write_bytes(b"half")
    alive.write_bytes(b"being written")
    ts.backend.collect_garbage()
    assert not stale.exists() and alive.exists()
    assert ts.list_tokens() == []


# -- the disk fills up at every possible point --------------------------------------------------

PAGE = 4096


def _fill_to(mnt: Path, free_pages: int) -> Path:
    filler = mnt / ".filler"
    filler.unlink(missing_ok=True)
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    filler.write_bytes(bytes(max(0, free - free_pages * PAGE)))
    return filler


def test_store_all_or_nothing_at_every_fill_level(make_store, tmp_path: Path, tmpfs) -> None:  # type: ignore[no-untyped-def]
    """With 0..N free pages the store either succeeds completely or fails with a VhsmError and
    leaves the store exactly as it was; somewhere in the range the objects fit but the metadata
    commit does not, which exercises the late failure path."""
    mnt = tmpfs("small", "1m")
    data = random_bytes(5 * PAGE + 123, 3)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    ts = make_store(mnt / "store", chunk_size=1024)
    outcomes = []
    for free in range(0, 10):
        filler = _fill_to(mnt, free)
        before = store_leftovers(mnt / "store")
        try:
            tok = ts.store_file(src)
        except VhsmError as e:
            outcomes.append(False)
            assert "space" in str(e).lower(), e
            # as it was; nothing hidden (temp files in .tmp/ included) left behind
            assert store_leftovers(mnt / "store") == before
            assert not any(n.startswith(".") for n in store_leftovers(mnt / "store"))
        else:
            outcomes.append(True)
            filler.unlink()
            out = tmp_path / f"out{free}"
            assert ts.retrieve(tok, out).read_bytes() == data
            ts.delete(tok)
        filler.unlink(missing_ok=True)
    assert outcomes[0] is False and outcomes[-1] is True
    assert store_names(mnt / "store") == ["VHSM-STORE"]


def test_retrieve_all_or_nothing_at_every_fill_level(make_store, tmp_path: Path, tmpfs) -> None:  # type: ignore[no-untyped-def]
    mnt = tmpfs("small", "1m")
    data = random_bytes(5 * PAGE + 123, 4)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    ts = make_store(tmp_path / "store", chunk_size=1024)
    tok = ts.store_file(src)
    outcomes = []
    for free in range(0, 9):
        _fill_to(mnt, free)
        out = mnt / f"out{free}"
        try:
            dest = ts.retrieve(tok, out)
        except VhsmError as e:
            outcomes.append(False)
            assert "space" in str(e).lower(), e
            assert not out.exists()
        else:
            outcomes.append(True)
            got = dest.read_bytes()
            assert len(got) == len(data), f"released a short file at {free} free pages"
            assert got == data
            assert os.listdir(out) == ["src.bin"]
            dest.unlink()
            out.rmdir()
        assert sorted(os.listdir(mnt)) == [".filler"]
    assert outcomes[0] is False and outcomes[-1] is True


@pytest.mark.parametrize("size", [0, 1])
def test_tiny_tokens_survive_gc(make_store, tmp_path: Path, size: int) -> None:
    ts = make_store()
    tok = _store(ts, tmp_path, size=size)
    assert ts.backend.collect_garbage() == []
    ts.verify_full(tok)


# -- gc running while a store is under way ------------------------------------------------------


def _gc_during_store(ts: TokenStore, tmp: Path, *, race_start: bool) -> uuid.UUID | None:
    """Store a file while gc runs after every run of chunks is written. With race_start, one
    more gc lands between the writer's open() of its data directory and its flock() -- a window
    of microseconds in real life, forced here."""
    import fcntl
    from unittest import mock

    import vhsmfs.store as store_mod

    backend = ts.backend
    real_flock = fcntl.flock
    state = {"raced": False}

    def flock(fd: int, op: int) -> None:
        if race_start and op == fcntl.LOCK_SH and not state["raced"]:
            state["raced"] = True
            backend.collect_garbage()
        real_flock(fd, op)

    src = tmp / "src.bin"
    src.write_bytes(random_bytes(20_000, 9))
    with (
        mock.patch("vhsmfs.backend.fcntl.flock", flock),
        mock.patch.object(store_mod, "RUN_TARGET", 4096),
    ):
        try:
            return ts.store_file(src, progress=lambda _n: backend.collect_garbage())
        except VhsmError:
            return None  # a failed store is acceptable; a committed broken token is not


def test_gc_during_store_does_not_reap_it(make_store, tmp_path: Path) -> None:
    ts = make_store(chunk_size=1024)
    tok = _gc_during_store(ts, tmp_path, race_start=False)
    assert tok is not None
    ts.verify_full(tok)


def test_gc_racing_the_start_of_a_store_never_commits_a_broken_token(
    make_store, tmp_path: Path
) -> None:
    """gc can wipe and rmdir the data directory after the writer opened it but before it took
    its shared flock. The writer must notice it locked a dead directory and start again;
    otherwise new_object() recreates an unlocked one, the next gc wipes the objects in it, and
    commit_metadata publishes a token whose objects are gone (a bug this test found)."""
    ts = make_store(chunk_size=1024)
    tok = _gc_during_store(ts, tmp_path, race_start=True)
    if tok is not None:
        ts.verify_full(tok)
        ts.verify_ciphertext(tok)
    assert ts.backend.collect_garbage() == [] or tok is None
