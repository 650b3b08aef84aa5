"""Safe access to the files the key service keeps (docs/KEYSVC.md "Hardening").

Whoever can add entries to the data dir, or to the directory of the audit log, must not be able
to make vhsm (usually root) follow a link, hang on a FIFO, read a device until memory runs out,
write through a hard link into another file, or trust a file some other user made. So every
such file is reached through this module, and only through it:

* its directory is opened once (the path the user named is followed: it is theirs to choose)
  and the file is opened relative to that directory fd with O_NOFOLLOW | O_NONBLOCK | O_NOCTTY
  | O_CLOEXEC: a final symlink is never followed, a FIFO never blocks, a tty never becomes the
  controlling terminal, and nothing leaks into child processes;
* the file must be a regular file owned by a trusted owner (checked with lstat before the open,
  so a device is not even opened, and with fstat after it, which is what counts). Trusted owner
  rule: a file is trusted if it is owned by the owner of the directory that holds it or by the
  effective uid running vhsm; anything owned by a third user is refused. Secret files must not
  be open to group or others; files written in place (the audit log and its head) must have
  exactly one link, so that they cannot be another file's hard link;
* reads are bounded by what the format allows;
* new files are created with O_EXCL (never through an existing entry). When root creates one in
  a directory another user owns (`sudo vhsm` in the service user's data dir) it gives the file
  to that user (fchown), so the service can still use it;
* replacements are temp file (O_EXCL) + fsync + renameat + fsync(dir), and never rename over an
  entry that is not a trusted regular file;
* StrictModes, as OpenSSH has it: a directory that group or others may write without the sticky
  bit is refused as soon as a file in it is used, since whoever can write it can rename, roll
  back or delete the service's files. A sticky directory (like /tmp) is accepted: others can
  only add names there, and what they add fails the owner check.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from keysvc.errors import KeysvcError

Error = type[KeysvcError]
StrPath = str | os.PathLike[str]

# Flags of every open of a file below a Dir (see the module docstring).
_SAFE = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_CLOEXEC

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
    large without reading the rest. A regular file is read with one buffer of its size (no
    copy); a pipe or device in 1 MiB pieces, so memory follows what really arrives."""
    st = os.fstat(fd)
    step = st.st_size + 1 if stat.S_ISREG(st.st_mode) else 1 << 20
    parts: list[bytes] = []
    total = 0
    with open(fd, "rb", closefd=False) as f:
        while total <= limit:
            chunk = f.read(min(step, limit + 1 - total))
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
            step = 1 << 20  # a regular file that grew while it was read
    return parts[0] if len(parts) == 1 else b"".join(parts)


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


def publish_new(dir_fd: int, tmp: str, name: str) -> None:
    """Publish temp file `tmp` as `name` (same directory) only if `name` does not exist:
    link(2) never replaces anything (EEXIST), so a file or link planted after our check is
    left alone. Where hard links are not supported, `name` is reserved with O_EXCL and the
    temp file renamed over our own reservation."""
    try:
        os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _SAFE, 0o600, dir_fd=dir_fd)
        os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    else:
        os.unlink(tmp, dir_fd=dir_fd)
    os.fsync(dir_fd)


class Dir:
    """An open directory holding key service files; every file in it is reached relative to its
    fd and checked (module docstring). `what` names the directory and `error` is the
    KeysvcError raised, with one line naming the file, for anything refused or failing."""

    def __init__(self, path: Path, fd: int, what: str, error: Error) -> None:
        self.path = path
        self.fd = fd
        self.what = what
        self.error = error
        self.st = os.fstat(fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Dir:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # -- checks

    def strict(self) -> None:
        """StrictModes: refuse a directory that group or others may write, unless sticky."""
        m = self.st.st_mode
        if m & 0o022 and not m & stat.S_ISVTX:
            raise self.error(
                f"{self.what} {self.path} is writable by group or others "
                f"(mode {stat.S_IMODE(m):04o}), so they could swap or delete the files in it; "
                f"run: chmod go-w {self.path}"
            )

    def check(
        self,
        st: os.stat_result,
        name: str,
        what: str,
        *,
        secret: bool = False,
        single_link: bool = False,
        owner_writes: bool = False,
    ) -> None:
        """Refuse anything but a regular file of a trusted owner (module docstring); `secret`:
        also one that group or others may read or write; `owner_writes`: one they may write
        (a file that decides something, such as the access policy)."""
        p = self.path / name
        if not stat.S_ISREG(st.st_mode):
            raise self.error(f"{what} {p} is {kind(st.st_mode)}, not a regular file; refusing it")
        if st.st_uid not in (self.st.st_uid, os.geteuid()):
            raise self.error(
                f"{what} {p} is owned by uid {st.st_uid}, not by you or the directory's owner; "
                "refusing it"
            )
        if secret and st.st_mode & 0o077:
            raise self.error(
                f"{what} {p} is readable or writable by other users "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {p}"
            )
        if owner_writes and st.st_mode & 0o022:
            raise self.error(
                f"{what} {p} is writable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod go-w {p}"
            )
        if single_link and st.st_nlink != 1:
            raise self.error(
                f"{what} {p} has {st.st_nlink} hard links, so writing it would change another "
                "file too; refusing it"
            )

    def _owner(self) -> tuple[int, int] | None:
        """Who a file root creates here is given to (the trusted owner rule): the directory's
        owner when that is another user, so the service running as that user can use it."""
        if os.geteuid() == 0 and self.st.st_uid != 0:
            return self.st.st_uid, self.st.st_gid
        return None

    def _fail(self, doing: str, what: str, name: str, e: OSError) -> KeysvcError:
        p = self.path / name
        if e.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink planted after the lstat
            return self.error(f"{what} {p} is a symbolic link, not a regular file; refusing it")
        return self.error(f"cannot {doing} {what} {p}: {e.strerror}")

    # -- files

    def lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self._fail("examine", "file", name, e) from None

    def open_file(
        self,
        name: str,
        what: str,
        flags: int,
        *,
        create_mode: int | None = None,
        secret: bool = False,
        single_link: bool = False,
        owner_writes: bool = False,
    ) -> tuple[int, bool] | None:
        """(fd, created) of the checked file `name`, opened with `flags` (access mode, O_APPEND).
        A missing file is None, or with `create_mode` created (O_EXCL, given to the directory's
        owner)."""
        for _ in range(8):  # only another process creating or removing it at once loops
            st = self.lstat(name)
            if st is None:
                if create_mode is None:
                    return None
                self.strict()
                try:
                    fd = os.open(
                        name, flags | os.O_CREAT | os.O_EXCL | _SAFE, create_mode, dir_fd=self.fd
                    )
                except FileExistsError:
                    continue
                except OSError as e:
                    raise self._fail("create", what, name, e) from None
                try:
                    if (owner := self._owner()) is not None:
                        os.fchown(fd, *owner)
                except OSError as e:
                    os.close(fd)
                    raise self._fail("create", what, name, e) from None
                return fd, True
            self.strict()
            rules = {"secret": secret, "single_link": single_link, "owner_writes": owner_writes}
            self.check(st, name, what, **rules)
            try:
                fd = os.open(name, flags | _SAFE, dir_fd=self.fd)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise self._fail("open", what, name, e) from None
            try:
                self.check(os.fstat(fd), name, what, **rules)
            except BaseException:
                os.close(fd)
                raise
            return fd, False
        raise self.error(f"{what} {self.path / name} keeps appearing and disappearing")

    def read(
        self, name: str, what: str, *, limit: int, secret: bool = False, owner_writes: bool = False
    ) -> bytes | None:
        """The whole file (None if missing), refused beyond `limit` bytes."""
        opened = self.open_file(name, what, os.O_RDONLY, secret=secret, owner_writes=owner_writes)
        if opened is None:
            return None
        fd = opened[0]
        try:
            data = read_at_most(fd, limit)
        except OSError as e:
            raise self._fail("read", what, name, e) from None
        finally:
            os.close(fd)
        if len(data) > limit:
            raise self.error(f"{what} {self.path / name} is larger than {limit} bytes; refusing it")
        return data

    def open_reader(self, name: str, what: str) -> BinaryIO | None:
        """A binary file object of the checked file (None if missing), for files read
        line by line or from the end (the audit log)."""
        opened = self.open_file(name, what, os.O_RDONLY)
        return None if opened is None else open(opened[0], "rb")  # noqa: SIM115

    def open_lock(self, name: str, what: str) -> int:
        """A lock file's fd for flock, created if missing. Opened read-only: a lock file is
        never written, so even a planted hard link could not be changed through it."""
        opened = self.open_file(name, what, os.O_RDONLY, create_mode=0o600)
        assert opened is not None  # create_mode given
        return opened[0]

    @contextlib.contextmanager
    def exclusive(self, name: str, what: str) -> Iterator[None]:
        """Hold an exclusive flock on lock file `name` (open_lock), waiting for it: for a
        read-modify-write of a data-dir file that two processes may do at once."""
        fd = self.open_lock(name, what)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def create(self, name: str, what: str, data: bytes, *, mode: int = 0o600) -> None:
        """A new file that must not exist yet (O_EXCL), durable with its directory entry.
        A failed write removes it again."""
        opened = self.open_file(name, what, os.O_WRONLY, create_mode=mode)
        assert opened is not None  # create_mode given
        fd, created = opened
        try:
            if not created:
                raise self.error(f"{what} {self.path / name} appeared while it was being created")
            write_all(fd, data)
            os.fsync(fd)
            os.fsync(self.fd)
        except BaseException as e:
            if created:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=self.fd)
            if isinstance(e, OSError):
                raise self._fail("write", what, name, e) from None
            raise
        finally:
            os.close(fd)

    def prepare_replace(
        self, name: str, what: str, data: bytes, *, mode: int = 0o600
    ) -> PendingFile:
        """First half of `replace`: a durable temp file beside `name`, not yet published."""
        self.strict()
        try:
            tmp = write_temp(self.fd, name, data, mode, self._owner())
        except OSError as e:
            raise self._fail("write", what, name, e) from None
        return PendingFile(self, tmp, name, what)

    def replace(self, name: str, what: str, data: bytes, *, mode: int = 0o600) -> None:
        """Atomically replace (or create) `name`: readers see the old file or the new one."""
        self.prepare_replace(name, what, data, mode=mode).publish()

    def fsync(self) -> None:
        os.fsync(self.fd)


@dataclass
class PendingFile:
    """A durable temp file that `publish` renames into place (or `discard` removes)."""

    dir: Dir
    tmp: str
    name: str
    what: str

    def publish(self) -> None:
        d = self.dir
        try:
            # never over a link, FIFO, device or directory, nor over another user's file
            rename_over(d.fd, self.tmp, self.name, lambda st: d.check(st, self.name, self.what))
        except KeysvcError:
            self.discard()
            raise
        except OSError as e:
            self.discard()
            raise d._fail("replace", self.what, self.name, e) from None

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.tmp, dir_fd=self.dir.fd)


def open_dir(path: StrPath, what: str, error: Error) -> Dir:
    """The directory at `path` (following the path given), for files to be used in it."""
    d = open_dir_if_exists(path, what, error)
    if d is None:
        raise error(f"{what} {path} does not exist")
    return d


def open_dir_if_exists(path: StrPath, what: str, error: Error) -> Dir | None:
    p = Path(path)
    try:
        fd = os.open(p, _DIR)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise error(f"cannot open {what} {p}: {e.strerror}") from None
    return Dir(p, fd, what, error)


def discard(pending: PendingFile) -> None:
    pending.discard()


# -- one file named by a path (its directory opened for the call) -------------------------------


def read_file(
    path: StrPath,
    what: str,
    error: Error,
    *,
    limit: int,
    secret: bool = False,
    owner_writes: bool = False,
) -> bytes | None:
    """`Dir.read` of the file at `path`; None if it (or its directory) does not exist."""
    p = Path(path)
    d = open_dir_if_exists(p.parent, "directory", error)
    if d is None:
        return None
    with d:
        return d.read(p.name, what, limit=limit, secret=secret, owner_writes=owner_writes)


def open_reader(path: StrPath, what: str, error: Error) -> BinaryIO | None:
    """`Dir.open_reader` of the file at `path`; None if it (or its directory) does not exist."""
    p = Path(path)
    d = open_dir_if_exists(p.parent, "directory", error)
    if d is None:
        return None
    with d:
        return d.open_reader(p.name, what)
