"""An output file that has no name until it is published.

Plaintext is written into an unnamed inode (O_TMPFILE) in the destination directory and linked
into place only after everything checked out, so a crash or `kill -9` part-way leaves nothing
behind: the kernel frees the inode. Filesystems without O_TMPFILE get a hidden temp file instead
(`.<name>.<random>.vhsm-part`, mode 0600), removed on every failure the process survives.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from vhsmfs.errors import OutputError

_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT)


class PendingFile:
    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self._tmp: str | None = None
        try:
            self.fd = os.open(dest.parent, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno not in _NO_TMPFILE:
                raise OutputError(f"cannot write to {dest.parent}: {e.strerror}") from None
            try:
                self.fd, self._tmp = tempfile.mkstemp(
                    dir=dest.parent, prefix=f".{dest.name}.", suffix=".vhsm-part"
                )
            except OSError as e2:
                raise OutputError(f"cannot write to {dest.parent}: {e2.strerror}") from None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:  # os.write may write only part
                view = view[os.write(self.fd, view) :]
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise OutputError(f"no space left on device while writing {self.dest}") from None
            raise OutputError(f"cannot write {self.dest}: {e.strerror}") from None

    def finish(self, mode: int, times_ns: tuple[int, int] | None) -> None:
        """Make the content durable and set mode and times, still without a name."""
        try:
            os.fsync(self.fd)
            os.fchmod(self.fd, mode)
            if times_ns:
                os.utime(self.fd, ns=times_ns)
        except OSError as e:
            raise OutputError(f"cannot write {self.dest}: {e.strerror}") from None

    def publish(self, *, force: bool) -> None:
        """Give the file its name. Without force an existing file is never replaced (link()
        fails instead), including one that appeared while we were writing."""
        src = self._tmp or f"/proc/self/fd/{self.fd}"
        try:
            if force:
                side = f"{self.dest.parent}/.{self.dest.name}.{os.urandom(6).hex()}.vhsm-part"
                _link(src, side)
                try:
                    os.replace(side, self.dest)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(side)
                    raise
            else:
                _link(src, str(self.dest))
        except FileExistsError:
            raise OutputError(f"{self.dest} already exists (use --force to overwrite)") from None
        except OSError as e:
            raise OutputError(f"cannot create {self.dest}: {e.strerror}") from None
        self._unlink_tmp()
        dfd = os.open(self.dest.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def close(self) -> None:
        """Release the descriptor; an unpublished file vanishes with it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._unlink_tmp()

    def _unlink_tmp(self) -> None:
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            self._tmp = None


def _link(src: str, dst: str) -> None:
    """linkat(src, dst, AT_SYMLINK_FOLLOW). CPython 3.11's os.link only passes the follow flag
    when given a dir fd; without it, linking /proc/self/fd/N links the magic symlink itself and
    fails with EXDEV. src is absolute or relative to the cwd either way."""
    cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(src, dst, src_dir_fd=cwd, follow_symlinks=True)
    finally:
        os.close(cwd)
