"""The mount's deferred deletions: a FIFO of wipes served by one thread (docs/MOUNT.md,
"Durability").

Queuing a wipe costs an append under an uncontended lock (a ThreadPoolExecutor.submit per
unlink cost more than the rest of unlink). Wipes yield to requests: each starts once the mount
has been quiet for QUIET_GAP, at the latest WIPE_MAX_DELAY after it was queued, and at once
while someone waits for all of them (fsync of a directory, unmount).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable

from vhsmfs.errors import TokenNotFoundError, VhsmError

log = logging.getLogger("vhsm.mount")

QUIET_GAP = 0.05  # seconds without requests before queued wipes run
WIPE_MAX_DELAY = 5.0  # ... but no later than this after the unlink
# A prompt queue (the tombstone renames of unlinked files) runs each job this long after it was
# queued, so that the jobs of a burst (rm -rf) run together: waking the thread for every
# unlink made each wake-up contend with the event loop for the GIL and the second CPU (7657
# files: 2.1 s with a wake-up per file, 1.6 s with no renames at all).
PROMPT_BATCH = 0.02


class WipeQueue:
    """Deletions run in the background, one at a time, first in first out. The thread starts
    on first use and stops at close()."""

    def __init__(
        self, last_request: Callable[[], float], *, prompt: bool = False, name: str = "vhsm-delete"
    ) -> None:
        """`last_request`: time.monotonic() of the mount's latest request. `prompt`: run each
        job as soon as it is queued (the tombstone renames of unlinked files), not once the
        mount is quiet."""
        self._last_request = last_request
        self._prompt = prompt
        self._name = name
        self._cv = threading.Condition(threading.Lock())
        self._wipes: deque[tuple[uuid.UUID, Callable[[], None], float]] = deque()
        self._open = 0  # queued or running
        self._thread: threading.Thread | None = None
        self._idle = False
        self._closed = False
        self._urgent = 0  # threads waiting for all wipes: then they run without waiting
        self.deleting: set[uuid.UUID] = set()  # tokens queued or being wiped

    def add(self, token: uuid.UUID, fn: Callable[[], None]) -> None:
        """Queue `fn`, the wipe of `token`; the token is in `deleting` until it has run."""
        self.deleting.add(token)
        with self._cv:
            self._wipes.append((token, fn, time.monotonic()))
            self._open += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            elif self._idle:
                self._cv.notify_all()

    def _loop(self) -> None:
        """The deletion thread: one wipe at a time, first in first out."""
        while True:
            with self._cv:
                while not self._wipes:
                    if self._closed:
                        if self._thread is threading.current_thread():
                            self._thread = None
                        return
                    self._idle = True
                    self._cv.wait()
                self._idle = False
                token, fn, queued = self._wipes.popleft()
            try:
                self._wait_quiet(queued)
                fn()
            except TokenNotFoundError:
                pass  # already deleted by the CLI
            except (OSError, VhsmError) as e:
                log.error("could not delete token %s: %s", token, e)
            except Exception:
                log.exception("deleting token %s failed", token)
            finally:
                self.deleting.discard(token)
                with self._cv:
                    self._open -= 1
                    if not self._open:
                        self._cv.notify_all()

    def _wait_quiet(self, queued: float) -> None:
        """Wait until the mount has been quiet for a moment, or WIPE_MAX_DELAY has passed since
        the wipe was queued, or someone waits for all wipes."""
        if self._prompt:
            delay = queued + PROMPT_BATCH - time.monotonic()
            if delay > 0 and not self._urgent:
                time.sleep(delay)  # later jobs of the burst are due by then: no wait for them
            return
        while not self._urgent:
            now = time.monotonic()
            if now - self._last_request() >= QUIET_GAP or now - queued >= WIPE_MAX_DELAY:
                return
            time.sleep(QUIET_GAP / 2)

    def wait(self) -> None:
        """Until every queued wipe is done (fsync of a directory, unmount)."""
        with self._cv:
            if not self._open:
                return
            self._urgent += 1
            try:
                while self._open:
                    self._cv.wait()
            finally:
                self._urgent -= 1

    def close(self) -> None:
        """Run what is queued, then stop the thread (a wipe queued later starts it again)."""
        self.wait()
        with self._cv:
            thread = self._thread
            self._closed = True
            self._cv.notify_all()
        if thread is not None:
            thread.join()
        with self._cv:
            self._closed = False
