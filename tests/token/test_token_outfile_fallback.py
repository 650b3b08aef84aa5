"""retrieve on a filesystem without O_TMPFILE: a hidden 0600 temp file is used instead, and it
is gone again after success and after a failed check (nothing half-written is left)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from unittest import mock

import pytest
from token_helpers import object_paths

import vhsmfs.outfile as outfile
from vhsmfs.errors import IntegrityError

_real_open = os.open


def _no_tmpfile(path, flags, mode=0o777, *, dir_fd=None):  # type: ignore[no-untyped-def]
    if flags & os.O_TMPFILE == os.O_TMPFILE:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")
    return _real_open(path, flags, mode, dir_fd=dir_fd)


def test_fallback_round_trip_and_failure_leave_no_temp_file(make_store, tmp_path: Path) -> None:
    ts = make_store(chunk_size=512)
    src = tmp_path / "doc.bin"
    src.write_bytes(os.urandom(5000))
    tok = ts.store_file(src)
    out = tmp_path / "out"
    out.mkdir()
    with mock.patch.object(outfile.os, "open", _no_tmpfile):
        dest = ts.retrieve(tok, out)
        assert dest.read_bytes() == src.read_bytes()
        assert sorted(p.name for p in out.iterdir()) == ["doc.bin"]

        # damage the last chunk: the check fails after plaintext was written to the temp file
        (obj,) = object_paths(tmp_path / "store", tok)
        data = bytearray(obj.read_bytes())
        data[-1] ^= 1
        obj.write_bytes(data)
        with pytest.raises(IntegrityError):
            ts.retrieve(tok, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["doc.bin"]  # no .vhsm-part left
    assert dest.read_bytes() == src.read_bytes()  # the existing file was not touched
