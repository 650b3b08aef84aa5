"""Fuzzing the daemon's frame reader and header checks (keysvc.protocol), the code every
connected user reaches before any authorization: any byte stream, cut anywhere, gives valid
requests or KeysvcErrors (which become error replies), never another exception and never a
hang, and what it holds for a frame not yet admitted stays bounded. Bounded: a few seconds."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keysvc import protocol
from keysvc.audit import AuditWriter
from keysvc.errors import KeysvcError
from keysvc.keystore import open_keystore
from keysvc.policy import Policy
from keysvc.service import Caller, Service

SETTINGS = settings(
    max_examples=300,
    deadline=timedelta(seconds=2),  # a hang fails the example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["\ud800", "a\udfffb", "\x00", "\u2028", "k" * 300]),
)
_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    _text,
)
_json = st.recursive(
    _scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=12,
)
_fields = ["key", "id", "user", "mk_check", "type", "sig_len", "version", "aad", "min_version"]
_fields += ["state", "confirm_destroy", "max_age_days", "max_uses", "auto_rotate", "exportable"]
_request = st.fixed_dictionaries(
    {"op": st.sampled_from([*protocol._FIELDS, "list", "status", "sign", "_auto_rotate", "x"])},
    optional={f: _json for f in _fields},
)


@st.composite
def _header_bytes(draw: st.DrawFn) -> bytes:
    value = draw(st.one_of(_request, _json))
    how = draw(st.sampled_from(["ascii", "utf8", "nested", "raw"]))
    if how == "nested":
        depth = draw(st.integers(1, 3000))
        return b"[" * depth + b"]" * depth
    if how == "raw":
        return draw(st.binary(max_size=40))
    text = json.dumps(value, ensure_ascii=how == "ascii")  # NaN/Infinity as Python writes them
    return text.encode("utf-8", "surrogatepass")  # lone surrogates as (invalid) UTF-8 bytes


@st.composite
def _frame(draw: st.DrawFn) -> bytes:
    raw = draw(_header_bytes())
    payload = draw(st.binary(max_size=64))
    version = draw(st.sampled_from([1, 1, 1, 0, 2]))
    jlen = len(raw) + draw(st.sampled_from([0, 0, 0, 1, -1, 1000]))
    body = struct.pack(">BI", version, max(jlen, 0)) + raw + payload
    length = draw(st.sampled_from([len(body)] * 6 + [2**32 - 1, 3, len(body) + 7]))
    return struct.pack(">I", length) + body


@st.composite
def _stream(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    parts = draw(st.lists(st.one_of(_frame(), st.binary(max_size=16)), min_size=1, max_size=6))
    data = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    return data, cuts


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]


def _normalize(item: protocol.Item) -> tuple[Any, ...]:
    """What the daemon does with an item: a request header, or the one-line error it sends."""
    if isinstance(item, KeysvcError):
        msg = str(item)
        assert msg and "\n" not in msg
        return ("error", msg)
    if isinstance(item, dict):  # refused on its header: must have passed every check
        protocol.check_request(item)
        return ("header", json.dumps(item, sort_keys=True))
    try:
        header, _payload = protocol.decode(item)
    except KeysvcError as e:
        return _normalize(e)
    protocol.check_request(header)
    json.dumps(header, allow_nan=False).encode()  # fit for a reply and an audit line
    return ("header", json.dumps(header, sort_keys=True))


def _read(chunks: list[bytes], admit: bool) -> tuple[list[tuple[Any, ...]], str | None]:
    reader = protocol.FrameReader(lambda _h: admit)
    out: list[tuple[Any, ...]] = []
    for c in chunks:
        out.extend(_normalize(it) for it in reader.feed(c))
        if not reader.admitted:
            # before admission: at most one header and one read are held
            assert len(reader.buf) <= 9 + protocol.MAX_HEADER + len(c)
    return out, None if reader.broken is None else str(reader.broken)


@SETTINGS
@given(_stream(), st.booleans())
def test_any_stream_cut_anywhere_gives_requests_or_errors(
    stream: tuple[bytes, list[int]], admit: bool
) -> None:
    data, cuts = stream
    whole = _read([data], admit)
    cut = _read(_chunks(data, cuts), admit)
    # how the bytes arrive changes nothing the daemon answers (a refused request's header is
    # answered the same whether it came whole or was refused before its payload)
    assert cut == whole


@SETTINGS
@given(st.binary(max_size=300), st.lists(st.integers(1, 64), max_size=10))
def test_random_bytes_never_raise_anything_else(data: bytes, sizes: list[int]) -> None:
    reader = protocol.FrameReader(lambda h: "payload" not in h)
    pos = 0
    for n in [*sizes, len(data)]:
        for it in reader.feed(data[pos : pos + n]):
            _normalize(it)
        pos += n


# --- past the checks: the service itself --------------------------------------------------


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    """A real keystore and audit log in a private directory, with an Ed25519 key `k` and an
    AES key `a`; the policy's owner is this process's uid, uid+1 gets nothing."""
    d = Path(tempfile.mkdtemp(prefix="vhsm-fuzz-"))
    ks = open_keystore(d, os.urandom(32))
    svc = Service(ks, AuditWriter(d / "hsm_audit.log"), policy=Policy(os.getuid()))
    me = Caller(os.getuid(), os.getgid(), os.getpid(), "fuzz")
    svc.run_batch(
        [
            ({"op": "generate", "key": "k"}, b"", me),
            ({"op": "generate", "key": "a", "type": "aes-256-gcm"}, b"", me),
        ]
    )
    try:
        yield svc
    finally:
        ks.close()
        shutil.rmtree(d, ignore_errors=True)


_key = st.one_of(st.sampled_from(["k", "a", "k", "a"]), _text)


@SETTINGS
@given(
    st.lists(
        st.tuples(_request, _key, st.binary(max_size=80), st.booleans(), st.booleans()),
        min_size=1,
        max_size=4,
    )
)
def test_checked_requests_only_ever_fail_with_keysvc_errors(service: Service, batch: list) -> None:
    """Whatever passes check_request runs to a reply (ok or error) in the real service, and
    its audit lines can be written: no TypeError/ValueError/UnicodeError from a field."""
    items = []
    for header, key, payload, owner, discarded in batch:
        header = {**header, "key": key}
        try:
            protocol.check_request(header)
        except KeysvcError:
            continue
        uid = os.getuid() if owner else os.getuid() + 1
        items.append((header, None if discarded else payload, Caller(uid, 0, 1, "fuzz")))
    for reply, _out in service.run_batch(items):
        assert isinstance(reply.get("ok"), bool)
        json.dumps(reply, allow_nan=False)
