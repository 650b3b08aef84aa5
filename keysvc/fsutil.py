"""Small file-system helpers: atomic replace, private file creation, permission checks, and the
temp-file primitives of keysvc.userfiles."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

from keysvc.errors import KeysvcError

_SAFE = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """temp + fsync + rename + fsync(dir): readers see the old file or the new one, never half."""
    tmp = prepare_atomic(path, data, mode=mode)
    publish_atomic(tmp, path)


def prepare_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> Path:
    """First half of atomic_write: a durable temp file beside `path`, not yet published."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def publish_atomic(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    fsync_dir(path.parent)


def discard(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def _refuse_unsafe(st: os.stat_result, path: Path, what: str, error: type[KeysvcError]) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path} is not a regular file")
    if st.st_mode & 0o077:
        raise error(
            f"{what} {path} is readable or writable by other users "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
        )


def check_private(path: Path, what: str, error: type[KeysvcError]) -> os.stat_result:
    """Refuse a secret file that other users could read (or that is not a regular file)."""
    st = os.stat(path)
    _refuse_unsafe(st, path, what, error)
    return st


def read_private(path: Path, what: str, error: type[KeysvcError]) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        _refuse_unsafe(os.fstat(fd), path, what, error)
        chunks = []
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def create_private(path: Path, data: bytes) -> None:
    """Create a new 0600 file (never overwrite), durably."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


_KINDS: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def kind(mode: int) -> str:
    """What kind of file `mode` describes ("a FIFO"), for messages."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "an unknown kind of file"


def read_at_most(fd: int, limit: int) -> bytes:
    """Up to limit + 1 bytes from fd: one more than allowed, so the caller can tell it is too
    large without reading the rest."""
    with open(fd, "rb", closefd=False) as f:
        return f.read(limit + 1) or b""


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_temp(
    dir_fd: int,
    name: str,
    data: bytes,
    mode: int,
    owner: tuple[int, int] | None = None,
    *,
    exact_mode: bool = False,
) -> str:
    """A new durable temp file beside `name` (O_EXCL, random name), created with `mode` (less
    the umask, unless `exact_mode`) and optionally given to `owner` (uid, gid) before any data
    is in it; returns its name. Removed again on failure."""
    tmp = f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _SAFE, mode, dir_fd=dir_fd)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        if exact_mode:
            os.fchmod(fd, mode)
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    finally:
        os.close(fd)
    return tmp


def rename_over(dir_fd: int, tmp: str, name: str, accept: Callable[[os.stat_result], None]) -> None:
    """Publish temp file `tmp` as `name` (same directory): `accept` sees what `name` is now, if
    anything, and raises to refuse replacing it; then rename and fsync the directory."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        pass
    else:
        accept(st)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)
