"""The streaming stages under `token store` / `token retrieve` (vhsmfs.pipeline): order, buffer
reuse that never hands out a buffer still held, errors raised in order, threads stopped."""

from __future__ import annotations

import threading

import pytest

from vhsmfs.pipeline import ReadAhead, WriteBehind


def _fill(item: int, buf: memoryview) -> int:
    """Write the item number into every byte of a buffer of item % 7 + 1 bytes."""
    n = item % 7 + 1
    buf[:n] = bytes([item % 256]) * n
    return n


@pytest.mark.parametrize(("depth", "keep"), [(1, 1), (2, 1), (3, 2), (1, 2)])
def test_read_ahead_yields_in_order_and_never_reuses_a_held_buffer(depth: int, keep: int) -> None:
    used: dict[int, int] = {}  # item -> the buffer it was fetched into

    def fetch(item: int, buf: memoryview) -> int:
        used[item] = id(buf.obj)
        return _fill(item, buf)

    held: list[tuple[memoryview, bytes]] = []
    with ReadAhead(range(200), fetch, size=8, depth=depth, keep=keep) as ahead:
        for item, view in ahead:
            assert bytes(view) == bytes([item % 256]) * (item % 7 + 1)
            held = [*held, (view, bytes(view))][-keep:]
            assert all(bytes(v) == copy for v, copy in held)
    assert sorted(used) == list(range(200))
    # while the consumer holds items m-keep+1..m, fetches up to m+depth may be under way:
    # any keep+depth items in a row must have had buffers of their own
    window = keep + depth
    for m in range(200 - window + 1):
        assert len({used[i] for i in range(m, m + window)}) == window


def test_read_ahead_raises_a_fetch_error_when_its_item_is_reached() -> None:
    def fetch(item: int, buf: memoryview) -> int:
        if item == 5:
            raise OSError("bad sector")
        return _fill(item, buf)

    got = []
    with (
        pytest.raises(OSError, match="bad sector"),
        ReadAhead(range(20), fetch, size=8, depth=3) as ahead,
    ):
        for item, _ in ahead:
            got.append(item)
    assert got == [0, 1, 2, 3, 4]


def test_read_ahead_close_stops_its_thread_early() -> None:
    before = threading.active_count()
    ahead = ReadAhead(iter(range(10**9)), _fill, size=8, depth=2)
    for item, _ in ahead:
        if item == 3:
            break
    ahead.close()
    assert threading.active_count() == before


def test_write_behind_keeps_order_and_bounds_what_is_unfinished() -> None:
    out: list[int] = []
    gate = threading.Event()
    unfinished: list[int] = []

    def write(i: int) -> None:
        gate.wait(5)
        out.append(i)

    with WriteBehind("t", 3) as behind:
        for i in range(3):
            behind.submit(write, i)
        unfinished.append(len(behind._pending))
        gate.set()  # the 4th submit must wait for the 1st write before it is queued
        for i in range(3, 50):
            behind.submit(write, i)
            assert len(behind._pending) <= 3
        behind.drain()
    assert unfinished == [3]
    assert out == list(range(50))


def test_write_behind_raises_the_first_failure() -> None:
    def write(i: int) -> None:
        if i == 2:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"), WriteBehind("t", 2) as behind:
        for i in range(10):
            behind.submit(write, i)
        behind.drain()
