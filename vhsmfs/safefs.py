"""Safe access to a directory tree that someone else may write to: vhsmfs's safe-open module.

The token store's threat model (docs/FORMAT.md section 8) gives the attacker write access to the
raw store, and vhsm usually runs as root. Such an attacker can plant symbolic links, hard links,
FIFOs, device nodes and files owned by other users where vhsm expects its own files. Every access
below a directory the user named therefore goes through this module:

* the directory the user named is opened once (links in that path are the user's choice and are
  followed); everything below it is reached relative to open directory descriptors (openat and
  friends), one component at a time, never through a symbolic link (O_NOFOLLOW);
* an entry is lstat()ed before it is opened (a device node is never opened) and fstat()ed after
  (what was opened is what was checked); files are opened O_NONBLOCK, so a FIFO swapped in
  between cannot block;
* an entry must be a regular file or a directory, as the caller expects, owned by a trusted owner
  (the owner of the root directory or the effective uid), and an entry that is overwritten or
  wiped must have exactly one link (a hard link to /etc/shadow is never zeroed);
* new entries are created O_CREAT|O_EXCL|O_NOFOLLOW, never truncated over what is there; when
  root creates one in a directory owned by another user, it is given to that user.

Anything else raises UnsafeEntryError: one line naming the entry, and the entry is left as it is.
Nothing here knows the token format (format v2 reworks it; this module stays).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import stat
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

from vhsmfs.errors import VhsmError

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW
_WIPE_BLOCK = 1 << 20
log = logging.getLogger("vhsm.store")
READER_WAIT = 5.0  # seconds wipe() waits for other readers of a file (a backup tool) to close it
RENAME_NOREPLACE = 1  # linux/fs.h
# What openat() reports when O_NOFOLLOW/O_DIRECTORY meet the wrong kind of entry, or a FIFO
# without a reader is opened for writing: the entry is then described from its lstat().
_WRONG_KIND = (errno.ELOOP, errno.ENOTDIR, errno.ENXIO, errno.EISDIR, errno.ENODEV)
# renameat2() flags the filesystem or the kernel does not support
_NO_RENAME2 = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP)

_KINDS = {
    stat.S_IFREG: "a regular file",
    stat.S_IFDIR: "a directory",
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


class UnsafeEntryError(VhsmError):
    """An entry that is not what it must be (a link, a special file, a stranger's file, a file
    with other hard links). It was not followed, read, written, wiped or removed."""


def kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "a special file")


@dataclass(frozen=True)
class Rules:
    """How the entries below one root are judged and named in messages."""

    label: str  # "store entry", "output path": starts every message
    root: str  # the directory whose owner is trusted (for messages)
    trusted: frozenset[int] | None  # owners accepted (None: any owner)
    give_to: tuple[int, int] | None  # (uid, gid) that root gives the entries it creates


class SafeDir:
    """An open directory. Entries are named relative to it and never reached through a link."""

    def __init__(self, fd: int, path: str, rules: Rules) -> None:
        self.fd = fd
        self.path = path  # for messages only; never opened again
        self.rules = rules
        self._closer = weakref.finalize(self, os.close, fd)

    @classmethod
    def open_root(cls, path: str, label: str, *, trust_owner: bool) -> SafeDir:
        """Open the directory `path` names (links in `path` are followed: the user chose it).
        With trust_owner, entries below must belong to its owner or to the effective uid, and
        what root creates is given to its owner. Raises OSError as os.open does."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        trusted = give = None
        if trust_owner:
            euid = os.geteuid()
            trusted = frozenset({st.st_uid, euid})
            if euid == 0 and st.st_uid != 0:
                give = (st.st_uid, st.st_gid)
        shown = path.rstrip("/") or "/"
        return cls(fd, shown, Rules(label, shown, trusted, give))

    def close(self) -> None:
        self._closer()

    def __enter__(self) -> SafeDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- judging entries ------------------------------------------------------------------------
    def shown(self, name: str) -> str:
        return f"{self.path}/{name}"

    def refuse(self, name: str, why: str) -> UnsafeEntryError:
        return UnsafeEntryError(f"{self.rules.label} {self.shown(name)} {why}")

    def check(self, name: str, st: os.stat_result, want: int, *, sole: bool = False) -> None:
        """Raise UnsafeEntryError unless `st` (of entry `name`) is of type `want` (S_IFREG or
        S_IFDIR), has a trusted owner and, with `sole`, exactly one link."""
        fmt = stat.S_IFMT(st.st_mode)
        if fmt == stat.S_IFLNK:
            raise self.refuse(name, "is a symbolic link; refusing to follow it")
        if fmt != want:
            raise self.refuse(name, f"is {kind(fmt)}, not {kind(want)}; refusing it")
        trusted = self.rules.trusted
        if trusted is not None and st.st_uid not in trusted:
            raise self.refuse(
                name,
                f"is owned by uid {st.st_uid}, not by you or the owner of {self.rules.root}; "
                "refusing it",
            )
        if sole and st.st_nlink != 1:
            raise self.refuse(
                name, f"has {st.st_nlink} hard links; refusing to overwrite or wipe it"
            )

    def lstat(self, name: str) -> os.stat_result | None:
        """The entry itself (a link is not followed); None if there is none."""
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def check_entry(self, name: str, want: int, *, sole: bool = False) -> os.stat_result:
        """lstat + check; FileNotFoundError if there is no such entry."""
        st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        self.check(name, st, want, sole=sole)
        return st

    def same(self, name: str, st: os.stat_result) -> bool:
        """Whether entry `name` is still the inode `st` describes."""
        now = self.lstat(name)
        return now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)

    def names(self) -> list[str]:
        """The directory's entries. Listed through a descriptor of its own: os.listdir(fd) would
        share (and move) the read position of self.fd with any other thread listing it."""
        fd = os.open(".", _DIR_FLAGS, dir_fd=self.fd)
        try:
            return os.listdir(fd)
        finally:
            os.close(fd)

    # -- opening and creating -------------------------------------------------------------------
    def _open(
        self, name: str, flags: int, want: int, *, sole: bool = False
    ) -> tuple[int, os.stat_result]:
        self.check_entry(name, want, sole=sole)  # never open what is not a file: a device
        try:
            fd = os.open(name, flags | _NOFOLLOW, dir_fd=self.fd)
        except OSError as e:
            if e.errno in _WRONG_KIND:  # swapped since the lstat: say what is there now
                self.check_entry(name, want, sole=sole)
            raise
        try:
            st = os.fstat(fd)
            self.check(name, st, want, sole=sole)
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def open_file(
        self, name: str, flags: int = os.O_RDONLY, *, sole: bool = False
    ) -> tuple[int, os.stat_result]:
        """A checked regular file: (fd, its fstat). FileNotFoundError if missing."""
        return self._open(name, flags, stat.S_IFREG, sole=sole)

    def make_dir(self, name: str, mode: int = 0o700) -> bool:
        """mkdirat; False if something is there already (open_dir then judges it)."""
        try:
            os.mkdir(name, mode, dir_fd=self.fd)
        except FileExistsError:
            return False
        return True

    def open_dir(self, name: str, *, create: bool = False, mode: int = 0o700) -> SafeDir:
        """A checked subdirectory, made first if `create`. FileNotFoundError if missing."""
        made = create and self.make_dir(name, mode)
        d = SafeDir(self._open(name, _DIR_FLAGS, stat.S_IFDIR)[0], self.shown(name), self.rules)
        if made:
            try:
                self.give(d.fd)
            except BaseException:
                d.close()
                raise
        return d

    def create_file(self, name: str, mode: int = 0o600, flags: int = os.O_WRONLY) -> int:
        """A new file (never one that exists, never through a link). FileExistsError if taken."""
        fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | _NOFOLLOW, mode, dir_fd=self.fd)
        try:
            self.give(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=self.fd)
            raise
        return fd

    def open_or_create(self, name: str, mode: int = 0o600, flags: int = os.O_RDWR) -> int:
        """A regular file opened for writing (`flags`: O_RDWR, or O_WRONLY|O_APPEND), created
        if missing; an existing one must be ours alone (it is written to: a lock file, a log)."""
        while True:
            try:
                return self.create_file(name, mode, flags)
            except FileExistsError:
                pass
            try:
                return self.open_file(name, flags, sole=True)[0]
            except FileNotFoundError:
                continue  # removed in between: create it after all

    def give(self, fd: int) -> None:
        """Root creating in another user's directory: the entry goes to that user, so the
        directory stays usable by its owner."""
        if self.rules.give_to is not None:
            os.fchown(fd, *self.rules.give_to)

    # -- changing entries -----------------------------------------------------------------------
    def wipe(self, name: str, *, wait_readers: float = READER_WAIT) -> None:
        """Unlink a regular file of ours and overwrite its data with zeros, fsync. Raises
        FileNotFoundError if missing. On copy-on-write filesystems and SSDs old blocks may
        survive (FORMAT.md 7).

        Never under a backup tool that is copying the file (it would copy zeros): up to
        `wait_readers` seconds are spent waiting for the last other descriptor to close, seen by
        whether a write lease can be taken (fcntl F_SETLEASE). The name goes first, so nobody
        can open the file after that check; the zeros are written through our descriptor only
        if nobody opened it in between. A file still open (a backup tool stalled on a loaded
        machine: seen with borg, issue 12) is left unlinked but not overwritten, and a warning
        names it: its holder is copying those bytes anyway."""
        fd, st = self.open_file(name, os.O_WRONLY, sole=True)
        try:
            alone = _wait_for_readers(fd, wait_readers)
            self.unlink(name, st)
            if alone:
                alone = _wait_for_readers(fd, 0.0)  # opened between the check and the unlink?
            if not alone:
                log.warning(
                    "%s: another process kept it open; unlinked without overwriting",
                    os.path.join(self.path, name),
                )
                return
            zeros = bytes(min(st.st_size, _WIPE_BLOCK))
            for start, end in _data_extents(fd, st.st_size):
                done = start
                while done < end:
                    done += os.pwrite(fd, zeros[: min(_WIPE_BLOCK, end - done)], done)
            os.fsync(fd)
        finally:
            os.close(fd)

    def unlink(self, name: str, st: os.stat_result | None = None) -> None:
        """Remove entry `name`; with `st`, only if it is still that inode (else it is left
        alone and reported)."""
        if st is not None and not self.same(name, st):
            if self.lstat(name) is None:
                return
            raise self.refuse(name, "was replaced while it was being removed; left in place")
        os.unlink(name, dir_fd=self.fd)

    def rmdir(self, name: str) -> None:
        os.rmdir(name, dir_fd=self.fd)

    def replace(self, src: str, dst: str) -> None:
        """rename(src, dst) in this directory, where an existing dst must be a regular file
        (anything else is refused, never replaced)."""
        if self.lstat(dst) is not None:
            self.check_entry(dst, stat.S_IFREG)
        os.rename(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def publish(self, src: str, dst: str, *, force: bool) -> None:
        """Give the finished file `src` the name `dst`. Without force an existing dst is never
        replaced (FileExistsError), even one that appears meanwhile; with force only a regular
        file is. Needs neither O_TMPFILE nor hard links (FUSE mounts, the vhsm mount itself)."""
        if force:
            self.replace(src, dst)
        else:
            rename_noreplace(self.fd, src, dst)

    def fsync(self) -> None:
        os.fsync(self.fd)

    @contextlib.contextmanager
    def locked(self, exclusive: bool) -> Iterator[bool]:
        """flock() on this directory without waiting: True if taken (released on exit)."""
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)


_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    _renameat2.restype = ctypes.c_int


def rename_noreplace(dir_fd: int, src: str, dst: str, dst_dir_fd: int | None = None) -> None:
    """renameat2(RENAME_NOREPLACE) from directory `dir_fd` to `dst_dir_fd` (the same one by
    default). Where the filesystem or kernel lacks it: reserve dst with O_CREAT|O_EXCL (fails
    if anything is there), then rename over our own reservation, which is removed again if the
    rename fails."""
    src_fd = dir_fd
    dir_fd = src_fd if dst_dir_fd is None else dst_dir_fd  # from here on: the destination's
    if _renameat2 is not None:
        res = _renameat2(src_fd, os.fsencode(src), dir_fd, os.fsencode(dst), RENAME_NOREPLACE)
        if res == 0:
            return
        err = ctypes.get_errno()
        if err not in _NO_RENAME2:
            raise OSError(err, os.strerror(err), dst)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600, dir_fd=dir_fd)
    try:
        reserved = os.fstat(fd)
    finally:
        os.close(fd)
    try:
        os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            now = os.stat(dst, dir_fd=dir_fd, follow_symlinks=False)
            if (now.st_dev, now.st_ino) == (reserved.st_dev, reserved.st_ino):
                os.unlink(dst, dir_fd=dir_fd)
        raise


def _wait_for_readers(fd: int, limit: float) -> bool:
    """Until no other descriptor anywhere has the file open (a write lease is granted only
    then; it is given back at once), at most `limit` seconds: False if one still has it. Where
    leases are not supported (some network filesystems), nothing is waited for (True)."""
    deadline = time.monotonic() + limit
    pause = 0.002
    while True:
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        except OSError as e:
            if e.errno != errno.EAGAIN:
                return True  # no leases here (EINVAL, ENOLCK): nothing to wait on
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.1)
            continue
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return True


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The regions of a file that hold data. Holes (an object whose writes failed part-way,
    e.g. on a full disk) hold nothing to wipe, and filling them could fail for want of space.
    The whole file where the filesystem cannot tell."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
            end = min(size, os.lseek(fd, start, os.SEEK_HOLE))
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data past pos
                return
            yield pos, size  # SEEK_DATA not supported
            return
        yield start, end
        pos = end
