"""The token store: store, retrieve, list, info, verify and delete tokens (docs/FORMAT.md).

Streaming throughout: a file is read, encrypted and written in runs of chunks through a bounded
ordered pipeline (vhsmfs.pipeline), and the chunk manifest is spooled when written and streamed
when read, so memory does not grow with file size. Plaintext is only ever released into an
unnamed file next to the destination, named after every chunk and the manifest authenticated.

Reading a format v2 token means its newest *complete* generation: the current metadata, or,
where objects it names are missing (a backup copy taken mid-commit), the newest generation file
whose objects are all there (docs/FORMAT.md section 5). Writing goes through vhsmfs.tokenwriter.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import itertools
import os
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vhsmfs.backend import Backend, GarbageReport, ObjectReader
from vhsmfs.errors import (
    BadTokenError,
    InputError,
    IntegrityError,
    StoreError,
    TokenNotFoundError,
    VhsmError,
    WrongKeyError,
)
from vhsmfs.format import (
    DEFAULT_CHUNK_SIZE,
    FORMAT_V1,
    MANIFEST_ENTRY,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    RECORD_OVERHEAD,
    Metadata,
    ParsedFile,
    chunk_count_for,
    first_bad_record,
    object_hasher,
    parse,
    record_checksum,
    record_len,
)
from vhsmfs.keyfile import KeyProvider
from vhsmfs.outfile import OutputDirs, PendingFile, check_destination
from vhsmfs.pipeline import OrderedHasher, ReadAhead, Ring, WriteBehind
from vhsmfs.safefs import UnsafeEntryError
from vhsmfs.tokencrypto import ChunkAuthError, TokenKeys
from vhsmfs.tokenwriter import (
    ManifestSpool,
    TokenWriter,
    check_chunk_count,
    grace_from_env,
    prune,
    read_generations,
)

RUN_TARGET = 4 << 20  # plaintext bytes per pipeline item: big enough to amortise overheads
MAX_STAGE_DEPTH = 8  # runs read ahead of, and written behind, the encrypting thread, at most
_SCRUB_BLOCK = 4 << 20

Progress = Callable[[int], None]
__all__ = ["TokenStore", "check_chunk_count", "parse_token"]


def parse_token(text: str) -> uuid.UUID:
    """A token is a UUID in its canonical 36-character form."""
    try:
        tok = uuid.UUID(text.strip())
    except (ValueError, AttributeError):
        raise BadTokenError(f"'{text}' is not a valid token (expected a UUID)") from None
    if str(tok) != text.strip().lower():
        raise BadTokenError(f"'{text}' is not a valid token (expected a UUID)")
    return tok


def chunk_size_from_env() -> int:
    return _env_number(
        "TOKEN_CHUNK_SIZE", DEFAULT_CHUNK_SIZE, MIN_CHUNK_SIZE, MAX_CHUNK_SIZE, "a number of bytes"
    )


def parallel_from_env() -> int:
    default = max(1, min(4, os.cpu_count() or 1))
    return _env_number("TOKEN_PARALLEL_CHUNKS", default, 1, 64, "a whole number")


def _env_number(name: str, default: int, lo: int, hi: int, what: str) -> int:
    """A setting from the environment: plain ASCII digits only (int() would also take spaces,
    underscores, signs and other scripts' digits), within lo..hi."""
    raw = os.environ.get(name, "")
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit()):
        raise VhsmError(f"{name} must be {what} (digits 0-9 only), got {raw!r}")
    if len(raw) > 18 or not lo <= int(raw) <= hi:
        raise VhsmError(f"{name} must be between {lo} and {hi}, got {raw}")
    return int(raw)


def safe_relative_path(name: str, fallback: str) -> PurePosixPath:
    """The stored name as a relative path that cannot escape the output directory."""
    p = PurePosixPath(name)
    parts = [x for x in p.parts if x not in ("", ".")]
    if not parts or p.is_absolute() or any(x == ".." for x in parts) or "\x00" in name:
        return PurePosixPath(fallback)
    return PurePosixPath(*parts)


@dataclass
class OpenedToken:
    """A token whose metadata authenticated under the key given."""

    token: uuid.UUID
    parsed: ParsedFile
    keys: TokenKeys
    meta: Metadata

    @property
    def header(self):  # type: ignore[no-untyped-def]
        return self.parsed.header

    @property
    def note(self) -> str | None:
        """Why an older generation is shown (the newest is incomplete), if it is."""
        return self.parsed.note


@dataclass
class TokenSummary:
    token: uuid.UUID
    chunk_size: int
    chunk_count: int
    generation: int
    stored_bytes: int
    name: str | None = None
    size: int | None = None
    sha256: str | None = None
    created: int | None = None
    mtime_ns: int | None = None
    mode: int | None = None
    readable: bool = False  # metadata authenticated under the key given
    kind: str = "file"  # "dir" for a directory marker made by the mount
    note: str | None = None  # an older generation is shown (the newest is incomplete)

    def as_dict(self) -> dict[str, object]:
        return {
            "token": str(self.token),
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "chunk_size": self.chunk_size,
            "chunk_count": self.chunk_count,
            "generation": self.generation,
            "stored_bytes": self.stored_bytes,
            "created": self.created,
            "mtime_ns": self.mtime_ns,
            "mode": self.mode,
            "readable": self.readable,
            "kind": self.kind if self.readable else None,
            "note": self.note,
        }


def _readinto_full(f, buf: memoryview) -> int:  # type: ignore[no-untyped-def]
    """Fill `buf` from `f` as far as the file goes (a pipe or a growing file may give less
    per read); returns the bytes read."""
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:])
        if not n:
            break
        got += n
    return got


def _disk_error(e: OSError, where: str) -> VhsmError:
    if e.errno == errno.ENOSPC:
        return StoreError(f"no space left on device while writing {where}")
    if e.errno == errno.EDQUOT:
        return StoreError(f"disk quota exceeded while writing {where}")
    return StoreError(f"cannot write {where}: {e.strerror}")


class TokenStore:
    def __init__(
        self,
        backend: Backend,
        keys: KeyProvider | None = None,
        *,
        chunk_size: int | None = None,
        parallel: int | None = None,
        grace: int | None = None,
    ) -> None:
        self.backend = backend
        self.keys = keys
        self.chunk_size = chunk_size or chunk_size_from_env()
        self.parallel = parallel or parallel_from_env()
        # TOKEN_PARALLEL_CHUNKS: runs in flight on each side of the one encrypting thread
        self._depth = min(self.parallel, MAX_STAGE_DEPTH)
        self.grace = grace_from_env() if grace is None else grace
        if not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise VhsmError(f"chunk size {self.chunk_size} out of range")

    def _need_keys(self) -> KeyProvider:
        if self.keys is None:
            raise VhsmError("this operation needs the key (--key FILE)")
        return self.keys

    # -- finding a token's newest complete generation -----------------------------------------
    def _parse_current(self, token: uuid.UUID) -> ParsedFile:
        r = self.backend.open_metadata(token)
        try:
            return parse(r, token, lambda: self.backend.open_metadata(token))
        finally:
            r.close()

    def _parse_generation(self, token: uuid.UUID, g: int) -> ParsedFile:
        r = self.backend.open_generation(token, g)
        try:
            parsed = parse(r, token, lambda: self.backend.open_generation(token, g))
        finally:
            r.close()
        if parsed.header.generation != g:
            raise IntegrityError(
                f"token {token}: generation file {g} holds generation {parsed.header.generation}"
            )
        return parsed

    def parse(self, token: uuid.UUID) -> ParsedFile:
        """The token's newest complete generation, parsed (nothing authenticated yet).

        Candidates, newest generation first: the current metadata, then the generation file of
        the same number. A candidate whose objects are all present with the lengths it records
        wins. One that names a missing object is *incomplete* (a backup copy taken mid-commit,
        an interrupted commit) once its tables are shown authentic (their digest, which also
        covers the object table, is checked first, so a damaged table cannot pass for an
        incomplete generation): then the next older generation is tried. A damaged candidate
        (bad checksum, wrong object length) is no reason to go back to an older generation:
        only the other copy of the same generation may stand in for it, else the damage is
        raised. Choosing anything but the current metadata is noted in ParsedFile.note; damage
        passed over is in ParsedFile.damage.

        Raises:
            TokenNotFoundError: no such token.
            NoCompleteGeneration: every candidate is incomplete, and none is damaged.
            IntegrityError, StoreError: damage, naming the first damaged part.
        """
        current: ParsedFile | None = None
        damage: VhsmError | None = None
        try:
            current = self._parse_current(token)
        except (IntegrityError, StoreError) as e:  # damaged: the generation file may stand in
            damage = e
        gens = self.backend.generations(token)
        if current is not None and current.version == FORMAT_V1 and not gens:
            return current
        if current is None and not gens:
            assert damage is not None
            raise damage
        # a planted entry no generation names must not make the token unreadable
        sizes = self.backend.object_sizes(token, skip_unsafe=True)
        numbers = set(gens) | ({current.header.generation} if current else set())
        missing: IntegrityError | None = None
        for g in sorted(numbers, reverse=True):
            damaged_here: VhsmError | None = None
            for cand in self._candidates(token, g, current, g in gens):
                if isinstance(cand, VhsmError):
                    damaged_here = damaged_here or cand
                    continue
                try:
                    self._check_objects(cand, sizes, token)
                except _MissingObject as e:
                    try:
                        _check_tables(cand)
                    except IntegrityError as d:
                        damaged_here = damaged_here or d
                        continue
                    missing = missing or e
                    continue
                except (IntegrityError, StoreError) as e:
                    damaged_here = damaged_here or e
                    continue
                if cand is not current:
                    why = missing or damaged_here or damage
                    cand.note = f"using generation {g}" + (
                        f" ({_reason(token, why)})" if why else ""
                    )
                passed_over = damaged_here or (damage if cand is not current else None)
                if passed_over is not None:
                    cand.damage = str(passed_over)
                return cand
            if damaged_here is not None:
                raise damaged_here  # never an older version in place of a damaged one
        if missing is not None:
            raise NoCompleteGeneration(str(missing))
        assert damage is not None
        raise damage

    def _candidates(
        self, token: uuid.UUID, g: int, current: ParsedFile | None, has_file: bool
    ) -> Iterator[ParsedFile | VhsmError]:
        """Generation g's copies: the current metadata if it is g, then its generation file
        (a damaged one is yielded as its error)."""
        if current is not None and current.header.generation == g:
            yield current
        if has_file:
            try:
                yield self._parse_generation(token, g)
            except FileNotFoundError:
                return
            except (IntegrityError, StoreError) as e:
                yield e

    def _check_objects(self, parsed: ParsedFile, sizes: dict[int, int], token: uuid.UUID) -> None:
        """Every object of the table present with its recorded length. A missing one makes the
        generation incomplete (_MissingObject); a length that differs is damage."""
        tok = parsed.header.token_id
        if parsed.version == FORMAT_V1:  # no object table: ids from the manifest, no lengths
            for obj in sorted(parsed.object_ids()):
                if obj not in sizes:
                    self._confirm_missing(token, obj)
            return
        for obj, (length, _) in sorted(parsed.objects.items()):
            have = sizes.get(obj)
            if have is None:
                have = self._confirm_missing(token, obj)
            if have != length:
                raise IntegrityError(
                    f"token {tok}: object {obj:08x} is {have} bytes, its metadata says {length} "
                    "(truncated or extended)"
                )

    def _confirm_missing(self, token: uuid.UUID, obj: int) -> int:
        """An object a generation names is not among the checked objects: it is missing
        (_MissingObject), or an unsafe entry stands there (UnsafeEntryError, naming it), or it
        appeared meanwhile (its size is returned)."""
        try:
            r = self.backend.open_object(token, obj)
        except FileNotFoundError:
            raise _MissingObject(f"token {token}: object {obj:08x} is missing") from None
        try:
            return r.size
        finally:
            r.close()

    def open_token(self, token: uuid.UUID) -> OpenedToken:
        """Read and authenticate a token's metadata; WrongKeyError / IntegrityError otherwise."""
        return self._authenticate(token, self.parse(token))

    def _authenticate(self, token: uuid.UUID, parsed: ParsedFile) -> OpenedToken:
        """open_token() of a generation parse() chose."""
        h = parsed.header
        try:
            ikm = self._need_keys().token_key(token, h.key_ref)
        except LookupError as e:
            raise WrongKeyError(f"wrong key for token {token}: {e}") from None
        keys = TokenKeys(ikm, h.salt, token, parsed.version)
        if not keys.key_matches(h.key_check):
            raise WrongKeyError(f"wrong key for token {token}")
        plain = keys.open_metadata(parsed.meta_nonce, parsed.meta_ciphertext, parsed.header_bytes)
        if plain is None:
            raise IntegrityError(f"token {token}: metadata failed authentication (modified)")
        try:
            meta = Metadata.from_json(plain, parsed.version)
        except (ValueError, KeyError, TypeError):
            raise IntegrityError(f"token {token}: metadata is malformed") from None
        if meta.size < 0 or chunk_count_for(meta.size, h.chunk_size) != h.chunk_count:
            raise IntegrityError(f"token {token}: size and chunk count disagree")
        return OpenedToken(token, parsed, keys, meta)

    # -- store ------------------------------------------------------------------------------------
    def store_file(
        self,
        src: str | os.PathLike[str],
        *,
        name: str | None = None,
        progress: Progress | None = None,
        follow_symlinks: bool = True,
    ) -> uuid.UUID:
        """Encrypt one regular file into a new token; returns the token id. With
        follow_symlinks=False a symbolic link at `src` is refused, not followed."""
        src = os.fspath(src)
        # O_NONBLOCK: a FIFO must fail the S_ISREG check below, not block the open
        extra = os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
        try:
            f = open(src, "rb", buffering=0, opener=lambda p, fl: os.open(p, fl | extra))  # noqa: SIM115
        except FileNotFoundError:
            raise InputError(f"{src}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{src} is a directory (use --recursive to store a tree)") from None
        except OSError as e:
            if e.errno == errno.ELOOP and not follow_symlinks:
                raise InputError(f"{src} is a symbolic link; refusing to follow it") from None
            raise InputError(f"cannot read {src}: {e.strerror}") from None
        with f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise InputError(f"{src} is not a regular file")
            check_chunk_count(st.st_size, self.chunk_size, src)
            return self._store_stream(
                f,
                name=name if name is not None else os.path.basename(src),
                st=st,
                progress=progress,
            )

    def _store_stream(
        self,
        f,  # type: ignore[no-untyped-def]
        *,
        name: str,
        st: os.stat_result,
        progress: Progress | None,
    ) -> uuid.UUID:
        """Read, encrypt (on worker threads) and append records in order; the manifest goes
        to a spool. Then one commit through the token writer."""
        cs = self.chunk_size
        writer = TokenWriter.create(self.backend, self._need_keys(), cs, grace=self.grace)
        token, keys = writer.token, writer.keys
        run_bytes = max(cs, (RUN_TARGET // cs) * cs)
        manifest = ManifestSpool()
        total = index = 0
        last_obj = -1
        pack = MANIFEST_ENTRY.pack
        ring = Ring(self._depth + 1, run_bytes + (run_bytes // cs) * RECORD_OVERHEAD)

        def read_block(_: None, buf: memoryview) -> int:
            try:
                return _readinto_full(f, buf)
            except OSError as e:
                raise InputError(f"cannot read {name}: {e.strerror}") from None

        def emit(plain: memoryview, final: bool, behind: WriteBehind) -> None:
            """Encrypt one run (here: one encrypting thread is fastest, see vhsmfs.pipeline),
            hand its records to the writing thread, note their places in the manifest."""
            nonlocal total, index, last_obj
            n = chunk_count_for(len(plain), cs)
            check_chunk_count(index * cs + len(plain), cs, name)  # grew while stored
            obj, off = writer.reserve(len(plain) + n * RECORD_OVERHEAD)
            if obj != last_obj:
                behind.drain()  # every run into the objects before this one landed
                writer.seal(upto=obj)
                last_obj = obj
            dst = ring.take()
            entries = keys.encrypt_run_into(plain, index, cs, index + n - 1 if final else -1, dst)
            behind.submit(writer.write_at, obj, off, dst[: len(plain) + n * RECORD_OVERHEAD])
            manifest.append(b"".join([pack(obj, o, k, d) for o, (k, d) in _offsets(off, entries)]))
            index += n
            total += len(plain)
            if progress:
                progress(len(plain))

        def encrypt_all() -> None:
            with (
                ReadAhead(
                    itertools.repeat(None), read_block, size=run_bytes, depth=self._depth, keep=2
                ) as ahead,
                WriteBehind("vhsm-write", self._depth) as behind,
            ):
                held: memoryview | None = None  # a full run: the last one if EOF comes next
                for _, view in ahead:
                    if held is not None:
                        emit(held, not view, behind)
                    if len(view) < run_bytes:
                        if view:  # a short tail (an empty file has no chunks)
                            emit(view, True, behind)
                        break
                    held = view
                behind.drain()

        try:
            try:
                encrypt_all()
                writer.seal()
            except OSError as e:
                raise _disk_error(e, f"token {token} to {self.backend.describe()}") from None
            now = time.time()
            meta = Metadata(
                name=name,
                size=total,
                mode=stat.S_IMODE(st.st_mode),
                mtime_ns=st.st_mtime_ns,
                atime_ns=st.st_atime_ns,
                ctime_ns=time.time_ns(),
                created=int(now),
                parallel_chunks=self.parallel,
            )
            try:
                writer.commit(manifest, meta, writer.sealed)
            except OSError as e:
                raise _disk_error(e, f"metadata of token {token}") from None
        except BaseException:
            writer.abort()
            with contextlib.suppress(OSError, VhsmError):
                self.backend.discard_uncommitted(token)
            raise
        finally:
            manifest.close()
        return token

    # -- reading ----------------------------------------------------------------------------------
    def _runs(self, t: ParsedFile, size: int | None) -> Iterator[_Run]:
        """Consecutive manifest entries stored contiguously in one object, as runs, streamed
        from the manifest. Each entry's length and place are checked against the format (and
        `size`, when the authenticated size is known) as it goes by."""
        h = t.header
        limit = max(RUN_TARGET, h.chunk_size + RECORD_OVERHEAD)
        full = h.chunk_size + RECORD_OVERHEAD
        last = h.chunk_count - 1
        objects = t.objects if t.version != FORMAT_V1 else None
        tok = h.token_id
        entry = t.entry
        run: _Run | None = None
        for first, block in t.manifest_blocks():
            for k, (obj, off, rlen, dig) in enumerate(entry.iter_unpack(block)):
                i = first + k
                if i < last:
                    ok = rlen == full
                elif size is not None:
                    ok = rlen == record_len(h.chunk_size, size, i, h.chunk_count)
                else:
                    ok = RECORD_OVERHEAD < rlen <= full
                if not ok:
                    raise IntegrityError(f"token {tok}: chunk {i} has the wrong length")
                if objects is not None:
                    known = objects.get(obj)
                    if known is None or off + rlen > known[0]:
                        raise IntegrityError(f"token {tok}: chunk {i} lies outside its object")
                if (
                    run is not None
                    and obj == run.obj
                    and off == run.end
                    and run.end - run.off < limit
                ):
                    run.lengths.append(rlen)
                    run.digests.append(dig)
                    run.end += rlen
                    continue
                if run is not None:
                    yield run
                run = _Run(obj, off, off + rlen, i, [rlen], [dig])
        if run is not None:
            yield run

    def _decrypt_stream(
        self,
        t: OpenedToken,
        sink: Callable[[memoryview], None] | None,
        *,
        check_digests: bool,
        progress: Progress | None = None,
        sink_at: Callable[[int, memoryview], None] | None = None,
    ) -> None:
        """Authenticate and decrypt every chunk in order, feeding plaintext to `sink` (which
        must be done with it when it returns), or to `sink_at(offset, plaintext)` on a writing
        thread of its own (so that writing the output overlaps decryption). Nothing handed over
        is released before the caller returns: the manifest's digest is checked as its last
        block is read, v1 tokens also have their whole-file SHA-256 checked, and on any failure
        this raises IntegrityError naming the first bad part."""
        h, token = t.header, t.token
        readers: dict[int, ObjectReader] = {}
        final = h.chunk_count - 1
        v1 = t.parsed.version == FORMAT_V1
        hasher = OrderedHasher(hashlib.sha256()) if v1 and t.meta.sha256 else None
        checksum = record_checksum(t.parsed.version)
        check = check_digests or not v1  # v2's checksums cost nothing: always checked
        total = 0
        plain_at = h.chunk_size
        full = h.chunk_size + RECORD_OVERHEAD
        most = -(-max(RUN_TARGET, full) // full)  # records in the longest run _runs() makes

        def fetch(run: _Run, buf: memoryview) -> int:
            """On the reading thread: the run's records (fewer bytes if the object is short)."""
            r = readers.get(run.obj)
            if r is None:
                try:
                    r = readers[run.obj] = self.backend.open_object(token, run.obj)
                except FileNotFoundError:
                    raise IntegrityError(
                        f"token {token}: object {run.obj:08x} is missing"
                    ) from None
            return r.pread_into(run.off, buf[: run.end - run.off])

        ring = Ring(self._depth + 1, most * h.chunk_size)
        try:
            with (
                ReadAhead(
                    self._runs(t.parsed, t.meta.size), fetch, size=most * full, depth=self._depth
                ) as ahead,
                WriteBehind("vhsm-write", self._depth) as behind,
            ):
                for run, records in ahead:
                    if len(records) != run.end - run.off:
                        bad = run.first + _first_short(run.lengths, len(records))
                        raise IntegrityError(f"token {token}: chunk {bad} is truncated or missing")
                    if check:
                        _check_digests(token, records, run, checksum)
                    plain = ring.take()[: len(records) - len(run.lengths) * RECORD_OVERHEAD]
                    try:
                        t.keys.decrypt_run_into(records, run.lengths, run.first, final, plain)
                    except ChunkAuthError as e:
                        raise IntegrityError(
                            f"token {token}: chunk {e.index} failed authentication (modified, "
                            "swapped or reordered)"
                        ) from None
                    if hasher is not None:
                        hasher.update(bytes(plain))  # hashed later, on its own thread
                    if sink_at is not None:
                        behind.submit(sink_at, run.first * plain_at, plain)
                    elif sink is not None:
                        sink(plain)
                    total += len(plain)
                    if progress:
                        progress(len(plain))
                behind.drain()
            digest = hasher.digest() if hasher is not None else None
        finally:
            if hasher is not None:
                hasher.close()
            for r in readers.values():
                r.close()
        if total != t.meta.size:
            raise IntegrityError(f"token {token}: size mismatch after decryption")
        if digest is not None and not hmac.compare_digest(digest.hex(), t.meta.sha256 or ""):
            raise IntegrityError(f"token {token}: whole-file SHA-256 mismatch")

    def digest(self, token: uuid.UUID | OpenedToken, progress: Progress | None = None) -> str:
        """The whole plaintext's SHA-256 (what `sha256sum` prints), computed by decrypting:
        format v2 does not store one (docs/FORMAT.md section 3)."""
        t = token if isinstance(token, OpenedToken) else self.open_token(token)
        h = hashlib.sha256()
        self._decrypt_stream(t, h.update, check_digests=False, progress=progress)
        return h.hexdigest()

    # -- retrieve ---------------------------------------------------------------------------------
    def retrieve(
        self,
        token: uuid.UUID | OpenedToken,
        outdir: str | os.PathLike[str],
        *,
        force: bool = False,
        progress: Progress | None = None,
        before_publish: Callable[[Path], None] | None = None,
    ) -> Path:
        """Decrypt a token to OUTDIR/<its relative path>. Nothing appears unless all checks pass.

        `token` may be a token already opened with open_token (so a caller that needs its size
        first reads the metadata once). `before_publish(dest)` runs after every check passed and
        before the file gets its name (the CLI writes its audit line there); if it raises,
        nothing is left behind either.
        """
        t = token if isinstance(token, OpenedToken) else self.open_token(token)
        rel = safe_relative_path(t.meta.name, str(t.token))
        dest = Path(outdir) / rel
        out = OutputDirs(Path(outdir))
        try:
            if t.meta.extra.get("kind") == "dir":
                # a directory marker (created through the mount): recreate the directory
                d = out.walk(rel.parts)
                if before_publish is not None:
                    before_publish(dest)
                if out.last_made:
                    os.fchmod(d.fd, t.meta.mode & 0o777)
                return dest
            d = out.walk(rel.parts[:-1])
            check_destination(d, rel.name, force=force)
            pending = PendingFile(d, rel.name)
            try:
                self._decrypt_stream(
                    t, None, check_digests=False, progress=progress, sink_at=pending.write_at
                )
                times = (t.meta.atime_ns or t.meta.mtime_ns, t.meta.mtime_ns)
                pending.finish(t.meta.mode & 0o777, times if t.meta.mtime_ns else None)  # no suid
                if before_publish is not None:
                    before_publish(dest)
                pending.publish(force=force)
            finally:
                pending.close()
        except BaseException:
            out.undo()
            raise
        finally:
            out.close()
        return dest

    # -- verify -----------------------------------------------------------------------------------
    def verify_ciphertext(self, token: uuid.UUID) -> str | None:
        """Without the key: the metadata's checksums, every object's length and XXH3-128 (so
        bytes appended to an object are found), the manifest's digest and each record's
        checksum. Returns the note if an older generation had to be used."""
        parsed = self.parse(token)
        self._scrub_metadata(parsed)
        self._scrub_objects(parsed)
        checksum = record_checksum(parsed.version)
        readers: dict[int, ObjectReader] = {}
        try:
            for run in self._runs(parsed, None):
                r = readers.get(run.obj)
                if r is None:
                    try:
                        r = readers[run.obj] = self.backend.open_object(token, run.obj)
                    except FileNotFoundError:
                        raise IntegrityError(
                            f"token {token}: object {run.obj:08x} is missing"
                        ) from None
                rec = r.pread(run.off, run.end - run.off)
                if len(rec) != run.end - run.off:
                    bad = run.first + _first_short(run.lengths, len(rec))
                    raise IntegrityError(f"token {token}: chunk {bad} is truncated or missing")
                _check_digests(token, rec, run, checksum)
        finally:
            for r in readers.values():
                r.close()
        return parsed.note

    def _scrub_metadata(self, parsed: ParsedFile) -> None:
        """Damage anywhere in the token's metadata: a copy passed over for being damaged, or
        any generation file (each read whole, so its tables digest is checked)."""
        token = parsed.header.token_id
        if parsed.damage is not None:
            raise IntegrityError(parsed.damage)
        for g in self.backend.generations(token):
            try:
                _check_tables(self._parse_generation(token, g))
            except FileNotFoundError:
                continue  # pruned meanwhile
            except (IntegrityError, StoreError) as e:
                raise IntegrityError(
                    f"token {token}: generation file {g}: {_reason(token, e)}"
                ) from None

    def _scrub_objects(self, parsed: ParsedFile) -> None:
        """v2: each object of the table read whole and compared with its length and digest."""
        token = parsed.header.token_id
        for obj, (length, digest) in sorted(parsed.objects.items()):
            try:
                r = self.backend.open_object(token, obj)
            except FileNotFoundError:
                raise IntegrityError(f"token {token}: object {obj:08x} is missing") from None
            try:
                if r.size != length:
                    raise IntegrityError(
                        f"token {token}: object {obj:08x} is {r.size} bytes, its metadata says "
                        f"{length} (truncated or extended)"
                    )
                h = object_hasher()
                for at in range(0, length, _SCRUB_BLOCK):
                    h.update(r.pread(at, min(_SCRUB_BLOCK, length - at)))
                if not hmac.compare_digest(h.digest(), digest):
                    raise IntegrityError(
                        f"token {token}: object {obj:08x} checksum mismatch (modified)"
                    )
            finally:
                r.close()

    def verify_full(self, token: uuid.UUID) -> str | None:
        """With the key: everything above plus decryption of every chunk. Returns the note if
        an older generation had to be used."""
        t = self.open_token(token)
        self._scrub_metadata(t.parsed)
        self._scrub_objects(t.parsed)
        self._decrypt_stream(t, None, check_digests=True)
        return t.note

    # -- list / info / delete ---------------------------------------------------------------------
    def summary(self, token: uuid.UUID) -> TokenSummary:
        parsed = self.parse(token)
        h = parsed.header
        if parsed.version == FORMAT_V1:
            ids = parsed.object_ids()
            stored = sum(n for o, n in self.backend.object_sizes(token).items() if o in ids)
        else:  # parse() found every object of the table at its recorded length
            stored = sum(n for n, _ in parsed.objects.values())
        s = TokenSummary(token, h.chunk_size, h.chunk_count, h.generation, stored)
        s.note = parsed.note
        if self.keys is not None:
            try:
                t = self._authenticate(token, parsed)
            except WrongKeyError:
                return s
            m = t.meta
            s.name, s.size, s.sha256, s.created = m.name, m.size, m.sha256, m.created
            s.mtime_ns, s.mode, s.readable = m.mtime_ns, m.mode, True
            s.kind = "dir" if m.extra.get("kind") == "dir" else "file"
        return s

    def retire(self, token: uuid.UUID) -> None:
        """Delete a token the way the mount does: hidden at once, wiped once the grace period
        has passed (by gc; at once when the grace period is 0). A backup copy taken while the
        token is deleted then holds it whole, at its last version, or not at all; `delete`
        (the CLI's) wipes at once."""
        if self.grace == 0:
            self.backend.delete_token(token)
            return
        try:
            self.backend.hide_token(token)
        except TokenNotFoundError:
            pass  # hidden already (the mount hides at unlink), or deleted by the CLI

    def list_tokens(self) -> list[uuid.UUID]:
        return self.backend.token_ids()

    def delete(self, token: uuid.UUID) -> None:
        """Wipe a token at once, every generation of it included. Needs no key and does not
        parse the metadata, so that a damaged token can be deleted too; TokenNotFoundError if
        there is no such token."""
        self.backend.delete_token(token)

    def collect_garbage(self, *, now_ns: int | None = None) -> GarbageReport:
        """The backend's clean-up (interrupted deletes and stores, stale temp files), then per
        token, while no writer holds it: the current metadata set back to the newest complete
        generation where a newer one lacks objects; a v2 token with no complete generation at
        all removed (a copy taken while it was stored or deleted); generations and objects
        superseded longer than the grace period ago wiped; objects a killed writer left past
        next_object_id wiped. Unsafe entries are refused and noted, never touched."""
        report = GarbageReport()
        self.backend.collect_garbage(report, keep_hidden=self.grace)
        now = time.time_ns() if now_ns is None else now_ns
        for token in self.list_tokens():
            try:
                self._collect_token(token, report, now)
            except TokenNotFoundError:
                continue  # deleted meanwhile
            except UnsafeEntryError as e:
                report.refused.append(str(e))
            except VhsmError as e:  # damaged: verify reports it; gc leaves it as it is
                reason = str(e).removeprefix(f"token {token}: ")
                report.ignored.append(f"token {token} ({reason}; left alone)")
        return report

    def _collect_token(self, token: uuid.UUID, report: GarbageReport, now: int) -> None:
        with self.backend.idle(token) as idle:
            if not idle:
                return
            try:
                parsed = self.parse(token)  # under the lock
            except NoCompleteGeneration as e:
                # every generation names a missing object and none is damaged: a copy taken
                # while the token was first stored, or deleted
                self.backend.delete_token(token)
                report.removed.append(
                    f"removed token {token}: no complete generation ({_reason(token, e)}; "
                    "stored or deleted while this copy was taken)"
                )
                return
            h = parsed.header
            if parsed.note is not None:
                self.backend.set_current(token, h.generation)
                report.removed.append(f"token {token}: {parsed.note}; current metadata rewritten")
            if parsed.damage is not None:
                report.ignored.append(
                    f"token {token} (damaged copy passed over: {_reason(token, parsed.damage)}; "
                    "left alone)"
                )
            if self.backend.generations(token):
                gens = read_generations(self.backend, token)
                for g in [g for g in gens if g > h.generation]:
                    self.backend.delete_generation(token, g)
                    del gens[g]
                    report.removed.append(f"removed incomplete generation {g} of token {token}")
                report.removed.extend(
                    prune(
                        self.backend,
                        token,
                        gens,
                        h.generation,
                        h.next_object_id,
                        now,
                        self.grace,
                        on_disk=self.backend.object_sizes(token),
                    )
                )
            for obj in sorted(self.backend.object_sizes(token)):
                if obj >= h.next_object_id:
                    self.backend.delete_object(token, obj)
                    report.removed.append(
                        f"removed object {obj:08x} of token {token} (left by an interrupted write)"
                    )


def _offsets(
    start: int, entries: list[tuple[int, bytes]]
) -> Iterator[tuple[int, tuple[int, bytes]]]:
    """(offset, (record length, checksum)) of records laid back to back from `start`."""
    for entry in entries:
        yield start, entry
        start += entry[0]


class _MissingObject(IntegrityError):
    """An object a generation names is not there: that generation is incomplete."""


class NoCompleteGeneration(IntegrityError):
    """Every generation of a token names a missing object, and none is damaged: what a copy
    taken while the token was first stored (or deleted) holds."""


def _check_tables(parsed: ParsedFile) -> None:
    """Read the whole manifest, so that its digest (which covers the object table) is checked."""
    for _ in parsed.manifest_blocks():
        pass


def _reason(token: uuid.UUID, e: BaseException) -> str:
    return str(e).removeprefix(f"token {token}: ")


@dataclass
class _Run:
    """Manifest entries stored back to back in one object."""

    obj: int
    off: int
    end: int
    first: int  # chunk index of the first
    lengths: list[int]
    digests: list[bytes]


def _first_short(lengths: list[int], got: int) -> int:
    acc = 0
    for k, n in enumerate(lengths):
        acc += n
        if acc > got:
            return k
    return len(lengths) - 1


def _check_digests(
    token: uuid.UUID, records: bytes, run: _Run, checksum: Callable[[memoryview], bytes]
) -> None:
    bad = first_bad_record(records, run.lengths, run.digests, checksum)
    if bad is not None:
        raise IntegrityError(f"token {token}: chunk {run.first + bad} checksum mismatch (modified)")
