"""The token store: store, retrieve, list, info, verify and delete tokens (docs/FORMAT.md).

Streaming throughout: a file is read, encrypted and written in runs of chunks through a bounded
ordered pipeline (vhsmfs.pipeline), so memory does not grow with file size. Plaintext is only
ever released into a temp file next to the destination, renamed into place after every chunk
authenticated and the whole-file SHA-256 matched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
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
    FIXED_HEADER,
    MANIFEST_ENTRY,
    MAX_CHUNK_COUNT,
    MAX_CHUNK_SIZE,
    MAX_META_JSON,
    MIN_CHUNK_SIZE,
    RECORD_OVERHEAD,
    SALT_LEN,
    Header,
    Metadata,
    ParsedFile,
    build_parts,
    chunk_count_for,
    manifest_digest,
    metadata_size_limit,
    parse_file,
    record_len,
)
from vhsmfs.keyfile import KeyProvider
from vhsmfs.outfile import OutputDirs, PendingFile, check_destination
from vhsmfs.pipeline import OrderedHasher, run_ordered
from vhsmfs.safefs import UnsafeEntryError
from vhsmfs.tokencrypto import ChunkAuthError, TokenKeys

RUN_TARGET = 1 << 20  # plaintext bytes per pipeline item: big enough to amortise overheads
OBJECT_TARGET = 64 << 20  # roll to a new object past this many bytes

Progress = Callable[[int], None]


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
    def header(self) -> Header:
        return self.parsed.header

    def entry(self, index: int) -> tuple[int, int, int, bytes]:
        return MANIFEST_ENTRY.unpack_from(self.parsed.manifest, index * MANIFEST_ENTRY.size)


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
        }


def _read_full(f, n: int) -> bytes:  # type: ignore[no-untyped-def]
    chunks = []
    while n > 0:
        b = f.read(n)
        if not b:
            break
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]


def _disk_error(e: OSError, where: str) -> VhsmError:
    if e.errno == errno.ENOSPC:
        return StoreError(f"no space left on device while writing {where}")
    if e.errno == errno.EDQUOT:
        return StoreError(f"disk quota exceeded while writing {where}")
    return StoreError(f"cannot write {where}: {e.strerror}")


class _ObjectSink:
    """Appends records to a token's objects, rolling to a new object past OBJECT_TARGET."""

    def __init__(self, backend: Backend, token: uuid.UUID, first_object: int) -> None:
        self._backend, self._token = backend, token
        self.next_object = first_object
        self._writer = None
        self._object = -1
        self._offset = 0

    def append(self, records: bytes | bytearray) -> tuple[int, int]:
        if self._writer is None or self._offset >= OBJECT_TARGET:
            self.finish()
            self._object = self.next_object
            self.next_object += 1
            self._writer = self._backend.new_object(self._token, self._object)
            self._offset = 0
        self._writer.write(records)
        at = self._offset
        self._offset += len(records)
        return self._object, at

    def finish(self) -> None:
        if self._writer is not None:
            self._writer.finish()
            self._writer = None

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


class TokenStore:
    def __init__(
        self,
        backend: Backend,
        keys: KeyProvider | None = None,
        *,
        chunk_size: int | None = None,
        parallel: int | None = None,
    ) -> None:
        self.backend = backend
        self.keys = keys
        self.chunk_size = chunk_size or chunk_size_from_env()
        self.parallel = parallel or parallel_from_env()
        if not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise VhsmError(f"chunk size {self.chunk_size} out of range")

    def _need_keys(self) -> KeyProvider:
        if self.keys is None:
            raise VhsmError("this operation needs the key (--key FILE)")
        return self.keys

    # -- metadata ---------------------------------------------------------------------------------
    def seal(
        self, keys: TokenKeys, header: Header, manifest: bytes | bytearray, meta: Metadata
    ) -> list[bytes | bytearray]:
        """The metadata file's parts (see format.build_parts), ready for commit_metadata.
        Refuses what readers would refuse: too many chunks, too much metadata."""
        check_chunk_count(meta.size, header.chunk_size, f"token {header.token_id}")
        doc = meta.to_json()
        if len(doc) > MAX_META_JSON:
            raise InputError(
                f"token {header.token_id}: its name and attributes take {len(doc)} bytes, more "
                f"than the format allows ({MAX_META_JSON})"
            )
        header_bytes = header.pack()
        nonce, ct = keys.seal_metadata(doc, header_bytes)
        return build_parts(header, manifest, nonce, ct)

    def parse(self, token: uuid.UUID) -> ParsedFile:
        """Read and split a token's metadata file, reading no more than its fixed header
        allows: a planted huge or endless file is refused before anything is allocated."""
        r = self.backend.open_metadata(token)
        try:
            limit = metadata_size_limit(r.pread(0, FIXED_HEADER.size), token)
            if r.size > limit:
                raise IntegrityError(
                    f"token {token}: metadata file is {r.size} bytes, more than its header "
                    f"allows ({limit})"
                )
            data = r.pread(0, r.size)
        finally:
            r.close()
        return parse_file(data, token)

    def open_token(self, token: uuid.UUID) -> OpenedToken:
        """Read and authenticate a token's metadata; WrongKeyError / IntegrityError otherwise."""
        parsed = self.parse(token)
        h = parsed.header
        try:
            ikm = self._need_keys().token_key(token, h.key_ref)
        except LookupError as e:
            raise WrongKeyError(f"wrong key for token {token}: {e}") from None
        keys = TokenKeys(ikm, h.salt, token)
        if not keys.key_matches(h.key_check):
            raise WrongKeyError(f"wrong key for token {token}")
        plain = keys.open_metadata(parsed.meta_nonce, parsed.meta_ciphertext, parsed.header_bytes)
        if plain is None:
            raise IntegrityError(f"token {token}: metadata failed authentication (modified)")
        try:
            meta = Metadata.from_json(plain)
        except (ValueError, KeyError, TypeError):
            raise IntegrityError(f"token {token}: metadata is malformed") from None
        opened = OpenedToken(token, parsed, keys, meta)
        self._check_layout(opened)
        return opened

    @staticmethod
    def _check_layout(t: OpenedToken) -> None:
        """The authenticated sizes must agree with the manifest's record lengths."""
        h, size = t.header, t.meta.size
        if size < 0 or chunk_count_for(size, h.chunk_size) != h.chunk_count:
            raise IntegrityError(f"token {t.token}: size and chunk count disagree")
        for i in (0, h.chunk_count - 1) if h.chunk_count else ():
            if t.entry(i)[2] != record_len(h.chunk_size, size, i, h.chunk_count):
                raise IntegrityError(f"token {t.token}: chunk {i} has the wrong length")

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
        f,
        *,
        name: str,
        st: os.stat_result,  # type: ignore[no-untyped-def]
        progress: Progress | None,
    ) -> uuid.UUID:
        token = uuid.uuid4()
        salt = os.urandom(SALT_LEN)
        ikm, key_ref = self._need_keys().new_token_key(token)
        keys = TokenKeys(ikm, salt, token)
        cs = self.chunk_size
        run_bytes = max(cs, (RUN_TARGET // cs) * cs)
        manifest = bytearray()
        hasher = OrderedHasher(hashlib.sha256())
        sink = _ObjectSink(self.backend, token, 0)
        total = 0

        def runs() -> Iterator[tuple[bytes, int, int]]:
            try:
                cur = _read_full(f, run_bytes)
                index = 0
                while cur:
                    nxt = _read_full(f, run_bytes) if len(cur) == run_bytes else b""
                    n = chunk_count_for(len(cur), cs)
                    check_chunk_count(index * cs + len(cur), cs, name)  # grew while stored
                    hasher.update(cur)
                    yield cur, index, (index + n - 1) if not nxt else -1
                    index += n
                    cur = nxt
            except OSError as e:
                raise InputError(f"cannot read {name}: {e.strerror}") from None

        def work(item: tuple[bytes, int, int]) -> tuple[bytearray, list[tuple[int, bytes]], int]:
            data, first, final = item
            records, entries = keys.encrypt_run(data, first, cs, final)
            return records, entries, len(data)

        def consume(result: tuple[bytearray, list[tuple[int, bytes]], int]) -> None:
            nonlocal total
            records, entries, plain_len = result
            obj, offset = sink.append(records)
            pack = MANIFEST_ENTRY.pack
            for rlen, digest in entries:
                manifest.extend(pack(obj, offset, rlen, digest))
                offset += rlen
            total += plain_len
            if progress:
                progress(plain_len)

        with self.backend.writing(token):
            try:
                try:
                    run_ordered(runs(), work, consume, workers=self.parallel)
                    sink.finish()
                except OSError as e:
                    raise _disk_error(e, f"token {token} to {self.backend.describe()}") from None
                now = time.time()
                header = Header(
                    token_id=token,
                    salt=salt,
                    key_check=keys.key_check,
                    generation=1,
                    chunk_size=cs,
                    chunk_count=len(manifest) // MANIFEST_ENTRY.size,
                    next_object_id=sink.next_object,
                    manifest_digest=manifest_digest(manifest),
                    key_ref=key_ref,
                )
                meta = Metadata(
                    name=name,
                    size=total,
                    sha256=hasher.digest().hex(),
                    mode=stat.S_IMODE(st.st_mode),
                    mtime_ns=st.st_mtime_ns,
                    atime_ns=st.st_atime_ns,
                    ctime_ns=time.time_ns(),
                    created=int(now),
                    parallel_chunks=self.parallel,
                )
                try:
                    self.backend.commit_metadata(token, self.seal(keys, header, manifest, meta))
                except OSError as e:
                    raise _disk_error(e, f"metadata of token {token}") from None
            except BaseException:
                sink.abort()
                hasher.close()
                with contextlib.suppress(OSError):
                    self.backend.discard_uncommitted(token)
                raise
        return token

    # -- reading ----------------------------------------------------------------------------------
    def _runs(self, t: OpenedToken) -> Iterator[tuple[int, int, list[int], int, list[bytes]]]:
        """Group consecutive manifest entries stored contiguously in one object into runs."""
        h = t.header
        limit = max(RUN_TARGET, h.chunk_size + RECORD_OVERHEAD)
        i = 0
        while i < h.chunk_count:
            obj, off, rlen, dig = t.entry(i)
            lengths, digests, first, end = [rlen], [dig], i, off + rlen
            i += 1
            while i < h.chunk_count and end - off < limit:
                o2, off2, rlen2, dig2 = t.entry(i)
                if o2 != obj or off2 != end:
                    break
                lengths.append(rlen2)
                digests.append(dig2)
                end += rlen2
                i += 1
            yield obj, off, lengths, first, digests

    def _decrypt_stream(
        self,
        t: OpenedToken,
        sink: Callable[[bytearray], None] | None,
        *,
        check_digests: bool,
        progress: Progress | None = None,
    ) -> None:
        """Authenticate and decrypt every chunk in order, feeding plaintext to `sink`; then check
        size and whole-file SHA-256. Raises IntegrityError naming the first bad part."""
        h, token = t.header, t.token
        readers: dict[int, ObjectReader] = {}
        final = h.chunk_count - 1
        hasher = OrderedHasher(hashlib.sha256())
        total = 0

        def reader(obj: int) -> ObjectReader:
            r = readers.get(obj)
            if r is None:
                try:
                    r = readers[obj] = self.backend.open_object(token, obj)
                except FileNotFoundError:
                    raise IntegrityError(f"token {token}: object {obj:08x} is missing") from None
            return r

        def work(item: tuple[int, int, list[int], int, list[bytes]]) -> bytearray:
            obj, off, lengths, first, digests = item
            want = sum(lengths)
            records = reader(obj).pread(off, want)
            if len(records) != want:
                bad = first + _first_short(lengths, len(records))
                raise IntegrityError(f"token {token}: chunk {bad} is truncated or missing")
            if check_digests:
                _check_digests(token, records, lengths, digests, first)
            try:
                return t.keys.decrypt_run(records, lengths, first, final)
            except ChunkAuthError as e:
                raise IntegrityError(
                    f"token {token}: chunk {e.index} failed authentication (modified, swapped "
                    "or reordered)"
                ) from None

        def consume(plain: bytearray) -> None:
            nonlocal total
            hasher.update(plain)
            if sink is not None:
                sink(plain)
            total += len(plain)
            if progress:
                progress(len(plain))

        try:
            run_ordered(self._runs(t), work, consume, workers=self.parallel)
            digest = hasher.digest()
        finally:
            hasher.close()
            for r in readers.values():
                r.close()
        if total != t.meta.size:
            raise IntegrityError(f"token {token}: size mismatch after decryption")
        if t.meta.sha256 is not None and not hmac.compare_digest(digest.hex(), t.meta.sha256):
            raise IntegrityError(f"token {token}: whole-file SHA-256 mismatch")

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
                self._decrypt_stream(t, pending.write, check_digests=False, progress=progress)
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
    def verify_ciphertext(self, token: uuid.UUID) -> None:
        """Without the key: metadata checksum, manifest digest, and each record's SHA-256."""
        parsed = self.parse(token)
        h = parsed.header
        full = h.chunk_size + RECORD_OVERHEAD
        entries = [
            MANIFEST_ENTRY.unpack_from(parsed.manifest, i * MANIFEST_ENTRY.size)
            for i in range(h.chunk_count)
        ]
        for i, (_, _, rlen, _) in enumerate(entries):
            if rlen != full if i < h.chunk_count - 1 else not RECORD_OVERHEAD < rlen <= full:
                raise IntegrityError(f"token {token}: chunk {i} has the wrong length")
        readers: dict[int, ObjectReader] = {}
        try:
            for i, (obj, off, rlen, dig) in enumerate(entries):
                if obj not in readers:
                    try:
                        readers[obj] = self.backend.open_object(token, obj)
                    except FileNotFoundError:
                        raise IntegrityError(
                            f"token {token}: object {obj:08x} is missing"
                        ) from None
                rec = readers[obj].pread(off, rlen)
                if len(rec) != rlen:
                    raise IntegrityError(f"token {token}: chunk {i} is truncated or missing")
                if not hmac.compare_digest(hashlib.sha256(rec).digest(), dig):
                    raise IntegrityError(f"token {token}: chunk {i} checksum mismatch (modified)")
        finally:
            for r in readers.values():
                r.close()

    def verify_full(self, token: uuid.UUID) -> None:
        """With the key: everything above plus decryption and the whole-file SHA-256."""
        t = self.open_token(token)
        self._decrypt_stream(t, None, check_digests=True)

    # -- list / info / delete ---------------------------------------------------------------------
    def summary(self, token: uuid.UUID) -> TokenSummary:
        parsed = self.parse(token)
        h = parsed.header
        stored = sum(self.backend.object_sizes(token).values())
        s = TokenSummary(token, h.chunk_size, h.chunk_count, h.generation, stored)
        if self.keys is not None:
            try:
                t = self.open_token(token)
            except WrongKeyError:
                return s
            m = t.meta
            s.name, s.size, s.sha256, s.created = m.name, m.size, m.sha256, m.created
            s.mtime_ns, s.mode, s.readable = m.mtime_ns, m.mode, True
            s.kind = "dir" if m.extra.get("kind") == "dir" else "file"
        return s

    def list_tokens(self) -> list[uuid.UUID]:
        return self.backend.token_ids()

    def delete(self, token: uuid.UUID) -> None:
        """Wipe a token. Needs no key and does not parse the metadata, so that a damaged token
        can be deleted too; TokenNotFoundError if there is no such token."""
        self.backend.delete_token(token)

    def collect_garbage(self) -> GarbageReport:
        """The backend's clean-up (interrupted deletes and stores, stale temp files), then the
        objects at or past each committed token's next_object_id: a writer killed before its
        commit (a mount) left them, and no commit refers to them. A token is only touched while
        no writer holds it; unsafe entries are refused and noted, never touched."""
        report = GarbageReport()
        self.backend.collect_garbage(report)
        for token in self.list_tokens():
            try:
                self._reclaim_past_end(token, report)
            except TokenNotFoundError:
                continue  # deleted meanwhile
            except UnsafeEntryError as e:
                report.refused.append(str(e))
            except VhsmError as e:  # damaged: verify reports it; gc leaves it as it is
                reason = str(e).removeprefix(f"token {token}: ")
                report.ignored.append(f"token {token} ({reason}; left alone)")
        return report

    def _reclaim_past_end(self, token: uuid.UUID, report: GarbageReport) -> None:
        with self.backend.idle(token) as idle:
            if not idle:
                return
            first_unused = self.parse(token).header.next_object_id  # read under the lock
            for obj in sorted(self.backend.object_sizes(token)):
                if obj >= first_unused:
                    self.backend.delete_object(token, obj)
                    report.removed.append(
                        f"removed object {obj:08x} of token {token} (left by an interrupted write)"
                    )


def _first_short(lengths: list[int], got: int) -> int:
    acc = 0
    for k, n in enumerate(lengths):
        acc += n
        if acc > got:
            return k
    return len(lengths) - 1


def _check_digests(
    token: uuid.UUID, records: bytes, lengths: list[int], digests: list[bytes], first: int
) -> None:
    view = memoryview(records)
    pos = 0
    for k, n in enumerate(lengths):
        if not hmac.compare_digest(hashlib.sha256(view[pos : pos + n]).digest(), digests[k]):
            raise IntegrityError(f"token {token}: chunk {first + k} checksum mismatch (modified)")
        pos += n
