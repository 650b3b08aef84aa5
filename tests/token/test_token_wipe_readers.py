"""`delete` wipes at once, but never zeros under a backup tool that is copying the file: a file
another process keeps open longer than the reader wait is unlinked without being overwritten
(the copy it is making stays good), and the skip is logged."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from token_helpers import object_paths, random_bytes

import vhsmfs.backend as backend_mod


def test_object_held_open_by_a_reader_is_unlinked_not_zeroed(
    make_store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ts = make_store()
    src = tmp_path / "f.bin"
    src.write_bytes(random_bytes(50_000, seed=7))
    tok = ts.store_file(src)
    (obj,) = object_paths(ts.backend.root, tok)
    fd = os.open(obj, os.O_RDONLY)  # a backup tool in the middle of copying the object
    try:
        before = os.pread(fd, 1 << 20, 0)
        monkeypatch.setattr(backend_mod, "READER_WAIT", 0.3)
        with caplog.at_level(logging.WARNING, logger="vhsm.store"):
            ts.delete(tok)
        assert not obj.exists() and tok not in ts.list_tokens()
        assert os.pread(fd, 1 << 20, 0) == before != bytes(len(before))  # not zeros
        assert "unlinked without overwriting" in caplog.text
    finally:
        os.close(fd)
