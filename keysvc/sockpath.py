"""The daemon's socket file: binding it without harming what is at its path, and reaching paths
longer than sun_path (108 bytes) through /proc/self/fd.

vhsm often runs as root, and `--socket FILE` names a path that may already hold something.
Binding never replaces anything but a stale socket of a trusted owner (a daemon that died); a
regular file, a symlink, a FIFO or a device there is refused with one line. Everything is done
relative to the parent directory's fd (the final component is never followed), the socket gets
its mode at bind time from the umask (a chmod by path afterwards could follow a symlink swapped
in meanwhile), and at shutdown the file is removed only if it is still the one this daemon
bound.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

from keysvc import safefs
from keysvc.errors import DaemonError

_LIMIT = 100


@contextlib.contextmanager
def usable(path: Path) -> Iterator[str]:
    """A path string bind()/connect() accept for `path`, valid inside the with block."""
    s = str(path)
    if len(s.encode()) <= _LIMIT:
        yield s
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def bind(path: Path, mode: int) -> tuple[socket.socket, tuple[int, int]]:
    """A Unix socket bound at `path` with `mode` (not listening yet) and the (dev, ino) of the
    socket file it made. Raises DaemonError when something other than a stale socket is there,
    or when a key service already listens on it."""
    try:
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise DaemonError(f"cannot use socket directory {path.parent}: {e.strerror}") from None
    try:
        name = path.name
        at = f"/proc/self/fd/{dfd}/{name}"  # the directory by fd; the name is never followed
        try:
            st: os.stat_result | None = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise DaemonError(
                    f"socket path {path} is {safefs.kind(st.st_mode)}, not a socket; refusing to "
                    "replace it"
                )
            if st.st_uid not in (os.geteuid(), os.fstat(dfd).st_uid):
                raise DaemonError(
                    f"socket {path} belongs to uid {st.st_uid}, not to you or the directory's "
                    "owner; refusing to replace it"
                )
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(at)
            except (ConnectionRefusedError, FileNotFoundError):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dfd)  # stale socket of a daemon that died
            else:
                raise DaemonError(f"a key service is already listening on {path}")
            finally:
                probe.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o777 & ~mode)
        try:
            s.bind(at)
        except OSError as e:
            s.close()
            raise DaemonError(f"cannot bind {path}: {e.strerror}") from None
        finally:
            os.umask(old)
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        return s, (st.st_dev, st.st_ino)
    finally:
        os.close(dfd)


def remove(path: Path, ident: tuple[int, int]) -> None:
    """Unlink the socket file at shutdown, only if it is still the one `bind` made."""
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            st = os.stat(path.name, dir_fd=dfd, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == ident:
                os.unlink(path.name, dir_fd=dfd)
        finally:
            os.close(dfd)
