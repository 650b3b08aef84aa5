"""Remount persistence, clean unmount on signals, kill -9 recovery, and a second user kept out."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)


def names(ts) -> dict[str, uuid.UUID]:
    out = {}
    for tok in ts.list_tokens():
        meta = ts.open_token(tok).meta
        out[meta.name] = tok
    return out


def test_modes_times_and_empty_dirs_survive_remount(mounter):
    m = mounter()
    (m.mnt / "proj" / "empty").mkdir(parents=True)
    os.chmod(m.mnt / "proj" / "empty", 0o700)
    (m.mnt / "proj" / "x.sh").write_text("#!/bin/sh\n")
    os.chmod(m.mnt / "proj" / "x.sh", 0o751)
    os.utime(m.mnt / "proj" / "x.sh", ns=(1_111_111_111_000_000_001, 1_222_222_222_000_000_002))
    os.utime(m.mnt / "proj", ns=(1_333_333_333_000_000_003, 1_444_444_444_000_000_004))
    assert m.stop() == 0
    m2 = mounter()
    st = os.stat(m2.mnt / "proj" / "x.sh")
    assert stat.S_IMODE(st.st_mode) == 0o751
    assert st.st_mtime_ns == 1_222_222_222_000_000_002
    assert st.st_atime_ns == 1_111_111_111_000_000_001
    assert stat.S_IMODE(os.stat(m2.mnt / "proj" / "empty").st_mode) == 0o700
    assert os.listdir(m2.mnt / "proj" / "empty") == []
    assert os.stat(m2.mnt / "proj").st_mtime_ns == 1_444_444_444_000_000_004
    assert (m2.mnt / "proj" / "x.sh").read_text() == "#!/bin/sh\n"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly_and_publishes_open_files(mounter, token_store, sig):
    m = mounter()
    f = open(m.mnt / "still-open.bin", "wb")  # noqa: SIM115 - left open on purpose
    try:
        f.write(b"q" * 300_000)
        f.flush()  # in the mount, not yet closed
        assert m.stop(sig) == 0
        assert not os.path.ismount(m.mnt)
    finally:
        with contextlib.suppress(OSError):
            f.close()
    tok = names(token_store)["still-open.bin"]
    token_store.verify_full(tok)
    assert token_store.open_token(tok).meta.size == 300_000


def test_kill9_recovery_keeps_fsynced_data(mounter, token_store, run_cli, is_mounted):
    m = mounter()
    durable = os.urandom(2_000_000)
    with open(m.mnt / "durable.bin", "wb") as f:
        f.write(durable)
        f.flush()
        os.fsync(f.fileno())
        f.write(b"after the fsync")  # acknowledged write, never fsynced: may be lost
    # a file rewritten in place, fsynced, then overwritten again without fsync
    p = m.mnt / "rewritten.bin"
    p.write_bytes(b"A" * 100_000)
    g = open(p, "r+b")  # noqa: SIM115 - still open when the mount dies
    g.seek(5_000)
    g.write(b"B" * 20_000)
    g.flush()
    os.fsync(g.fileno())
    g.seek(50_000)
    g.write(b"C" * 40_000)  # in flight when killed
    g.flush()
    h = open(m.mnt / "never-closed.bin", "wb")  # noqa: SIM115
    h.write(os.urandom(20_000_000))
    h.flush()
    m.kill9()
    for f in (g, h):
        with contextlib.suppress(OSError):
            f.close()
    assert is_mounted(m.mnt)  # dead mount: "transport endpoint is not connected"
    with pytest.raises(OSError):
        os.listdir(m.mnt)
    run_cli("umount", str(m.mnt))
    assert not is_mounted(m.mnt)
    # every token in the store verifies; fsynced content is there
    for tok in token_store.list_tokens():
        token_store.verify_full(tok)
    found = names(token_store)
    t = token_store.open_token(found["durable.bin"])
    assert t.meta.size in (len(durable), len(durable) + len(b"after the fsync"))
    m2 = mounter()
    assert (m2.mnt / "durable.bin").read_bytes()[: len(durable)] == durable
    got = (m2.mnt / "rewritten.bin").read_bytes()
    assert got[:5_000] == b"A" * 5_000 and got[5_000:25_000] == b"B" * 20_000
    assert got[25_000:50_000] == b"A" * 25_000
    # writing after recovery works (orphaned objects of the killed session are swept)
    with open(m2.mnt / "rewritten.bin", "r+b") as f:
        f.write(b"D" * 10)
    assert (m2.mnt / "rewritten.bin").read_bytes()[:10] == b"D" * 10
    res = run_cli("token", "verify", "--key", str(m2.key), "--store", str(m2.store))
    assert res.returncode == 0


def store_leftovers(store: Path) -> list[str]:
    """Names in the store that belong to no committed token: data directories without
    metadata, tombstones of unfinished deletes."""
    names_ = os.listdir(store)
    return sorted(
        n
        for n in names_
        if n.endswith(".deleting") or (n.endswith(".data") and n[:-5] + ".metadata" not in names_)
    )


def test_queued_wipes_finish_before_unmount_returns(mounter, token_store, monkeypatch):
    """Wipes run in the background after unlink; unmount waits for every one of them. (With
    a grace period, format v2 leaves the wipe of what the mount deleted to gc once it has
    passed, so that a backup copy taken meanwhile holds such a file whole or not at all: here
    there is none.)"""
    monkeypatch.setenv("VHSM_GRACE_SECONDS", "0")  # inherited by the mount
    m = mounter()
    (m.mnt / "d").mkdir()
    for i in range(60):
        (m.mnt / "d" / f"f{i}.bin").write_bytes(os.urandom(70_000))
    assert len(token_store.list_tokens()) >= 60  # (the directory's marker is batched)
    shutil.rmtree(m.mnt / "d")
    assert m.stop() == 0  # at once: wipes are still queued (they wait for a quiet mount)
    assert token_store.list_tokens() == []
    assert store_leftovers(m.store) == []


def test_kill9_with_queued_wipes_leaves_a_store_gc_cleans(
    mounter, token_store, run_cli, monkeypatch
):
    """As above, the mount killed with wipes queued or half done: gc finishes them. (With a
    grace period gc finishes them only once it has passed: here there is none.)"""
    monkeypatch.setenv("VHSM_GRACE_SECONDS", "0")  # inherited by the mount and the CLI
    m = mounter()
    keep = os.urandom(100_000)
    (m.mnt / "keep.bin").write_bytes(keep)
    for i in range(60):
        (m.mnt / f"gone{i}.bin").write_bytes(os.urandom(70_000))
    for i in range(60):
        os.unlink(m.mnt / f"gone{i}.bin")
    m.kill9()  # wipes queued or half done
    run_cli("umount", str(m.mnt))
    store = ["--store", str(m.store)]
    assert run_cli("token", "verify", "--key", str(m.key), *store).returncode == 0
    assert run_cli("token", "gc", *store).returncode == 0
    assert store_leftovers(m.store) == []
    # files whose wipe never started come back (documented); every token still verifies
    found = names(token_store)
    assert set(found) <= {"keep.bin"} | {f"gone{i}.bin" for i in range(60)}
    for tok in found.values():
        token_store.verify_full(tok)
    m2 = mounter()
    assert (m2.mnt / "keep.bin").read_bytes() == keep


@pytest.fixture
def other_user():
    name = f"vhsmt{uuid.uuid4().hex[:6]}"
    res = subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/bin/sh", name],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if res.returncode != 0:
        pytest.fail(f"cannot add a user here: {res.stderr.strip()}")  # tests run as root
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", "-f", name], capture_output=True, timeout=30, check=False)


@pytest.fixture
def open_dir():
    """A directory every user may traverse (pytest's own temp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="vhsm-mnt-", dir="/tmp"))
    os.chmod(path, 0o755)
    (path / "plain").mkdir(mode=0o755)
    (path / "plain" / "f.txt").write_text("plain")
    os.chmod(path / "plain" / "f.txt", 0o644)
    yield path
    if not subprocess.run(["mountpoint", "-q", str(path / "mnt")], check=False).returncode:
        subprocess.run(["fusermount3", "-u", "-z", str(path / "mnt")], check=False, timeout=30)
    shutil.rmtree(path, ignore_errors=True)


def as_user(user, script: str) -> str:
    res = subprocess.run(
        ["su", "-s", "/bin/sh", user.pw_name, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return res.stdout + res.stderr


def test_second_user_is_denied(open_dir, other_user, mounter):
    m = mounter(mnt=open_dir / "mnt")
    (m.mnt / "secret.txt").write_text("mine")
    os.chmod(m.mnt / "secret.txt", 0o644)
    assert stat.S_IMODE(os.stat(m.mnt).st_mode) == 0o755  # modes alone would let them in
    # the same user reads a plain directory beside the mount: only the mount stands in the way
    assert "plain" in as_user(other_user, f"cat {open_dir}/plain/f.txt")
    out = as_user(
        other_user,
        f"cat {m.mnt}/secret.txt; echo rc=$?; ls {m.mnt}; echo rc=$?; "
        f"touch {m.mnt}/theirs; echo rc=$?",
    )
    assert "mine" not in out
    assert out.count("rc=0") == 0, out
    assert "Permission denied" in out
    assert not (m.mnt / "theirs").exists()


def test_allow_other_still_applies_modes(open_dir, other_user, mounter):
    """--allow-other lets other users in; default_permissions still checks each file's mode."""
    m = mounter("--allow-other", mnt=open_dir / "mnt")
    (m.mnt / "public.txt").write_text("for everyone")
    os.chmod(m.mnt / "public.txt", 0o644)
    (m.mnt / "private.txt").write_text("only root")
    os.chmod(m.mnt / "private.txt", 0o600)
    out = as_user(
        other_user,
        f"cat {m.mnt}/public.txt; echo; cat {m.mnt}/private.txt; echo rc=$?; touch {m.mnt}/theirs",
    )
    assert "for everyone" in out
    assert "only root" not in out and "Permission denied" in out


def test_lazy_umount_detaches_at_once_and_publishes_open_files_on_close(
    mounter, run_cli, is_mounted, token_store
):
    """`vhsm umount --lazy` with a file still open: the mount point is detached and the command
    says so within seconds; the mount process keeps serving the open descriptor, publishes the
    file when it is closed, then exits."""
    m = mounter()
    f = open(m.mnt / "held.bin", "wb")  # noqa: SIM115
    try:
        f.write(b"A" * 100_000)
        f.flush()
        busy = run_cli("umount", str(m.mnt), check=False)
        assert busy.returncode != 0 and "vhsm umount --lazy" in busy.stderr
        res = run_cli("umount", "--lazy", str(m.mnt), timeout=60)
        assert f"(pid {m.pid})" in res.stdout and "Detached" in res.stdout
        assert not is_mounted(m.mnt)
        assert m.proc is not None and m.proc.poll() is None  # still serving the open file
        f.write(b"B" * 50_000)
    finally:
        f.close()
    assert m.proc.wait(timeout=30) == 0
    found = names(token_store)
    assert set(found) == {"held.bin"}
    data = token_store.retrieve(found["held.bin"], m.store.parent / "out").read_bytes()
    assert data == b"A" * 100_000 + b"B" * 50_000
