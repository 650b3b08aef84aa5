"""Hostile frames from any connected user, before and after the policy check (issue 11,
class 3): every request that is not well-formed gets an error reply, and the daemon keeps
serving its owner. Sent by root (the owner, past the policy check) and by a second user whom
the policy denies everything (the check must not be reached with anything unsafe)."""

from __future__ import annotations

import pwd
from pathlib import Path

import pytest
from hostile import KeyService, exchange, exchange_as, frame, key_service

# (name, frame bytes). Headers the real client never sends: each must get an error reply.
HOSTILE: list[tuple[str, bytes]] = [
    ("nested arrays", frame("[" * 30000 + "]" * 30000)),
    ("nested in a field", frame('{"op":"sign","key":"k","id":' + "[" * 20000 + "]" * 20000 + "}")),
    ("nested objects", frame('{"a":' * 5000 + "1" + "}" * 5000)),
    ("lone surrogate user", frame('{"op":"sign","key":"k","user":"\\ud800"}', b"m")),
    ("lone surrogate key", frame('{"op":"sign","key":"\\udfff"}', b"m")),
    ("lone surrogate aad", frame('{"op":"encrypt","key":"k","aad":"\\ud800"}', b"m")),
    ("lone surrogate op", frame('{"op":"\\ud800"}')),
    ("lone surrogate id", frame('{"op":"status","id":"\\ud800"}')),
    ("surrogate in a field name", frame('{"op":"status","\\ud800":1}')),
    ("raw surrogate bytes", frame(b'{"op":"status","user":"\xed\xa0\x80"}')),
    ("NaN", frame('{"op":"set_policy","key":"k","max_age_days":NaN}')),
    ("Infinity", frame('{"op":"set_policy","key":"k","max_age_days":Infinity}')),
    ("-Infinity", frame('{"op":"generate","key":"x1","max_age_days":-Infinity}')),
    ("1e999", frame('{"op":"set_policy","key":"k","max_age_days":1e999}')),
    ("huge int", frame('{"op":"set_policy","key":"k","max_uses":' + "9" * 4000 + "}")),
    ("int past 2^53", frame('{"op":"verify","key":"k","sig_len":' + str(2**64) + "}", b"x")),
    ("missing op", frame('{"key":"k"}')),
    ("op not a string", frame('{"op":["sign"],"key":"k"}', b"m")),
    ("key not a string", frame('{"op":"sign","key":{"a":1}}', b"m")),
    ("verify without sig_len", frame('{"op":"verify","key":"k"}', b"x")),
    ("sig_len a string", frame('{"op":"verify","key":"k","sig_len":"64"}', b"x")),
    ("version a string", frame('{"op":"export_public_key","key":"k","version":"abc"}')),
    ("min_version a float", frame('{"op":"retire","key":"k","min_version":1.5}')),
    ("type a number", frame('{"op":"generate","key":"x2","type":5}')),
    ("state an object", frame('{"op":"set_state","key":"k","state":{}}')),
    ("user a number", frame('{"op":"sign","key":"k","user":7}', b"m")),
    ("mk_check a list", frame('{"op":"sign","key":"k","mk_check":[1]}', b"m")),
    ("max_age_days negative", frame('{"op":"set_policy","key":"k","max_age_days":-1}')),
    ("header an array", frame("[1,2]")),
    ("header not JSON", frame("{op: sign}")),
    ("header not UTF-8", frame(b'{"op":"\xff"}')),
    ("header over 64 KiB", frame('{"op":"status","pad":"' + "a" * 70000 + '"}')),
    ("unknown protocol version", frame({"op": "status"}, version=7)),
    ("short frame", b"\x00\x00\x00\x02\x01\x00"),
    ("header overruns frame", b"\x00\x00\x00\x05\x01\x00\x00\x00\x10"),
]


@pytest.fixture
def daemon(shared_dir: Path) -> KeyService:  # type: ignore[misc]
    with key_service(shared_dir) as d:
        yield d


def _check(d: KeyService, name: str, reply: list[object]) -> None:
    assert reply and isinstance(reply[0], dict), f"{name}: no error reply: {reply}"
    assert reply[0]["ok"] is False, f"{name}: accepted: {reply}"
    assert "\n" not in reply[0]["message"], name
    assert d.alive(), f"{name}: the daemon stopped: {d.stderr}"
    d.owner_ok()


def test_hostile_frames_from_the_owner(daemon: KeyService) -> None:
    for name, data in HOSTILE:
        _check(daemon, name, exchange(daemon.sock, data, 1))
    # nothing that arrived that way changed the key or reached the audit log as text
    assert "Traceback" not in daemon.stderr


def test_hostile_frames_from_a_denied_user(
    daemon: KeyService, other_user: pwd.struct_passwd
) -> None:
    for name, data in HOSTILE:
        reply = exchange_as(other_user.pw_uid, other_user.pw_gid, daemon.sock, data, 1)
        _check(daemon, name, reply)
    assert "Traceback" not in daemon.stderr


def test_connection_stays_usable_after_a_bad_header(daemon: KeyService) -> None:
    """Pipelined: a bad header between two good requests; all three answered in order."""
    good = frame({"op": "sign", "key": "k", "id": 1}, b"a")
    bad = frame('{"op":"sign","key":"k","user":"\\ud800","id":2}', b"b")
    last = frame({"op": "sign", "key": "k", "id": 3}, b"c")
    r1, r2, r3 = exchange(daemon.sock, good + bad + last, 3)
    assert r1["ok"] and r1["id"] == 1
    assert not r2["ok"] and r2["error"] == "invalid_input"
    assert r3["ok"] and r3["id"] == 3
