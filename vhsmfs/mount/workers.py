"""Thread pools for the mount's background work, and how much of it is queued or running.

The event loop reads `busy()` before it polls for the next request (requestwait.py): while
chunks are being encrypted, decrypted ahead, hashed or keys derived, the CPU and the GIL are
worth more to those threads than to a loop polling for a client that is not there yet.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

_lock = threading.Lock()
_jobs = 0  # submitted to any CountingPool and not finished


def busy() -> int:
    """Jobs queued or running in all CountingPools (a plain read: exact enough for a hint)."""
    return _jobs


def _finish() -> None:
    global _jobs
    with _lock:
        _jobs -= 1


class CountingPool(ThreadPoolExecutor):
    """A ThreadPoolExecutor whose jobs are counted in `busy()` until they finish."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        global _jobs

        def job() -> Any:
            try:
                return fn(*args, **kwargs)
            finally:
                _finish()

        with _lock:
            _jobs += 1
        try:
            return super().submit(job)
        except BaseException:  # shut down: the job will never run
            _finish()
            raise


class MountWorkers:
    """The mount's thread pools, made by whoever builds the Vault (the mount runner, or the
    Vault itself when given none) and shut down when the mount ends; never at import time.

    `encrypt`: write-back runs (merge, encrypt, write), shared by all files; never waits.
    `readahead`: decryption ahead of sequential readers.
    `keygen`: keys of new tokens derived ahead (keyprefetch.py).
    Their threads start on first use."""

    def __init__(self) -> None:
        self.encrypt = CountingPool(max_workers=2, thread_name_prefix="vhsm-encrypt")
        self.readahead = CountingPool(max_workers=2, thread_name_prefix="vhsm-readahead")
        self.keygen = CountingPool(max_workers=1, thread_name_prefix="vhsm-keygen")

    def shutdown(self) -> None:
        """Wait for the queued jobs, then stop the threads."""
        for pool in (self.keygen, self.readahead, self.encrypt):
            pool.shutdown(wait=True)

    def __enter__(self) -> MountWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
