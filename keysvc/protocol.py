"""The daemon's wire protocol (documented in docs/KEYSVC.md, "Daemon protocol").

Every message, in both directions, is one frame:

    u32 big-endian  length of everything that follows
    u8              protocol version (1)
    u32 big-endian  length J of the JSON header
    J bytes         JSON object (UTF-8): request {"op": ..., "key": ..., "id": ...} or
                    reply {"ok": true, ...} / {"ok": false, "error": code, "message": text}
    rest            binary payload (message to sign, signature, ciphertext, PEM, ...)

Requests on one connection are answered in order; a client may pipeline several. Binary data
never goes through JSON, so signing a large file costs no base64.

Everything a client sends is checked here, once, before the service sees it (any local user who
can open the socket can send anything, including users the policy denies):

* framing: frame length (MAX_FRAME), header length (MAX_HEADER), protocol version;
* JSON: well-formed UTF-8, an object, at most MAX_CONTAINERS arrays/objects (so nesting cannot
  exhaust the stack), numbers finite and within +-MAX_INT (no NaN/Infinity, no 1e999, no
  4000-digit integers), strings of Unicode scalar values (no lone surrogates, which could not be
  encoded into an audit line later);
* `check_request`: the known fields of each operation have the right type and range (the
  service calls it for in-process requests too, so both paths refuse the same values).

`FrameReader` splits one connection's byte stream and decides on a frame as soon as its header
is complete, before its payload is buffered: a refused request's payload is discarded as it
arrives, so a caller the policy denies cannot make the daemon hold more than one header.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from typing import Any

from keysvc.errors import DaemonError, InvalidInputError, KeysvcError

VERSION = 1
MAX_PAYLOAD = 256 * 1024 * 1024
MAX_HEADER = 64 * 1024  # JSON header of a request; ours are a few hundred bytes
MAX_FRAME = MAX_PAYLOAD + MAX_HEADER  # largest message: 256 MiB payload plus header
MAX_CONTAINERS = 16  # arrays/objects in one header (requests are flat: one object)
MAX_INT = 2**53  # every JSON implementation represents integers up to here exactly
_LEN = struct.Struct(">I")
_HDR = struct.Struct(">BI")
_PREFIX = _LEN.size + _HDR.size  # length, version, header length


class _Refused(ValueError):
    """A JSON value the protocol does not accept (raised from the decoder's hooks)."""


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a number")


# Built once: json.dumps/json.loads with arguments build a new encoder/decoder on every call,
# which is a large part of the per-request cost at thousands of requests per second.
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode
_loads = json.JSONDecoder(parse_constant=_no_constant).decode
# Headers repeat (the same op on the same key from the same client): parse and check each once.
_HEADER_CACHE: dict[bytes, dict[str, Any]] = {}
_CACHE_MAX_HEADER = 256
_CACHE_MAX_ENTRIES = 4096


_KEY_PREFIX: dict[str, str] = {}  # '"name":' for header names that need no escaping


def _header_json(header: dict[str, Any]) -> str:
    """JSON for the common flat header of ints and booleans without the generic encoder
    (which costs more than the signature check of a small request); anything else falls back."""
    parts = []
    for k, v in header.items():
        prefix = _KEY_PREFIX.get(k)
        if prefix is None:
            if not (k.isascii() and k.isidentifier()) or len(_KEY_PREFIX) > 256:
                return _dumps(header)
            prefix = _KEY_PREFIX[k] = f'"{k}":'
        if v is True:
            parts.append(prefix + "true")
        elif v is False:
            parts.append(prefix + "false")
        elif v is None:
            parts.append(prefix + "null")
        elif type(v) is int:
            parts.append(prefix + str(v))
        else:
            return _dumps(header)
    return "{" + ",".join(parts) + "}"


def encode(header: dict[str, Any], payload: bytes = b"") -> bytes:
    try:
        j = _header_json(header).encode()
    except (ValueError, UnicodeEncodeError):
        # NaN/Infinity or a lone surrogate: the other side would refuse the frame anyway
        raise InvalidInputError("a request field is not a finite number or valid text") from None
    n = _HDR.size + len(j) + len(payload)
    if n > MAX_FRAME:
        raise DaemonError(f"message too large ({len(payload)} bytes; limit 256 MiB)")
    return b"".join((_LEN.pack(n), _HDR.pack(VERSION, len(j)), j, payload))


# --- the JSON header ------------------------------------------------------------------------


def _check_text(s: str) -> None:
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise _Refused("a string is not valid Unicode (lone surrogate)") from None


def _check_value(v: object) -> None:
    """Numbers finite and in range, strings encodable; recursion is bounded by the
    container count checked before parsing."""
    t = type(v)
    if t is str:
        _check_text(v)  # type: ignore[arg-type]
    elif t is int:
        if not -MAX_INT <= v <= MAX_INT:  # type: ignore[operator]
            raise _Refused(f"a number is out of range (limit +-{MAX_INT})")
    elif t is float:
        if not (math.isfinite(v) and -MAX_INT <= v <= MAX_INT):  # type: ignore[arg-type,operator]
            raise _Refused(f"a number is not finite or out of range (limit +-{MAX_INT})")
    elif t is list:
        for x in v:  # type: ignore[attr-defined]
            _check_value(x)
    elif t is dict:
        for k, x in v.items():  # type: ignore[attr-defined]
            _check_text(k)
            _check_value(x)


def _containers(raw: bytes) -> int:
    """Arrays and objects in a JSON text, brackets inside strings not counted.

    The quick count (brackets anywhere) is exact for ordinary headers. Otherwise escaped
    backslashes and quotes are removed, after which the remaining quotes delimit strings, so
    the even-numbered pieces of a split on '"' are what lies outside strings. All of it runs in
    C: a hostile 64 KiB header costs microseconds, and the parser never recurses deeper than
    this count (in an invalid text, the parser stops at the first error, and everything before
    it was classified correctly)."""
    n = raw.count(b"[") + raw.count(b"{")
    if n <= MAX_CONTAINERS:
        return n
    outside = b"".join(raw.replace(b"\\\\", b"").replace(b'\\"', b"").split(b'"')[::2])
    return outside.count(b"[") + outside.count(b"{")


def _parse(raw: bytes) -> dict[str, Any]:
    if _containers(raw) > MAX_CONTAINERS:
        raise InvalidInputError("frame header is nested too deeply")
    try:
        header = _loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise InvalidInputError("frame header is not a JSON object")
        _check_value(header)
    except _Refused as e:
        raise InvalidInputError(f"frame header: {e}") from None
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise InvalidInputError("frame header is not valid JSON") from None
    return header


def parse_header(raw: bytes) -> dict[str, Any]:
    """The JSON header of a request, checked (JSON rules and `check_request`, see the module
    doc); InvalidInputError if not. Valid small headers are cached, so a client repeating
    one costs a dict lookup."""
    cached = _HEADER_CACHE.get(raw)
    if cached is not None:
        return dict(cached)  # a copy: callers may add fields
    if len(raw) > MAX_HEADER:
        raise InvalidInputError(f"frame header of {len(raw)} bytes exceeds the limit")
    header = _parse(raw)
    check_request(header)
    if len(raw) <= _CACHE_MAX_HEADER:
        if len(_HEADER_CACHE) >= _CACHE_MAX_ENTRIES:
            _HEADER_CACHE.clear()
        _HEADER_CACHE[raw] = dict(header)
    return header


def _frame_problem(length: int, version: int, jlen: int, max_header: int) -> KeysvcError | None:
    """What is wrong with a frame's fixed fields (they are all read before its header)."""
    if version != VERSION:
        return DaemonError(f"unsupported protocol version {version} (this side speaks {VERSION})")
    if _HDR.size + jlen > length:
        return DaemonError("frame header overruns the frame")
    if jlen > max_header:
        return InvalidInputError(f"frame header of {jlen} bytes exceeds the limit")
    return None


def decode(body: bytes | memoryview, *, reply: bool = False) -> tuple[dict[str, Any], bytes]:
    """Parse the part after the length prefix (KeysvcError if it is not a valid frame).
    A request's header goes through parse_header. A reply's (the client's side) gets the
    JSON checks only, with no size cap of its own: `list` of many keys is a big header."""
    if len(body) < _HDR.size:
        raise DaemonError("short frame")
    version, jlen = _HDR.unpack_from(body, 0)
    problem = _frame_problem(len(body), version, jlen, MAX_FRAME if reply else MAX_HEADER)
    if problem is not None:
        raise problem
    end = _HDR.size + jlen
    raw = bytes(body[_HDR.size : end])
    return (_parse(raw) if reply else parse_header(raw)), bytes(body[end:])


# --- framing ---------------------------------------------------------------------------------


def split_frames(buf: bytearray) -> list[bytes]:
    """Remove and return every complete frame body at the start of buf.

    A frame whose length exceeds the limit raises DaemonError once it is at the start of buf;
    complete frames before it are returned first (call again to meet it)."""
    out: list[bytes] = []
    pos = 0
    n = len(buf)
    while n - pos >= 4:
        (length,) = _LEN.unpack_from(buf, pos)
        if length > MAX_FRAME:
            if out:
                break
            raise DaemonError(f"frame of {length} bytes exceeds the limit")
        if n - pos - 4 < length:
            break
        out.append(bytes(buf[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    if pos:
        del buf[:pos]
    return out


# What FrameReader.feed returns, in arrival order: a whole frame body (bytes, decoded later),
# the header of a request refused on its header alone (dict; its payload was discarded), or
# the error for a frame whose header is not valid (its payload was discarded too).
Item = bytes | dict[str, Any] | KeysvcError


class FrameReader:
    """One connection's incoming bytes, split into frames.

    `admit(header)` is asked as soon as a frame's header is complete, if the rest of the frame
    has not arrived with it: True buffers the payload until the frame is whole; False discards
    the payload as it arrives (never buffered) and returns the header at once, so the refusal is
    answered in order with the other requests. Frames that arrive whole are returned as bytes
    without asking (they are checked when decoded, at the same point of the batch). So before
    admission at most one header (MAX_HEADER) plus one read is held per connection.

    A frame length over MAX_FRAME breaks the framing: `broken` is set to the error, and what
    came before it has been returned; nothing more can be read from the connection."""

    __slots__ = ("buf", "skip", "admitted", "broken", "_admit")

    def __init__(self, admit: Callable[[dict[str, Any]], bool]) -> None:
        self.buf = bytearray()
        self.skip = 0  # bytes of a refused frame still to discard
        self.admitted = False  # the incomplete frame at the start of buf was admitted
        self.broken: KeysvcError | None = None
        self._admit = admit

    def feed(self, data: bytes) -> list[Item]:
        if self.broken is not None:
            return []
        if self.skip:
            if len(data) <= self.skip:
                self.skip -= len(data)
                return []
            data = data[self.skip :]
            self.skip = 0
        buf = self.buf
        buf += data
        out: list[Item] = []
        while True:
            try:
                frames = split_frames(buf)
            except DaemonError as e:
                self.broken = e
                return out
            if frames:
                out.extend(frames)
                self.admitted = False  # the admitted frame was the first one
            if self.admitted or len(buf) < _LEN.size:
                return out
            length = _LEN.unpack_from(buf, 0)[0]
            if length > MAX_FRAME:
                continue  # split_frames raises it, now that the frame is first
            if len(buf) < _PREFIX:
                return out
            version, jlen = _HDR.unpack_from(buf, _LEN.size)
            problem = _frame_problem(length, version, jlen, MAX_HEADER)
            if problem is None:
                if len(buf) < _PREFIX + jlen:
                    return out  # the header is not complete yet
                try:
                    header = parse_header(bytes(buf[_PREFIX : _PREFIX + jlen]))
                except KeysvcError as e:
                    problem = e
                else:
                    if self._admit(header):
                        self.admitted = True
                        return out
                    out.append(header)
            if problem is not None:
                out.append(problem)
            # the frame is incomplete (split_frames took every whole one): drop what is here
            # and the rest as it arrives
            self.skip = 4 + length - len(buf)
            buf.clear()
            return out


# --- request fields --------------------------------------------------------------------------

MAX_AGE_DAYS = 36500  # rotation policy: 100 years; 0 = no age limit
# Data keys (wrap, datakey): AES keys are 16-64 bytes; 1 KiB leaves room for key bundles.
MAX_DATA_KEY = 1024
MIN_GENERATED_DATA_KEY = 16  # datakey: fewer than 128 random bits is no key


def _text(v: object) -> str | None:
    if not isinstance(v, str):
        return "must be a string"
    try:
        _check_text(v)
    except _Refused:
        return "must be valid Unicode text"
    return None


def _flag(v: object) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _whole(lo: int, hi: int) -> Callable[[object], str | None]:
    def check(v: object) -> str | None:
        if type(v) is int and lo <= v <= hi:
            return None
        return f"must be a whole number from {lo} to {hi}"

    return check


def _days(v: object) -> str | None:
    # finiteness first: NaN compares false with everything, inf would pass an upper bound of inf
    if type(v) in (int, float) and math.isfinite(v) and 0 <= v <= MAX_AGE_DAYS:  # type: ignore[arg-type,operator]
        return None
    return f"must be a number of days from 0 to {MAX_AGE_DAYS} (0 = no age limit)"


def _span(v: object) -> str | None:
    """`audit_logs` days: any finite non-negative number (a huge one means "everything")."""
    if type(v) in (int, float) and math.isfinite(v) and 0 <= v <= MAX_INT:  # type: ignore[arg-type,operator]
        return None
    return "must be a non-negative number of days"


def _request_id(v: object) -> str | None:
    return _text(v) if isinstance(v, str) else _whole(-MAX_INT, MAX_INT)(v)


_Check = Callable[[object], str | None]
_COMMON: dict[str, _Check] = {
    "op": _text,
    "key": _text,
    "id": _request_id,
    "user": _text,
    "mk_check": _text,
}
_POLICY: dict[str, _Check] = {
    "max_age_days": _days,
    "max_uses": _whole(0, MAX_INT),
    "auto_rotate": _flag,
}
# Per operation: its own fields (optional unless listed in _REQUIRED). A field that is absent or
# null means "not given". Unknown fields are ignored (newer clients may send more).
_FIELDS: dict[str, dict[str, _Check]] = {
    "generate": {
        "type": _text,
        "exportable": _flag,
        "pre_active": _flag,
        "ssh": _flag,
        **_POLICY,
    },
    # version: sign with an older version still usable (the ssh-agent offers those until they
    # are retired); ssh: refuse unless the key is marked for SSH (the agent's requests)
    "sign": {"hash": _text, "prehashed": _flag, "version": _whole(1, MAX_INT), "ssh": _flag},
    "verify": {
        "sig_len": _whole(0, MAX_PAYLOAD),
        "hash": _text,
        "prehashed": _flag,
        "version": _whole(1, MAX_INT),
    },
    "export_public_key": {"version": _whole(0, MAX_INT)},
    "encrypt": {"aad": _text},
    "decrypt": {"aad": _text},
    "datakey": {"bytes": _whole(MIN_GENERATED_DATA_KEY, MAX_DATA_KEY), "wrapped_only": _flag},
    "rewrap": {"aad": _text},
    "retire": {"min_version": _whole(1, MAX_INT)},
    "set_state": {"state": _text, "confirm_destroy": _flag},
    "set_policy": {**_POLICY, "ssh": _flag},
    "unlock": {"kind": _text},
    "audit_logs": {"days": _span},
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    "verify": ("sig_len",),
    "retire": ("min_version",),
    "set_state": ("state",),
}


def check_request(header: dict[str, Any]) -> None:
    """The known fields of a request have the right types and ranges (InvalidInputError, one
    line, naming the field). Called by the client before sending and by the service before
    executing, so the daemon and the in-process path refuse the same values the same way."""
    op = header.get("op")
    own = _FIELDS.get(op, {}) if isinstance(op, str) else {}
    for name, value in header.items():
        check = own.get(name) or _COMMON.get(name)
        if check is None or value is None:
            continue
        problem = check(value)
        if problem is not None:
            raise InvalidInputError(f"{name} {problem}")
    for name in _REQUIRED.get(op, ()) if isinstance(op, str) else ():
        if header.get(name) is None:
            raise InvalidInputError(f"{op} needs {name}")
