"""`vhsm keysvc serve --socket PATH` against what may already be at PATH (issue 11, class 2).

The daemon used to connect to PATH, and on ECONNREFUSED (which any non-socket gives) unlink
it: a regular file there was deleted, a symlink replaced, and the socket's mode was then set by
a chmod through the path (following a link swapped in meanwhile). Now only a stale socket of a
trusted owner is replaced; anything else is refused in one line and left as it was, and at
shutdown the daemon removes the socket only if it is still its own."""

from __future__ import annotations

import os
import pwd
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from attack import assert_one_line_error, env_for, snapshot
from hostile import KeyService, make_store


def _serve(data: Path, sock: Path) -> subprocess.CompletedProcess[bytes]:
    """The real daemon, expected to refuse at once (the timeout fails a hang)."""
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "keysvc", "serve", "--no-harden"]
        + ["--data-dir", str(data), "--socket", str(sock)],
        cwd=data,
        env=env_for(),
        capture_output=True,
        timeout=60,
    )


def _plant(kind: str, sock: Path, victim: Path, other: pwd.struct_passwd) -> None:
    if kind == "regular":
        sock.write_bytes(b"someone's file\n")
    elif kind == "symlink-to-file":
        sock.symlink_to(victim)
    elif kind == "symlink-to-dir":
        sock.symlink_to(victim.parent)
    elif kind == "fifo":
        os.mkfifo(sock)
    elif kind == "device":
        os.mknod(sock, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    elif kind == "foreign-socket":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(sock))
        s.close()  # stale: nobody listens, but it is another user's
        os.chown(sock, other.pw_uid, other.pw_gid, follow_symlinks=False)


@pytest.mark.parametrize(
    "kind",
    ["regular", "symlink-to-file", "symlink-to-dir", "fifo", "device", "foreign-socket"],
)
def test_serve_never_replaces_what_is_not_its_stale_socket(
    shared_dir: Path, other_user: pwd.struct_passwd, kind: str
) -> None:
    data = shared_dir / "data"
    make_store(data)
    victim_dir = shared_dir / "victim"
    victim_dir.mkdir()
    victim = victim_dir / "passwd"
    victim.write_bytes(b"root:x:0:0\n")
    os.chmod(victim, 0o600)
    sock = shared_dir / "keysvc.sock"
    _plant(kind, sock, victim, other_user)
    before, victim_before = snapshot(sock), snapshot(victim)
    p = _serve(data, sock)
    assert_one_line_error(p, str(sock))
    assert snapshot(sock) == before
    assert snapshot(victim) == victim_before


def test_stale_own_socket_is_replaced_and_removed_at_stop(shared_dir: Path) -> None:
    """A daemon killed with -9 leaves its socket: the next one replaces it, serves, and at a
    normal stop removes it."""
    data = shared_dir / "data"
    make_store(data)
    sock = shared_dir / "keysvc.sock"
    first = KeyService(data, sock).start()
    first.proc.kill()  # type: ignore[union-attr]
    first.wait_exit()
    first.stop()
    assert stat.S_ISSOCK(os.lstat(sock).st_mode)
    second = KeyService(data, sock).start()
    try:
        assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o666  # the mode asked for, at bind
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(str(sock))
        c.close()
    finally:
        assert second.stop() == 0
    assert not os.path.lexists(sock)


def test_stop_leaves_a_file_that_replaced_its_socket(shared_dir: Path) -> None:
    """Someone renames the socket away and puts a file at its path while the daemon runs: the
    daemon's clean-up at stop must not delete that file."""
    data = shared_dir / "data"
    make_store(data)
    sock = shared_dir / "keysvc.sock"
    d = KeyService(data, sock).start()
    try:
        os.rename(sock, shared_dir / "moved.sock")
        sock.write_bytes(b"not yours\n")
    finally:
        assert d.stop() == 0
    assert sock.read_bytes() == b"not yours\n"
