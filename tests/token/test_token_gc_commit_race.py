"""gc must never reap a token that committed between gc listing the store and gc locking the
token's data directory (the writer has then released its lock, so the lock alone can't tell)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from unittest import mock

from vhsmfs.backend import LocalBackend
from vhsmfs.keyfile import StaticKeyProvider
from vhsmfs.store import TokenStore


def test_gc_keeps_a_token_that_committed_after_the_listing(tmp_path: Path) -> None:
    ts = TokenStore(
        LocalBackend(tmp_path / "store"),
        StaticKeyProvider(os.urandom(32)),
        chunk_size=1024,
        parallel=1,
    )
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(10_000))
    tok = ts.store_file(src)
    meta = tmp_path / "store" / f"{tok}.metadata"
    hidden = tmp_path / "hidden.metadata"
    os.rename(meta, hidden)  # as gc's listing saw it: data directory, no metadata yet

    real_flock = fcntl.flock

    def flock(fd: int, op: int) -> None:
        if op & fcntl.LOCK_EX and hidden.exists():
            os.rename(hidden, meta)  # the writer commits just before gc takes the lock
        real_flock(fd, op)

    with mock.patch("vhsmfs.backend.fcntl.flock", flock):
        removed = ts.backend.collect_garbage()

    assert removed == []
    ts.verify_full(tok)
