"""The tamper-evident audit log (`hsm_audit.log`).

Line format (compat.md, with two fields added at the end):

    timestamp|event_type|key_name|user_id|details|success|seq|chain

`seq` counts from 1 without gaps across the life of the log (also across rotated files) and
`chain` is HMAC-SHA256(audit key, "vhsm-audit-v1\\0" + previous chain (32 bytes) + the line up to
and including its seq), hex. The audit key is a random 32-byte file beside the log
(`.hsm_audit.log.key`, 0600): the token CLI, which never has the key service's master key, must be
able to extend the same chain. The last (seq, chain) is also kept beside the log in
`.hsm_audit.log.head` so that deleting lines from the end is detected.

Writers in any process serialize on flock(`.hsm_audit.log.lock`); a batch of lines is written
with one write() and made durable with one fdatasync() before anybody is told it succeeded
(group commit). If anything fails, the partial write is cut off again and AuditError is raised:
the caller must then fail the operation (fail-closed).

The log and its sidecars are opened only through keysvc.safefs, relative to the fd of the log's
directory: never through a symlink, a FIFO, a device or a hard link, never if another user owns
them, and every read of a sidecar is bounded by its format.
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import json
import math
import os
import pwd
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac

from keysvc import auditchain, paths, safefs
from keysvc.errors import (
    AuditError,
    AuditIntegrityError,
    DaemonError,
    InvalidInputError,
    NoAuditLogError,
)

EVENTS = frozenset(
    {
        "KEY_CREATED",
        "KEY_ACCESSED",
        "KEY_MODIFIED",
        "KEY_DELETED",
        "KEY_ROTATED",
        "AUTH_SUCCESS",
        "AUTH_FAILURE",
        "SIGN_OPERATION",
        "VERIFY_OPERATION",
        "ENCRYPTION",
        "DECRYPTION",
        "CONFIG_CHANGE",
        "SECURITY_VIOLATION",
    }
)

HEADER = (
    "# Virtual HSM Audit Log\n"
    "# Format: timestamp|event_type|key_name|user_id|details|success|seq|chain\n"
)
TS_FORMAT = "%Y-%m-%d %H:%M:%S"
_DOMAIN = b"vhsm-audit-v1\0"
_START_DOMAIN = b"vhsm-audit-v1 chain-start\0"
_GENESIS = bytes(32)
_MAX_FIELD = 2048  # characters after escaping; keeps every line well under one page
_CHAIN_START_RE = re.compile(r"^# Chain-Start: seq=(\d+) prev=([0-9a-f]{64}) mac=([0-9a-f]{64})$")
_HEAD_FMT = "vhsm-audit-head v1 seq={seq:020d} chain={chain}\n"
_HEAD_RE = re.compile(r"^vhsm-audit-head v1 seq=(\d{20}) chain=([0-9a-f]{64})$")
KEY_LEN = 32  # .hsm_audit.log.key
_HEAD_LIMIT = 512  # .hsm_audit.log.head holds one ~110-byte line
_USER_LIMIT = 4096  # .hsm_user: one user name of at most 256 characters


# --- fields ------------------------------------------------------------------------------------

# `%` and `|` (the separator), and every character that could drive a terminal or forge a line
# when someone runs `cat`/`tail -f` on the log: control characters (C0, DEL, C1), bidirectional
# formatting characters and the Unicode line/paragraph separators (the same set cli/display.py
# escapes on output). A denied socket client chooses the key name of its AUTH_FAILURE line.
_ESCAPE_RE = re.compile(
    "[%|\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
    "\ud800-\udfff]"  # lone surrogates (from JSON "\\udXXX"): UTF-8 cannot encode them raw
)
_UNESCAPE_RE = re.compile(r"(?:%[0-9A-F]{2})+")


def _percent(m: re.Match[str]) -> str:
    return "".join(f"%{b:02X}" for b in m.group(0).encode("utf-8", "surrogatepass"))


def escape_field(value: str) -> str:
    """Percent-escape (UTF-8 bytes as %XX) `%`, `|` and the characters above, so a field can
    never forge a separator or a line, nor drive the terminal of whoever reads the log."""
    if len(value) <= _MAX_FIELD and value.isprintable() and "%" not in value and "|" not in value:
        return value  # the common case, without a regex pass
    out = _ESCAPE_RE.sub(_percent, value)
    if len(out) > _MAX_FIELD:
        out = out[: _MAX_FIELD - 3]
        # never cut an escape sequence in half
        cut = out.rfind("%", len(out) - 2)
        if cut != -1:
            out = out[:cut]
        out += "..."
    return out


def unescape_field(value: str) -> str:
    """The field as it was given. Logs written before more characters were escaped hold only
    %25 %7C %0A %0D, and never a bare `%`: they read the same."""
    return _UNESCAPE_RE.sub(
        lambda m: bytes.fromhex(m.group(0).replace("%", "")).decode("utf-8", "replace"), value
    )


@dataclass(slots=True)
class AuditRecord:
    """One event before it is written: the writer adds timestamp, seq and chain."""

    event: str
    key: str
    user: str
    details: str
    success: bool
    uid: int | None = None

    def body(self, ts: str, seq: int) -> str:
        details = self.details if self.uid is None else f"{self.details} [uid={self.uid}]"
        return "|".join(
            (
                ts,
                self.event,
                escape_field(self.key or "N/A"),
                escape_field(self.user),
                escape_field(details),
                "SUCCESS" if self.success else "FAILURE",
                str(seq),
            )
        )


@dataclass(slots=True, frozen=True)
class AuditEntry:
    """One parsed line of the log."""

    lineno: int
    timestamp: str
    event: str
    key: str
    user: str
    details: str
    success: bool
    seq: int
    chain: str

    def fields(self) -> list[str]:
        return [
            self.timestamp,
            self.event,
            self.key,
            self.user,
            self.details,
            "SUCCESS" if self.success else "FAILURE",
            str(self.seq),
            self.chain,
        ]


def _mac(key: bytes, prev: bytes, body: bytes) -> bytes:
    h = crypto_hmac.HMAC(key, hashes.SHA256())
    h.update(_DOMAIN)
    h.update(prev)
    h.update(body)
    return h.finalize()


def _start_mac(key: bytes, seq: int, prev: bytes) -> bytes:
    h = crypto_hmac.HMAC(key, hashes.SHA256())
    h.update(_START_DOMAIN + str(seq).encode() + b"\0" + prev)
    return h.finalize()


def _chain_start_line(key: bytes, seq: int, prev: bytes) -> str:
    return f"# Chain-Start: seq={seq} prev={prev.hex()} mac={_start_mac(key, seq, prev).hex()}\n"


# --- user context -----------------------------------------------------------------------------


def unix_user(uid: int | None = None) -> str:
    uid = os.getuid() if uid is None else uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


def validate_user(user: str) -> str:
    user = user.strip()
    # Surrogates: argv and JSON can carry lone ones (undecodable bytes), which no UTF-8 line
    # can hold. C1 and bidi characters pass here; every output escapes them.
    if (
        not user
        or len(user) > 256
        or any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in user)
    ):
        raise InvalidInputError("a user name must be 1-256 printable characters")
    return user


def current_user(data_dir: str | os.PathLike[str] | None = None) -> str:
    """The persisted `set_user` context of this data dir, else the Unix login name."""
    path = paths.user_file(data_dir)
    raw = safefs.read_file(path, "user context", AuditError, limit=_USER_LIMIT)
    if raw is None:
        return unix_user()
    try:
        text = raw.decode("utf-8").strip()
        return validate_user(text) if text else unix_user()
    except (UnicodeDecodeError, InvalidInputError):
        raise AuditError(f"user context {path} does not hold a valid user name") from None


def persist_user(user: str, data_dir: str | os.PathLike[str] | None = None) -> None:
    data = (validate_user(user) + "\n").encode()
    with safefs.open_dir(paths.data_dir(data_dir), "data dir", InvalidInputError) as d:
        d.replace(paths.USER_FILE_NAME, "user context", data, mode=0o600)


# --- writer -----------------------------------------------------------------------------------


class AuditWriter:
    """Appends chained lines to one log file. Thread-safe; serialized across processes by flock.

    The daemon keeps one writer for its whole life and calls `append` once per batch; it
    remembers the tail (inode, size, seq, chain) so that the common case needs no read of the
    log, and re-reads the tail whenever another process (a CLI run, logrotate) changed the file.
    """

    def __init__(self, log_path: str | os.PathLike[str]) -> None:
        self.path = Path(log_path)
        self._key_path = paths.audit_sidecar(self.path, "key")
        self._head_path = paths.audit_sidecar(self.path, "head")
        self._lock_path = paths.audit_sidecar(self.path, "lock")
        self._dir: safefs.Dir | None = None  # the log's directory: all four files are in it
        self._key: bytes | None = None
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._head_fd: int | None = None
        self._tail: tuple[int, int, int, bytes] | None = None  # (ino, size, seq, chain)
        self._hbase: crypto_hmac.HMAC | None = None
        self._mutex = threading.Lock()
        self._head_lock = threading.Lock()
        self._head_seq = 0

    # -- public

    def append(
        self,
        records: Sequence[AuditRecord],
        before_write: Callable[[int], None] | None = None,
    ) -> int:
        """Write all records durably, in order; return the last seq. Raises AuditError.

        `before_write(last_seq)` runs under the writers' lock once the seq the batch will end
        at is known, before anything is written; if it raises, nothing is written. The key
        service uses it to save keystore.dat stamped with exactly that seq."""
        if not records:
            return self._tail[2] if self._tail else 0
        for r in records:
            if r.event not in EVENTS:
                raise AuditError(f"unknown audit event type {r.event!r}")
        with self._mutex:
            try:
                return self._append_locked(records, before_write)
            except AuditError:
                self._tail = None
                raise
            except OSError as e:
                self._tail = None
                raise AuditError(f"cannot write audit log {self.path}: {e.strerror}") from None

    def close(self) -> None:
        with self._mutex:
            for name in ("_fd", "_lock_fd", "_head_fd"):
                fd = getattr(self, name)
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                    setattr(self, name, None)
            if self._dir is not None:
                self._dir.close()
                self._dir = None
            self._tail = None

    # -- internals

    def _append_locked(
        self, records: Sequence[AuditRecord], before_write: Callable[[int], None] | None
    ) -> int:
        if self._lock_fd is None:
            self._lock_fd = self._log_dir().open_lock(self._lock_path.name, "audit lock")
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            fd, st = self._open_log()
            self._open_head(create=False)  # a bad head is refused before any line is written
            prefix = ""
            if (
                self._tail is not None
                and self._tail[0] == st.st_ino
                and self._tail[1] == st.st_size
            ):
                _, size, seq, prev = self._tail
            else:
                size, seq, prev, prefix, extra = self._recover(fd, st.st_size)
                records = [*extra, *records]
            key = self._load_key(allow_create=(size == 0 and seq == 0))
            if prefix == "" and size == 0:
                prefix = HEADER
                if seq:
                    prefix += _chain_start_line(key, seq, prev)
            if before_write is not None:
                before_write(seq + len(records))
            ts = time.strftime(TS_FORMAT, time.localtime())
            parts = [prefix] if prefix else []
            base = self._mac_base(key)
            for r in records:
                seq += 1
                body = r.body(ts, seq)
                h = base.copy()  # cheaper than a new HMAC per line; same value as _mac()
                h.update(prev)
                h.update(body.encode())
                prev = h.finalize()
                parts.append(f"{body}|{prev.hex()}\n")
            data = "".join(parts).encode()
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fdatasync(fd)
            except OSError:
                # cut off whatever part of the batch reached the file: no half line may stay
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                    os.fdatasync(fd)
                raise
            new_size = size + len(data)
            self._tail = (st.st_ino, new_size, seq, prev)
            self._write_head(seq, prev)
            return seq
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _log_dir(self) -> safefs.Dir:
        if self._dir is None:
            self._dir = safefs.open_dir(self.path.parent, "audit log directory", AuditError)
        return self._dir

    def _open_log(self) -> tuple[int, os.stat_result]:
        """The log fd, reopened if the path now names another file (rotation, deletion)."""
        d = self._log_dir()
        if self._fd is not None:
            st_path = d.lstat(self.path.name)
            st_fd = os.fstat(self._fd)
            if st_path is not None and (st_path.st_ino, st_path.st_dev) == (
                st_fd.st_ino,
                st_fd.st_dev,
            ):
                return self._fd, st_fd
            os.close(self._fd)
            self._fd = None
            self._tail = None
        # in place: appended to, so it must not be another file's hard link
        opened = d.open_file(
            self.path.name,
            "audit log",
            os.O_WRONLY | os.O_APPEND,
            create_mode=0o600,
            single_link=True,
        )
        assert opened is not None  # create_mode given
        self._fd, created = opened
        if created:
            d.fsync()
        return self._fd, os.fstat(self._fd)

    def _recover(self, fd: int, size: int) -> tuple[int, int, bytes, str, list[AuditRecord]]:
        """Find the tail of a log some other writer touched: (size, seq, chain, prefix, extra).

        A final line without newline was never acknowledged (acks follow fdatasync of whole
        lines), so it is cut off and the cut is itself recorded. A log that cannot continue the
        chain the head (or the audit key) shows -- tail cut, emptied, deleted, head gone -- gets
        a chain-break record (keysvc/auditchain.py) before anything else.
        """
        extra: list[AuditRecord] = []
        head = read_head(self.path)
        if head is None:
            self._forget_head()
        if size == 0:
            return self._start_file(head, extra)
        tail, at_start = _read_tail(self.path, size)
        if not tail.endswith(b"\n"):
            cut = tail.rfind(b"\n") + 1
            torn = len(tail) - cut
            size -= torn
            tail = tail[:cut]
            os.ftruncate(fd, size)
            os.fdatasync(fd)
            extra.append(
                AuditRecord(
                    "SECURITY_VIOLATION",
                    "N/A",
                    auditchain.WRITER_USER,
                    f"torn unacknowledged final line ({torn} bytes) removed",
                    False,
                )
            )
        seq, prev = 0, _GENESIS
        found = False
        for raw in reversed(tail.split(b"\n")):
            if not raw:
                continue
            line = raw.decode("utf-8", "replace")
            if line.startswith("#"):
                m = _CHAIN_START_RE.match(line)
                if m:
                    seq, prev, found = int(m.group(1)), bytes.fromhex(m.group(2)), True
                    break
                continue
            fields = line.split("|")
            if len(fields) != 8 or not fields[6].isdigit():
                raise AuditError(
                    f"audit log {self.path} ends with a malformed line; run: vhsm audit verify"
                )
            seq, prev, found = int(fields[6]), bytes.fromhex(fields[7]), True
            break
        if not found and not at_start:
            raise AuditError(f"cannot find the last entry of audit log {self.path}")
        if head is not None and head[0] > seq:
            extra.insert(
                0, _chain_break(f"log truncated: head records seq {head[0]}, log ends at seq {seq}")
            )
        elif head is None and seq:
            extra.insert(
                0,
                _chain_break(
                    f"head {self._head_path.name} missing: log ends at seq {seq}, "
                    "a cut tail cannot be ruled out"
                ),
            )
        return size, seq, prev, "", extra

    def _start_file(
        self, head: tuple[int, bytes] | None, extra: list[AuditRecord]
    ) -> tuple[int, int, bytes, str, list[AuditRecord]]:
        """The log is new, rotated away, emptied or deleted: where does its chain continue?

        A rotated file beside the log that ends with the head's entry makes this a rotation:
        the new file continues the chain with a MAC'd chain-start line. Anything else that
        shows a chain existed (a head, the audit key) makes it a break."""
        if head is None:
            if self._key is not None or self._log_dir().lstat(self._key_path.name) is not None:
                extra.append(
                    _chain_break(
                        "log and head missing while the audit key exists: "
                        "a new chain starts at seq 1"
                    )
                )
            return 0, 0, _GENESIS, "", extra
        key = self._load_key(allow_create=False)
        for sibling in auditchain.rotated_siblings(self.path):
            end = _chain_end_in(sibling, head, key)
            if end is not None:
                return 0, end[0], end[1], "", extra
        extra.append(
            _chain_break(
                f"log emptied or removed: head records seq {head[0]} but no rotated file "
                f"({self.path.name}.N, {self.path.name}-DATE) ends there"
            )
        )
        return 0, head[0], head[1], "", extra

    def _forget_head(self) -> None:
        """The head file is gone: recreate it on the next write (an fd kept open would write
        into the deleted file, and the seq guard would refuse a chain restarting at 1)."""
        with self._head_lock:
            if self._head_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._head_fd)
                self._head_fd = None
            self._head_seq = 0

    def _mac_base(self, key: bytes) -> crypto_hmac.HMAC:
        if self._hbase is None:
            h = crypto_hmac.HMAC(key, hashes.SHA256())
            h.update(_DOMAIN)
            self._hbase = h
        return self._hbase

    def _load_key(self, *, allow_create: bool) -> bytes:
        if self._key is not None:
            return self._key
        d = self._log_dir()
        key = d.read(self._key_path.name, "audit key", limit=KEY_LEN, secret=True)
        if key is None:
            if not allow_create:
                raise AuditError(
                    f"audit key {self._key_path} is missing but {self.path} has entries"
                )
            key = os.urandom(KEY_LEN)
            d.create(self._key_path.name, "audit key", key)
        if len(key) != KEY_LEN:
            raise AuditError(f"audit key {self._key_path} must be 32 bytes")
        self._key = key
        return key

    def _write_head(self, seq: int, chain: bytes) -> None:
        # Written after the log's fdatasync, so on disk the head never runs ahead of the log.
        # Not fsynced itself: after a power cut it may lag the log, never lead it (see docs).
        with self._head_lock:
            if seq <= self._head_seq:
                return  # never move the head backwards
            line = _HEAD_FMT.format(seq=seq, chain=chain.hex()).encode()
            os.pwrite(self._open_head(create=True), line, 0)
            self._head_seq = seq

    def _open_head(self, *, create: bool) -> int:
        """The head's fd (-1 while it does not exist and `create` is false)."""
        if self._head_fd is None:
            opened = self._log_dir().open_file(
                self._head_path.name,
                "audit head",
                os.O_WRONLY,
                create_mode=0o600 if create else None,
                single_link=True,  # written in place
            )
            if opened is None:
                return -1
            self._head_fd = opened[0]
        return self._head_fd


def _read_tail(path: Path, size: int) -> tuple[bytes, bool]:
    """The last complete lines of the log (at least one entry line if there is one)."""
    buf = b""
    f = _open_log_reader(path, AuditError)
    if f is None:
        raise AuditError(f"audit log {path} disappeared while it was being read")
    with f:
        for pos, buf in _tail_blocks(f, size, 8192):
            lines = buf.rstrip(b"\n").split(b"\n")
            # a complete entry line: not the first fragment unless we reached the start
            candidates = lines[1:] if pos > 0 else lines
            if any(c and not c.startswith(b"#") for c in candidates) or any(
                c.startswith(b"# Chain-Start") for c in candidates
            ):
                return (buf if pos == 0 else buf[buf.index(b"\n") + 1 :]), pos == 0
            if len(buf) > 2 * _MAX_LINE:  # the last entry lies within the last line's length
                raise AuditError(
                    f"audit log {path} ends with a line longer than any entry; "
                    "run: vhsm audit verify"
                )
        return buf, True


def _tail_blocks(f: BinaryIO, size: int, block: int) -> Iterator[tuple[int, bytes]]:
    """Read a file backwards from `size`: yields (start offset, everything from there to the
    end), the block doubling each time, until the caller stops or the start is reached."""
    pos, buf = size, b""
    while pos > 0:
        step = min(block, pos)
        pos -= step
        f.seek(pos)
        buf = f.read(step) + buf
        yield pos, buf
        block *= 2


# Longer than any line a writer makes (three fields of at most _MAX_FIELD escaped characters,
# up to 4 bytes each, and a few short ones): anything longer is not an entry, and a reader never
# holds more of it than this.
_MAX_LINE = 64 * 1024


def _log_lines(f: BinaryIO) -> Iterator[tuple[int, bytes | None, bool]]:
    """(line number, the line without its newline, whether a newline ended it) for each line
    of a log, read in pieces of at most _MAX_LINE: a line longer than that comes as None (read
    past, never held), so an edited or planted file of any size costs bounded memory. Only
    the last line can lack its newline."""
    n = 0
    while raw := f.readline(_MAX_LINE):
        n += 1
        if raw.endswith(b"\n"):
            yield n, raw[:-1], True
        elif len(raw) < _MAX_LINE:
            yield n, raw, False  # the end of the file
        else:
            while raw and not raw.endswith(b"\n"):
                raw = f.readline(_MAX_LINE)
            yield n, None, bool(raw)


def _open_log_reader(
    log_path: str | os.PathLike[str], error: safefs.Error = AuditError
) -> BinaryIO | None:
    return safefs.open_reader(log_path, "audit log", error)


def _chain_break(reason: str) -> AuditRecord:
    return AuditRecord(
        auditchain.BREAK_EVENT,
        "N/A",
        auditchain.WRITER_USER,
        auditchain.BREAK_PREFIX + reason,
        False,
    )


# Bytes read back from the end of a log at most, in one buffer (a rotated file's end, the uses
# after the keystore's stamp); past that a reader gives up or streams (_log_lines).
_TAIL_SCAN_MAX = 16 << 20


def _chain_end_in(path: Path, head: tuple[int, bytes], key: bytes) -> tuple[int, bytes] | None:
    """(seq, chain) at the end of `path`, a rotated copy of the log, if it holds the entry the
    head records followed only by entries that extend the chain (MAC-checked: after a power cut
    the head may lag the log by a few lines). None if it is not that file (an older rotation,
    another log, something planted). A torn final line there was never acknowledged: ignored."""
    try:  # checked like the log itself; anything unsafe there is simply not the rotated log
        f = safefs.open_reader(path, "rotated audit log", AuditError)
    except AuditError:
        return None
    if f is None:
        return None
    hseq, hchain = head
    with f:
        st = os.fstat(f.fileno())
        lines: list[bytes] = []
        for pos, buf in _tail_blocks(f, st.st_size, 8192):
            lines = buf.split(b"\n")[0 if pos == 0 else 1 : -1]
            first = next((e for e in map(_parse_raw, lines) if e is not None), None)
            if (first is not None and first.seq <= hseq) or len(buf) >= _TAIL_SCAN_MAX:
                break
    start = next(
        (
            i
            for i, raw in enumerate(lines)
            if (e := _parse_raw(raw)) is not None
            and e.seq == hseq
            and _ct_eq(e.chain, hchain.hex())
        ),
        None,
    )
    if start is None:
        return None
    seq, prev = hseq, hchain
    for raw in lines[start + 1 :]:
        e = _parse_raw(raw)
        if e is None or e.seq != seq + 1:
            return None
        mac = _mac(key, prev, raw.rsplit(b"|", 1)[0])
        if not _ct_eq(mac.hex(), e.chain):
            return None
        seq, prev = e.seq, mac
    return seq, prev


def _parse_raw(raw: bytes) -> AuditEntry | None:
    return None if raw.startswith(b"#") else parse_line(raw.decode("utf-8", "replace"), 0)


def read_head(log_path: str | os.PathLike[str]) -> tuple[int, bytes] | None:
    head_path = paths.audit_sidecar(Path(log_path), "head")
    raw = safefs.read_file(head_path, "audit head", AuditError, limit=_HEAD_LIMIT)
    if raw is None:
        return None
    m = _HEAD_RE.match(raw.decode("ascii", "replace").strip())
    if not m:
        raise AuditError(f"audit head {head_path} is malformed")
    return int(m.group(1)), bytes.fromhex(m.group(2))


# --- the API used by other components ---------------------------------------------------------

_writers: dict[Path, AuditWriter] = {}
_writers_lock = threading.Lock()


def writer_for(log_path: str | os.PathLike[str] | None = None) -> AuditWriter:
    path = paths.audit_log_path(log_path).absolute()
    with _writers_lock:
        w = _writers.get(path)
        if w is None:
            w = _writers[path] = AuditWriter(path)
        return w


def audit_event(
    event_type: str,
    key_name: str,
    details: str,
    success: bool,
    *,
    user: str | None = None,
    log_path: str | os.PathLike[str] | None = None,
) -> None:
    """Append one chained, sequenced, fsync'd line; raise AuditError if it cannot be written.

    The log is `log_path`, else $HSM_AUDIT_LOG, else <$HSM_DATA_DIR or cwd>/hsm_audit.log.
    `user` defaults to the persisted `set_user` context (else the Unix login name); the real
    uid of the process is always recorded in the details as `[uid=N]`.
    """
    if event_type not in EVENTS:
        raise AuditError(f"unknown audit event type {event_type!r}")
    who = user if user is not None else current_user()
    writer_for(log_path).append(
        [AuditRecord(event_type, key_name or "N/A", who, details, success, os.getuid())]
    )


def acknowledge_breaks(
    reason: str,
    *,
    user: str | None = None,
    log_path: str | os.PathLike[str] | None = None,
) -> int:
    """Record that an operator accepts every chain break recorded so far (a deliberate reset,
    a restore from backup): one chained CONFIG_CHANGE line with the reason, the user and the
    real uid. Breaks recorded later are not covered. Returns the seq of that line.

    If the log itself is damaged (cut, emptied, deleted), the writer records that break first,
    in the same write: the acknowledgment then covers it too."""
    reason = " ".join(reason.split())
    if not reason:
        raise InvalidInputError("an acknowledgment needs a reason (--reason TEXT)")
    who = user if user is not None else current_user()
    record = AuditRecord(
        auditchain.ACK_EVENT, "N/A", who, auditchain.ACK_PREFIX + reason, True, os.getuid()
    )
    return writer_for(log_path).append([record])


# --- reading and verifying --------------------------------------------------------------------


def parse_line(line: str, lineno: int) -> AuditEntry | None:
    fields = line.split("|")
    if len(fields) != 8 or fields[5] not in ("SUCCESS", "FAILURE") or not fields[6].isdigit():
        return None
    return AuditEntry(
        lineno,
        fields[0],
        fields[1],
        unescape_field(fields[2]),
        unescape_field(fields[3]),
        unescape_field(fields[4]),
        fields[5] == "SUCCESS",
        int(fields[6]),
        fields[7],
    )


def read_entries(log_path: str | os.PathLike[str]) -> Iterator[AuditEntry]:
    """Entries of one log (comment lines skipped, malformed lines skipped)."""
    raw = _open_log_reader(log_path)
    if raw is None:
        return
    with raw as f:
        yield from _entries_in(f)


def _entries_in(f: BinaryIO) -> Iterator[AuditEntry]:
    for n, line, _ in _log_lines(f):
        if line and not line.startswith(b"#"):
            e = parse_line(line.decode("utf-8", "replace"), n)
            if e is not None:
                yield e


def cutoff(days: float) -> str:
    """The timestamp `days` days ago, as the log writes it ("" before the epoch: everything)."""
    if not math.isfinite(days) or days < 0:
        raise InvalidInputError(f"DAYS must be a non-negative number, got {days:g}")
    now = time.time()
    if days * 86400 >= now:
        return ""
    return time.strftime(TS_FORMAT, time.localtime(now - days * 86400))


def entries_since(log_path: str | os.PathLike[str], days: float | None) -> list[AuditEntry]:
    """Entries of the last `days` days (`audit logs`; None: all of them). A log that is
    missing while its head exists was rotated away and nothing was written since: no entries.
    Neither the log nor its head: nothing was ever logged there (most likely the wrong data
    dir), an error."""
    since = "" if days is None else cutoff(days)
    f = _open_log_reader(log_path)
    if f is None:
        if read_head(log_path) is None:
            head = paths.audit_sidecar(Path(log_path), "head")
            raise NoAuditLogError(
                f"no audit log {log_path} and no head {head.name}: nothing was logged there"
            )
        return []
    with f:
        return [e for e in _entries_in(f) if e.timestamp >= since]


def entries_to_json(entries: Iterable[AuditEntry]) -> bytes:
    """The daemon's `audit_logs` payload: one array of the 8 fields per entry."""
    return json.dumps([e.fields() for e in entries], ensure_ascii=True).encode()


def entries_from_json(raw: bytes) -> list[AuditEntry]:
    try:
        rows = json.loads(raw)
        out = []
        for r in rows:
            if not (isinstance(r, list) and len(r) == 8 and all(isinstance(x, str) for x in r)):
                raise ValueError
            ts, ev, key, user, details, ok, seq, chain = r
            out.append(AuditEntry(0, ts, ev, key, user, details, ok == "SUCCESS", int(seq), chain))
        return out
    except (ValueError, TypeError):
        raise DaemonError("the key service sent a malformed audit_logs reply") from None


def entries_after(log_path: str | os.PathLike[str], seq: int) -> list[AuditEntry]:
    """Entries with a sequence number above `seq`, read backwards from the end of the log so
    that the usual case (a few new lines) reads one block. Further back than _TAIL_SCAN_MAX
    (many uses since the stamp, or a line no writer makes) the log is streamed from its start
    instead, in bounded lines."""
    f = _open_log_reader(log_path)
    if f is None:
        return []
    pos, buf = 0, b""
    with f:
        for pos, buf in _tail_blocks(f, f.seek(0, os.SEEK_END), 65536):
            lines = buf.split(b"\n")[0 if pos == 0 else 1 :]
            first = next((ln for ln in lines if ln and not ln.startswith(b"#")), None)
            e = parse_line(first.decode("utf-8", "replace"), 0) if first else None
            if e is not None and e.seq <= seq:
                break
            if len(buf) >= _TAIL_SCAN_MAX:
                f.seek(0)
                return _entries_above(seq, (raw for _, raw, _ in _log_lines(f) if raw))
    return _entries_above(seq, buf.split(b"\n")[0 if pos == 0 else 1 :])


def _entries_above(seq: int, lines: Iterable[bytes]) -> list[AuditEntry]:
    out = []
    for raw in lines:
        if raw and not raw.startswith(b"#"):
            e = parse_line(raw.decode("utf-8", "replace"), 0)
            if e is not None and e.seq > seq:
                out.append(e)
    return out


@dataclass
class VerifyResult:
    ok: bool
    entries: int
    last_seq: int
    message: str


def verify(log_paths: Iterable[str | os.PathLike[str]]) -> VerifyResult:
    """Check one log (or rotated logs oldest first) against its chain and head.

    Reports the first bad line: an edited line breaks its chain value, an inserted, deleted or
    reordered line breaks the sequence (or the chain), and a log that ends before the head
    says it should has lost its tail. A check that checked nothing (no entries), a missing head
    (a cut tail would go unnoticed) and a chain break a writer recorded that no later
    acknowledgment covers (keysvc/auditchain.py) fail too. The last file is the live log: its
    sidecars hold the key and the head; given after rotated files, it may be missing or empty
    (rotated, nothing written since).
    """
    files = [Path(p) for p in log_paths]
    if not files:
        raise InvalidInputError("no audit log given")
    key_path = paths.audit_sidecar(files[-1], "key")
    key = safefs.read_file(key_path, "audit key", AuditIntegrityError, limit=KEY_LEN, secret=True)
    if key is None:
        raise AuditIntegrityError(f"audit key {key_path} not found")
    head = read_head(files[-1])
    c = _Chain(key, head)
    for path in files:
        f = _open_log_reader(path, AuditIntegrityError)
        if f is None:
            if path is not files[-1] or len(files) == 1:
                raise AuditIntegrityError(f"{path}: audit log not found")
            continue
        with f:
            problem = c.read(f, path)
        if problem is not None:
            return VerifyResult(False, c.count, c.seq or 0, problem)
    last = c.seq or 0
    problem = _final_problem(files[-1], c.count, last, head, c.head_chain)
    problem = problem or c.breaks.first_open()
    if problem:
        return VerifyResult(False, c.count, last, problem)
    msg = f"OK: {c.count} entries, chain intact, last seq {last}"
    if c.first_start:
        # a rotated (or deleted) predecessor holds seq 1..first_start: say so, it is not here
        msg += f" (continues from seq {c.first_start}: verify older rotated files with it)"
    if c.breaks.acknowledged:
        msg += f" ({c.breaks.acknowledged} chain break(s) acknowledged)"
    return VerifyResult(True, c.count, last, msg)


@dataclass
class _Chain:
    """What verify() knows after the lines read so far, across rotated files."""

    key: bytes
    head: tuple[int, bytes] | None
    seq: int | None = None
    prev: bytes = _GENESIS
    count: int = 0
    first_start: int = 0
    head_chain: bytes | None = None  # our chain value at the head's seq, once read
    breaks: auditchain.Breaks = field(default_factory=auditchain.Breaks)

    def read(self, f: BinaryIO, path: Path) -> str | None:
        """Check one file's lines (streamed, bounded: _log_lines); the first problem, if any."""
        key = self.key
        in_header = True
        for n, raw, ended in _log_lines(f):
            where = f"{path}:{n}"
            if raw is None:
                return f"{where}: malformed line (edited or inserted)"
            if not ended:
                return f"{where}: incomplete final line"
            line = raw.decode("utf-8", "replace")
            if line.startswith("#"):
                if not in_header:
                    return f"{where}: comment line inside the log (inserted)"
                m = _CHAIN_START_RE.match(line)
                if m:
                    s, p = int(m.group(1)), bytes.fromhex(m.group(2))
                    if not _ct_eq(_start_mac(key, s, p).hex(), m.group(3)):
                        return f"{where}: forged chain-start line"
                    if self.seq is not None and (s != self.seq or p != self.prev):
                        return (
                            f"{where}: file does not continue the previous one "
                            f"(expected seq {self.seq})"
                        )
                    if self.seq is None:
                        self.first_start = s
                    self.seq, self.prev = s, p
                continue
            in_header = False
            entry = parse_line(line, n)
            if entry is None or len(entry.chain) != 64:
                return f"{where}: malformed line (edited or inserted)"
            expected = (self.seq or 0) + 1
            if entry.seq != expected:
                return (
                    f"{where}: sequence {entry.seq} where {expected} was expected "
                    "(a line was deleted, inserted or reordered)"
                )
            mac = _mac(key, self.prev, raw.rsplit(b"|", 1)[0])
            if not _ct_eq(mac.hex(), entry.chain):
                return f"{where}: chain value does not match (seq {entry.seq} edited or forged)"
            self.seq, self.prev = entry.seq, mac
            if self.head is not None and entry.seq == self.head[0]:
                self.head_chain = mac
            self.breaks.see(where, entry.seq, entry.event, entry.user, entry.details)
            self.count += 1
        return None


def _final_problem(
    log: Path,
    count: int,
    last: int,
    head: tuple[int, bytes] | None,
    head_chain: bytes | None,
) -> str | None:
    """What is wrong with a chain that read cleanly: nothing in it, or not what the head says."""
    if count == 0:
        return f"{log}: no entries: nothing was verified"
    if head is None:
        return (
            f"{log}: the head {paths.audit_sidecar(log, 'head').name} is missing, so a cut "
            "tail would go unnoticed (the next write records this as a chain break)"
        )
    hseq, hchain = head
    if hseq > last:
        return f"{log}: log ends at seq {last} but the head records seq {hseq} (tail truncated)"
    if head_chain is not None and not _ct_eq(head_chain.hex(), hchain.hex()):
        return f"{log}: entry seq {hseq} differs from the head (log rewritten)"
    return None


def _ct_eq(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def verify_or_raise(log_paths: Iterable[str | os.PathLike[str]]) -> VerifyResult:
    res = verify(log_paths)
    if not res.ok:
        raise AuditIntegrityError(res.message)
    return res
