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
"""

from __future__ import annotations

import json
import struct
from typing import Any

from keysvc.errors import DaemonError

VERSION = 1
MAX_FRAME = 256 * 1024 * 1024 + 65536  # largest message: 256 MiB payload plus header
_LEN = struct.Struct(">I")
_HDR = struct.Struct(">BI")
# Built once: json.dumps/json.loads with arguments build a new encoder/decoder on every call,
# which is a large part of the per-request cost at thousands of requests per second.
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode
_loads = json.JSONDecoder().decode
# Headers repeat (the same op on the same key from the same client): parse each once.
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
    j = _header_json(header).encode()
    n = _HDR.size + len(j) + len(payload)
    if n > MAX_FRAME:
        raise DaemonError(f"message too large ({len(payload)} bytes; limit 256 MiB)")
    return b"".join((_LEN.pack(n), _HDR.pack(VERSION, len(j)), j, payload))


def decode(body: bytes | memoryview) -> tuple[dict[str, Any], bytes]:
    """Parse the part after the length prefix."""
    if len(body) < _HDR.size:
        raise DaemonError("short frame")
    version, jlen = _HDR.unpack_from(body, 0)
    if version != VERSION:
        raise DaemonError(f"unsupported protocol version {version} (this side speaks {VERSION})")
    end = _HDR.size + jlen
    if end > len(body):
        raise DaemonError("frame header overruns the frame")
    raw = bytes(body[_HDR.size : end])
    cached = _HEADER_CACHE.get(raw)
    if cached is not None:
        return dict(cached), bytes(body[end:])  # a copy: callers may add fields
    try:
        header = _loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise DaemonError("frame header is not JSON") from None
    if not isinstance(header, dict):
        raise DaemonError("frame header is not an object")
    if len(raw) <= _CACHE_MAX_HEADER:
        if len(_HEADER_CACHE) >= _CACHE_MAX_ENTRIES:
            _HEADER_CACHE.clear()
        _HEADER_CACHE[raw] = dict(header)
    return header, bytes(body[end:])


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
