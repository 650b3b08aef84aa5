"""Output files and directories: nothing is written outside the directory the user named.

OUTDIR is the user's path: links in it are followed (the user chose them) and missing
directories are created. Below it, a token's relative path is walked one component at a time
relative to directory descriptors with O_NOFOLLOW|O_DIRECTORY (vhsmfs.safefs): a component that
is a symbolic link or not a directory is refused, and on failure only the directories this run
created are removed again.

A file has no name until it is published. Plaintext is written into an unnamed inode
(O_TMPFILE) in the destination directory and linked into place only after everything checked
out, so a crash or `kill -9` part-way leaves nothing behind: the kernel frees the inode.
Filesystems without O_TMPFILE (FUSE mounts, the vhsm mount itself) get a hidden temp file
instead (`.<name>.<random>.vhsm-part`, mode 0600), removed on every failure the process
survives, and published by renameat2(RENAME_NOREPLACE), or where that is missing too by renaming
over a reservation made with O_CREAT|O_EXCL: no hard link is needed. An existing destination
that is not a regular file (a link, FIFO, device or directory) is never replaced, not even with
--force; a regular one only with --force, and atomically.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from vhsmfs.errors import OutputError
from vhsmfs.safefs import SafeDir

_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT)
OUTPUT = "output path"


def check_destination(directory: SafeDir, name: str, *, force: bool) -> None:
    """Refuse an existing destination: anything but a regular file always (UnsafeEntryError),
    a regular file unless `force`."""
    st = directory.lstat(name)
    if st is None:
        return
    directory.check(name, st, stat.S_IFREG)
    if not force:
        raise OutputError(f"{directory.shown(name)} already exists (use --force to overwrite)")


class PendingFile:
    """A file being written into `directory` that gets the name `name` only on publish()."""

    def __init__(self, directory: SafeDir, name: str) -> None:
        self.dir, self.name = directory, name
        self.dest = directory.shown(name)
        self._tmp: str | None = None
        self._tmp_st: os.stat_result | None = None
        try:
            self.fd = os.open(
                ".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=self.dir.fd
            )
        except OSError as e:
            if e.errno not in _NO_TMPFILE:
                raise OutputError(f"cannot write to {directory.path}: {e.strerror}") from None
            self._tmp = self._hidden()
            try:
                self.fd = directory.create_file(self._tmp)
            except OSError as e2:
                raise OutputError(f"cannot write to {directory.path}: {e2.strerror}") from None
            self._tmp_st = os.fstat(self.fd)

    def _hidden(self) -> str:
        return f".{self.name[:100]}.{os.urandom(6).hex()}.vhsm-part"

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:  # os.write may write only part
                view = view[os.write(self.fd, view) :]
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise OutputError(f"no space left on device while writing {self.dest}") from None
            raise OutputError(f"cannot write {self.dest}: {e.strerror}") from None

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """write() at an offset, from any thread (pieces may arrive in any order)."""
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                view = view[n:]
                offset += n
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
        """Give the file its name. Without force an existing entry is never replaced, including
        one that appeared while we were writing; with force only a regular file is."""
        try:
            if self._tmp is None and not force:
                self._link(self.name)  # linkat fails if anything is there
            else:
                if self._tmp is None:  # an unnamed inode: name it where nobody looks first
                    self._tmp = self._hidden()
                    self._link(self._tmp)
                    self._tmp_st = os.fstat(self.fd)
                self.dir.publish(self._tmp, self.name, force=force)
                self._tmp = None
        except FileExistsError:
            raise OutputError(f"{self.dest} already exists (use --force to overwrite)") from None
        except OSError as e:
            raise OutputError(f"cannot create {self.dest}: {e.strerror}") from None
        with contextlib.suppress(OSError):  # durable name; the content was fsynced already
            self.dir.fsync()

    def _link(self, name: str) -> None:
        """linkat(AT_FDCWD, /proc/self/fd/N, dir, name, AT_SYMLINK_FOLLOW): the unnamed inode.
        CPython passes the follow flag only when given a dir fd, which we always do here."""
        os.link(f"/proc/self/fd/{self.fd}", name, dst_dir_fd=self.dir.fd, follow_symlinks=True)

    def close(self) -> None:
        """Release the descriptor; an unpublished file vanishes with it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self.dir.unlink(self._tmp, self._tmp_st)
            self._tmp = None


class OutputDirs:
    """OUTDIR, opened once, and the directories of a relative path below it."""

    def __init__(self, outdir: Path) -> None:
        self.outdir = outdir
        self._made_top = _make_dirs(outdir)
        try:
            self.top = SafeDir.open_root(str(outdir), OUTPUT, trust_owner=False)
        except OSError as e:
            _remove_dirs(self._made_top)
            raise OutputError(f"cannot open {outdir}: {e.strerror}") from None
        self._made: list[tuple[SafeDir, str]] = []
        self._held: list[SafeDir] = [self.top]
        self.last_made = False  # whether walk() created its last directory

    def walk(self, parts: Sequence[str]) -> SafeDir:
        """The directory OUTDIR/parts..., made where missing; never through a link."""
        d = self.top
        for part in parts:
            try:
                self.last_made = d.make_dir(part)
                if self.last_made:
                    self._made.append((d, part))
                d = d.open_dir(part)
            except FileNotFoundError:
                raise OutputError(f"{d.shown(part)} vanished while it was being created") from None
            except OSError as e:
                raise OutputError(f"cannot create {d.shown(part)}: {e.strerror}") from None
            self._held.append(d)
        return d

    def undo(self) -> None:
        """Remove the directories this run created (deepest first, only if still empty)."""
        for parent, name in reversed(self._made):
            with contextlib.suppress(OSError):
                parent.rmdir(name)
        self._made.clear()
        _remove_dirs(self._made_top)

    def close(self) -> None:
        for d in self._held:
            d.close()
        self._held.clear()


def _remove_dirs(created: list[Path]) -> None:
    """Undo _make_dirs: remove the directories it created, deepest first (if still empty)."""
    for d in reversed(created):
        with contextlib.suppress(OSError):
            d.rmdir()


def _make_dirs(path: Path) -> list[Path]:
    """mkdir -p of OUTDIR (the user's path) that returns the directories it created (to remove
    them again on failure)."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    created: list[Path] = []
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            continue
        except OSError as e:
            _remove_dirs(created)
            raise OutputError(f"cannot create {d}: {e.strerror}") from None
        created.append(d)
    if not path.is_dir():
        _remove_dirs(created)
        raise OutputError(f"{path} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        _remove_dirs(created)
        raise OutputError(f"{path} is not writable")
    return created
