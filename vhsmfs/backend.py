"""Storage backends: immutable objects per token plus an atomic metadata commit.

Nothing above this module may assume a POSIX path: the token store talks to a Backend. The
local directory backend is the embedded default. Layout of a local store (docs/FORMAT.md):

    STORE/VHSM-STORE                  marker: "vhsm-store 1"
    STORE/<uuid>.metadata             the committed metadata file of a token
    STORE/<uuid>.data/<8 hex>         immutable objects holding encrypted chunk records
    STORE/.<uuid>.deleting            a token being deleted (hidden from list; gc finishes it)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import uuid
from collections.abc import Iterator, Sequence
from typing import Protocol

from vhsmfs.errors import StoreError, TokenNotFoundError

Buffer = bytes | bytearray | memoryview

STORE_MARKER = "VHSM-STORE"
STORE_MARKER_TEXT = b"vhsm-store 1\n"
_META_RE = re.compile(r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\.metadata$")
_WIPE_BLOCK = 1 << 20


class ObjectWriter(Protocol):
    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    # At a given offset, from any thread: the mount encrypts several runs at once and each
    # lands where its place was reserved. An object is complete only after finish().
    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...
    def finish(self) -> None: ...
    def abort(self) -> None: ...


class ObjectReader(Protocol):
    def pread(self, offset: int, length: int) -> bytes: ...
    def close(self) -> None: ...


class Backend(Protocol):
    def token_ids(self) -> list[uuid.UUID]: ...
    def read_metadata(self, token: uuid.UUID) -> bytes: ...
    def commit_metadata(self, token: uuid.UUID, data: bytes | Sequence[Buffer]) -> None: ...
    def new_object(self, token: uuid.UUID, object_id: int) -> ObjectWriter: ...
    def open_object(self, token: uuid.UUID, object_id: int) -> ObjectReader: ...
    def object_sizes(self, token: uuid.UUID) -> dict[int, int]: ...
    def delete_object(self, token: uuid.UUID, object_id: int) -> None: ...
    def delete_token(self, token: uuid.UUID) -> None: ...
    def discard_uncommitted(self, token: uuid.UUID) -> None: ...
    def writing(self, token: uuid.UUID) -> contextlib.AbstractContextManager[None]: ...
    def collect_garbage(self) -> list[str]: ...
    def describe(self) -> str: ...


def _make_dir(path: str) -> None:
    """mkdir -p for a directory whose parent (the store root) exists: one system call, where
    os.makedirs(exist_ok=True) makes three on this hot path (every new object)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(path, mode=0o700, exist_ok=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def wipe_file(path: str) -> None:
    """Overwrite a file with zeros, fsync, then unlink it. On copy-on-write filesystems and
    SSDs the old blocks may survive in the device: documented in docs/FORMAT.md."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        size = os.fstat(fd).st_size
        zeros = bytes(min(size, _WIPE_BLOCK))
        for start, end in _data_extents(fd, size):
            done = start
            while done < end:
                done += os.pwrite(fd, zeros[: min(_WIPE_BLOCK, end - done)], done)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(path)


class _LocalObjectWriter:
    def __init__(self, path: str) -> None:
        self._path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view = view[n:]
            offset += n

    def finish(self) -> None:
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)


class _LocalObjectReader:
    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDONLY)

    def pread(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LocalBackend:
    """A store in a local directory: plain files, stable names, no xattrs, no sparse files."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = os.path.abspath(os.fspath(root))
        if create:
            self._ensure()
        elif not os.path.isdir(self.root):
            raise StoreError(f"store {self.root} does not exist")

    def describe(self) -> str:
        return self.root

    def _ensure(self) -> None:
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store {self.root}: {e.strerror}") from None
        marker = os.path.join(self.root, STORE_MARKER)
        if os.path.exists(marker):
            return
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        except OSError as e:
            raise StoreError(f"cannot initialise store {self.root}: {e.strerror}") from None
        with os.fdopen(fd, "wb") as f:
            f.write(STORE_MARKER_TEXT)
            f.flush()
            os.fsync(f.fileno())

    # -- paths ----------------------------------------------------------------------------------
    def _meta_path(self, token: uuid.UUID) -> str:
        return os.path.join(self.root, f"{token}.metadata")

    def _data_dir(self, token: uuid.UUID) -> str:
        return os.path.join(self.root, f"{token}.data")

    def _object_path(self, token: uuid.UUID, object_id: int) -> str:
        return os.path.join(self._data_dir(token), f"{object_id:08x}")

    # -- metadata -------------------------------------------------------------------------------
    def token_ids(self) -> list[uuid.UUID]:
        try:
            names = os.listdir(self.root)
        except OSError as e:
            raise StoreError(f"cannot list store {self.root}: {e.strerror}") from None
        found = []
        for name in names:
            m = _META_RE.match(name)
            if m:
                found.append(uuid.UUID(m.group(1)))
        return sorted(found, key=str)

    def read_metadata(self, token: uuid.UUID) -> bytes:
        try:
            with open(self._meta_path(token), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise TokenNotFoundError(f"token {token} not found in {self.root}") from None

    def commit_metadata(self, token: uuid.UUID, data: bytes | Sequence[Buffer]) -> None:
        """Publish a new metadata file atomically: objects it names must be durable first, so the
        data directory is fsynced, then temp file written + fsynced, renamed, root fsynced."""
        data_dir = self._data_dir(token)
        with contextlib.suppress(FileNotFoundError):  # a token with no objects has no directory
            _fsync_dir(data_dir)
        tmp = os.path.join(self.root, f".{token}.metadata.{os.getpid()}.{os.urandom(4).hex()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for part in [data] if isinstance(data, bytes | bytearray) else data:
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, self._meta_path(token))
            _fsync_dir(self.root)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    # -- objects --------------------------------------------------------------------------------
    def new_object(self, token: uuid.UUID, object_id: int) -> ObjectWriter:
        path = self._object_path(token, object_id)
        try:  # writers hold writing(token), which made the directory: no mkdir per object
            return _LocalObjectWriter(path)
        except FileNotFoundError:
            _make_dir(self._data_dir(token))
            return _LocalObjectWriter(path)

    def open_object(self, token: uuid.UUID, object_id: int) -> ObjectReader:
        return _LocalObjectReader(self._object_path(token, object_id))

    def object_sizes(self, token: uuid.UUID) -> dict[int, int]:
        out: dict[int, int] = {}
        try:
            with os.scandir(self._data_dir(token)) as it:
                for entry in it:
                    if len(entry.name) == 8:
                        with contextlib.suppress(ValueError):
                            out[int(entry.name, 16)] = entry.stat().st_size
        except FileNotFoundError:
            pass
        return out

    def delete_object(self, token: uuid.UUID, object_id: int) -> None:
        wipe_file(self._object_path(token, object_id))

    # -- whole tokens ---------------------------------------------------------------------------
    def delete_token(self, token: uuid.UUID) -> None:
        """Hide the token at once (atomic rename to a tombstone), then wipe its objects and finally
        the metadata. A crash part-way leaves a tombstone that collect_garbage finishes."""
        tomb = os.path.join(self.root, f".{token}.deleting")
        try:
            os.rename(self._meta_path(token), tomb)
        except FileNotFoundError:
            raise TokenNotFoundError(f"token {token} not found in {self.root}") from None
        _fsync_dir(self.root)
        self._wipe_data_dir(token)
        wipe_file(tomb)
        _fsync_dir(self.root)

    def _wipe_data_dir(self, token: uuid.UUID) -> None:
        data_dir = self._data_dir(token)
        try:
            names = os.listdir(data_dir)
        except FileNotFoundError:
            return
        for name in names:
            wipe_file(os.path.join(data_dir, name))
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(data_dir)

    def discard_uncommitted(self, token: uuid.UUID) -> None:
        """Remove the objects of a token whose first commit never happened (failed store)."""
        if not os.path.exists(self._meta_path(token)):
            self._wipe_data_dir(token)

    @contextlib.contextmanager
    def writing(self, token: uuid.UUID) -> Iterator[None]:
        """Held while a token is being written, so collect_garbage never reaps work in progress.
        An flock on the data directory: released by the kernel if the writer is killed."""
        data_dir = self._data_dir(token)
        while True:
            _make_dir(data_dir)
            fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(fd, fcntl.LOCK_SH)
            # gc may have wiped and removed the directory between open() and flock(): the lock
            # would then guard a dead inode, so start again on a fresh directory.
            if _same_dir(fd, data_dir):
                break
            os.close(fd)
        try:
            yield
        finally:
            os.close(fd)

    def collect_garbage(self) -> list[str]:
        """Finish interrupted deletes, drop data of stores that never committed (a killed
        `store`), and stale temp files. Returns a line per thing removed."""
        removed: list[str] = []
        for name in sorted(os.listdir(self.root)):
            path = os.path.join(self.root, name)
            if name.startswith(".") and name.endswith(".deleting"):
                token = uuid.UUID(name[1:-9])
                self._wipe_data_dir(token)
                wipe_file(path)
                removed.append(f"finished deleting token {token}")
            elif (
                name.endswith(".data")
                and os.path.isdir(path)
                and not os.path.exists(path[:-5] + ".metadata")
            ):
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError as e:
                        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                            continue  # a store is writing it right now
                        raise
                    # Checked again under the lock: the writer may have committed and let go of
                    # its lock since the directory was listed.
                    if os.path.exists(path[:-5] + ".metadata") or not _same_dir(fd, path):
                        continue
                    token = uuid.UUID(name[:-5])
                    self._wipe_data_dir(token)
                    removed.append(f"removed data of unfinished store {token}")
                finally:
                    os.close(fd)
            elif name.startswith(".") and ".metadata." in name:
                pid = name.split(".")[3] if name.count(".") >= 4 else ""
                if pid.isdigit() and not pid_alive(int(pid)):
                    wipe_file(path)
                    removed.append(f"removed stale temp file {name}")
        if removed:
            _fsync_dir(self.root)
        return removed

    def unreferenced_objects(self, token: uuid.UUID, referenced: set[int]) -> list[int]:
        return sorted(set(self.object_sizes(token)) - referenced)


def _same_dir(fd: int, path: str) -> bool:
    """Whether the open directory `fd` is still the directory at `path`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (st.st_dev, st.st_ino) and held.st_nlink > 0


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (also one we may not signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
