"""Storage backends: immutable objects per token plus an atomic metadata commit.

Nothing above this module may assume a POSIX path: the token store talks to a Backend. The
local directory backend is the embedded default. Layout of a local store (docs/FORMAT.md):

    STORE/VHSM-STORE                  marker: "vhsm-store 1"
    STORE/<uuid>.metadata             the committed metadata file of a token
    STORE/<uuid>.data/<8 hex>         immutable objects holding encrypted chunk records
    STORE/.<uuid>.deleting            a token being deleted (hidden from list; gc finishes it)

Whoever can write to the store can plant links and special files in it (docs/FORMAT.md section
8), so the local backend reaches every entry through vhsmfs.safefs: relative to the store's
directory descriptor, never through a link, only regular files and directories of a trusted
owner, and nothing with other hard links is wiped or overwritten.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import stat
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from vhsmfs.errors import StoreError, TokenNotFoundError, VhsmError
from vhsmfs.safefs import SafeDir

Buffer = bytes | bytearray | memoryview

log = logging.getLogger("vhsm.store")

STORE_MARKER = "VHSM-STORE"
STORE_MARKER_TEXT = b"vhsm-store 1\n"
# A token id as it appears in store names: the canonical lower-case 8-4-4-4-12 form only.
UUID_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_META_RE = re.compile(rf"({UUID_PATTERN})\.metadata")
_DATA_RE = re.compile(rf"({UUID_PATTERN})\.data")
_TOMB_RE = re.compile(rf"\.({UUID_PATTERN})\.deleting")
_TEMP_RE = re.compile(rf"\.({UUID_PATTERN})\.metadata\.([0-9]+)\.[0-9a-f]+")
_OBJECT_RE = re.compile(r"[0-9a-f]{8}")
LOCK_NAME = ".vhsm-mount.lock"  # the mount's lock (vhsmfs.mount.runner); gc leaves it alone
_KNOWN = (STORE_MARKER, LOCK_NAME)


class ObjectWriter(Protocol):
    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    # At a given offset, from any thread: the mount encrypts several runs at once and each
    # lands where its place was reserved. An object is complete only after finish().
    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...
    def finish(self) -> None: ...
    def abort(self) -> None: ...


class ObjectReader(Protocol):
    size: int  # when it was opened

    def pread(self, offset: int, length: int) -> bytes: ...
    def close(self) -> None: ...


@dataclass
class GarbageReport:
    """What collect_garbage did: a line per thing removed, per stray name it does not know
    (left alone) and per unsafe entry it refused to touch (left alone)."""

    removed: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


class Backend(Protocol):
    def token_ids(self) -> list[uuid.UUID]: ...
    def open_metadata(self, token: uuid.UUID) -> ObjectReader: ...
    def commit_metadata(self, token: uuid.UUID, data: bytes | Sequence[Buffer]) -> None: ...
    def new_object(self, token: uuid.UUID, object_id: int) -> ObjectWriter: ...
    def open_object(self, token: uuid.UUID, object_id: int) -> ObjectReader: ...
    def object_sizes(self, token: uuid.UUID) -> dict[int, int]: ...
    def delete_object(self, token: uuid.UUID, object_id: int) -> None: ...
    def delete_token(self, token: uuid.UUID) -> None: ...
    def discard_uncommitted(self, token: uuid.UUID) -> None: ...
    def writing(self, token: uuid.UUID) -> contextlib.AbstractContextManager[None]: ...
    def idle(self, token: uuid.UUID) -> contextlib.AbstractContextManager[bool]: ...
    def collect_garbage(self, report: GarbageReport | None = None) -> list[str]: ...
    def describe(self) -> str: ...


class _LocalObjectWriter:
    def __init__(self, directory: SafeDir, name: str, fd: int) -> None:
        self._dir, self._name, self._fd = directory, name, fd
        self._st = os.fstat(fd)

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
            self._dir.close()

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            with contextlib.suppress(OSError, VhsmError):
                self._dir.unlink(self._name, self._st)  # only the file we made
            self._dir.close()


class _LocalObjectReader:
    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self.size = size

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
            try:
                os.makedirs(self.root, mode=0o700, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create store {self.root}: {e.strerror}") from None
        # Opened once: the path may be a link (the user's choice); everything below is reached
        # from this descriptor.
        try:
            self._dir = SafeDir.open_root(self.root, "store entry", trust_owner=True)
        except FileNotFoundError:
            raise StoreError(f"store {self.root} does not exist") from None
        except NotADirectoryError:
            raise StoreError(f"store {self.root} is not a directory") from None
        except OSError as e:
            raise StoreError(f"cannot open store {self.root}: {e.strerror}") from None
        if create:
            self._ensure_marker()

    def describe(self) -> str:
        return self.root

    def close(self) -> None:
        self._dir.close()

    @property
    def directory(self) -> SafeDir:
        """The store's root directory (the mount keeps its lock file there)."""
        return self._dir

    def _ensure_marker(self) -> None:
        if self._dir.lstat(STORE_MARKER) is not None:
            return
        try:
            fd = self._dir.create_file(STORE_MARKER)
        except FileExistsError:
            return
        except OSError as e:
            raise StoreError(f"cannot initialise store {self.root}: {e.strerror}") from None
        with os.fdopen(fd, "wb") as f:
            f.write(STORE_MARKER_TEXT)
            f.flush()
            os.fsync(f.fileno())

    # -- names ----------------------------------------------------------------------------------
    @staticmethod
    def _meta_name(token: uuid.UUID) -> str:
        return f"{token}.metadata"

    @staticmethod
    def _data_name(token: uuid.UUID) -> str:
        return f"{token}.data"

    def _data_dir(self, token: uuid.UUID, *, create: bool = False) -> SafeDir:
        """The token's checked data directory; FileNotFoundError if it has none."""
        return self._dir.open_dir(self._data_name(token), create=create)

    def _object_path(self, token: uuid.UUID, object_id: int) -> str:
        """For messages and tests only: the backend never opens by path."""
        return os.path.join(self.root, self._data_name(token), f"{object_id:08x}")

    # -- metadata -------------------------------------------------------------------------------
    def token_ids(self) -> list[uuid.UUID]:
        try:
            names = self._dir.names()
        except OSError as e:
            raise StoreError(f"cannot list store {self.root}: {e.strerror}") from None
        found = []
        for name in names:
            m = _META_RE.fullmatch(name)
            if m:
                found.append(uuid.UUID(m.group(1)))
        return sorted(found, key=str)

    def open_metadata(self, token: uuid.UUID) -> ObjectReader:
        """The committed metadata file, checked (a regular file of a trusted owner). The caller
        reads it with a bound the format allows (vhsmfs.format.metadata_size_limit)."""
        try:
            fd, st = self._dir.open_file(self._meta_name(token))
        except FileNotFoundError:
            raise TokenNotFoundError(f"token {token} not found in {self.root}") from None
        return _LocalObjectReader(fd, st.st_size)

    def commit_metadata(self, token: uuid.UUID, data: bytes | Sequence[Buffer]) -> None:
        """Publish a new metadata file atomically: objects it names must be durable first, so the
        data directory is fsynced, then temp file written + fsynced, renamed, root fsynced."""
        with contextlib.suppress(FileNotFoundError):  # a token with no objects has no directory
            with self._data_dir(token) as d:
                d.fsync()
        tmp = f".{token}.metadata.{os.getpid()}.{os.urandom(4).hex()}"
        fd = self._dir.create_file(tmp)
        try:
            for part in [data] if isinstance(data, bytes | bytearray) else data:
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
            os.close(fd)
            fd = -1
            self._dir.replace(tmp, self._meta_name(token))
            self._dir.fsync()
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(OSError):
                self._dir.unlink(tmp)
            raise

    # -- objects --------------------------------------------------------------------------------
    def new_object(self, token: uuid.UUID, object_id: int) -> ObjectWriter:
        """A new object, created O_EXCL. A regular file of ours already at that id is what a
        writer killed before its commit left (ids from the committed next_object_id on are
        never referenced): it is wiped and the id reused. Anything else there is refused."""
        d = self._data_dir(token, create=True)
        name = f"{object_id:08x}"
        try:
            try:
                fd = d.create_file(name)
            except FileExistsError:
                d.wipe(name)
                fd = d.create_file(name)
            return _LocalObjectWriter(d, name, fd)
        except BaseException:
            d.close()
            raise

    def open_object(self, token: uuid.UUID, object_id: int) -> ObjectReader:
        """FileNotFoundError if the object (or the token's data directory) is missing."""
        with self._data_dir(token) as d:
            fd, st = d.open_file(f"{object_id:08x}")
        return _LocalObjectReader(fd, st.st_size)

    def object_sizes(self, token: uuid.UUID) -> dict[int, int]:
        """Sizes from the lstat of each checked object: the entry itself, never what a link
        points to (a link, special file or stranger's file is refused). Nothing is opened."""
        out: dict[int, int] = {}
        try:
            d = self._data_dir(token)
        except FileNotFoundError:
            return out
        with d:
            for name in d.names():
                if _OBJECT_RE.fullmatch(name):
                    try:
                        st = d.check_entry(name, stat.S_IFREG)
                    except FileNotFoundError:  # wiped meanwhile
                        continue
                    out[int(name, 16)] = st.st_size
        return out

    def delete_object(self, token: uuid.UUID, object_id: int) -> None:
        try:
            with self._data_dir(token) as d:
                d.wipe(f"{object_id:08x}")
        except FileNotFoundError:
            pass

    # -- whole tokens ---------------------------------------------------------------------------
    def delete_token(self, token: uuid.UUID) -> None:
        """Hide the token at once (atomic rename to a tombstone), then wipe its objects and finally
        the metadata. A crash part-way leaves a tombstone that collect_garbage finishes. Every
        entry is checked first, so an unsafe one refuses the delete before anything changed."""
        meta, tomb = self._meta_name(token), f".{token}.deleting"
        try:
            self._dir.check_entry(meta, stat.S_IFREG, sole=True)
        except FileNotFoundError:
            raise TokenNotFoundError(f"token {token} not found in {self.root}") from None
        self._check_data_dir(token)
        self._dir.replace(meta, tomb)
        self._dir.fsync()
        self._wipe_data_dir(token)
        self._dir.wipe(tomb)
        self._dir.fsync()

    def _each_object(self, token: uuid.UUID, action: Callable[[SafeDir, str], object]) -> bool:
        """action(data_dir, name) for every entry of the token's data directory (one removed
        meanwhile is skipped). False if the token has no data directory."""
        try:
            d = self._data_dir(token)
        except FileNotFoundError:
            return False
        with d:
            for name in sorted(d.names()):
                with contextlib.suppress(FileNotFoundError):
                    action(d, name)
        return True

    def _check_data_dir(self, token: uuid.UUID) -> None:
        """Refuse (UnsafeEntryError) if anything in the data directory could not be wiped."""
        self._each_object(token, lambda d, name: d.check_entry(name, stat.S_IFREG, sole=True))

    def _wipe_data_dir(self, token: uuid.UUID) -> None:
        if self._each_object(token, SafeDir.wipe):
            with contextlib.suppress(FileNotFoundError):
                self._dir.rmdir(self._data_name(token))

    def discard_uncommitted(self, token: uuid.UUID) -> None:
        """Remove the objects of a token whose first commit never happened (failed store)."""
        if self._dir.lstat(self._meta_name(token)) is None:
            self._wipe_data_dir(token)

    @contextlib.contextmanager
    def writing(self, token: uuid.UUID) -> Iterator[None]:
        """Held while a token is being written, so collect_garbage never reaps work in progress.
        A shared flock on the data directory: released by the kernel if the writer is killed."""
        while True:
            d = self._data_dir(token, create=True)
            fcntl.flock(d.fd, fcntl.LOCK_SH)
            # gc may have wiped and removed the directory between open() and flock(): the lock
            # would then guard a dead inode, so start again on a fresh directory.
            if self._still_there(d, token):
                break
            d.close()
        try:
            yield
        finally:
            d.close()

    def _still_there(self, d: SafeDir, token: uuid.UUID) -> bool:
        """Whether the open data directory `d` is still the token's data directory."""
        held = os.fstat(d.fd)
        return held.st_nlink > 0 and self._dir.same(self._data_name(token), held)

    @contextlib.contextmanager
    def idle(self, token: uuid.UUID) -> Iterator[bool]:
        """True while this process holds the token's data directory exclusively: no writer is
        at work and none can start (a writer waits in writing()). False if a writer holds it or
        there is no data directory. Not waited for."""
        try:
            d = self._data_dir(token)
        except FileNotFoundError:
            yield False
            return
        with d, d.locked(exclusive=True) as got:
            yield got and self._still_there(d, token)

    def collect_garbage(self, report: GarbageReport | None = None) -> list[str]:
        """Finish interrupted deletes, drop data of stores that never committed (a killed
        `store`), and stale temp files. Returns a line per thing removed; stray names and unsafe
        entries are left alone and noted in `report` (logged when there is none)."""
        rep = report if report is not None else GarbageReport()
        try:
            names = sorted(self._dir.names())
        except OSError as e:
            raise StoreError(f"cannot list store {self.root}: {e.strerror}") from None
        before = len(rep.removed)
        for name in names:
            try:
                self._collect(name, rep)
            except VhsmError as e:
                rep.refused.append(str(e))
            except FileNotFoundError:  # removed by someone else meanwhile
                continue
        if len(rep.removed) > before:
            self._dir.fsync()
        if report is None:
            for line in rep.ignored + rep.refused:
                log.warning("gc: %s", line)
        return rep.removed

    def _collect(self, name: str, rep: GarbageReport) -> None:
        if name in _KNOWN or _META_RE.fullmatch(name):
            return
        if m := _TOMB_RE.fullmatch(name):
            token = uuid.UUID(m.group(1))
            self._check_data_dir(token)
            self._dir.check_entry(name, stat.S_IFREG, sole=True)
            self._wipe_data_dir(token)
            self._dir.wipe(name)
            rep.removed.append(f"finished deleting token {token}")
        elif m := _DATA_RE.fullmatch(name):
            token = uuid.UUID(m.group(1))
            if self._dir.lstat(self._meta_name(token)) is not None:
                return  # a committed token's: TokenStore.collect_garbage looks past its end
            # Checked again under the lock: the writer may have committed and let go of its
            # lock since the directory was listed.
            with self.idle(token) as free:
                if free and self._dir.lstat(self._meta_name(token)) is None:
                    self._check_data_dir(token)
                    self._wipe_data_dir(token)
                    rep.removed.append(f"removed data of unfinished store {token}")
        elif m := _TEMP_RE.fullmatch(name):
            if not pid_alive(int(m.group(2))):
                self._dir.wipe(name)
                rep.removed.append(f"removed stale temp file {name}")
        elif name.endswith((".deleting", ".data", ".metadata")) or ".metadata." in name:
            rep.ignored.append(f"{self._dir.shown(name)} (not a token id; left alone)")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (also one we may not signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:  # not a pid at all
        return False
    return True
