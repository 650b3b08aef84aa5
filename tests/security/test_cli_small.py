"""The CLI's and the mount's smaller holes (issue 11, class 7, this part):

* `vhsm ... | head -1`: a closed stdout ends the command quietly (status 141, no traceback),
  while a broken connection to the key service is still a clear one-line error;
* the mount's `--log FILE`: created 0600, never through a symlink, never a FIFO or device, never
  another user's file; no plaintext file names in it unless `--debug`;
* the mount process (foreground and `--background` child) is hardened like the daemon: no core
  dumps, not dumpable, memory locked.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from attack import assert_one_line_error, env_for, snapshot, vhsm

EXIT_PIPE = 141
CLI = [sys.executable, "-m", "cli.main"]


def _closed_stdout(args: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """Run a command whose reader has gone before it writes anything (`| head -0`)."""
    p = subprocess.Popen(
        args, cwd=cwd, env=env_for(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # before the interpreter has even started: its first write fails
    err = p.stderr.read()
    p.wait(timeout=60)
    return subprocess.CompletedProcess(args, p.returncode, b"", err)


def test_closed_stdout_ends_quietly_but_a_broken_socket_is_an_error(tmp_path: Path) -> None:
    cli = CLI
    assert vhsm("key", "generate-master-key", cwd=tmp_path).returncode == 0
    assert vhsm("key", "generate", "k", cwd=tmp_path).returncode == 0
    assert vhsm("token", "generate-key", "t.key", cwd=tmp_path).returncode == 0
    (tmp_path / "f").write_bytes(b"x")
    assert vhsm("token", "store", "f", "--key", "t.key", cwd=tmp_path).returncode == 0
    for args in (
        [*cli, "key", "list"],
        [*cli, "audit", "logs"],
        [*cli, "token", "list"],
        [*cli, "token", "verify", "--no-key"],
        ["hsm_enhanced", "-list"],
        ["hsm_enhanced", "-audit_logs"],
    ):
        p = _closed_stdout(args, tmp_path)
        assert p.returncode == EXIT_PIPE, (args, p.returncode, p.stderr)
        assert p.stderr == b"", (args, p.stderr)  # no traceback, no "Error: Broken pipe"
    # a key service that hangs up: not a closed stdout, so a clear error
    with _hanging_up_daemon(tmp_path / ".vhsm-keysvc.sock"):
        for args in (["key", "list"], ["keysvc", "status"]):
            assert_one_line_error(vhsm(*args, cwd=tmp_path), "key service")


@contextlib.contextmanager
def _hanging_up_daemon(path: Path) -> Iterator[None]:
    """A socket where the daemon's would be that accepts each connection and closes it."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(8)
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                conn, _ = srv.accept()
                conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=10)
        srv.close()


# -- the mount --------------------------------------------------------------------------------


class Mounts:
    """`vhsm mount` processes started by a test: every one is unmounted and killed afterwards."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.key = base / "m.key"
        assert vhsm("token", "generate-key", str(self.key), cwd=base).returncode == 0
        self.points: list[Path] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def mountpoint(self) -> Path:
        mnt = self.base / f"mnt-{len(self.points)}"
        mnt.mkdir()
        self.points.append(mnt)
        return mnt

    def _command(self, mnt: Path) -> list[str]:
        """`vhsm mount MNT` on a store of its own (one mount per store)."""
        store = self.base / f"store-{mnt.name}"
        return [*CLI, "mount", str(mnt), "--store", str(store), "--key", str(self.key)]

    def background(
        self, *extra: str, log: Path | None = None, gid: int | None = None
    ) -> tuple[subprocess.CompletedProcess[bytes], Path]:
        mnt = self.mountpoint()
        args = [*self._command(mnt), "--background", *extra]
        args += ["--log", str(log)] if log else []
        p = subprocess.run(
            args,
            cwd=self.base,
            env=env_for(),
            capture_output=True,
            timeout=120,
            umask=0,  # the log must be 0600 whatever the caller's umask
            group=gid,
            extra_groups=[] if gid is not None else None,
        )
        return p, mnt

    def foreground(self, *extra: str, gid: int | None = None) -> tuple[int, Path]:
        mnt = self.mountpoint()
        proc = subprocess.Popen(
            [*self._command(mnt), *extra],
            cwd=self.base,
            env=env_for(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            group=gid,
            extra_groups=[] if gid is not None else None,
        )
        self.procs.append(proc)
        deadline = time.monotonic() + 60
        while not _in_mount_table(mnt):
            assert proc.poll() is None and time.monotonic() < deadline, "mount did not start"
            time.sleep(0.05)
        return proc.pid, mnt

    def unmount(self, mnt: Path) -> None:
        assert vhsm("umount", str(mnt), cwd=self.base).returncode == 0

    def cleanup(self) -> None:
        for mnt in self.points:
            if _in_mount_table(mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], timeout=30, check=False)
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=30)
        # detached mounts: their pids are in the store's lock file until they exit
        for pid in _mount_pids(self.base):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _in_mount_table(mnt: Path) -> bool:
    """Mounted (alive or dead). Not os.path.ismount: a FUSE mount without allow_other refuses
    every process whose uid/gid differ from its own, root included, and ismount says False."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(mnt) for line in f)


def _mount_pids(base: Path) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (d / "cmdline").read_bytes().split(b"\0")
                if b"mount" in cmd and str(base).encode() in b" ".join(cmd):
                    out.append(int(d.name))
    return out


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Mounts]:
    m = Mounts(tmp_path)
    try:
        yield m
    finally:
        m.cleanup()


def _pid_of(p: subprocess.CompletedProcess[bytes]) -> int:
    found = re.search(rb"\(pid (\d+)\)", p.stdout)
    assert p.returncode == 0 and found, (p.stdout, p.stderr)
    return int(found.group(1))


def test_mount_log_is_private_and_never_followed(
    mounts: Mounts, shared_dir: Path, other_user: pwd.struct_passwd
) -> None:
    base = mounts.base
    log = base / "mount.log"
    p, mnt = mounts.background(log=log)
    _pid_of(p)
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600  # was 0644 (and 0666 with umask 0)
    mounts.unmount(mnt)
    # an existing regular file is appended to
    before = log.read_bytes()
    p, mnt = mounts.background(log=log)
    _pid_of(p)
    mounts.unmount(mnt)
    assert log.read_bytes().startswith(before) and len(log.read_bytes()) > len(before)
    # a symlink planted at the log path: refused, its target untouched
    victim = base / "victim"
    victim.write_bytes(b"precious\n")
    want = snapshot(victim)
    (base / "link.log").symlink_to(victim)
    p, mnt = mounts.background(log=base / "link.log")
    assert_one_line_error(p, "link.log", "symbolic link")
    assert snapshot(victim) == want and not _in_mount_table(mnt)
    # a FIFO (would hang) and a device node: refused
    os.mkfifo(base / "fifo.log")
    os.mknod(base / "null.log", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    for name in ("fifo.log", "null.log"):
        p, mnt = mounts.background(log=base / name)
        assert_one_line_error(p, name, "not a regular file")
        assert not _in_mount_table(mnt)
    # a file another user planted in a directory both can write
    os.chmod(shared_dir, 0o1777)
    planted = shared_dir / "mount.log"
    planted.write_bytes(b"")
    os.chown(planted, other_user.pw_uid, other_user.pw_gid)
    os.chmod(planted, 0o644)
    p, mnt = mounts.background(log=planted)
    assert_one_line_error(p, "mount.log", f"owned by uid {other_user.pw_uid}")
    assert planted.read_bytes() == b"" and not _in_mount_table(mnt)


def test_mount_log_is_never_another_files_hard_link(mounts: Mounts) -> None:
    """The log is appended to as root: a hard link planted at its path would append the
    mount's log to the linked file (say /etc/passwd). Refused, the linked file untouched."""
    victim = mounts.base / "victim"
    victim.write_bytes(b"precious\n")
    os.link(victim, mounts.base / "linked.log")
    want = snapshot(victim)
    p, mnt = mounts.background(log=mounts.base / "linked.log")
    assert_one_line_error(p, "linked.log", "hard links")
    assert snapshot(victim) == want and not _in_mount_table(mnt)


def test_mount_log_names_no_files(mounts: Mounts) -> None:
    secret = f"SECRET-{uuid.uuid4().hex}"
    log = mounts.base / "mount.log"
    p, mnt = mounts.background(log=log)
    _pid_of(p)
    (mnt / f"{secret}.txt").write_bytes(b"data")
    (mnt / f"{secret}-dir").mkdir()
    # refused operations are logged as warnings, with their arguments
    with pytest.raises(OSError):
        os.mkfifo(mnt / f"{secret}.fifo")
    with pytest.raises(OSError):
        os.symlink("target", mnt / f"{secret}.link")
    mounts.unmount(mnt)
    text = log.read_text(errors="replace")
    assert "WARNING mknod(1, <name>)" in text, text
    assert secret not in text, text
    # --debug is the opt-in: names, as repr (escaped), for whoever debugs the mount
    p, mnt = mounts.background("--debug", log=log)
    _pid_of(p)
    with pytest.raises(OSError):
        os.mkfifo(mnt / f"{secret}\x1b.fifo")
    mounts.unmount(mnt)
    text = log.read_text(errors="replace")
    assert f"b'{secret}\\x1b.fifo'" in text and "\x1b" not in text


def _limits_core(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            return " ".join(line.split()[4:6])
    raise AssertionError("no core limit")


def _vm_locked_kib(pid: int) -> int:
    m = re.search(r"^VmLck:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert m
    return int(m.group(1))


def test_mount_process_is_hardened(mounts: Mounts, other_user: pwd.struct_passwd) -> None:
    # Run as root with another group: /proc/PID/* then belongs to that group while the process
    # is dumpable, and to root:root once it is not (the kernel's task_dump_owner).
    gid = other_user.pw_gid
    p, bg_mnt = mounts.background(gid=gid)
    fg_pid, fg_mnt = mounts.foreground(gid=gid)
    for pid in (_pid_of(p), fg_pid):
        assert _limits_core(pid) == "0 0"
        assert os.stat(f"/proc/{pid}/status").st_gid == 0  # PR_SET_DUMPABLE 0
        assert _vm_locked_kib(pid) > 0  # mlockall (root may lock)
    mounts.unmount(bg_mnt)
    mounts.unmount(fg_mnt)
    # the debugging escape hatch shows the checks above can tell the difference
    p, mnt = mounts.background("--no-harden", gid=gid)
    pid = _pid_of(p)
    assert os.stat(f"/proc/{pid}/status").st_gid == gid and _vm_locked_kib(pid) == 0
    mounts.unmount(mnt)
    # --no-mlock: still no dumps, memory not locked
    p, mnt = mounts.background("--no-mlock", gid=gid)
    pid = _pid_of(p)
    assert os.stat(f"/proc/{pid}/status").st_gid == 0 and _vm_locked_kib(pid) == 0
    mounts.unmount(mnt)
