"""An ordered producer -> parallel workers -> in-order consumer pipeline with bounded memory.

At most `depth` work items are in flight, so memory is O(depth * item size) whatever the
file size. Results are consumed in submission order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from threading import BoundedSemaphore
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def run_ordered(
    items: Iterable[T],
    work: Callable[[T], R],
    consume: Callable[[R], None],
    *,
    workers: int,
    depth: int | None = None,
) -> None:
    workers = max(1, workers)
    depth = depth or workers * 2 + 1
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vhsm-chunk") as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(work, item))
                while len(pending) >= depth:
                    consume(pending.popleft().result())
            while pending:
                consume(pending.popleft().result())
        finally:
            for fut in pending:
                fut.cancel()


class OrderedHasher:
    """Feeds a hash on a thread of its own so that hashing overlaps with encryption.

    hashlib releases the GIL for large buffers, so this is real parallelism on 2+ cores.
    """

    def __init__(self, hasher, *, max_pending: int = 4) -> None:  # type: ignore[no-untyped-def]
        self._h = hasher
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vhsm-hash")
        self._last: Future[None] | None = None
        # Bounds the buffers queued for hashing, so memory stays flat if hashing lags.
        self._slots = BoundedSemaphore(max_pending)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._slots.acquire()
        self._last = self._pool.submit(self._h.update, data)
        self._last.add_done_callback(lambda _f: self._slots.release())

    def digest(self) -> bytes:
        self._pool.shutdown(wait=True)
        if self._last is not None:
            self._last.result()
        return self._h.digest()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
