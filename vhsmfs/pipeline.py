"""Streaming stages for `token store` and `token retrieve`: read ahead on one thread, write
behind on another, and the encryption between them on the caller's thread.

Why this shape (measured on the 2-core bench machine, docs/FORMAT.md "Performance"):
AES-GCM in the `cryptography` bindings releases the GIL on every call, so at the default 8 KiB
chunk two encrypting threads hand the GIL back and forth on every chunk and run at 0.64x the
speed of one; a single encrypting thread does 1 GiB in about 0.2 s. What costs is the kernel's
copying (reading the input and writing the output), and that runs without the GIL, so it goes to
the two I/O threads and overlaps with the encryption. Buffers come from fixed rings: memory does
not grow with file size, and no fresh buffer is page-faulted in per run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from threading import BoundedSemaphore
from typing import Generic, TypeVar

T = TypeVar("T")


class WriteBehind:
    """Runs calls on one background thread in submission order, with at most `depth` of them
    unfinished. A buffer handed to a call is free again once `depth` more calls were submitted
    (so a ring of depth + 1 buffers cycles safely); drain() waits for every call. The first
    failure is raised by the submit() or drain() after it."""

    def __init__(self, name: str, depth: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: deque[Future[None]] = deque()
        self.depth = depth

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        while len(self._pending) >= self.depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Cancel what has not started, wait for what has (never raises for them)."""
        for fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Ring:
    """A fixed set of equal buffers handed out in turn."""

    def __init__(self, count: int, size: int) -> None:
        self._bufs = [bytearray(size) for _ in range(count)]
        self._next = 0

    def take(self) -> memoryview:
        buf = self._bufs[self._next]
        self._next = (self._next + 1) % len(self._bufs)
        return memoryview(buf)


class ReadAhead(Generic[T]):
    """Yields (item, data) for each item, where data is what `fetch(item, buffer)` put in a
    buffer of `size` bytes (it returns how many), fetched on a background thread up to `depth`
    items ahead. A view stays valid while the consumer holds at most `keep` of them (the current
    one and keep - 1 before it); it is reused after that. Fetch errors are raised in order, when
    their item is reached. close() (or leaving a `with`) stops the thread."""

    def __init__(
        self,
        items: Iterable[T],
        fetch: Callable[[T, memoryview], int],
        *,
        size: int,
        depth: int,
        keep: int = 1,
        name: str = "vhsm-read",
    ) -> None:
        self._items = iter(items)
        self._fetch = fetch
        self._ring = Ring(depth + keep, size)
        self._depth = depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._window: deque[tuple[T, memoryview, Future[int]]] = deque()
        self._exhausted = False

    def _top_up(self) -> None:
        while not self._exhausted and len(self._window) < self._depth:
            try:
                item = next(self._items)
            except StopIteration:
                self._exhausted = True
                return
            buf = self._ring.take()
            self._window.append((item, buf, self._pool.submit(self._fetch, item, buf)))

    def __iter__(self) -> Iterator[tuple[T, memoryview]]:
        while True:
            self._top_up()
            if not self._window:
                return
            item, buf, fut = self._window.popleft()
            n = fut.result()
            # the next fetch may go into the buffer `keep` views back: the consumer is done with it
            self._top_up()
            yield item, buf[:n]

    def close(self) -> None:
        for _, _, fut in self._window:
            fut.cancel()
        self._window.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> ReadAhead[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
