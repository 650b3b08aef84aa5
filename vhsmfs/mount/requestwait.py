"""How the event loop waits for the next FUSE request.

pyfuse3 waits, before reading each request from /dev/fuse, in `trio.lowlevel.wait_readable(fd)`:
a full trip through trio's scheduler and epoll (an epoll_ctl, an epoll_wait, a reschedule).
`RequestWait` replaces that call, only in pyfuse3's view of trio (its module global `trio`):

- A request already queued is taken at once (a zero-timeout poll()), which under a busy client
  (tar, rm -rf) is often the case.
- Otherwise the loop polls for up to SPIN seconds before it sleeps. A serial client (rm -rf
  sends one request, waits for the answer, sends the next) is back within tens of
  microseconds, and a sleeping thread costs a cross-CPU wake-up per request: measured on the
  2-core VM this was built on, a pipe round trip between two processes took 56-72 us when both
  slept and 22-33 us when one polled (8 us on one CPU). It spins only while nothing else wants
  the CPU or the GIL (no thread hop in flight, no runnable task, no background job queued or
  running: see workers.py). After a spin that found nothing it sleeps at once for SPIN_BACKOFF
  seconds, so a slow or finished client costs at most SPIN of CPU per SPIN_BACKOFF.
- The real path is taken at least every MAX_SKIP seconds, so the other tasks (thread
  hand-backs, housekeeping, signals) still run at least that often.
"""

from __future__ import annotations

import os
import select
import time
import types
from collections.abc import Awaitable, Callable, Mapping

import pyfuse3
import trio

from vhsmfs.errors import VhsmError
from vhsmfs.mount import workers

MAX_SKIP = 0.002
SPIN = 0.0005  # seconds; VHSM_MOUNT_SPIN_US in the mount's environment overrides it
SPIN_BACKOFF = 0.01


def spin_from_env(env: Mapping[str, str] = os.environ, cpus: int | None = None) -> float:
    """The spin limit in seconds: VHSM_MOUNT_SPIN_US microseconds (0: never spin), or SPIN.
    Always 0 with one CPU to run on: the client could not run while the loop polls for it."""
    raw = env.get("VHSM_MOUNT_SPIN_US")
    us = SPIN * 1e6
    if raw is not None:
        try:
            us = int(raw)
        except ValueError:
            us = -1
        if not 0 <= us <= 100_000:
            raise VhsmError(f"VHSM_MOUNT_SPIN_US must be 0-100000 microseconds, not {raw!r}")
    if (len(os.sched_getaffinity(0)) if cpus is None else cpus) < 2:
        return 0.0
    return us / 1e6


class RequestWait:
    def __init__(
        self,
        real: Callable[[int], Awaitable[None]],
        may_spin: Callable[[], bool],
        *,
        spin: float = SPIN,
        backoff: float = SPIN_BACKOFF,
        max_skip: float = MAX_SKIP,
    ) -> None:
        self._real = real
        self._may_spin = may_spin
        self.spin = spin
        self.backoff = backoff
        self.max_skip = max_skip
        self._polls: dict[int, select.poll] = {}
        self._last_real = 0.0
        self._spin_after = 0.0

    async def wait_readable(self, fd: int) -> None:
        p = self._polls.get(fd)
        if p is None:
            p = self._polls[fd] = select.poll()
            p.register(fd, select.POLLIN)
        if time.monotonic() - self._last_real < self.max_skip and (p.poll(0) or self._spin(p)):
            return
        await self._real(fd)
        self._last_real = time.monotonic()

    def _spin(self, p: select.poll) -> bool:
        now = time.monotonic()
        if not self.spin or now < self._spin_after or not self._may_spin():
            return False
        end = now + self.spin
        while time.monotonic() < end:
            if p.poll(0):
                return True
        self._spin_after = time.monotonic() + self.backoff
        return False


def install(hops_in_flight: Callable[[], int], spin: float = SPIN) -> None:
    """Give pyfuse3 a view of trio whose wait_readable is RequestWait's."""

    def may_spin() -> bool:
        return (
            not hops_in_flight()
            and not workers.busy()
            and not trio.lowlevel.current_statistics().tasks_runnable
        )

    wait = RequestWait(trio.lowlevel.wait_readable, may_spin, spin=spin)
    lowlevel = types.SimpleNamespace(**vars(trio.lowlevel))
    lowlevel.wait_readable = wait.wait_readable
    view = types.SimpleNamespace(**vars(trio))
    view.lowlevel = lowlevel
    pyfuse3.trio = view  # type: ignore[attr-defined]
