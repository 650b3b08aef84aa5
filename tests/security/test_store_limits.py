"""Settings and sizes the token store must refuse up front (issue 11 classes 1 and 7): chunk size
and parallelism only as plain ASCII digits, and a file whose manifest would pass the format's cap
refused before anything is written (readers would refuse its metadata)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from attack import assert_one_line_error, env_for
from storekit import Scene, run_cli

from vhsmfs.errors import InputError
from vhsmfs.tokenwriter import check_chunk_count

# the format's cap: a manifest of at most 1 GiB, 32 bytes per chunk in format v2 (docs/FORMAT.md
# section 3)
MAX_CHUNK_COUNT = (1 << 30) // 32


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TOKEN_CHUNK_SIZE", " 8192"),
        ("TOKEN_CHUNK_SIZE", "8192\n"),
        ("TOKEN_CHUNK_SIZE", "+8192"),
        ("TOKEN_CHUNK_SIZE", "8_192"),
        ("TOKEN_CHUNK_SIZE", "\uff18\uff11\uff19\uff12"),  # fullwidth digits
        ("TOKEN_PARALLEL_CHUNKS", " 2"),
        ("TOKEN_PARALLEL_CHUNKS", "\u0662"),  # ARABIC-INDIC DIGIT TWO
    ],
)
def test_settings_are_plain_digits(tmp_path: Path, name: str, value: str) -> None:
    s = Scene(tmp_path)
    (s.work / "f.txt").write_bytes(b"data\n")
    env = env_for(VHSM_STORE=str(s.store), **{name: value})
    p = run_cli("token", "store", "f.txt", "--key", str(s.key), cwd=s.work, env=env)
    assert_one_line_error(p, name, "digits")
    assert not s.store.exists() or not [n for n in os.listdir(s.store) if n != "VHSM-STORE"]
    env[name] = "8192" if name == "TOKEN_CHUNK_SIZE" else "2"  # the plain spelling works
    p = run_cli("token", "store", "f.txt", "--key", str(s.key), cwd=s.work, env=env)
    assert p.returncode == 0, p.stderr


def test_store_refuses_a_file_with_too_many_chunks_up_front(tmp_path: Path) -> None:
    """A sparse file one chunk past the cap at 512-byte chunks: refused at once with the chunk
    size that would fit, nothing written (it used to start encrypting 11 GB)."""
    from vhsmfs.format import MAX_CHUNK_COUNT as cap

    assert cap == MAX_CHUNK_COUNT == 33_554_432
    s = Scene(tmp_path)
    big = s.work / "huge.img"
    with open(big, "wb") as f:
        f.truncate((MAX_CHUNK_COUNT + 1) * 512)
    env = env_for(VHSM_STORE=str(s.store), TOKEN_CHUNK_SIZE="512")
    p = run_cli("token", "store", "huge.img", "--key", str(s.key), cwd=s.work, env=env)
    assert_one_line_error(p, "huge.img", "TOKEN_CHUNK_SIZE=513")
    assert [n for n in os.listdir(s.store) if n != "VHSM-STORE"] == []
    # the cap itself still fits: one chunk fewer is not refused up front
    check_chunk_count(MAX_CHUNK_COUNT * 512, 512, "at the cap")
    with pytest.raises(InputError, match="TOKEN_CHUNK_SIZE=513"):
        check_chunk_count((MAX_CHUNK_COUNT + 1) * 512, 512, "past the cap")
