"""Storage backends: immutable objects per token plus an atomic metadata commit.

Nothing above this module may assume a POSIX path: the token store talks to a Backend. The
local directory backend is the embedded default. Layout of a local store (docs/FORMAT.md):

    STORE/VHSM-STORE                  marker: "vhsm-store 1"
    STORE/<uuid>.metadata             the token's current metadata (a copy of its newest
                                      generation file); the token exists while this does
    STORE/<uuid>.data/<8 hex>         immutable objects holding encrypted chunk records
    STORE/<uuid>.data/gen-<16 hex>    immutable generation files: every committed metadata
    STORE/.<uuid>.deleting            a token being deleted (hidden from list; gc finishes it)
    STORE/.tmp/                       files being written under a name; backups skip it

Objects and generation files are written without a name (O_TMPFILE) and linked in only once
complete and durable, so a backup tool walking the store never meets a partial one.

Whoever can write to the store can plant links and special files in it (docs/FORMAT.md section
8), so the local backend reaches every entry through vhsmfs.safefs: relative to the store's
directory descriptor, never through a link, only regular files and directories of a trusted
owner, and nothing with other hard links is wiped or overwritten.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from vhsmfs.errors import StoreError, TokenNotFoundError, VhsmError
from vhsmfs.safefs import READER_WAIT, SafeDir, UnsafeEntryError, rename_noreplace

Buffer = bytes | bytearray | memoryview

log = logging.getLogger("vhsm.store")

STORE_MARKER = "VHSM-STORE"
STORE_MARKER_TEXT = b"vhsm-store 1\n"
# A token id as it appears in store names: the canonical lower-case 8-4-4-4-12 form only.
UUID_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_META_RE = re.compile(rf"({UUID_PATTERN})\.metadata")
_DATA_RE = re.compile(rf"({UUID_PATTERN})\.data")
_TOMB_RE = re.compile(rf"\.({UUID_PATTERN})\.deleting")
# format v1's metadata temp files sat in the store directory itself
_TEMP_RE = re.compile(rf"\.({UUID_PATTERN})\.metadata\.([0-9]+)\.[0-9a-f]+")
_STAGED_RE = re.compile(rf"({UUID_PATTERN})\.[0-9a-z-]+\.([0-9]+)\.[0-9a-f]{{8}}")  # in .tmp/
_OBJECT_RE = re.compile(r"[0-9a-f]{8}")
_GEN_RE = re.compile(r"gen-([0-9a-f]{16})")
LOCK_NAME = ".vhsm-mount.lock"  # the mount's lock (vhsmfs.mount.runner); gc leaves it alone
TEMP_DIR = ".tmp"  # files being written under a name; backups exclude it (docs/BACKUP.md)
_KNOWN = (STORE_MARKER, LOCK_NAME, TEMP_DIR)
# O_TMPFILE unsupported by the filesystem or kernel: stage under a name in .tmp/ instead
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL)


class ObjectWriter(Protocol):
    """An object being built. Invisible to readers (and to backup tools) until finish()."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append `data` (one thread)."""
        ...

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write `data` at `offset`, from any thread: the mount encrypts several runs at once
        and each lands where its place was reserved. Unwritten gaps read as zeros."""
        ...

    def pread(self, offset: int, length: int) -> bytes:
        """Read back what was written so far (before finish)."""
        ...

    def size(self) -> int:
        """The object's length so far (the end of the furthest write)."""
        ...

    def finish(self) -> None:
        """Seal: make the object durable and publish it under its id, atomically; immutable
        from then on. Raises FileExistsError if the id is taken, OSError on I/O errors (the
        object is then not published and the writer is closed)."""
        ...

    def abort(self) -> None:
        """Drop the object unpublished. Never raises."""
        ...


class ObjectReader(Protocol):
    size: int  # when it was opened

    def pread(self, offset: int, length: int) -> bytes:
        """At most `length` bytes from `offset` (fewer at the end)."""
        ...

    def pread_into(self, offset: int, buf: memoryview) -> int:
        """pread() into `buf` (up to len(buf) bytes); returns how many bytes came. Saves the
        caller a buffer per read when it streams."""
        ...

    def close(self) -> None: ...


@dataclass
class GarbageReport:
    """What collect_garbage did: a line per thing removed, per stray name it does not know
    (left alone) and per unsafe entry it refused to touch (left alone)."""

    removed: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


class Backend(Protocol):
    """Where tokens live, as an S3 bucket or a directory can hold them.

    Per token: immutable *objects* and immutable *generation files*, each named by a number,
    and a *current metadata* that is replaced atomically; plus per-token writer locks. Nothing
    above a backend sees a path: the token store, the token writer and the mount name things by
    token id and number only. Objects and generation files are only ever created whole (an
    object is built by an ObjectWriter and appears when finished) and removed whole (wiped).

    Every method may also raise UnsafeEntryError (an entry that breaks the store's rules; it is
    left alone), StoreError, and OSError for I/O failures such as ENOSPC.
    """

    def describe(self) -> str:
        """Returns: the store's location, for messages."""
        ...

    def token_ids(self) -> list[uuid.UUID]:
        """Returns: the tokens that have current metadata, sorted by their string form.

        Raises:
            StoreError: the store cannot be listed.
        """
        ...

    def open_metadata(self, token: uuid.UUID) -> ObjectReader:
        """Open the token's current metadata.

        Args:
            token: the token id.
        Returns:
            A reader; the caller bounds what it reads (vhsmfs.format.parse) and closes it.
        Raises:
            TokenNotFoundError: the token has no current metadata.
        """
        ...

    def generations(self, token: uuid.UUID) -> list[int]:
        """Returns: the numbers of the token's generation files, ascending ([] for a format v1
        token, or for no token)."""
        ...

    def open_generation(self, token: uuid.UUID, generation: int) -> ObjectReader:
        """Open one generation file.

        Raises:
            FileNotFoundError: there is no such generation file.
        """
        ...

    def commit_metadata(self, token: uuid.UUID, generation: int, parts: Iterable[Buffer]) -> None:
        """Commit a generation: durable, then visible.

        Args:
            token: the token id.
            generation: its number; the generation file is created under it.
            parts: the metadata file's bytes in order, iterated once (a large manifest is
                streamed from a spool).
        Stores `parts` durably as the generation file, then makes the same bytes the token's
        current metadata, atomically: a reader sees the old or the new, never a mix. Every
        object the metadata names must have been finished before.
        Raises:
            FileExistsError: that generation file exists already (nothing was changed).
        """
        ...

    def set_current(self, token: uuid.UUID, generation: int) -> None:
        """Make an existing generation file the current metadata again (gc's repair).

        Raises:
            FileNotFoundError: there is no such generation file.
        """
        ...

    def delete_generation(self, token: uuid.UUID, generation: int) -> None:
        """Wipe and remove a generation file; one already gone is not an error."""
        ...

    def new_object(self, token: uuid.UUID, object_id: int) -> ObjectWriter:
        """Start building object `object_id` of `token`.

        Returns:
            A writer; the object appears, immutable, when the writer's finish() returns.
        A finished object of that id (the leftover of a writer killed before its commit: ids
        from the committed next_object_id on are never referenced) is wiped first.
        """
        ...

    def open_object(self, token: uuid.UUID, object_id: int) -> ObjectReader:
        """Open a finished object for ranged reads.

        Raises:
            FileNotFoundError: the object does not exist (a missing object makes a generation
                incomplete; see TokenStore.parse).
        """
        ...

    def object_sizes(self, token: uuid.UUID, *, skip_unsafe: bool = False) -> dict[int, int]:
        """Returns: every finished object of the token, id -> length in bytes (no reads).
        An unsafe entry raises UnsafeEntryError, or with `skip_unsafe` is left out."""
        ...

    def delete_object(self, token: uuid.UUID, object_id: int) -> None:
        """Wipe and remove an object; one already gone is not an error."""
        ...

    def hide_token(self, token: uuid.UUID) -> None:
        """Make the token disappear at once (atomically), before its data is wiped by
        delete_token, or by collect_garbage if nobody finishes.

        Raises:
            TokenNotFoundError: no such token.
        """
        ...

    def delete_token(self, token: uuid.UUID) -> None:
        """Hide the token atomically (unless hidden already), then wipe all of it: objects,
        generation files, metadata. Every entry is checked before anything changes.

        Raises:
            TokenNotFoundError: no such token (neither visible nor hidden).
        """
        ...

    def discard_uncommitted(self, token: uuid.UUID) -> None:
        """Remove what a first commit that never happened left (a failed store); nothing if
        the token has current metadata."""
        ...

    def writing(self, token: uuid.UUID) -> contextlib.AbstractContextManager[None]:
        """Returns: a context held (shared) by a writer of the token while it has uncommitted
        work, so collect_garbage never reaps work in progress. Released if the writer dies."""
        ...

    def idle(self, token: uuid.UUID) -> contextlib.AbstractContextManager[bool]:
        """Returns: a context that excludes writers while held; it yields True if it got the
        token to itself, False (nothing held) if a writer is at work. Never waits."""
        ...

    def collect_garbage(
        self, report: GarbageReport | None = None, *, keep_hidden: float = 0
    ) -> list[str]:
        """The backend's own clean-up: interrupted deletes and first stores, stale temp files.

        Args:
            report: collects what was removed, ignored and refused (logged when None).
            keep_hidden: seconds a hidden token (hide_token) is kept before it is wiped: the
                grace period, for a backup copy that is still reading it.
        Returns:
            A line per thing removed.
        """
        ...


class _LocalObjectWriter:
    """A file staged without a name in its directory (O_TMPFILE) and linked under its name by
    finish(); where O_TMPFILE is missing, staged under a name in .tmp/ and renamed."""

    def __init__(self, directory: SafeDir, name: str, staging: SafeDir, token: uuid.UUID) -> None:
        self._dir, self._name, self._staging = directory, name, staging
        self._tmp: str | None = None
        self.written = 0  # by write()
        try:
            self._fd = os.open(
                ".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=directory.fd
            )
        except OSError as e:
            if e.errno not in _NO_TMPFILE:
                raise
            self._tmp = staged_name(f"{token}.{name}")
            self._fd = staging.create_file(self._tmp, flags=os.O_RDWR)
        else:
            try:
                directory.give(self._fd)
            except BaseException:
                os.close(self._fd)
                raise
        self._st = os.fstat(self._fd)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        self.written += len(view)
        while view:
            view = view[os.write(self._fd, view) :]

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view = view[n:]
            offset += n

    def pread(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def finish(self) -> None:
        try:
            os.fsync(self._fd)
            if self._tmp is None:
                # linkat(/proc/self/fd/N, AT_SYMLINK_FOLLOW): fails if the name is taken
                os.link(
                    f"/proc/self/fd/{self._fd}",
                    self._name,
                    dst_dir_fd=self._dir.fd,
                    follow_symlinks=True,
                )
            else:
                rename_noreplace(self._staging.fd, self._tmp, self._name, self._dir.fd)
                self._tmp = None
        except BaseException:
            self.abort()
            raise
        os.close(self._fd)
        self._fd = -1
        self._dir.close()

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            if self._tmp is not None:
                with contextlib.suppress(OSError, VhsmError):
                    self._staging.unlink(self._tmp, self._st)  # only the file we made
                self._tmp = None
            self._dir.close()


def staged_name(what: str) -> str:
    """A name in .tmp/ that gc can tell is stale: `<token>.<what>.<pid>.<random>`."""
    return f"{what}.{os.getpid()}.{os.urandom(4).hex()}"


class _LocalObjectReader:
    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self.size = size

    def pread(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def pread_into(self, offset: int, buf: memoryview) -> int:
        got = 0
        while got < len(buf):
            n = os.preadv(self._fd, [buf[got:]], offset + got)
            if not n:
                break
            got += n
        return got

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
        self._tmpdir: SafeDir | None = None
        self._keep_hidden = 0.0
        if create:
            self._ensure_marker()

    def describe(self) -> str:
        return self.root

    def close(self) -> None:
        if self._tmpdir is not None:
            self._tmpdir.close()
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
        """The current metadata file, checked (a regular file of a trusted owner). The caller
        reads it within the bounds the format allows (vhsmfs.format.parse)."""
        try:
            fd, st = self._dir.open_file(self._meta_name(token))
        except FileNotFoundError:
            raise TokenNotFoundError(f"token {token} not found in {self.root}") from None
        return _LocalObjectReader(fd, st.st_size)

    def _staging(self) -> SafeDir:
        """STORE/.tmp, made on first use."""
        if self._tmpdir is None:
            self._tmpdir = self._dir.open_dir(TEMP_DIR, create=True)
        return self._tmpdir

    @staticmethod
    def _gen_name(generation: int) -> str:
        return f"gen-{generation:016x}"

    def generations(self, token: uuid.UUID) -> list[int]:
        try:
            d = self._data_dir(token)
        except FileNotFoundError:
            return []
        with d:
            return sorted(int(m.group(1), 16) for n in d.names() if (m := _GEN_RE.fullmatch(n)))

    def open_generation(self, token: uuid.UUID, generation: int) -> ObjectReader:
        with self._data_dir(token) as d:
            fd, st = d.open_file(self._gen_name(generation))
        return _LocalObjectReader(fd, st.st_size)

    def commit_metadata(self, token: uuid.UUID, generation: int, parts: Iterable[Buffer]) -> None:
        """The generation file first (written unnamed, fsynced, linked; the data directory
        fsynced, which also makes the names of the objects it refers to durable), then a copy
        made in .tmp/ renamed over <uuid>.metadata, and the store directory fsynced."""
        name = self._gen_name(generation)
        w = self._writer(token, name)
        try:
            for part in parts:
                w.write(part)
            size = w.written
            w.finish()
        except BaseException:
            w.abort()
            raise
        with self._data_dir(token) as d:
            d.fsync()
            fd, _ = d.open_file(name)
        try:
            self._publish_current(token, fd, size)
        finally:
            os.close(fd)

    def set_current(self, token: uuid.UUID, generation: int) -> None:
        with self._data_dir(token) as d:
            fd, st = d.open_file(self._gen_name(generation))
        try:
            self._publish_current(token, fd, st.st_size)
        finally:
            os.close(fd)

    def _publish_current(self, token: uuid.UUID, src: int, size: int) -> None:
        """Copy `size` bytes of the open file `src` (in the kernel) to a temp file in .tmp/,
        fsync it and rename it over <uuid>.metadata (which must be a regular file if present)."""
        staging = self._staging()
        tmp = staged_name(f"{token}.metadata")
        fd = staging.create_file(tmp)
        try:
            done = 0
            while done < size:
                n = os.copy_file_range(src, fd, size - done, done, done)
                if n == 0:
                    raise OSError(errno.EIO, "generation file shrank while it was copied")
                done += n
            os.fsync(fd)
            os.close(fd)
            fd = -1
            meta = self._meta_name(token)
            if self._dir.lstat(meta) is not None:
                self._dir.check_entry(meta, stat.S_IFREG)
            os.rename(tmp, meta, src_dir_fd=staging.fd, dst_dir_fd=self._dir.fd)
            self._dir.fsync()
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(OSError):
                staging.unlink(tmp)
            raise

    def delete_generation(self, token: uuid.UUID, generation: int) -> None:
        try:
            with self._data_dir(token) as d:
                d.wipe(self._gen_name(generation))
        except FileNotFoundError:
            pass

    # -- objects --------------------------------------------------------------------------------
    def new_object(self, token: uuid.UUID, object_id: int) -> ObjectWriter:
        """A new object, staged unnamed and linked under its id by finish(). A regular file of
        ours already at that id is what a writer killed before its commit left (ids from the
        committed next_object_id on are never referenced): it is wiped now. Anything else
        there is refused."""
        name = f"{object_id:08x}"
        with self._data_dir(token, create=True) as d, contextlib.suppress(FileNotFoundError):
            d.wipe(name)
        return self._writer(token, name)

    def _writer(self, token: uuid.UUID, name: str) -> _LocalObjectWriter:
        d = self._data_dir(token, create=True)
        try:
            return _LocalObjectWriter(d, name, self._staging(), token)
        except BaseException:
            d.close()
            raise

    def open_object(self, token: uuid.UUID, object_id: int) -> ObjectReader:
        """FileNotFoundError if the object (or the token's data directory) is missing."""
        with self._data_dir(token) as d:
            fd, st = d.open_file(f"{object_id:08x}")
        return _LocalObjectReader(fd, st.st_size)

    def object_sizes(self, token: uuid.UUID, *, skip_unsafe: bool = False) -> dict[int, int]:
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
                    except UnsafeEntryError:
                        if not skip_unsafe:
                            raise
                        continue  # an object a generation names is refused when opened
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
            if self._dir.lstat(tomb) is None:
                raise TokenNotFoundError(f"token {token} not found in {self.root}") from None
            self._dir.check_entry(tomb, stat.S_IFREG, sole=True)  # hidden already: wipe it
        else:
            self._check_data_dir(token)
            self._dir.replace(meta, tomb)
        self._dir.fsync()
        self._wipe_data_dir(token)
        self._dir.wipe(tomb)
        self._dir.fsync()

    def hide_token(self, token: uuid.UUID) -> None:
        """The rename to the tombstone alone (the mount's unlink: the wipe follows later, in
        the background). Not fsynced: like an unlink, durable with the next fsync."""
        meta = self._meta_name(token)
        try:
            self._dir.check_entry(meta, stat.S_IFREG, sole=True)
        except FileNotFoundError:
            raise TokenNotFoundError(f"token {token} not found in {self.root}") from None
        self._dir.replace(meta, f".{token}.deleting")

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
        """Wipe every file of the data directory, then remove it. Waiting for other readers
        (SafeDir.wipe) is bounded for the whole directory, not per file: a token that another
        process keeps open costs one wait, not one per object."""
        deadline = time.monotonic() + READER_WAIT

        def wipe(d: SafeDir, name: str) -> None:
            d.wipe(name, wait_readers=max(0.0, deadline - time.monotonic()))

        if self._each_object(token, wipe):
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
        at work and none can start (a writer waits in writing()). False if a writer holds it.
        True, holding nothing, if there is no data directory (a writer makes it before it locks
        it, and then finds it replaced if gc removed it: see writing()). Not waited for."""
        try:
            d = self._data_dir(token)
        except FileNotFoundError:
            yield True  # no data directory: no writer (a writer makes it first, then locks it)
            return
        with d, d.locked(exclusive=True) as got:
            yield got and self._still_there(d, token)

    def collect_garbage(
        self, report: GarbageReport | None = None, *, keep_hidden: float = 0
    ) -> list[str]:
        """Finish interrupted and deferred deletes (a tombstone is wiped once it is older than
        `keep_hidden` seconds, by its ctime: the rename that hid it), drop data of stores that
        never committed (a killed `store`), and stale temp files. Returns a line per thing
        removed; stray names and unsafe entries are left alone and noted in `report` (logged
        when there is none)."""
        rep = report if report is not None else GarbageReport()
        self._keep_hidden = keep_hidden
        try:
            names = sorted(self._dir.names())
        except OSError as e:
            raise StoreError(f"cannot list store {self.root}: {e.strerror}") from None
        before = len(rep.removed)
        self._collect_staged(rep)
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

    def _collect_staged(self, rep: GarbageReport) -> None:
        """Files in .tmp/ whose writer is gone (its pid is no longer alive)."""
        if self._dir.lstat(TEMP_DIR) is None:
            return
        try:
            staging = self._staging()
            names = sorted(staging.names())
        except VhsmError as e:
            rep.refused.append(str(e))
            return
        for name in names:
            m = _STAGED_RE.fullmatch(name)
            if m is None:
                rep.ignored.append(f"{staging.shown(name)} (not vhsm's; left alone)")
                continue
            if pid_alive(int(m.group(2))):
                continue
            try:
                staging.wipe(name)
            except FileNotFoundError:
                continue
            except VhsmError as e:
                rep.refused.append(str(e))
                continue
            rep.removed.append(f"removed stale temp file {TEMP_DIR}/{name}")

    def _collect(self, name: str, rep: GarbageReport) -> None:
        if name in _KNOWN or _META_RE.fullmatch(name):
            return
        if m := _TOMB_RE.fullmatch(name):
            token = uuid.UUID(m.group(1))
            st = self._dir.check_entry(name, stat.S_IFREG, sole=True)
            if time.time() - st.st_ctime < self._keep_hidden:
                return  # deleted through the mount: kept for the grace period
            self._check_data_dir(token)
            self._wipe_data_dir(token)
            self._dir.wipe(name)
            rep.removed.append(f"finished deleting token {token}")
        elif m := _DATA_RE.fullmatch(name):
            token = uuid.UUID(m.group(1))
            if self._dir.lstat(self._meta_name(token)) is not None:
                return  # a committed token's: TokenStore.collect_garbage looks past its end
            if self._dir.lstat(f".{token}.deleting") is not None:
                return  # a hidden token's: its tombstone says when it goes
            # Checked again under the lock: the writer may have committed and let go of its
            # lock since the directory was listed.
            with self.idle(token) as free:
                if (
                    free
                    and self._dir.lstat(self._meta_name(token)) is None
                    and self._dir.lstat(name) is not None  # not wiped meanwhile
                ):
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
