"""Writing and committing one token: the only module that writes the token format (v2).

Both writers of tokens use it: `vhsm token store` (vhsmfs.store, sequential) and the mount
(vhsmfs.mount.randomaccess, chunks rewritten anywhere by several encryption threads). It owns:

* object allocation: places for records are reserved in order in the token's current object,
  which rolls to a new object past OBJECT_TARGET; records are written there from any thread;
* sealing: an object is finished (durable, published under its id, immutable) with its length
  and XXH3-128 recorded for the object table, hashed in offset order as the bytes arrive;
* the commit: metadata sealed under the token's key, the generation file written, then the
  current metadata replaced (vhsmfs.backend.Backend.commit_metadata);
* retention: what earlier generations and superseded objects stay for the grace period, so a
  backup copy taken at any moment holds a complete generation of every token (FORMAT.md 7, 9).

Nothing here knows chunks' plaintext: callers hand in encrypted records and manifest entries.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from vhsmfs.backend import Backend, ObjectWriter
from vhsmfs.errors import InputError, IntegrityError, StoreError, VhsmError
from vhsmfs.format import (
    MANIFEST_ENTRY,
    MAX_CHUNK_COUNT,
    MAX_CHUNK_SIZE,
    MAX_META_JSON,
    SALT_LEN,
    Header,
    Metadata,
    ParsedFile,
    build_head,
    chunk_count_for,
    object_hasher,
    pack_object_table,
    parse,
)
from vhsmfs.keyfile import KeyProvider
from vhsmfs.safefs import UnsafeEntryError
from vhsmfs.tokencrypto import TokenKeys

log = logging.getLogger("vhsm.store")

OBJECT_TARGET = 64 << 20  # roll to a new object past this many bytes
DEFAULT_GRACE_SECONDS = 3600
SPOOL_IN_MEMORY = 8 << 20  # manifest bytes kept in memory before the spool goes to a temp file
_READ_BACK = 4 << 20


def grace_from_env() -> int:
    """VHSM_GRACE_SECONDS: how long superseded generations and objects are kept (0 to 10 years)."""
    raw = os.environ.get("VHSM_GRACE_SECONDS", "")
    if not raw:
        return DEFAULT_GRACE_SECONDS
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
        raise VhsmError(f"VHSM_GRACE_SECONDS must be a number of seconds, got {raw!r}")
    return int(raw)


def check_chunk_count(size: int, chunk_size: int, what: str) -> None:
    """Refuse, before anything is written, a file whose manifest would exceed the format's cap
    (MAX_CHUNK_COUNT entries, a 1 GiB manifest): readers refuse such metadata."""
    count = chunk_count_for(size, chunk_size)
    if count <= MAX_CHUNK_COUNT:
        return
    need = -(-size // MAX_CHUNK_COUNT)
    hint = (
        f"store it with TOKEN_CHUNK_SIZE={need} or more"
        if need <= MAX_CHUNK_SIZE
        else "that is more than the format holds at any chunk size"
    )
    raise InputError(
        f"{what} is too large for chunk size {chunk_size}: {count} chunks, the format allows "
        f"{MAX_CHUNK_COUNT}; {hint}"
    )


class ManifestSpool:
    """A manifest built in index order (by `store`): entries spooled to an anonymous temp file
    past SPOOL_IN_MEMORY bytes, so memory stays flat whatever the file size."""

    def __init__(self) -> None:
        self._f = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115
        self.count = 0
        self._hash = hashlib.sha256()

    def append(self, entries: bytes | bytearray) -> None:
        self._f.write(entries)
        self._hash.update(entries)
        self.count += len(entries) // MANIFEST_ENTRY.size

    def digest(self, object_table: bytes) -> bytes:
        h = self._hash.copy()
        h.update(object_table)
        return h.digest()

    def parts(self) -> Iterator[bytes]:
        self._f.flush()
        self._f.seek(0)
        while block := self._f.read(1 << 20):
            yield block

    def close(self) -> None:
        self._f.close()


class ManifestBuffer:
    """A manifest held in memory (by the mount, which changes entries anywhere)."""

    def __init__(self, data: bytearray) -> None:
        self.data = data

    @property
    def count(self) -> int:
        return len(self.data) // MANIFEST_ENTRY.size

    def digest(self, object_table: bytes) -> bytes:
        h = hashlib.sha256(self.data)
        h.update(object_table)
        return h.digest()

    def parts(self) -> Iterator[bytes | bytearray]:
        yield self.data


class _Building:
    """The object being filled: places reserved in order, bytes arriving from any thread, the
    XXH3-128 kept in offset order (bytes that arrive early wait for those before them)."""

    def __init__(self, object_id: int, writer: ObjectWriter) -> None:
        self.id = object_id
        self.writer = writer
        self.end = 0
        self._hashed = 0
        self._hash = object_hasher()
        self._early: dict[int, bytes | bytearray | memoryview] = {}
        self._lock = threading.Lock()

    def reserve(self, n: int) -> int:
        at = self.end
        self.end += n
        return at

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.writer.write_at(offset, data)
        with self._lock:
            if offset != self._hashed:
                self._early[offset] = data
                return
            self._hash.update(data)
            self._hashed += len(data)
            while (nxt := self._early.pop(self._hashed, None)) is not None:
                self._hash.update(nxt)
                self._hashed += len(nxt)

    def sealed_as(self) -> tuple[int, bytes]:
        """(length, XXH3-128) of the object as it stands. Where some reserved place never got
        its bytes (a run that failed, e.g. on a full disk), the object is read back: what is
        there is what counts (records are only ever referenced where their write succeeded)."""
        if self._hashed == self.end and not self._early:
            return self.end, self._hash.digest()
        length = self.writer.size()
        h = object_hasher()
        for at in range(0, length, _READ_BACK):
            want = min(_READ_BACK, length - at)
            data = self.writer.pread(at, want)
            if len(data) != want:
                raise StoreError(f"object {self.id:08x} could not be read back")
            h.update(data)
        return length, h.digest()


class _BuildingReader:
    """Reads records back from the object being written (before it is sealed)."""

    def __init__(self, b: _Building) -> None:
        self._b = b
        self.size = b.end

    def pread(self, offset: int, length: int) -> bytes:
        return self._b.writer.pread(offset, length)

    def close(self) -> None:
        pass


@dataclass
class Generation:
    """What retention needs to know of a generation: when it was committed, what it uses."""

    number: int
    commit_time_ns: int
    objects: set[int]


def generation_info(parsed: ParsedFile) -> Generation:
    return Generation(
        parsed.header.generation, parsed.header.commit_time_ns, set(parsed.object_ids())
    )


class TokenWriter:
    """Writes new generations of one token. Not thread-safe except write_at (the caller holds
    its own lock around reserve, seal and commit)."""

    def __init__(
        self,
        backend: Backend,
        keys: TokenKeys,
        header: Header,
        *,
        objects: dict[int, tuple[int, bytes]] | None = None,
        grace: int | None = None,
        committed: bool = True,
    ) -> None:
        """`header` is the token's newest committed generation (for a new token: generation
        0, no objects). `objects`: its object table (what earlier objects the next manifest
        may still refer to)."""
        self.backend = backend
        self.token = header.token_id
        self.keys = keys
        self.salt = header.salt
        self.key_ref = header.key_ref
        self.chunk_size = header.chunk_size
        self.generation = header.generation
        self.next_object = header.next_object_id
        self.committed = committed
        self.grace = grace_from_env() if grace is None else grace
        self.sealed: dict[int, tuple[int, bytes]] = dict(objects or {})
        self._open: dict[int, _Building] = {}  # objects being written, by id
        self._current: _Building | None = None  # where reserve() places records
        self._roll = False
        self._writing = contextlib.ExitStack()  # backend.writing() while work is uncommitted
        self._held = False
        self._generations: dict[int, Generation] | None = None  # retention's cache
        self._swept = False
        self._listed = False  # generation files checked for leftovers (first commit)

    @classmethod
    def create(
        cls,
        backend: Backend,
        provider: KeyProvider,
        chunk_size: int,
        *,
        token: uuid.UUID | None = None,
        grace: int | None = None,
    ) -> TokenWriter:
        """A new token (nothing written yet): fresh id unless given, salt and keys."""
        token = token or uuid.uuid4()
        ikm, key_ref = provider.new_token_key(token)
        salt = os.urandom(SALT_LEN)
        keys = TokenKeys(ikm, salt, token)
        header = Header(token, salt, keys.key_check, 0, chunk_size, 0, 0, b"", key_ref)
        return cls(backend, keys, header, grace=grace, committed=False)

    @classmethod
    def upgrade(
        cls, backend: Backend, provider: KeyProvider, legacy: Header, *, grace: int | None = None
    ) -> TokenWriter:
        """A writer that rewrites a format v1 token as v2: new salt and keys (records must all
        be encrypted again), generation and object numbering continued from `legacy`."""
        token = legacy.token_id
        ikm, key_ref = provider.new_token_key(token)
        salt = os.urandom(SALT_LEN)
        keys = TokenKeys(ikm, salt, token)
        header = Header(
            token,
            salt,
            keys.key_check,
            legacy.generation,
            legacy.chunk_size,
            0,
            legacy.next_object_id,
            b"",
            key_ref,
        )
        return cls(backend, keys, header, grace=grace, committed=True)

    # -- objects ----------------------------------------------------------------------------------
    def _begin_writing(self) -> None:
        if not self._held:
            self._writing.enter_context(self.backend.writing(self.token))
            self._held = True

    def _end_writing(self) -> None:
        self._writing.close()
        self._held = False

    @property
    def building(self) -> bool:
        """Objects are being written (not sealed yet)."""
        return bool(self._open)

    def reading(self, object_id: int) -> _BuildingReader | None:
        """A reader of `object_id` if it is being written (it has no name yet), else None.
        Valid until the object is sealed: the caller lets no read overlap seal()."""
        b = self._open.get(object_id)
        return _BuildingReader(b) if b is not None else None

    def would_roll(self, nbytes: int) -> bool:
        """Whether reserve(nbytes) would start a new object."""
        b = self._current
        return b is None or self._roll or b.end + nbytes > OBJECT_TARGET and b.end > 0

    def reserve(self, nbytes: int) -> tuple[int, int]:
        """A place for `nbytes` of records: (object id, offset), at the end of the current
        object, or of a new one past OBJECT_TARGET (or after a failed write). The object
        given up stays open until it is sealed (seal(), once every write into it landed)."""
        if self.would_roll(nbytes):
            self._roll = False
            self._begin_writing()
            if not self._swept:
                self._sweep_leftovers()
            b = self._new_building()
            self._open[b.id] = self._current = b
        assert self._current is not None
        return self._current.id, self._current.reserve(nbytes)

    def _new_building(self) -> _Building:
        """The next object id's writer. An id where an unsafe entry was planted (a link, a
        stranger's file: refused by the backend, left alone) is skipped, a few times at most:
        the token stays writable, and every refusal is logged."""
        for _ in range(8):
            obj = self.next_object
            self.next_object += 1
            try:
                return _Building(obj, self.backend.new_object(self.token, obj))
            except UnsafeEntryError as e:
                log.warning("%s; object id %08x skipped", e, obj)
                last = e
        raise last

    def write_at(self, object_id: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write records at a reserved place (any thread). `data` must not change afterwards."""
        b = self._open.get(object_id)
        if b is None:
            raise StoreError(f"token {self.token}: object {object_id:08x} is not being written")
        b.write_at(offset, data)

    def append(self, data: bytes | bytearray | memoryview) -> tuple[int, int]:
        obj, at = self.reserve(len(data))
        self.write_at(obj, at, data)
        return obj, at

    def failed(self) -> None:
        """A write at a reserved place failed: later records go to a new object."""
        self._roll = True

    def seal(self, upto: int | None = None) -> None:
        """Finish objects being written (all, or those with ids below `upto`): durable,
        published, length and digest recorded. Every write into them must have landed."""
        for obj in sorted(self._open):
            if upto is not None and obj >= upto:
                break
            b = self._open.pop(obj)
            if b is self._current:
                self._current = None
            try:
                length, digest = b.sealed_as()
                b.writer.finish()
            except BaseException:
                b.writer.abort()
                raise
            self.sealed[b.id] = (length, digest)

    def abort(self) -> None:
        """Drop the objects being written (unpublished) and let go of the writer lock."""
        for b in self._open.values():
            b.writer.abort()
        self._open.clear()
        self._current = None
        self._end_writing()

    def _sweep_leftovers(self) -> None:
        """Objects at or past next_object_id were left by a writer killed before its commit:
        nothing refers to them, so they go before their ids are used again."""
        self._swept = True
        if not self.committed:
            return
        for obj in sorted(self.backend.object_sizes(self.token)):
            if obj >= self.next_object:
                self.backend.delete_object(self.token, obj)
                # never reuse the id: a backup copy may hold the leftover, and must not pair
                # it with a later generation that names a new object of that id
                self.next_object = obj + 1

    # -- commit ------------------------------------------------------------------------------------
    def commit(
        self,
        manifest: ManifestSpool | ManifestBuffer,
        meta: Metadata,
        used: Iterable[int],
    ) -> int:
        """Publish a new generation: `manifest` (entries in index order), `meta` (the sizes
        must agree), `used` the objects the manifest refers to, all sealed. Durable on return;
        then superseded generations past the grace period are pruned. Returns the generation."""
        self.seal()
        check_chunk_count(meta.size, self.chunk_size, f"token {self.token}")
        if manifest.count != chunk_count_for(meta.size, self.chunk_size):
            raise StoreError(f"token {self.token}: manifest and size disagree")
        try:
            objects = {o: self.sealed[o] for o in used}
        except KeyError as e:
            raise IntegrityError(
                f"token {self.token}: object {e.args[0]:08x} was never finished"
            ) from None
        doc = meta.to_json()
        if len(doc) > MAX_META_JSON:
            raise InputError(
                f"token {self.token}: its name and attributes take {len(doc)} bytes, more than "
                f"the format allows ({MAX_META_JSON})"
            )
        table = pack_object_table(objects)
        now = time.time_ns()
        header = Header(
            token_id=self.token,
            salt=self.salt,
            key_check=self.keys.key_check,
            generation=self.generation + 1,
            chunk_size=self.chunk_size,
            chunk_count=manifest.count,
            next_object_id=self.next_object,
            tables_digest=manifest.digest(table),
            key_ref=self.key_ref,
            commit_time_ns=now,
            object_count=len(objects),
        )
        header_bytes = header.pack()
        nonce, ct = self.keys.seal_metadata(doc, header_bytes)
        head = build_head(header, nonce, ct, table)
        # Held through the commit and the pruning, also when no object was written (a rename,
        # a chmod): gc must never judge the token between its generation file and its current
        # metadata, nor prune beside this writer.
        self._begin_writing()
        try:
            self._clear_stale_generation(header.generation)
            self.backend.commit_metadata(self.token, header.generation, _chain(head, manifest))
            if not self.committed:
                self._generations = {}  # a new token: this is its only generation
            self.generation = header.generation
            self.committed = True
            self.sealed = objects  # what later generations may still refer to
            self._swept = False
            if self._generations is None:
                self.prune(now)  # reads the generation files once
            else:
                self._generations[header.generation] = Generation(
                    header.generation, now, set(objects)
                )
                if len(self._generations) > 1:
                    self.prune(now)
        finally:
            self._end_writing()  # the metadata now refers to every object written
        return header.generation

    def _clear_stale_generation(self, generation: int) -> None:
        """A generation file with the number about to be written, or higher, is the leftover
        of a writer killed between writing it and replacing the current metadata, whose
        objects this writer has since reused: it is dead."""
        if not self.committed:
            return  # a new token: nothing of it is committed
        if self._listed:
            found = list(self._generations or ())
        else:
            found = self.backend.generations(self.token)
            self._listed = True
        for g in found:
            if g >= generation:
                self.backend.delete_generation(self.token, g)
                if self._generations is not None:
                    self._generations.pop(g, None)

    def keep_generation(self, parsed: ParsedFile, data: bytes) -> None:
        """Store `data`, the token's current metadata in format v1 (which kept no generation
        files), as its generation file before the first v2 commit, so that its objects stay
        for the grace period like any superseded generation's."""
        if parsed.header.generation in self.backend.generations(self.token):
            return
        self.backend.commit_metadata(self.token, parsed.header.generation, [data])
        if self._generations is not None:
            self._generations[parsed.header.generation] = generation_info(parsed)

    # -- retention ---------------------------------------------------------------------------------
    def prune(self, now_ns: int | None = None) -> list[str]:
        """Remove generations superseded more than `grace` seconds ago and the objects only
        they referred to. Returns a line per thing removed."""
        if self._generations is None:
            self._generations = read_generations(self.backend, self.token)
        return prune(
            self.backend,
            self.token,
            self._generations,
            self.generation,
            self.next_object,
            now_ns if now_ns is not None else time.time_ns(),
            self.grace,
            on_disk=None,
        )


def _chain(head: bytes, manifest: ManifestSpool | ManifestBuffer) -> Iterator[bytes | bytearray]:
    yield head
    yield from manifest.parts()


def read_generations(backend: Backend, token: uuid.UUID) -> dict[int, Generation]:
    """Every readable generation file of a token (an unreadable one is left out: retention
    keeps it, gc reports it)."""
    out: dict[int, Generation] = {}
    for g in backend.generations(token):
        try:
            r = backend.open_generation(token, g)
        except FileNotFoundError:
            continue
        try:
            parsed = parse(r, token, lambda g=g: backend.open_generation(token, g))
        except VhsmError:
            continue
        finally:
            r.close()
        if parsed.header.generation == g:
            out[g] = generation_info(parsed)
    return out


def prune(
    backend: Backend,
    token: uuid.UUID,
    generations: dict[int, Generation],
    newest: int,
    next_object: int,
    now_ns: int,
    grace: int,
    *,
    on_disk: Iterable[int] | None,
) -> list[str]:
    """Retention. Generation g is superseded when the next newer one was committed; it is kept
    while that was less than `grace` seconds ago. The newest is always kept; so is every
    object a kept generation refers to, and every object at or past `next_object` (a writer's
    work in progress). Everything else is wiped: of `on_disk` (every object there is, as gc
    lists them), or, when that is None (a writer after its commit, which lists nothing), of
    the objects the generations dropped now referred to. `generations` is updated."""
    order = sorted(g for g in generations if g <= newest)
    keep = {newest}
    for older, newer in zip(order, order[1:], strict=False):
        if now_ns - generations[newer].commit_time_ns < grace * 1_000_000_000:
            keep.add(older)
    removed: list[str] = []
    dropped: set[int] = set()
    for g in order:
        if g not in keep:
            backend.delete_generation(token, g)
            dropped |= generations.pop(g).objects
            removed.append(f"removed generation {g} of token {token} (superseded)")
    live: set[int] = set()
    for g in keep:
        if g in generations:
            live |= generations[g].objects
    if newest not in generations:
        return removed  # the newest is unreadable: nothing is known to be unused
    for obj in sorted(dropped if on_disk is None else on_disk):
        if obj < next_object and obj not in live:
            backend.delete_object(token, obj)
            removed.append(f"removed object {obj:08x} of token {token} (superseded)")
    return removed
