"""Unix socket paths longer than sun_path (108 bytes) are reached through /proc/self/fd."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

_LIMIT = 100


@contextlib.contextmanager
def usable(path: Path) -> Iterator[str]:
    """A path string bind()/connect() accept for `path`, valid inside the with block."""
    s = str(path)
    if len(s.encode()) <= _LIMIT:
        yield s
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)
