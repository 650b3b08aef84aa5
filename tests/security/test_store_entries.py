"""The token store under its own threat model's attacker (docs/FORMAT.md section 8; issue 11
class 1): links, special files, hard links and other users' files planted in the raw store.

The real CLI must refuse each with one line naming the entry, never follow, read, write, wipe or
remove it, never hang, and keep serving the good tokens beside it (list and verify report the bad
one and carry on, then exit non-zero)."""

from __future__ import annotations

import fcntl
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest
from attack import assert_one_line_error, snapshot, tree_snapshot
from storekit import CHUNK_COUNT_AT, OBJECT_COUNT_AT, Scene, new_token_id, replace_with


def _good_and_bad(tmp_path: Path) -> tuple[Scene, str, str]:
    s = Scene(tmp_path)
    good = s.put("good.txt", b"good content\n" * 500)
    bad = s.put("bad.txt", b"bad content\n" * 500)
    return s, good, bad


def _good_still_served(s: Scene, good: str, bad: str, fragment: str) -> None:
    """list and verify report the bad token (naming `fragment`), serve the good one, exit 1."""
    p = s.keyed("token", "list")
    out = p.stdout.decode()
    assert p.returncode != 0 and "Traceback" not in p.stderr.decode()
    assert "good.txt" in out and fragment in out.split(bad, 1)[1].splitlines()[0]
    for mode in (("--no-key",), ("--key", str(s.key))):
        p = s.run("token", "verify", *mode)
        out = p.stdout.decode()
        assert p.returncode == 1 and "Traceback" not in p.stderr.decode(), p.stderr
        assert f"OK {good}" in out and f"FAILED {bad}" in out and fragment in out
    p = s.keyed("token", "retrieve", good, "good-out")
    assert p.returncode == 0, p.stderr
    assert (s.work / "good-out/good.txt").read_bytes() == b"good content\n" * 500


def test_data_directory_symlink_is_never_followed(tmp_path: Path) -> None:
    """<uuid>.data -> a victim directory: delete and gc used to wipe the victim's files."""
    s, good, bad = _good_and_bad(tmp_path)
    victim = s.victim_dir()
    before = tree_snapshot(victim)
    replace_with(s.data(bad), "symlink", victim)
    orphan = new_token_id()  # an unfinished store's data directory, as gc would see it
    replace_with(s.store / f"{orphan}.data", "symlink", victim)

    for args in (
        ("token", "delete", bad),
        ("token", "info", bad),
        ("token", "retrieve", bad, "out", "--key", str(s.key)),
    ):
        assert_one_line_error(s.run(*args), f"{bad}.data", "symbolic link")
    p = s.run("token", "gc")  # both refused, named; one Error line
    assert_one_line_error(p, "2 store entries refused", "symbolic link")
    assert f"{orphan}.data" in p.stderr.decode() and f"{bad}.data" in p.stderr.decode()
    _good_still_served(s, good, bad, "symbolic link")

    assert tree_snapshot(victim) == before
    assert s.meta(bad).is_file() and s.data(bad).is_symlink()
    assert not (s.work / "out").exists()


@pytest.mark.parametrize("kind", ["fifo", "zero", "symlink-zero", "symlink-file"])
def test_metadata_that_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    """A FIFO hung list/verify; a link to /dev/zero (or such a device) read until memory ran out;
    a link to any file was read. Each is refused at once, named, and left as it is."""
    s, good, bad = _good_and_bad(tmp_path)
    victim = s.work / "victim.txt"
    victim.write_bytes(b"not a token\n")
    if kind.startswith("symlink"):
        replace_with(s.meta(bad), "symlink", Path("/dev/zero") if kind.endswith("zero") else victim)
        fragment = "symbolic link"
    else:
        replace_with(s.meta(bad), kind)
        fragment = "FIFO" if kind == "fifo" else "character device"
    before = snapshot(s.meta(bad)), snapshot(victim)

    for args in (
        ("token", "info", bad),
        ("token", "retrieve", bad, "out", "--key", str(s.key)),
        ("token", "delete", bad),
    ):
        assert_one_line_error(s.run(*args), f"{bad}.metadata", fragment)
    _good_still_served(s, good, bad, fragment)
    assert (snapshot(s.meta(bad)), snapshot(victim)) == before


def test_hard_link_to_a_victim_is_never_wiped(tmp_path: Path) -> None:
    """An object (or a tombstone) that is a hard link to a file outside the store: delete and gc
    used to overwrite the file with zeros. Nothing with other links is wiped."""
    s, good, bad = _good_and_bad(tmp_path)
    victim = s.work / "shadow"
    victim.write_bytes(b"root:secret:19000::::::\n")
    os.chmod(victim, 0o600)
    replace_with(s.data(bad) / "00000000", "hardlink", victim)
    before = snapshot(victim)

    assert_one_line_error(s.run("token", "delete", bad), "00000000", "2 hard links")
    assert s.meta(bad).is_file()  # refused before anything changed
    tomb = s.store / f".{good}.deleting"  # an interrupted delete whose tombstone is a hard link
    replace_with(s.meta(good), "hardlink", victim)
    s.meta(good).rename(tomb)
    before = snapshot(victim)
    assert_one_line_error(s.run("token", "gc"), f".{good}.deleting", "hard links")
    assert snapshot(victim) == before and victim.read_bytes().startswith(b"root:")


def test_object_links_do_not_report_sizes(tmp_path: Path) -> None:
    """info reported the size of whatever an object symlink pointed to."""
    s, good, bad = _good_and_bad(tmp_path)
    big = s.work / "big-secret"
    big.write_bytes(b"x" * 4_000_000)
    replace_with(s.data(bad) / "00000000", "symlink", big)
    line = assert_one_line_error(s.run("token", "info", bad), "00000000", "symbolic link")
    assert "4000000" not in line
    assert "Stored bytes" in s.ok("token", "info", good)


_CLAIMS = {  # what the planted header says -> what the refusal names
    "a valid header": "its header says",
    "2**40 chunks": "chunks",
    "2**31 objects": "objects",
}


def _oversize(path: Path, claimed: str) -> None:
    """Make `path` a sparse 100 GB file behind the header it had (patched as `claimed`)."""
    with open(path, "r+b") as f:
        if claimed == "2**40 chunks":
            f.seek(CHUNK_COUNT_AT[2])  # chunk_count (docs/FORMAT.md section 3)
            f.write((2**40).to_bytes(8, "big"))
        elif claimed == "2**31 objects":
            f.seek(OBJECT_COUNT_AT)  # object_count
            f.write((2**31).to_bytes(4, "big"))
        f.truncate(100 << 30)


@pytest.mark.parametrize("claimed", list(_CLAIMS))
def test_oversized_metadata_is_refused_before_it_is_read(tmp_path: Path, claimed: str) -> None:
    """A sparse 100 GB metadata file (the current one and its generation file, as an attacker
    plants them): refused after its fixed header, never read into memory (the CLI runs under a
    2 GiB address-space cap)."""
    s, good, bad = _good_and_bad(tmp_path)
    (gen,) = s.gens(bad)
    for path in (s.meta(bad), gen):
        _oversize(path, claimed)
    fragment = _CLAIMS[claimed]
    assert_one_line_error(s.run("token", "info", bad), str(bad), fragment)
    _good_still_served(s, good, bad, fragment)


@pytest.mark.parametrize("claimed", list(_CLAIMS))
def test_oversized_current_metadata_alone_falls_back(tmp_path: Path, claimed: str) -> None:
    """The current metadata alone a sparse 100 GB file: refused without being read; verify
    reports it, and the token is still served from its intact generation file, with a note
    naming the refusal."""
    s, good, bad = _good_and_bad(tmp_path)
    _oversize(s.meta(bad), claimed)
    fragment = _CLAIMS[claimed]
    out = s.ok("token", "info", bad)
    assert "using generation 1" in out and fragment in out, out
    for mode in (("--no-key",), ("--key", str(s.key))):
        p = s.run("token", "verify", *mode)
        out = p.stdout.decode()
        assert p.returncode == 1 and "Traceback" not in p.stderr.decode(), p.stderr
        assert f"OK {good}" in out and f"FAILED {bad}" in out and fragment in out, out
    p = s.keyed("token", "retrieve", bad, "bad-out")
    assert p.returncode == 0 and b"using generation 1" in p.stderr, p.stderr
    assert (s.work / "bad-out/bad.txt").read_bytes() == b"bad content\n" * 500


def test_entries_of_another_user_are_refused(
    shared_dir: Path, other_user: pwd.struct_passwd
) -> None:
    """The store is writable by a second user (the attacker has write access to the raw store):
    what that user plants is refused by owner, never wiped or removed, and gc still cleans the
    rest."""
    s = Scene(shared_dir)
    good = s.put("good.txt", b"good\n" * 100)
    os.chmod(s.store, 0o777)
    os.chmod(s.data(good), 0o777)
    uid = other_user.pw_uid
    planted = new_token_id()
    orphan = s.store / f"{planted}.data"  # an "unfinished store" of the other user's
    script = (
        f"import os; os.mkdir({str(orphan)!r}, 0o700);"
        f"open({str(orphan / '00000000')!r}, 'wb').write(b'theirs');"
        f"open({str(s.store / (new_token_id() + '.metadata'))!r}, 'wb').write(b'VHSMTOK');"
        f"open({str(s.data(good) / '00000007')!r}, 'wb').write(b'past the end')"
    )
    subprocess.run([sys.executable, "-c", script], user=uid, group=other_user.pw_gid, check=True)
    before = tree_snapshot(s.store)

    p = s.run("token", "gc")
    err = p.stderr.decode()
    assert p.returncode != 0 and "Traceback" not in err
    assert f"{planted}.data" in err and "00000007" in err and f"owned by uid {uid}" in err
    assert tree_snapshot(s.store) == before
    p = s.keyed("token", "list")
    assert p.returncode != 0 and f"owned by uid {uid}" in p.stdout.decode()
    # the good token itself: test_a_strangers_file_beside_a_tokens_objects_is_ignored


def test_a_strangers_file_beside_a_tokens_objects_is_ignored(
    shared_dir: Path, other_user: pwd.struct_passwd
) -> None:
    """Another user's file planted past the end of a good token's objects (which gc refuses
    to touch, test above) does not stop the token being verified and retrieved."""
    s = Scene(shared_dir)
    good = s.put("good.txt", b"good\n" * 100)
    os.chmod(s.store, 0o777)
    os.chmod(s.data(good), 0o777)
    uid = other_user.pw_uid
    script = f"open({str(s.data(good) / '00000007')!r}, 'wb').write(b'past the end')"
    subprocess.run([sys.executable, "-c", script], user=uid, group=other_user.pw_gid, check=True)
    for mode in (("--no-key",), ("--key", str(s.key))):
        p = s.run("token", "verify", good, *mode)
        assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()
    p = s.keyed("token", "retrieve", good, "out")
    assert p.returncode == 0, p.stderr.decode()
    assert (s.work / "out/good.txt").read_bytes() == b"good\n" * 100


def test_root_gives_what_it_creates_to_the_stores_owner(
    shared_dir: Path, other_user: pwd.struct_passwd
) -> None:
    """Root storing into a store owned by another user hands every new entry to that user, who
    can then use the store (list, verify, retrieve, gc, delete) as itself."""
    uid, gid = other_user.pw_uid, other_user.pw_gid
    s = Scene(shared_dir)
    s.store.mkdir(mode=0o700)
    os.chown(s.store, uid, gid)
    tok = s.put("doc.txt", b"document\n" * 1000)
    s.put("second.txt", b"second\n")
    for entry in [s.store, *s.store.rglob("*")]:
        assert entry.lstat().st_uid == uid, entry
    os.chown(s.key, uid, gid)
    out = shared_dir / "out"
    out.mkdir()
    os.chown(out, uid, gid)
    assert "doc.txt" in s.keyed("token", "list", user=uid).stdout.decode()
    assert s.keyed("token", "verify", user=uid).returncode == 0
    assert s.keyed("token", "retrieve", tok, str(out), user=uid).returncode == 0
    assert (out / "doc.txt").read_bytes() == b"document\n" * 1000
    assert s.run("token", "gc", user=uid).returncode == 0
    assert s.run("token", "delete", tok, user=uid).returncode == 0


def test_gc_reports_stray_names_and_leaves_them(tmp_path: Path) -> None:
    """Names shaped like gc's but without a canonical token id tracebacked gc."""
    s = Scene(tmp_path)
    good = s.put("good.txt", b"good\n")
    strays = [".zzz.deleting", "nonsense.data", ".nope.metadata.123.abcd", good.upper() + ".data"]
    (s.store / strays[0]).write_bytes(b"x")
    (s.store / strays[1]).mkdir()
    (s.store / strays[1] / "00000000").write_bytes(b"keep me")
    (s.store / strays[2]).write_bytes(b"x")
    (s.store / strays[3]).mkdir()
    before = tree_snapshot(s.store)
    p = s.run("token", "gc")
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode()
    for name in strays:
        assert f"ignored {s.store}/{name}" in out
    assert tree_snapshot(s.store) == before
    assert s.keyed("token", "verify", good).returncode == 0


def test_gc_reclaims_objects_past_next_object_id(tmp_path: Path) -> None:
    """Objects at or past a committed token's next_object_id (a mount killed before its commit)
    were never reclaimed. gc removes them, but not while a writer holds the token, and never
    one with other links."""
    s = Scene(tmp_path)
    tok = s.put("doc.bin", os.urandom(300_000))
    first_unused = s.next_object(tok)
    leftovers = [s.data(tok) / f"{first_unused + k:08x}" for k in (0, 3)]
    for p in leftovers:
        p.write_bytes(os.urandom(5000))
        os.chmod(p, 0o600)

    fd = os.open(s.data(tok), os.O_RDONLY | os.O_DIRECTORY)  # a writer at work (store/mount)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        assert s.run("token", "gc").returncode == 0
        assert all(p.exists() for p in leftovers)
    finally:
        os.close(fd)

    out = s.ok("token", "gc")
    assert all(not p.exists() for p in leftovers)
    assert all(p.name in out and tok in out for p in leftovers)
    assert (s.data(tok) / "00000000").exists()
    assert s.keyed("token", "verify", tok).returncode == 0

    victim = s.work / "victim"
    victim.write_bytes(b"keep")
    os.link(victim, s.data(tok) / f"{first_unused:08x}")
    assert_one_line_error(s.run("token", "gc"), f"{first_unused:08x}", "hard links")
    assert victim.read_bytes() == b"keep"


def test_a_file_found_by_store_r_is_never_followed_once_it_became_a_link(tmp_path: Path) -> None:
    """`store -r` as root over a tree someone else can change: a file the walk saw may be
    swapped for a link to /etc/shadow before it is opened. The walk's entries are opened with
    O_NOFOLLOW (a path the user named is still followed: their choice)."""
    from vhsmfs.backend import LocalBackend
    from vhsmfs.errors import InputError
    from vhsmfs.keyfile import StaticKeyProvider
    from vhsmfs.store import TokenStore

    secret = tmp_path / "secret"
    secret.write_bytes(b"root only\n")
    link = tmp_path / "swapped"
    link.symlink_to(secret)
    ts = TokenStore(LocalBackend(tmp_path / "store"), StaticKeyProvider(os.urandom(32)))
    with pytest.raises(InputError, match="symbolic link"):
        ts.store_file(link, follow_symlinks=False)
    assert ts.list_tokens() == []
    assert ts.store_file(link) in ts.list_tokens()  # named by the user: followed
