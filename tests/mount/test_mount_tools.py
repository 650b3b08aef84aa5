"""Ordinary tools copy in and out unchanged: cp, cp -a, cp -r, rsync -a, tar x, shutil.copy2,
and editors that save through a temp file and rename."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import sysconfig
import tarfile
import time
from pathlib import Path

import pytest

from vhsmfs.errors import TokenNotFoundError

pytestmark = pytest.mark.timeout(300)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SOURCE_DIRS = ["json", "email", "asyncio", "xml", "concurrent", "urllib", "http", "logging"]


def tree(root: Path, *, times: bool, resolution: int = 1) -> dict[str, tuple]:
    """Relative path -> (kind, mode, sha256 of content, mtime if asked, in `resolution` ns)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
            mtime = st.st_mtime_ns // resolution if times and stat.S_ISREG(st.st_mode) else 0
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), digest, mtime)
    return out


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory) -> Path:
    """A real source tree: part of the Python standard library, with varied modes and times."""
    root = tmp_path_factory.mktemp("src") / "pysrc"
    for d in SOURCE_DIRS:
        shutil.copytree(STDLIB / d, root / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (root / "empty-dir").mkdir()
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "run.sh", 0o750)
    os.chmod(root / "json" / "__init__.py", 0o600)
    (root / "big.bin").write_bytes(os.urandom(5 * 1024 * 1024 + 17))
    (root / "empty.txt").write_bytes(b"")
    os.utime(root / "big.bin", ns=(1_000_000_000_000_000_000, 1_200_000_000_123_456_789))
    return root


def run(*cmd: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
    assert res.returncode == 0, f"{cmd}: {res.stdout}\n{res.stderr}"


def test_cp_r_and_cp_a(vault, source_tree, tmp_path):
    run("cp", "-r", str(source_tree), str(vault.mnt / "r"))
    assert tree(vault.mnt / "r", times=False) == tree(source_tree, times=False)
    run("cp", "-a", str(source_tree), str(vault.mnt / "a"))
    assert tree(vault.mnt / "a", times=True) == tree(source_tree, times=True)
    # and back out again
    run("cp", "-a", str(vault.mnt / "a"), str(tmp_path / "back"))
    assert tree(tmp_path / "back", times=True) == tree(source_tree, times=True)


def test_plain_cp_of_single_files(vault, source_tree):
    run("cp", str(source_tree / "big.bin"), str(vault.mnt / "big.bin"))
    assert (vault.mnt / "big.bin").read_bytes() == (source_tree / "big.bin").read_bytes()
    run("cp", str(source_tree / "run.sh"), str(vault.mnt))
    assert (vault.mnt / "run.sh").read_bytes() == (source_tree / "run.sh").read_bytes()
    # overwrite in place (cp truncates the existing file)
    run("cp", str(source_tree / "run.sh"), str(vault.mnt / "big.bin"))
    assert (vault.mnt / "big.bin").read_bytes() == (source_tree / "run.sh").read_bytes()


def test_rsync_a(vault, source_tree):
    run("rsync", "-a", f"{source_tree}/", str(vault.mnt / "rs"))
    assert tree(vault.mnt / "rs", times=True) == tree(source_tree, times=True)
    # a second run with one change goes through rsync's temp-file-and-rename
    changed = vault.mnt / "rs" / "json" / "decoder.py"
    with open(changed, "ab") as f:
        f.write(b"# local edit\n")
    run("rsync", "-a", "--checksum", f"{source_tree}/", str(vault.mnt / "rs"))
    assert tree(vault.mnt / "rs", times=True) == tree(source_tree, times=True)


def test_tar_x_of_source_tree(vault, source_tree, tmp_path):
    archive = tmp_path / "src.tar"
    with tarfile.open(archive, "w") as t:
        t.add(source_tree, arcname="pysrc")
    run("tar", "-x", "-f", str(archive), "-C", str(vault.mnt))
    # a pax archive keeps mtimes as decimal seconds: equal to within a few microseconds
    got, want = tree(vault.mnt / "pysrc", times=True), tree(source_tree, times=True)
    assert got.keys() == want.keys()
    for k, (kind, mode, digest, mtime) in want.items():
        assert got[k][:3] == (kind, mode, digest), k
        assert abs(got[k][3] - mtime) < 5_000, k
    run("tar", "-c", "-f", str(tmp_path / "again.tar"), "-C", str(vault.mnt), "pysrc")
    out = tmp_path / "out"
    out.mkdir()
    run("tar", "-x", "-f", str(tmp_path / "again.tar"), "-C", str(out))
    assert tree(out / "pysrc", times=True, resolution=10**9) == tree(
        source_tree, times=True, resolution=10**9
    )


def test_shutil_copy2(vault, source_tree):
    src = source_tree / "big.bin"
    dst = shutil.copy2(src, vault.mnt / "copy2.bin")
    s, d = os.stat(src), os.stat(dst)
    assert Path(dst).read_bytes() == src.read_bytes()
    assert d.st_mtime_ns == s.st_mtime_ns and stat.S_IMODE(d.st_mode) == stat.S_IMODE(s.st_mode)


def test_editor_save_by_temp_and_rename(vault, token_store):
    """As vim/emacs/gedit do: write a temp file, fsync, rename it over the original."""
    target = vault.mnt / "notes" / "todo.txt"
    target.parent.mkdir()
    target.write_text("version 1\n")
    os.chmod(target, 0o640)
    for n in range(2, 6):
        tmp = target.parent / f".todo.txt.swp{n}"
        with open(tmp, "w") as f:
            f.write(f"version {n}\n" * n)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o640)
        os.replace(tmp, target)
        assert target.read_text() == f"version {n}\n" * n
    assert sorted(os.listdir(target.parent)) == ["todo.txt"]

    def names() -> list[str]:
        out = []
        for t in token_store.list_tokens():
            with contextlib.suppress(TokenNotFoundError):  # replaced ones are wiped meanwhile
                out.append(token_store.open_token(t).meta.name)
        return sorted(n for n in out if n.startswith("notes/"))

    deadline = time.monotonic() + 20
    while names() != ["notes/todo.txt"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert names() == ["notes/todo.txt"]
