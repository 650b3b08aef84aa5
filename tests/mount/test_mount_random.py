"""A seeded random-operation test: thousands of mixed writes, truncates, renames, reads, fsyncs,
closes and unlinks across several files, applied to the mount and to a plain directory, which
must agree at every read, at the end, and again after a remount."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

SEED = 20261127
OPS = 4000
NAMES = ["a.bin", "b.bin", "c.bin", "sub/d.bin", "sub/e.bin", "sub/f.bin", "g.bin"]


class Twin:
    """The same file open in the mount and in the reference directory."""

    def __init__(self, roots: tuple[Path, Path], name: str) -> None:
        self.fds = [os.open(r / name, os.O_RDWR | os.O_CREAT, 0o644) for r in roots]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def snapshot(root: Path) -> dict[str, bytes]:
    out = {}
    for name in NAMES:
        p = root / name
        if p.exists():
            out[name] = p.read_bytes()
    return out


def test_random_operations_match_a_plain_directory(mounter, tmp_path, monkeypatch, token_store):
    # small chunks: many chunk boundaries, final-chunk changes and holes per operation
    monkeypatch.setenv("TOKEN_CHUNK_SIZE", "4096")
    # and early background write-back, so writes race with chunks still being encrypted
    monkeypatch.setenv("VHSM_MOUNT_WRITEBACK_BYTES", "65536")
    m = mounter()
    ref = tmp_path / "ref"
    roots = (m.mnt, ref)
    for r in roots:
        (r / "sub").mkdir(parents=True)
    rng = random.Random(SEED)
    open_: dict[str, Twin] = {}
    sizes: dict[str, int] = {}

    def twin(name: str) -> Twin:
        if name not in open_:
            open_[name] = Twin(roots, name)
            sizes.setdefault(name, 0)
        return open_[name]

    def close(name: str) -> None:
        t = open_.pop(name, None)
        if t is not None:
            t.close()

    counts: dict[str, int] = {}
    for step in range(OPS):
        name = rng.choice(NAMES)
        r = rng.random()
        size = sizes.get(name, 0)
        if r < 0.40:
            op = "write"
            off = rng.randrange(0, size + 70_000)
            n = rng.choice([1, 7, 512, 4096, 4097, 8191, rng.randrange(1, 70_000)])
            if rng.random() < 0.02:
                n = rng.randrange(200_000, 1_500_000)
            data = rng.randbytes(n)
            for fd in twin(name).fds:
                assert os.pwrite(fd, data, off) == n
            sizes[name] = max(size, off + n)
        elif r < 0.50:
            op = "truncate"
            new = rng.randrange(0, int(size * 1.3) + 9_000)
            for fd in twin(name).fds:
                os.ftruncate(fd, new)
            sizes[name] = new
        elif r < 0.78:
            op = "read"
            if name not in sizes:
                continue
            off = rng.randrange(0, size + 5_000)
            n = rng.randrange(1, 100_000)
            got, want = (os.pread(fd, n, off) for fd in twin(name).fds)
            assert got == want, f"step {step}: read {name} [{off}, +{n})"
        elif r < 0.86:
            op = "rename"
            if name not in sizes:
                continue
            dst = rng.choice([x for x in NAMES if x != name])
            close(dst)  # the replaced file's descriptors would point at a deleted file
            for root in roots:
                os.rename(root / name, root / dst)
            if name in open_:
                open_[dst] = open_.pop(name)
            sizes[dst] = sizes.pop(name)
        elif r < 0.92:
            op = "close"
            close(name)
        elif r < 0.96:
            op = "fsync"
            if name in sizes:
                for fd in twin(name).fds:
                    os.fsync(fd)
        else:
            op = "unlink"
            if name not in sizes:
                continue
            for root in roots:
                os.unlink(root / name)  # open descriptors keep working on both sides
            close(name)
            del sizes[name]
        counts[op] = counts.get(op, 0) + 1
    for name in list(open_):
        close(name)
    assert min(counts.values()) > 50, counts
    assert snapshot(m.mnt) == snapshot(ref)
    assert sorted(os.listdir(m.mnt / "sub")) == sorted(os.listdir(ref / "sub"))
    m.stop()
    for tok in token_store.list_tokens():
        token_store.verify_full(tok)
    m2 = mounter()
    assert snapshot(m2.mnt) == snapshot(ref)
