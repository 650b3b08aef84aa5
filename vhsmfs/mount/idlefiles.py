"""Recently closed files kept loaded, least recently closed evicted first: tools chmod or utime
a file right after closing it, and a loaded file answers that without I/O (docs/MOUNT.md).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vhsmfs.mount.vault import FileNode

IDLE_KEEP = 256  # recently closed files kept loaded (chmod/utime after close need no I/O)
IDLE_MAX_CHUNKS = 4096  # ... if their manifest is small


class IdleFiles:
    """The closed, clean files still loaded, oldest first. Each file's own state is changed
    under its node.lock; this set's under a lock never held across I/O."""

    def __init__(self) -> None:
        self._files: dict[int, FileNode] = {}  # inode -> node, insertion-ordered: oldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._files)

    def drop_if_idle(self, node: FileNode, *, trim: bool) -> None:
        """A closed, clean file (caller holds node.lock): keep it loaded for a while if small,
        else release its descriptors and caches now. `trim=False` on the event loop: the file
        is only added, and the next flush or commit trims the set."""
        tf = node.tf
        if tf is None or node.opens or tf.dirty:
            return
        node.meta = tf.meta
        if tf.count <= IDLE_MAX_CHUNKS:
            tf.forget_cache()
            with self._lock:
                self._files.pop(node.ino, None)
                self._files[node.ino] = node
            if trim:
                self.trim(keep=node)
            return
        _unload(node)

    def discard(self, node: FileNode) -> None:
        """The file is gone (unlinked): no longer kept."""
        with self._lock:
            self._files.pop(node.ino, None)

    def trim(self, keep: FileNode | None = None) -> None:
        """Unload the oldest idle files beyond IDLE_KEEP (in a worker thread), except `keep`;
        one whose lock is taken is only dropped from the set."""
        if len(self._files) <= IDLE_KEEP:
            return
        with self._lock:
            evict = []
            while len(self._files) > IDLE_KEEP:
                evict.append(self._files.pop(next(iter(self._files))))
        for old in evict:
            if old is not keep and old.lock.acquire(blocking=False):
                try:
                    _unload(old)
                finally:
                    old.lock.release()


def _unload(node: FileNode) -> None:
    tf = node.tf
    if tf is not None and node.opens == 0 and not tf.dirty:
        node.meta = tf.meta
        tf.close()
        node.tf = None
