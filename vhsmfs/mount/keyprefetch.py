"""New tokens whose keys are derived ahead, in the background ("blanks"), so that creating a
file needs no crypto and can be answered on the event loop (docs/MOUNT.md, "Concurrency").

Only a key file makes keys ahead for free; another provider (the key service) would wrap, and
audit, a data key for every blank, used or not: then nothing is prepared.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from vhsmfs.errors import VhsmError
from vhsmfs.keyfile import StaticKeyProvider
from vhsmfs.mount.randomaccess import TokenFile
from vhsmfs.mount.workers import MountWorkers
from vhsmfs.store import TokenStore

log = logging.getLogger("vhsm.mount")

BLANKS = 32  # new tokens whose keys are derived ahead, in the background


class KeyPrefetch:
    """Up to BLANKS new, uncommitted tokens with their keys derived, made on `workers.keygen`
    and refilled when half are used."""

    def __init__(self, store: TokenStore, workers: MountWorkers) -> None:
        self.store = store
        self.workers = workers
        self._blanks: deque[TokenFile] = deque()
        self._lock = threading.Lock()  # never held across I/O
        self._enabled = isinstance(store.keys, StaticKeyProvider)
        self._refilling = False

    def take(self) -> TokenFile | None:
        """A prepared token (to be claimed), or None if none is ready; starts a refill when
        the supply runs low."""
        with self._lock:
            tf = self._blanks.popleft() if self._blanks else None
            refill = self._enabled and len(self._blanks) < BLANKS // 2 and not self._refilling
            if refill:
                self._refilling = True
        if refill:
            self.workers.keygen.submit(self._refill)
        return tf

    def _refill(self) -> None:
        try:
            while True:
                with self._lock:
                    if len(self._blanks) >= BLANKS:
                        return
                tf = TokenFile.create(self.store, "", 0o600, workers=self.workers)
                with self._lock:
                    self._blanks.append(tf)
        except (OSError, VhsmError) as e:
            log.warning("could not prepare token keys: %s", e)
        finally:
            with self._lock:
                self._refilling = False

    def close(self) -> None:
        """Drop the tokens prepared and not used (nothing of them is stored yet). Call once the
        keygen pool is shut down, or when no take() can start a refill any more."""
        with self._lock:
            blanks, self._blanks = list(self._blanks), deque()
        for tf in blanks:
            tf.close()
