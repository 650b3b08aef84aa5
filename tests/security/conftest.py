"""Fixtures of the attack tests: directories both root and the second Unix user (tests/conftest.py)
can reach. The whole suite runs as root, as vhsm usually does."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory under /tmp that every user can reach (pytest's tmp_path is private to root):
    mode 0755, owned by root. Tests open it up further where the attack needs write access."""
    d = Path(tempfile.mkdtemp(prefix="vhsm-attack-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
