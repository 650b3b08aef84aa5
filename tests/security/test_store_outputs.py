"""Output paths of `vhsm token retrieve` and `generate-key` (issue 11 class 2): nothing is written
outside the directory the user named, and an existing entry that is not a regular file (a link,
FIFO, device, directory) is never replaced, not even with --force."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from attack import assert_one_line_error, snapshot, tree_snapshot
from storekit import Scene, replace_with

DOC = b"the document\n" * 300


def test_retrieve_refuses_symlinked_directories_inside_outdir(tmp_path: Path) -> None:
    """A token stored with --recursive (name proj/sub/doc.txt); OUTDIR/proj or OUTDIR/proj/sub
    planted as a link to a victim directory: the file used to land in the victim."""
    s = Scene(tmp_path)
    (s.work / "proj/sub").mkdir(parents=True)
    (s.work / "proj/sub/doc.txt").write_bytes(DOC)
    tok = s.ok("token", "store", "proj", "-r", "-q", "--key", str(s.key)).strip()
    victim = s.victim_dir()
    before = tree_snapshot(victim)
    out = s.work / "out"
    out.mkdir()
    replace_with(out / "proj", "symlink", victim)
    assert_one_line_error(s.keyed("token", "retrieve", tok, "out"), "out/proj", "symbolic link")
    replace_with(out / "proj", "dir")
    replace_with(out / "proj" / "sub", "symlink", victim)
    assert_one_line_error(
        s.keyed("token", "retrieve", tok, "out", "--force"), "proj/sub", "symbolic link"
    )
    replace_with(out / "proj" / "sub", "fifo")
    assert_one_line_error(s.keyed("token", "retrieve", tok, "out"), "proj/sub", "FIFO")
    assert tree_snapshot(victim) == before

    # OUTDIR itself may be a link: that is the user's own choice, and it is followed
    (s.work / "via-link").symlink_to(s.work / "real-out", target_is_directory=True)
    (s.work / "real-out").mkdir()
    assert s.keyed("token", "retrieve", tok, "via-link").returncode == 0
    assert (s.work / "real-out/proj/sub/doc.txt").read_bytes() == DOC


@pytest.mark.parametrize("kind", ["symlink", "fifo", "null"])
def test_retrieve_never_replaces_a_non_regular_destination(tmp_path: Path, kind: str) -> None:
    s = Scene(tmp_path)
    tok = s.put("doc.txt", DOC)
    victim = s.work / "victim.txt"
    victim.write_bytes(b"victim\n")
    out = s.work / "out"
    out.mkdir()
    replace_with(out / "doc.txt", kind, victim)
    before = snapshot(out / "doc.txt"), snapshot(victim)
    for force in ((), ("--force",)):
        p = s.keyed("token", "retrieve", tok, "out", *force)
        assert_one_line_error(p, "out/doc.txt")
    assert (snapshot(out / "doc.txt"), snapshot(victim)) == before
    assert sorted(os.listdir(out)) == ["doc.txt"]  # no temp file left behind

    # a regular file: only with --force, and replaced by rename (a new inode)
    replace_with(out / "doc.txt", "dir")
    (out / "doc.txt").rmdir()
    (out / "doc.txt").write_bytes(b"old\n")
    old_ino = (out / "doc.txt").stat().st_ino
    assert_one_line_error(s.keyed("token", "retrieve", tok, "out"), "already exists")
    assert s.keyed("token", "retrieve", tok, "out", "--force").returncode == 0
    assert (out / "doc.txt").read_bytes() == DOC and (out / "doc.txt").stat().st_ino != old_ino


@pytest.mark.parametrize("kind", ["symlink", "fifo", "null"])
def test_generate_key_never_replaces_a_non_regular_file(tmp_path: Path, kind: str) -> None:
    """generate-key FILE --force replaced whatever was at FILE (as root: /dev/null too)."""
    s = Scene(tmp_path)
    victim = s.work / "victim.txt"
    victim.write_bytes(b"victim\n")
    target = s.work / "new.key"
    replace_with(target, kind, victim)
    before = snapshot(target), snapshot(victim)
    for force in ((), ("--force",)):
        assert_one_line_error(s.run("token", "generate-key", str(target), *force), "new.key")
    assert (snapshot(target), snapshot(victim)) == before
    assert sorted(p.name for p in s.work.iterdir() if "new.key" in p.name) == ["new.key"]

    target.unlink()
    target.write_bytes(b"old key")
    assert_one_line_error(s.run("token", "generate-key", str(target)), "already exists")
    s.ok("token", "generate-key", str(target), "--force")
    assert len(target.read_bytes()) == 32 and target.stat().st_mode & 0o777 == 0o600
