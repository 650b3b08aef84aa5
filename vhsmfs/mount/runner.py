"""Mount lifecycle: lock the store, load the vault, mount, serve, unmount cleanly.

Foreground by default. SIGINT/SIGTERM end the FUSE loop; the mount is then detached and every
file still holding changes is published before the process exits. `--background` re-executes
this module in a new session and returns once the child reports the mount is ready (or why it
failed). `python -m vhsmfs.mount.runner` is that child's entry point.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import gc
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pyfuse3
import trio

from vhsmfs.backend import LOCK_NAME, LocalBackend, pid_alive
from vhsmfs.errors import VhsmError
from vhsmfs.keyfile import KeyProvider, StaticKeyProvider, load_key_file
from vhsmfs.mount import requestwait
from vhsmfs.mount.fs import VaultOps
from vhsmfs.mount.vault import Vault
from vhsmfs.mount.workers import MountWorkers
from vhsmfs.safefs import SafeDir
from vhsmfs.store import TokenStore, chunk_size_from_env

log = logging.getLogger("vhsm.mount")
READY_TIMEOUT = 120.0
# Files created through the mount use 64 KiB chunks unless TOKEN_CHUNK_SIZE or --chunk-size say
# otherwise: the per-chunk cost in Python (an AEAD call, a record hash, a manifest entry) is paid
# 8x less often than with the CLI's 8 KiB default. The chunk size is recorded per token.
MOUNT_CHUNK_SIZE = 64 * 1024
SYNC_TIMEOUT = 60.0  # seconds to let the kernel write back cached data on SIGINT/SIGTERM
_LIBC = ctypes.CDLL(None, use_errno=True)
SWITCH_INTERVAL = 0.0005  # seconds; see run()
GC_THRESHOLD = 20000  # allocations between young-generation collections (default 700)
READ_AHEAD_KB = 1024  # kernel read-ahead for the mount: 1 MiB read requests instead of 128 KiB


class MountError(VhsmError):
    """The vault cannot be mounted or unmounted."""


def key_provider(key_file: str | None) -> KeyProvider:
    """For `python -m vhsmfs.mount.runner --key FILE`. The CLI (`vhsm mount`) builds providers
    itself, including the key service's, which vhsmfs does not import."""
    if not key_file:
        raise MountError("the mount needs a key: --key FILE")
    return StaticKeyProvider(load_key_file(key_file))


@contextlib.contextmanager
def store_lock(store_dir: str) -> Iterator[None]:
    """One mount per store: two would publish conflicting generations of the same token.
    The lock file is opened like every store entry (vhsmfs.safefs): never through a link, and
    only a regular file of ours with no other links is truncated and written."""
    with _store_dir(store_dir) as d:
        fd = d.open_or_create(LOCK_NAME)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise MountError(f"store {store_dir} is already mounted") from None
                raise
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            try:
                yield
            finally:
                os.ftruncate(fd, 0)  # no stale pid for `vhsm umount` to wait on
        finally:
            os.close(fd)


def _store_dir(store_dir: str) -> SafeDir:
    try:
        return SafeDir.open_root(store_dir, "store entry", trust_owner=True)
    except OSError as e:
        raise MountError(f"cannot open store {store_dir}: {e.strerror}") from None


def check_mountpoint(mountpoint: str) -> str:
    mnt = os.path.abspath(mountpoint)
    if not os.path.isdir(mnt):
        raise MountError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mnt):
        raise MountError(f"{mountpoint} is already a mount point")
    return mnt


def mount_options(store_dir: str, allow_other: bool) -> set[str]:
    opts = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    opts |= {f"fsname=vhsm:{store_dir}", "subtype=vhsm"}
    if allow_other:
        opts.add("allow_other")
    return opts


async def _serve(ops: VaultOps, mnt: str) -> None:
    async with trio.open_nursery() as nursery:

        async def tune() -> None:
            # after the kernel's INIT exchange, which resets read-ahead to 128 KiB
            await trio.sleep(0.2)
            await trio.to_thread.run_sync(tune_read_ahead, mnt)

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for sig in signals:
                    log.info("signal %d: unmounting", sig)
                    # Writes the kernel still caches (write-back cache) come to us first.
                    with trio.move_on_after(SYNC_TIMEOUT):
                        await trio.to_thread.run_sync(syncfs, mnt, abandon_on_cancel=True)
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signal)
        nursery.start_soon(tune)
        nursery.start_soon(ops.housekeeping)
        await pyfuse3.main(min_tasks=2, max_tasks=64)
        nursery.cancel_scope.cancel()


def tune_malloc() -> None:
    """Keep freed buffers in the heap. Every write-back run allocates a few MiB (plaintext run,
    records); glibc serves such sizes with fresh mmap()s by default, and faulting in and zeroing
    those pages, with the GIL held, cost more than the encryption. Memory stays bounded by the
    per-file limits (docs/MOUNT.md, "Memory"). glibc only; a no-op elsewhere."""
    try:
        mallopt = _LIBC.mallopt
    except AttributeError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 64 << 20)
    mallopt(m_trim_threshold, 256 << 20)


def tune_gc() -> None:
    """Every FUSE request allocates a few dozen short-lived objects (coroutines, attributes),
    and every new file a few long-lived ones (its node, token and metadata). With the default
    threshold (700) the cyclic collector ran every few requests and, as the namespace grew,
    spent about a tenth of the event loop's time re-scanning it. The namespace loaded at start
    is frozen (never scanned again), and collections run less often: reference counting frees
    almost everything; the collector is only needed for the rare cycle."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 50, 50)


def syncfs(path: str) -> None:
    """syncfs(2) through ctypes, which releases the GIL while the kernel writes back to us
    (pyfuse3.syncfs keeps it, which would deadlock a call made from inside the mount)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _LIBC.syncfs(fd) != 0:
            err = ctypes.get_errno()
            log.warning("syncfs %s: %s", path, os.strerror(err))
    finally:
        os.close(fd)


def mount_chunk_size(chunk_size: int | None) -> int:
    if chunk_size:
        return chunk_size
    if os.environ.get("TOKEN_CHUNK_SIZE"):
        return chunk_size_from_env()
    return MOUNT_CHUNK_SIZE


def tune_read_ahead(mnt: str) -> None:
    """Raise the mount's read-ahead (root only; best effort). Read from the mount table, not
    by stat()ing the mount point, which would wait for this very process to answer."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == mnt:
                    with open(f"/sys/class/bdi/{fields[2]}/read_ahead_kb", "w") as ra:
                        ra.write(str(READ_AHEAD_KB))
                    return
    except OSError as e:
        log.debug("read-ahead left at the default: %s", e)


def run(
    store_dir: str,
    mountpoint: str,
    keys: KeyProvider,
    *,
    allow_other: bool = False,
    ready: int | None = None,
    chunk_size: int | None = None,
) -> None:
    """Mount and serve until unmounted or signalled. `ready` is a pipe fd the background
    parent waits on: "ok" or "error: <message>"."""
    store_dir = os.path.abspath(store_dir)
    # Background threads (write-back, wipes, hashing) run Python code too; with the default
    # 5 ms GIL switch interval the event loop could wait that long to answer each request.
    sys.setswitchinterval(SWITCH_INTERVAL)
    tune_malloc()
    try:
        spin = requestwait.spin_from_env()
        mnt = check_mountpoint(mountpoint)
        backend = LocalBackend(store_dir)
        with store_lock(store_dir), MountWorkers() as workers:
            for line in backend.collect_garbage():
                log.info("store: %s", line)
            store = TokenStore(backend, keys, chunk_size=mount_chunk_size(chunk_size))
            vault = Vault(store, workers=workers)
            vault.load()
            tune_gc()
            ops = VaultOps(vault)
            requestwait.install(lambda: ops.hops, spin)
            try:
                pyfuse3.init(ops, mnt, mount_options(store_dir, allow_other))
            except RuntimeError as e:
                raise MountError(f"cannot mount on {mountpoint}: {e}") from None
            report_ready(ready, "ok")
            print(f"vhsm: mounted {store_dir} at {mnt} (pid {os.getpid()})", flush=True)
            clean = False
            try:
                trio.run(_serve, ops, mnt)
                clean = True
            finally:
                # Detach first (MNT_DETACH as root, fusermount3 -u -z otherwise) so no process
                # blocks on a dead mount, then publish what is still pending.
                with contextlib.suppress(Exception):
                    pyfuse3.close(unmount=True)
                try:
                    vault.flush_all()
                finally:
                    vault.close()  # then the thread pools are shut down, leaving the `with`
                log.info("requests: %s", " ".join(f"{k}={v}" for k, v in sorted(ops.stats.items())))
                log.info(
                    "time per operation: %s",
                    " ".join(f"{k}={n}/{t:.2f}s" for k, (n, t) in sorted(ops.timing.items())),
                )
                log.info("unmounted %s (%s)", mnt, "clean" if clean else "after an error")
    except VhsmError as e:
        report_ready(ready, f"error: {e}")
        raise


def report_ready(fd: int | None, message: str) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, message.encode() + b"\n")
        os.close(fd)


def open_log(path: str) -> int:
    """The `--log` file, opened for appending, like any entry below a directory others may
    write (vhsmfs.safefs): created 0600; never through a symbolic link, never a FIFO, device or
    directory, never a file of a third user (trusted owner: you or the directory's owner), and
    never another file's hard link (it is appended to). An existing log keeps its mode."""
    parent, name = os.path.split(os.path.abspath(path))
    try:
        d = SafeDir.open_root(parent, "log file", trust_owner=True)
    except OSError as e:
        raise MountError(f"cannot open log file {path}: {e.strerror}") from None
    with d:
        try:
            fd = d.open_or_create(name, flags=os.O_WRONLY | os.O_APPEND | os.O_NOCTTY)
        except OSError as e:
            raise MountError(f"cannot open log file {path}: {e.strerror}") from None
    os.set_blocking(fd, True)  # safefs opens O_NONBLOCK; the child writes to it as stdout
    return fd


def start_background(
    child_argv: list[str],
    mountpoint: str,
    *,
    log_file: str | None = None,
    env: dict[str, str] | None = None,
) -> int:
    """Start `child_argv` (a foreground mount command) detached, passing it `--ready-fd N`;
    return its pid once it reports the mount ready, or raise MountError with its message."""
    check_mountpoint(mountpoint)
    out = open_log(log_file) if log_file else subprocess.DEVNULL
    r, w = os.pipe()
    cmd = [*child_argv, "--ready-fd", str(w)]
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            pass_fds=(w,),
            start_new_session=True,
            cwd="/",
            env=env,
        )
    finally:
        os.close(w)
        if log_file:
            os.close(out)
    with os.fdopen(r, "rb") as pipe:
        line = pipe.readline().decode(errors="replace").strip()
    if line == "ok":
        return proc.pid
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    raise MountError(
        line[len("error: ") :]
        if line.startswith("error: ")
        else f"mount process exited ({proc.poll()}) before the mount was ready"
    )


# -- unmount ---------------------------------------------------------------------------------------
def _mount_source(mountpoint: str) -> str | None:
    mnt = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and _unescape(fields[4]) == mnt:
                parts = right.split()
                if len(parts) >= 2 and parts[0].startswith("fuse"):
                    return _unescape(parts[1])
    return None


def _unescape(s: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) + 0 and s[i + 1 : i + 4].isdigit():
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def _mount_pid(source: str | None) -> int | None:
    """The pid the mount of store `source` wrote into its lock file. Read like a store entry
    (a FIFO or a link to /dev/zero there must not hang or exhaust `vhsm umount`), at most a
    line's worth."""
    if not source or not source.startswith("vhsm:"):
        return None
    try:
        with _store_dir(source[5:]) as d:
            fd, _ = d.open_file(LOCK_NAME)
            try:
                text = os.read(fd, 32)
            finally:
                os.close(fd)
        text = text.strip()
        return int(text) or None if text.isdigit() else None
    except (OSError, VhsmError):
        return None


LAZY_WAIT = 5.0  # a lazy unmount waits this long for the mount process, then reports it
NOTICE_AFTER = 2.0  # a wait longer than this is announced (the caller is not left guessing)


def unmount(
    mountpoint: str,
    *,
    lazy: bool = False,
    timeout: float = 120.0,
    notice: Callable[[str], None] | None = None,
) -> int | None:
    """fusermount3 -u, then wait for the mount process to publish pending data and exit.

    Returns None once it has exited, or its pid if it is still running: a lazy unmount leaves
    it serving the files still open (it publishes each as it is closed, then exits), so the
    wait is LAZY_WAIT there, `timeout` otherwise. `notice` gets one line when the wait is long."""
    source = _mount_source(mountpoint)
    if source is None:
        raise MountError(f"{mountpoint} is not a FUSE mount")
    pid = _mount_pid(source)
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        msg = (res.stderr.strip().splitlines() or ["fusermount3 failed"])[-1]
        if "busy" in msg.lower():
            msg += " (close the files using it, or: vhsm umount --lazy)"
        raise MountError(msg)
    if pid is None:
        return None
    start = time.monotonic()
    deadline = start + (min(timeout, LAZY_WAIT) if lazy else timeout)
    announced = False
    while _alive(pid):
        now = time.monotonic()
        if now >= deadline:
            return pid
        if notice is not None and not announced and now - start >= NOTICE_AFTER:
            notice(f"waiting for the mount process (pid {pid}) to publish pending data")
            announced = True
        time.sleep(0.05)
    return None


def _alive(pid: int) -> bool:
    if not pid_alive(pid):
        return False
    try:  # a zombie counts as gone, and so does a reused pid that is not a mount
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ")[-1][:1] == "Z":
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"mount" in f.read()
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vhsmfs.mount.runner")
    p.add_argument("mountpoint")
    p.add_argument("--store", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--allow-other", action="store_true")
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--chunk-size", type=int)
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.debug else logging.INFO,
        format="%(asctime)s vhsm-mount %(levelname)s %(message)s",
    )
    try:
        keys = key_provider(a.key)
        run(
            a.store,
            a.mountpoint,
            keys,
            allow_other=a.allow_other,
            ready=a.ready_fd,
            chunk_size=a.chunk_size,
        )
    except VhsmError as e:
        report_ready(a.ready_fd, f"error: {e}")
        print(f"Error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
