"""dd of 1 GiB into the mount and back (store on tmpfs), then the token checked in-process."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from vhsmfs.backend import LocalBackend
from vhsmfs.keyfile import StaticKeyProvider, load_key_file
from vhsmfs.store import TokenStore

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

GIB = 1 << 30
BLOCK = 1 << 20


def pattern_file(path: Path) -> str:
    """1 GiB of incompressible data built from a 16 MiB random block, each MiB tagged with its
    index so misplaced blocks cannot compare equal. Returns its SHA-256."""
    base = os.urandom(16 * BLOCK)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(GIB // BLOCK):
            block = bytearray(base[(i % 16) * BLOCK : (i % 16 + 1) * BLOCK])
            block[:8] = i.to_bytes(8, "big")
            f.write(block)
            h.update(block)
    return h.hexdigest()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(4 * BLOCK):
            h.update(chunk)
    return h.hexdigest()


def test_dd_one_gib_write_and_read_back(tmpfs, mounter, key_file, tmp_path):
    store = tmpfs / f"store-{os.getpid()}"
    src = tmpfs / "src.bin"
    want = pattern_file(src)
    try:
        m = mounter("--store", str(store))  # the last --store wins: keep it in RAM
        dst = m.mnt / "big.bin"
        res = subprocess.run(
            ["dd", f"if={src}", f"of={dst}", "bs=1M", "conv=fsync"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert res.returncode == 0, res.stderr
        assert os.path.getsize(dst) == GIB
        # remount: a fresh inode, so the read really goes through decryption, not page cache
        m.stop()
        m2 = mounter("--store", str(store))
        assert sha256_of(m2.mnt / "big.bin") == want
        m2.stop()
        ts = TokenStore(LocalBackend(store), StaticKeyProvider(load_key_file(key_file)))
        (tok,) = ts.list_tokens()
        t = ts.open_token(tok)
        assert t.meta.size == GIB
        assert t.meta.sha256 is None  # format v2 stores none: computed on demand
        assert ts.digest(t) == want
        ts.verify_full(tok)
    finally:
        src.unlink(missing_ok=True)
        subprocess.run(["rm", "-rf", str(store)], check=False, timeout=60)
