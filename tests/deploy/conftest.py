"""Fixtures for the deployment tests: `make install` into a temp prefix that every user can
reach (once per module: it takes about 25 s)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from deployutil import make_install


@pytest.fixture(scope="module")
def signing_install() -> Iterator[Path]:
    """A signing-only install (EXTRAS empty: no pyfuse3, no hardware libraries) in a 0755
    directory under /tmp, with its links in PREFIX/../links."""
    top = Path(tempfile.mkdtemp(prefix="vhsm-install-", dir="/tmp"))
    os.chmod(top, 0o755)
    prefix = top / "opt-vhsm"
    try:
        make_install(
            prefix,
            "EXTRAS=",
            f"BINDIR={top / 'links' / 'bin'}",
            f"MANLINKDIR={top / 'links' / 'man1'}",
        )
        yield prefix
    finally:
        shutil.rmtree(top, ignore_errors=True)
