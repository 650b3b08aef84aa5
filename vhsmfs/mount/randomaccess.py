"""Random access to one token's plaintext, with copy-on-write commits (docs/MOUNT.md).

A TokenFile is the mount's view of one token. Reads decrypt only the chunks they touch; writes
go to dirty plaintext chunks held in memory, or, for part of a stored chunk, to patches merged
later. Nothing on disk is ever modified in place:

* write-back encrypts pending chunks in runs, on the encryption threads, into places reserved
  in order at the end of a NEW object of the token (fresh nonces);
* commit seals that object and publishes a new generation (generation + 1) with the new
  manifest. Objects and places, sealing, the commit and retention of superseded objects belong
  to vhsmfs.tokenwriter, the one module that writes the format; this module keeps chunks.
  A crash before the commit leaves the previous generation intact; the orphaned object is
  removed the next time the token is written (or by `collect_garbage`).
* a format v1 token is read as it is and rewritten as v2 (every chunk encrypted again under new
  keys) before its first change is committed.

The final-chunk marker is part of every record's AAD, so the chunk that ends the file is always
kept dirty until commit, and any chunk that stops (or starts) being the last one is re-encrypted.

Not thread-safe by itself: callers hold `lock` (the mount serializes each file's requests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hmac
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future

from vhsmfs.backend import ObjectReader
from vhsmfs.errors import IntegrityError, TokenNotFoundError
from vhsmfs.format import (
    FORMAT_V1,
    MANIFEST_ENTRY,
    MANIFEST_ENTRY_V1,
    MAX_CHUNK_COUNT,
    RECORD_OVERHEAD,
    Metadata,
    ParsedFile,
    chunk_count_for,
    first_bad_record,
    parse_bytes,
    record_checksum,
)
from vhsmfs.mount.workers import MountWorkers
from vhsmfs.store import OpenedToken, TokenStore
from vhsmfs.tokencrypto import ChunkAuthError, TokenKeys
from vhsmfs.tokenwriter import ManifestBuffer, TokenWriter

ENTRY = MANIFEST_ENTRY.size
Buffer = bytes | bytearray | memoryview
# A chunk handed to a run: its plaintext, patches over its stored plaintext, or None (zeros).
Pending = bytearray | memoryview | list[tuple[int, Buffer]] | None
# A manifest entry for a chunk that has no record yet (a hole from sparse extension, or a chunk
# only held dirty in memory). Never committed: every such chunk is encrypted before a commit.
NO_OBJECT = 0xFFFFFFFF
SENTINEL = MANIFEST_ENTRY.pack(NO_OBJECT, 0, 0, bytes(16))
_CHECKSUM = record_checksum(2)  # format v2's record checksum (XXH3-128)

# Dirty plaintext per file before full chunks are written back (in the background). Tests lower
# it through the environment to exercise write-back with small files.
WRITEBACK_BYTES = int(os.environ.get("VHSM_MOUNT_WRITEBACK_BYTES", 8 << 20))
RUN_BYTES = 4 << 20  # plaintext per encrypt/decrypt call: amortises per-call overhead
# Runs of one file being encrypted and written at once. Past this the writer waits for the
# oldest: memory stays bounded (MAX_RUNS x RUN_BYTES of plaintext in flight per file).
MAX_RUNS = 4
# A write into part of a stored chunk is kept as a patch (offset, bytes) instead of decrypting
# the chunk at once; patches are merged when the chunk is read or written back, on an
# encryption thread. Past this many patches on one chunk it is decrypted (bounded memory).
MAX_PATCHES = 32
PATCH_OVERHEAD = 64  # bytes counted per patch besides its data, for the write-back budget
# Patch bytes per file before patched chunks are written back. Larger than WRITEBACK_BYTES:
# merging rewrites whole chunks, so the more patches each chunk gathers first, the less is
# rewritten per byte written (random 4 KiB writes).
PATCH_BYTES = int(os.environ.get("VHSM_MOUNT_PATCH_BYTES", 16 << 20))
# Decrypted ahead, in the background, for sequential readers: windows of the kernel's 1 MiB
# read requests, up to READAHEAD_WINDOWS in flight on the read-ahead threads, so a request
# usually finds its window decrypted and is answered on the event loop.
READAHEAD_BYTES = 1 << 20
READAHEAD_WINDOWS = 3

# Background work runs on the pools of the MountWorkers passed in (shared by all files):
# encryption of written-back chunks and decryption ahead of sequential readers. Each file has at
# most MAX_RUNS runs being encrypted and READAHEAD_WINDOWS read-ahead jobs in flight, so memory
# stays bounded whatever the file sizes.


def _fit(buf: Buffer, want: int) -> Buffer:
    """A chunk's plaintext at exactly `want` bytes (the unwritten tail reads as zeros)."""
    if len(buf) == want:
        return buf
    return bytes(buf[:want]) + bytes(max(0, want - len(buf)))


def _patch_cost(patches: Iterable[tuple[int, Buffer]]) -> int:
    """What patches count against PATCH_BYTES: their data plus a fixed overhead each."""
    return sum(len(d) + PATCH_OVERHEAD for _, d in patches)


def _lay(buf: bytearray, patches: Iterable[tuple[int, Buffer]] | None) -> None:
    """Apply patches (offset, bytes) to a chunk's plaintext, in order."""
    for at, data in patches or ():
        if len(buf) < at:
            buf.extend(bytes(at - len(buf)))
        buf[at : at + len(data)] = data


class _Patched:
    """A stored chunk plus the patches to lay over its plaintext, merged by the run."""

    __slots__ = ("obj", "off", "rlen", "digest", "patches", "want")

    def __init__(
        self,
        obj: int,
        off: int,
        rlen: int,
        digest: bytes,
        patches: list[tuple[int, Buffer]],
        want: int,
    ) -> None:
        self.obj, self.off, self.rlen, self.digest = obj, off, rlen, digest
        self.patches, self.want = patches, want


class _Run:
    """Chunks (any indexes) being encrypted into their reserved place `obj`/`off`, in order."""

    __slots__ = ("idx", "bufs", "obj", "off", "future")

    def __init__(self, idx: list[int], bufs: list[Pending], obj: int, off: int) -> None:
        self.idx, self.bufs, self.obj, self.off = idx, bufs, obj, off
        self.future: Future[list[tuple[int, bytes]]]


class TokenFile:
    """One token opened for random access. `lock` must be held around every call."""

    def __init__(
        self,
        store: TokenStore,
        writer: TokenWriter,
        manifest: bytes | bytearray,
        meta: Metadata,
        *,
        workers: MountWorkers,
        legacy: ParsedFile | None = None,
        legacy_keys: TokenKeys | None = None,
    ) -> None:
        """`writer` continues the token's newest generation; `manifest` is its manifest in
        v2 layout. A v1 token is read with `legacy_keys` until it is upgraded (`legacy`).
        Background work runs on the pools of `workers`."""
        self.store = store
        self.workers = workers
        self.backend = store.backend
        self.writer = writer
        self.token = writer.token
        self.keys = legacy_keys or writer.keys
        self._legacy = legacy
        self.lock = threading.RLock()
        # Guards `meta` alone, held for microseconds: attribute changes (the kernel's mtime
        # updates under its write-back cache) need not wait for a write-back holding `lock`.
        self.meta_lock = threading.Lock()
        self.cs = writer.chunk_size
        self.manifest = bytearray(manifest)
        self.meta = meta
        self.size = meta.size
        self.meta_dirty = not writer.committed
        # Dirty plaintext per chunk: a bytearray, or a read-only view of the write request that
        # replaced the whole chunk (not copied; made a bytearray if later written in part).
        self._dirty: dict[int, bytearray | memoryview] = {}
        self._dirty_bytes = 0
        # chunks handed to background encryption: read from here until their run is applied
        self._inflight: dict[int, Pending] = {}
        # patches over stored chunks, not merged yet (see MAX_PATCHES)
        self._patches: dict[int, list[tuple[int, Buffer]]] = {}
        self._patch_bytes = 0
        # runs being encrypted and written, oldest first (see _submit)
        self._runs: deque[_Run] = deque()
        self._ahead: deque[tuple[int, int, Future[bytearray]]] = deque()  # read-ahead jobs
        self._holes: set[int] = set()  # sentinel entries that are not dirty: read as zeros
        self._readers: dict[int, ObjectReader] = {}
        self._cache_first = 0
        self._cache: bytearray | None = None  # decrypted plaintext of chunks from _cache_first
        self._last_read_end = 0  # a first read from offset 0 starts a sequential reader

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def load(cls, store: TokenStore, token: uuid.UUID, *, workers: MountWorkers) -> TokenFile:
        return cls.from_opened(store, store.open_token(token), workers=workers)

    @classmethod
    def from_opened(cls, store: TokenStore, t: OpenedToken, *, workers: MountWorkers) -> TokenFile:
        parsed = t.parsed
        manifest = parsed.load_manifest()
        if parsed.version == FORMAT_V1:
            # read in place with the v1 keys; entries in v2 layout (their checksums unused
            # until the token is upgraded, which re-encrypts and re-checksums every record)
            manifest = b"".join(
                MANIFEST_ENTRY.pack(o, off, n, d[:16])
                for o, off, n, d in MANIFEST_ENTRY_V1.iter_unpack(manifest)
            )
            writer = TokenWriter(store.backend, t.keys, t.header, grace=store.grace)
            return cls(
                store, writer, manifest, t.meta, workers=workers, legacy=parsed, legacy_keys=t.keys
            )
        writer = TokenWriter(
            store.backend, t.keys, t.header, objects=parsed.objects, grace=store.grace
        )
        return cls(store, writer, manifest, t.meta, workers=workers)

    @property
    def committed(self) -> bool:
        """A metadata file exists for this token."""
        return self.writer.committed

    @property
    def generation(self) -> int:
        return self.writer.generation

    @classmethod
    def create(
        cls,
        store: TokenStore,
        name: str,
        mode: int,
        *,
        workers: MountWorkers,
        extra: dict | None = None,
        token: uuid.UUID | None = None,
    ) -> TokenFile:
        """A new, empty, not yet committed token."""
        provider = store.keys
        if provider is None:
            raise IntegrityError("the mount needs a key")
        writer = TokenWriter.create(
            store.backend, provider, store.chunk_size, token=token, grace=store.grace
        )
        now = time.time_ns()
        meta = Metadata(
            name=name,
            size=0,
            mode=mode,
            mtime_ns=now,
            atime_ns=now,
            ctime_ns=now,
            created=now // 10**9,
            parallel_chunks=1,
            extra=dict(extra or {}),
        )
        return cls(store, writer, b"", meta, workers=workers)

    def claim(self, name: str, mode: int, extra: dict | None = None) -> None:
        """Give a token prepared ahead (keys derived) its name, mode and fresh times."""
        now = time.time_ns()
        m = self.meta
        m.name, m.mode, m.extra = name, mode, dict(extra or {})
        m.mtime_ns = m.atime_ns = m.ctime_ns = now
        m.created = now // 10**9

    # -- geometry -------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return chunk_count_for(self.size, self.cs)

    def _clen(self, i: int) -> int:
        return min(self.cs, self.size - i * self.cs)

    def _entry(self, i: int) -> tuple[int, int, int, bytes]:
        return MANIFEST_ENTRY.unpack_from(self.manifest, i * ENTRY)

    @property
    def dirty(self) -> bool:
        return (
            bool(self._dirty)
            or bool(self._holes)
            or self.meta_dirty
            or self.writer.building
            or bool(self._runs)
            or bool(self._patches)
        )

    # -- reading --------------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes | memoryview:
        if offset >= self.size or length <= 0:
            return b""
        end = min(self.size, offset + length)
        cs = self.cs
        first, last = offset // cs, (end - 1) // cs
        c = self._cache
        base = self._cache_first * cs
        if c is None or offset < base or end > base + len(c):
            ahead = self._take_ahead(first, last)
            if ahead is not None:
                c, base = ahead, first * cs
            else:
                c, base = self._plaintext(first, last), first * cs
            self._cache, self._cache_first = c, first
        sequential = offset == self._last_read_end
        self._last_read_end = end
        # A sequential reader gets the next window decrypted while it consumes this one.
        if sequential and base + len(c) < self.size:
            self._start_ahead((base + len(c)) // cs)
        # A view, not a copy: pyfuse3 copies it once into the kernel. The window is never
        # changed in place (a new read replaces it), so the view stays valid.
        return memoryview(c)[offset - base : end - base]

    def read_cached(self, offset: int, length: int) -> bytes | memoryview | None:
        """The read if it needs no decryption or I/O (served from the decrypted window, or
        from a finished read-ahead), else None and nothing changed. Lets the FUSE layer answer
        on its event loop without a thread hop."""
        if offset >= self.size or length <= 0:
            return b""
        end = min(self.size, offset + length)
        cs = self.cs
        c = self._cache
        base = self._cache_first * cs
        if c is None or offset < base or end > base + len(c):
            # a finished read-ahead that starts at this read: take it without a hop
            first, last = offset // cs, (end - 1) // cs
            while self._ahead and self._ahead[0][0] < first and self._ahead[0][2].done():
                self._ahead.popleft()  # skipped by the reader
            if not self._ahead:
                return None
            a_first, a_last, fut = self._ahead[0]
            if not fut.done() or a_first != first or a_last < last or fut.exception() is not None:
                return None
            self._ahead.popleft()
            c, base = fut.result(), first * cs
            self._cache, self._cache_first = c, first
        sequential = offset == self._last_read_end
        self._last_read_end = end
        if sequential and base + len(c) < self.size:
            self._start_ahead((base + len(c)) // cs, open_readers=False)
        # A view, not a copy: pyfuse3 copies it once into the kernel. The window is never
        # changed in place (a new read replaces it), so the view stays valid.
        return memoryview(c)[offset - base : end - base]

    def _take_ahead(self, first: int, last: int) -> bytearray | None:
        """The read-ahead window that starts at `first` and covers `last` (windows before it
        are dropped), or None: then the queue no longer matches the reader and is dropped."""
        while self._ahead:
            a_first, a_last, fut = self._ahead.popleft()
            if a_first < first:
                continue
            if a_first == first and a_last >= last:
                try:
                    return fut.result()
                except Exception:
                    break  # decrypted again, synchronously, with the error reported there
            break
        self._stop_ahead(keep_cache=True)
        return None

    def _start_ahead(self, first: int, *, open_readers: bool = True) -> None:
        """Keep READAHEAD_WINDOWS windows from chunk `first` on being decrypted in the
        background while the kernel consumes this one. Only for files with no pending writes,
        so the jobs read nothing the caller may change. `open_readers=False` (on the event
        loop): stop rather than open an object."""
        if self._dirty or self._inflight or self._holes or self._patches:
            return
        if self._ahead:
            first = max(first, self._ahead[-1][1] + 1)
        per = max(1, READAHEAD_BYTES // self.cs)
        while len(self._ahead) < READAHEAD_WINDOWS and first < self.count:
            last = min(self.count - 1, first + per - 1)
            for i in range(first, last + 1):
                obj = self._entry(i)[0]
                if obj == NO_OBJECT or (not open_readers and obj not in self._readers):
                    return
                self._reader(obj)  # opened here: the jobs only look readers up
            job = self.workers.readahead.submit(self._decrypt, first, last)
            self._ahead.append((first, last, job))
            first = last + 1

    def _stop_ahead(self, *, keep_cache: bool = False) -> None:
        """Before anything changes the file: wait for the read-ahead jobs and drop them."""
        if not keep_cache:
            self._cache = None
        while self._ahead:
            _, _, fut = self._ahead.popleft()
            with contextlib.suppress(Exception):
                fut.result()

    def _plaintext(self, first: int, last: int) -> bytearray:
        """Plaintext of chunks first..last (inclusive) as one buffer, each at its logical length."""
        if self._inflight and any(
            isinstance(self._inflight.get(i), list) for i in range(first, last + 1)
        ):
            self._drain()  # a patched chunk being merged: read it once it is stored
        for i in [k for k in self._patches if first <= k <= last]:
            self._make_dirty(i)  # merged here; written back from the dirty set later
        if not (self._dirty or self._inflight or self._holes):
            return self._decrypt(first, last)  # all stored: no copy into a second buffer
        out = bytearray()
        run: list[int] = []
        for i in range(first, last + 1):
            buf = self._dirty.get(i)
            if buf is None:
                buf = self._inflight.get(i)
            if buf is None and i not in self._holes:
                obj = self._entry(i)[0]
                if obj != NO_OBJECT:
                    run.append(i)
                    continue
            if run:
                out += self._decrypt(run[0], run[-1])
                run = []
            want = self._clen(i)
            out += bytes(want) if buf is None else _fit(buf, want)
        if run:
            out += self._decrypt(run[0], run[-1])
        return out

    def _reader(self, obj: int) -> ObjectReader:
        r = self._readers.get(obj)
        if r is None:
            building = self.writer.reading(obj)
            if building is not None:  # not sealed, so not named yet: read it back, uncached
                return building
            try:
                r = self._readers[obj] = self.backend.open_object(self.token, obj)
            except FileNotFoundError:
                raise IntegrityError(f"token {self.token}: object {obj:08x} is missing") from None
        return r

    def _decrypt(self, first: int, last: int) -> bytearray:
        """Authenticate and decrypt stored chunks first..last, one pread per contiguous run,
        each straight into its place in one buffer. The buffer is returned only if every
        record authenticated (on failure it may hold unauthenticated plaintext: dropped)."""
        final = self.count - 1
        runs = list(self._record_runs(first, last))
        out = bytearray(sum(sum(r[2]) - len(r[2]) * RECORD_OVERHEAD for r in runs))
        view = memoryview(out)
        pos = 0
        check = self._legacy is None  # v2 records are checked against the manifest first
        for obj, off, lengths, start in runs:
            want = sum(lengths)
            records = self._read_records(obj, off, want, start)
            if check:
                self._check_records(records, lengths, start)
            n = want - len(lengths) * RECORD_OVERHEAD
            try:
                self.keys.decrypt_run_into(records, lengths, start, final, view[pos : pos + n])
            except ChunkAuthError as e:
                raise IntegrityError(
                    f"token {self.token}: chunk {e.index} failed authentication"
                ) from None
            pos += n
        return out

    def _check_records(self, records: bytes, lengths: list[int], first: int) -> None:
        """Each record's XXH3-128 against the manifest: a record swapped for another genuine
        record of the same chunk (an older version kept for the grace period) is refused."""
        digests = [self._entry(first + k)[3] for k in range(len(lengths))]
        bad = first_bad_record(records, lengths, digests, _CHECKSUM)
        if bad is not None:
            raise IntegrityError(f"token {self.token}: chunk {first + bad} checksum mismatch")

    def _read_records(self, obj: int, off: int, want: int, index: int) -> bytes:
        """`want` bytes of records of object `obj` from `off`; IntegrityError if it is short."""
        records = self._reader(obj).pread(off, want)
        if len(records) != want:
            raise IntegrityError(f"token {self.token}: chunk {index} is truncated or missing")
        return records

    def _record_runs(self, first: int, last: int) -> Iterator[tuple[int, int, list[int], int]]:
        i = first
        while i <= last:
            obj, off, rlen, _ = self._entry(i)
            lengths, start, end = [rlen], i, off + rlen
            i += 1
            while i <= last:
                o2, off2, rlen2, _ = self._entry(i)
                if o2 != obj or off2 != end or end - off >= RUN_BYTES:
                    break
                lengths.append(rlen2)
                end += rlen2
                i += 1
            yield obj, off, lengths, start

    # -- writing --------------------------------------------------------------------------------
    def can_write_now(self, offset: int, n: int) -> bool:
        """True if write(offset, n bytes) would need no decryption, no I/O and no waiting on
        a background job: every chunk it touches is already dirty, a hole, new, or wholly
        replaced. Then the FUSE layer may run it on its event loop (a memory copy)."""
        if n <= 0:
            return True
        if self._legacy is not None:
            return False  # a v1 token is rewritten as v2 first
        if self._ahead and not all(a[2].done() for a in self._ahead):
            return False
        # n + cs: a write of n bytes into a new chunk counts the whole chunk as dirty
        if self._over_budget(n + self.cs) and self._write_back_would_wait(n + self.cs):
            return False  # starting the next write-back would wait (or open an object)
        cs, end, count = self.cs, offset + n, self.count
        if end > self.size and count and not self._no_io(count - 1):
            return False  # the old last chunk must be loaded to drop its final marker
        for i in range(offset // cs, (end - 1) // cs + 1):
            if i in self._inflight:
                return False
            if i >= count or self._no_io(i):
                continue
            base = i * cs
            if not (offset <= base and end >= base + min(cs, max(self.size, end) - base)):
                if not self._patchable(i):
                    return False
        return True

    def _patchable(self, i: int) -> bool:
        """Chunk i is stored and not dirty: a partial write to it can be kept as a patch."""
        return (
            i not in self._holes
            and i not in self._inflight
            and self._entry(i)[0] != NO_OBJECT
            and len(self._patches.get(i, ())) < MAX_PATCHES
        )

    def _over_budget(self, n: int) -> bool:
        return self._dirty_bytes + n > WRITEBACK_BYTES or self._patch_bytes + n > PATCH_BYTES

    def _far_over_budget(self, n: int) -> bool:
        """Past this the writer waits for the runs in flight: memory stays bounded."""
        return (
            self._dirty_bytes + n > 2 * WRITEBACK_BYTES or self._patch_bytes + n > 2 * PATCH_BYTES
        )

    def _drop_patches(self, i: int) -> list[tuple[int, Buffer]] | None:
        patches = self._patches.pop(i, None)
        if patches:
            self._patch_bytes -= _patch_cost(patches)
        return patches

    def _no_io(self, i: int) -> bool:
        return i in self._dirty or i in self._holes or self._entry(i)[0] == NO_OBJECT

    def write(self, offset: int, data: bytes | memoryview) -> int:
        n = len(data)
        if n == 0:
            return 0
        if self._legacy is not None:
            self._upgrade()
        end = offset + n
        cs = self.cs
        self._stop_ahead()
        if self._inflight and any(
            i in self._inflight for i in range(offset // cs, (end - 1) // cs + 1)
        ):
            self._drain()
        if end > self.size:
            self._resize(end)
        src = memoryview(data)
        immutable = isinstance(data, bytes)  # whole chunks may then be kept as views of it
        pos = 0
        for i in range(offset // cs, (end - 1) // cs + 1):
            base = i * cs
            a = max(offset, base) - base
            b = min(end, base + cs) - base
            piece = src[pos : pos + b - a]
            pos += b - a
            buf = self._dirty.get(i)
            if buf is None:
                if a == 0 and b >= self._clen(i):
                    # whole chunk replaced: nothing to load, and nothing to copy
                    self._dirty[i] = piece if immutable else bytearray(piece)
                    self._dirty_bytes += cs
                    self._holes.discard(i)
                    self._drop_patches(i)
                    continue
                if self._patchable(i):  # merged later, off this thread
                    patch = (a, piece if immutable else bytes(piece))
                    self._patches.setdefault(i, []).append(patch)
                    self._patch_bytes += _patch_cost((patch,))
                    continue
                buf = self._make_dirty(i)
            elif not isinstance(buf, bytearray):
                buf = self._dirty[i] = bytearray(buf)
            _lay(buf, ((a, piece),))
        now = time.time_ns()
        self.meta.mtime_ns = self.meta.ctime_ns = now
        self.meta_dirty = True
        if self._over_budget(0):
            self._start_write_back()
        return n

    def _make_dirty(self, i: int) -> bytearray:
        """Bring chunk i into the dirty set with its current plaintext (stored, or zeros)."""
        buf = self._dirty.get(i)
        if buf is not None:
            if not isinstance(buf, bytearray):
                buf = self._dirty[i] = bytearray(buf)
            return buf
        if i in self._inflight:
            self._drain()
        if i in self._holes or self._entry(i)[0] == NO_OBJECT:
            buf = bytearray()
        else:
            buf = self._decrypt(i, i)
        _lay(buf, self._drop_patches(i))
        self._holes.discard(i)
        self._dirty[i] = buf
        self._dirty_bytes += self.cs
        return buf

    def truncate(self, size: int) -> None:
        if size == self.size:
            return
        if self._legacy is not None:
            self._upgrade(keep_data=size > 0)
        self._resize(size)
        now = time.time_ns()
        self.meta.mtime_ns = self.meta.ctime_ns = now
        self.meta_dirty = True

    def _resize(self, new: int) -> None:
        """Change the size. Chunks whose final marker or length changes are made dirty first,
        while their records still decrypt under the old chunk count."""
        if chunk_count_for(new, self.cs) > MAX_CHUNK_COUNT:
            # the format's cap (docs/FORMAT.md, "Limits"): refused here, as EFBIG, rather than
            # at commit, where the data already written could not be published
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        self._stop_ahead()
        if new < self.size:
            self._drain()  # in-flight chunks past the new end must not land afterwards
        old_count, new_count = self.count, chunk_count_for(new, self.cs)
        if new_count > old_count:
            if old_count:
                self._make_dirty(old_count - 1)  # stops being the final chunk
            self.manifest += SENTINEL * (new_count - old_count)
            self._holes.update(range(old_count, new_count))
        else:
            if new_count:
                self._make_dirty(new_count - 1)  # becomes (or stays) final with a new length
            for i in [k for k in self._dirty if k >= new_count]:
                del self._dirty[i]
                self._dirty_bytes -= self.cs
            for i in [k for k in self._patches if k >= new_count]:
                self._drop_patches(i)
            self._holes.difference_update(range(new_count, old_count))
            del self.manifest[new_count * ENTRY :]
        self.size = new
        # Bytes past the new end of the last chunk must read as zeros if the file grows again.
        if new_count:
            last = self._dirty.get(new_count - 1)
            keep = self._clen(new_count - 1)
            if last is not None and len(last) > keep:
                if isinstance(last, bytearray):
                    del last[keep:]
                else:
                    self._dirty[new_count - 1] = last[:keep]

    # -- write-back and commit -------------------------------------------------------------------
    def _reserve(self, nbytes: int) -> tuple[int, int]:
        """A place for `nbytes` of records at the end of the object being written (a new one
        at first, and past its size target or after a failed run, once every run writing the
        old one has landed: the writer seals it then)."""
        if self.writer.would_roll(nbytes):
            self._settle(0)  # runs still writing into the current object land first
            self.writer.seal()
        return self.writer.reserve(nbytes)

    def _append(self, records: bytes | bytearray) -> tuple[int, int]:
        obj, at = self._reserve(len(records))
        self.writer.write_at(obj, at, records)
        return obj, at

    def _busy_runs(self) -> int:
        """Runs in flight from the oldest one not finished (finished ones are applied next)."""
        for k, run in enumerate(self._runs):
            if not run.future.done():
                return len(self._runs) - k
        return 0

    def _write_back_would_wait(self, n: int) -> bool:
        """Whether _start_write_back() after a write of n bytes could block: it would wait for
        runs in flight (only when far over budget), open an object or a reader."""
        busy = self._busy_runs()
        if busy >= MAX_RUNS:
            return self._far_over_budget(n)
        room = MAX_RUNS - busy
        if self.writer.would_roll(room * (RUN_BYTES + RUN_BYTES // 32)):
            return True
        return any(self._entry(i)[0] not in self._readers for i in self._patches)

    def _start_write_back(self) -> None:
        """Hand pending chunks to the encryption threads, at most MAX_RUNS runs in flight,
        and return: the caller keeps writing meanwhile. Full dirty chunks go first (in order,
        for sequential writers), then the chunks with the most patches. The final chunk stays
        (its marker may change). When all runs are busy the writer goes on, unless it is far
        over budget: then it waits for room."""
        self._settle(MAX_RUNS)
        if len(self._runs) >= MAX_RUNS:
            if not self._far_over_budget(0):
                return
            self._settle(MAX_RUNS - 1)
        per_run = max(1, RUN_BYTES // self.cs)
        take = (MAX_RUNS - len(self._runs)) * per_run
        final = self.count - 1
        dirty = sorted(i for i in self._dirty if i < final)
        patched: list[int] = []
        if self._patch_bytes > PATCH_BYTES:
            patched = [i for i in self._patches if i < final]
            patched.sort(key=lambda i: len(self._patches[i]), reverse=True)
        # patches first only when far over their budget, so they stay bounded under a writer
        # that also keeps making chunks dirty
        first, second = (
            (patched, dirty) if self._patch_bytes > 2 * PATCH_BYTES else (dirty, patched)
        )
        todo = (first + second)[:take]
        if todo:
            self._submit(sorted(todo), final)

    def _submit(self, todo: list[int], final: int, *, inline_last: bool = False) -> None:
        """Encrypt chunks `todo` (dirty plaintext, patches over stored chunks, or holes as
        zeros) in runs of up to RUN_BYTES. Each run gets its place in the object now, in order,
        and is merged, encrypted and written there by an encryption thread (`inline_last`: the
        last run by the caller), so runs of one file proceed in parallel. Records carry their
        index, so a run's chunks need not be neighbours. Chunks leave the pending sets run by
        run: if reserving a place fails, the rest are still pending."""
        cs = self.cs
        per_run = max(1, RUN_BYTES // cs)
        for k in range(0, len(todo), per_run):
            idx = todo[k : k + per_run]
            wants = [self._clen(i) if i == final else cs for i in idx]
            for i in idx:  # opened first (may fail): the run only looks readers up
                if i in self._patches:
                    self._reader(self._entry(i)[0])
            obj, off = self._reserve(sum(wants) + len(idx) * RECORD_OVERHEAD)
            # From here nothing fails: every chunk taken from the pending sets is in the run.
            parts: list[Buffer | _Patched] = []
            bufs: list[Pending] = []
            for i, want in zip(idx, wants, strict=True):
                patches = self._drop_patches(i)
                if patches is not None:
                    e_obj, e_off, e_rlen, e_dig = self._entry(i)
                    parts.append(_Patched(e_obj, e_off, e_rlen, e_dig, patches, want))
                    self._inflight[i] = patches
                    bufs.append(patches)
                    continue
                buf = self._dirty.pop(i, None)
                if buf is None:
                    self._holes.discard(i)
                    parts.append(bytes(want))
                else:
                    self._dirty_bytes -= cs
                    self._inflight[i] = buf
                    parts.append(_fit(buf, want))
                bufs.append(buf)
            run = _Run(idx, bufs, obj, off)
            self._runs.append(run)
            if inline_last and k + len(idx) >= len(todo):
                run.future = Future()
                try:
                    run.future.set_result(self._encrypt_run(run, parts, final))
                except BaseException as e:
                    run.future.set_exception(e)
            else:
                run.future = self.workers.encrypt.submit(self._encrypt_run, run, parts, final)

    def _encrypt_run(
        self, run: _Run, parts: list[Buffer | _Patched], final: int
    ) -> list[tuple[int, bytes]]:
        """On an encryption thread: touches only the run's own buffers, the readers opened for
        it, and its reserved place (the token writer hashes the object in order)."""
        plain = [
            self._merge(p, i, final) if isinstance(p, _Patched) else p
            for i, p in zip(run.idx, parts, strict=True)
        ]
        records, entries = self.keys.encrypt_chunks(plain, run.idx, final)
        self.writer.write_at(run.obj, run.off, records)
        return entries

    def _merge(self, p: _Patched, i: int, final: int) -> Buffer:
        """A patched chunk's plaintext: its stored record, authenticated, with the patches laid
        over it in the order they were written."""
        record = self._read_records(p.obj, p.off, p.rlen, i)  # reader opened by _submit
        if not hmac.compare_digest(_CHECKSUM(record), p.digest):
            raise IntegrityError(f"token {self.token}: chunk {i} checksum mismatch")
        try:
            buf = self.keys.decrypt_run(record, [p.rlen], i, final)
        except ChunkAuthError:
            raise IntegrityError(f"token {self.token}: chunk {i} failed authentication") from None
        _lay(buf, p.patches)
        return _fit(buf, p.want)

    def _settle(self, limit: int) -> None:
        """Record where finished runs landed, oldest first, waiting for the oldest while more
        than `limit` are in flight (`_settle(0)`: all). A run that failed puts its chunks back
        (dirty, patched, or hole): nothing is lost. Its error is raised once no run is left in
        flight, so nothing still reads the buffers afterwards."""
        error: BaseException | None = None
        runs = self._runs
        while runs and (error is not None or len(runs) > limit or runs[0].future.done()):
            run = runs.popleft()
            try:
                entries = run.future.result()
            except BaseException as e:
                error = error or e
                self.writer.failed()  # its place stays a gap: later runs go to a new object
                for i, buf in zip(run.idx, run.bufs, strict=True):
                    self._inflight.pop(i, None)
                    if i >= self.count or i in self._dirty or i in self._patches:
                        continue
                    if buf is None:
                        self._holes.add(i)
                    elif isinstance(buf, list):
                        self._patches[i] = buf
                        self._patch_bytes += _patch_cost(buf)
                    else:
                        self._dirty[i] = buf
                        self._dirty_bytes += self.cs
                continue
            off, pack_into = run.off, MANIFEST_ENTRY.pack_into
            for i, (rlen, digest) in zip(run.idx, entries, strict=True):
                pack_into(self.manifest, i * ENTRY, run.obj, off, rlen, digest)
                off += rlen
                self._inflight.pop(i, None)
        if error is not None:
            raise error

    def _drain(self) -> None:
        self._settle(0)

    def _write_back(self) -> None:
        """For a commit: every dirty or patched chunk and hole; the last run is encrypted by
        the caller (a small file then costs no hand-off to another thread)."""
        todo = sorted(set(self._dirty) | self._holes | set(self._patches))
        self._submit(todo, self.count - 1, inline_last=True)
        self._settle(0)

    def _live_bytes(self) -> dict[int, int]:
        live: dict[int, int] = {}
        for obj, _off, rlen, _dig in MANIFEST_ENTRY.iter_unpack(self.manifest):
            live[obj] = live.get(obj, 0) + rlen
        return live

    def _compact(self) -> None:
        """Copy the live records of sealed objects that are mostly dead into the object being
        written. Records are bound to (token, index, final), not to their location: no
        re-encryption. The old objects stay for the grace period (vhsmfs.tokenwriter)."""
        live = self._live_bytes()
        victims = {
            obj
            for obj, (size, _) in self.writer.sealed.items()
            if obj in live and live[obj] * 2 < size
        }
        if not victims:
            return
        i, count = 0, self.count
        while i < count:
            obj, off, rlen, dig = self._entry(i)
            if obj not in victims:
                i += 1
                continue
            run = [(rlen, dig)]
            end, j = off + rlen, i + 1
            while j < count and end - off < RUN_BYTES:
                o2, off2, r2, d2 = self._entry(j)
                if o2 != obj or off2 != end:
                    break
                run.append((r2, d2))
                end += r2
                j += 1
            records = self._read_records(obj, off, end - off, i)
            # copied bytes must still match the manifest
            if (
                first_bad_record(records, [r[0] for r in run], [r[1] for r in run], _CHECKSUM)
                is not None
            ):
                raise IntegrityError(f"token {self.token}: chunk {i} checksum mismatch")
            new_obj, new_off = self._append(records)
            for k, (rl, dg) in enumerate(run):
                MANIFEST_ENTRY.pack_into(self.manifest, (i + k) * ENTRY, new_obj, new_off, rl, dg)
                new_off += rl
            i = j

    def _upgrade(self, *, keep_data: bool = True) -> None:
        """Rewrite a format v1 token as v2 before its first change: every chunk decrypted with
        the v1 keys and encrypted again under new v2 keys into new objects, in runs (none when
        the change is a truncation to zero, `keep_data=False`). The v1 metadata is kept as a
        generation file, so its objects stay for the grace period."""
        legacy = self._legacy
        if legacy is None:
            return
        if not keep_data:
            self.size = 0
        provider = self.store.keys
        if provider is None:
            raise IntegrityError("the mount needs a key")
        self._stop_ahead()
        r = self.backend.open_metadata(self.token)
        try:
            # the file parsed at load, bounded by its header: not one planted since
            if r.size != legacy.file_size:
                raise IntegrityError(f"token {self.token}: metadata changed since it was read")
            raw = r.pread(0, r.size)
        finally:
            r.close()
        again = parse_bytes(raw, self.token)
        if (again.version, again.header_bytes) != (FORMAT_V1, legacy.header_bytes):
            raise IntegrityError(f"token {self.token}: metadata changed since it was read")
        writer = TokenWriter.upgrade(self.backend, provider, legacy.header, grace=self.store.grace)
        count, final, cs = self.count, self.count - 1, self.cs
        manifest = bytearray()
        step = max(1, RUN_BYTES // cs)
        try:
            for first in range(0, count, step):
                last = min(count, first + step) - 1
                plain = self._decrypt(first, last)
                records, entries = writer.keys.encrypt_run(plain, first, cs, final)
                obj, off = writer.append(records)
                for rlen, digest in entries:
                    manifest += MANIFEST_ENTRY.pack(obj, off, rlen, digest)
                    off += rlen
            writer.seal()
            writer.keep_generation(legacy, raw)
        except BaseException:
            writer.abort()
            raise
        for rd in self._readers.values():
            rd.close()
        self._readers.clear()
        self._cache = None
        self.writer, self.keys, self.manifest, self._legacy = writer, writer.keys, manifest, None
        self.meta_dirty = True

    def commit(self, *, final: bool = True) -> bool:
        """Publish everything written so far as a new generation. Durable on return. Returns
        False if there was nothing to publish. (`final`: the last close, fsync or unmount;
        nothing differs any more since format v2 keeps no whole-file digest.)"""
        self._stop_ahead()
        self._drain()
        if not self.dirty:
            return False
        self._upgrade()
        self._write_back()
        self._compact()
        with self.meta_lock:  # a consistent snapshot; later setattrs mark it dirty again
            self.meta.size = self.size
            self.meta.sha256 = None
            meta = dataclasses.replace(self.meta, extra=dict(self.meta.extra))
            self.meta_dirty = False
        used = set(self._live_bytes())
        # closed first: the commit's pruning may wipe them, and a wipe waits for every other
        # descriptor of a file to close (a backup tool's); ours would only delay it
        for obj in [o for o in self._readers if o not in used]:
            self._readers.pop(obj).close()
        try:
            self.writer.commit(ManifestBuffer(self.manifest), meta, used)
        except BaseException:
            self.meta_dirty = True
            raise
        return True

    # -- lifetime -------------------------------------------------------------------------------
    def delete(self) -> None:
        """Remove the token and wipe its data (committed or not)."""
        self.close()
        if self.committed:
            with contextlib.suppress(FileNotFoundError, TokenNotFoundError):
                self.store.retire(self.token)
        else:
            self.backend.discard_uncommitted(self.token)
        self.writer.committed = False

    def close(self) -> None:
        """Drop caches and file descriptors. Uncommitted data is discarded: commit first."""
        self._stop_ahead()
        with contextlib.suppress(Exception):
            self._drain()
        self.writer.abort()
        for r in self._readers.values():
            r.close()
        self._readers.clear()
        self._cache = None
        self._dirty.clear()
        self._dirty_bytes = 0
        self._patches.clear()
        self._patch_bytes = 0

    def forget_cache(self) -> None:
        """Closed but kept loaded: drop the decrypted window (a finished read-ahead too)."""
        self._cache = None
        if self._ahead and all(a[2].done() for a in self._ahead):
            self._ahead.clear()

    def stat_blocks(self) -> int:
        return (self.count * RECORD_OVERHEAD + self.size + 511) // 512
