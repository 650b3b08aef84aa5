"""How many refused requests (access denied, wrong master key) get an audit line of their own.

Every refusal is answered, but a caller that loops on refused requests must not be able to fill
the disk with AUTH_FAILURE lines (nor slow everyone's group commits). Per uid, the first
`per_window` refusals of each `window` seconds are logged one by one; the rest are counted, and
one summary line per uid and window says how many were not ("N more refused requests from uid U
not logged one by one"). So a flood costs at most per_window + 1 lines per uid per window
(21 a minute by default, about 3 KiB), and nothing is hidden: the count is in the log.
"""

from __future__ import annotations

import time

PER_WINDOW = 20
WINDOW = 60.0


class DenialBudget:
    """Per-uid counters; used by one thread at a time (the daemon's worker)."""

    def __init__(self, per_window: int = PER_WINDOW, window: float = WINDOW) -> None:
        self.per_window = per_window
        self.window = window
        self._uids: dict[int, list[float | int]] = {}  # uid -> [window start, logged, not logged]

    def take(self, uid: int, now: float | None = None) -> bool:
        """True: log this refusal one by one; False: it is only counted."""
        now = time.monotonic() if now is None else now
        st = self._uids.get(uid)
        if st is None or now - st[0] >= self.window:
            if st is not None and st[2]:
                return self._count(st)  # its summary is still due: keep counting until then
            self._uids[uid] = [now, 1, 0]
            return True
        if st[1] < self.per_window:
            st[1] += 1
            return True
        return self._count(st)

    @staticmethod
    def _count(st: list[float | int]) -> bool:
        st[2] += 1
        return False

    def due(self, now: float | None = None) -> list[tuple[int, int]]:
        """(uid, refusals not logged) for every window that has ended; those uids start afresh."""
        now = time.monotonic() if now is None else now
        out = []
        for uid, st in list(self._uids.items()):
            if now - st[0] >= self.window:
                if st[2]:
                    out.append((uid, int(st[2])))
                del self._uids[uid]
        return out

    def summary(self, uid: int, count: int) -> str:
        return (
            f"{count} more refused requests from uid {uid} not logged one by one "
            f"(limit {self.per_window} per {self.window:g} s)"
        )
