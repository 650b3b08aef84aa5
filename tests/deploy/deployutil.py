"""Helpers for the deployment tests: `make install` from this checkout. Named deployutil (not
conftest) so the module name is unique across the test tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# tests/keysvc/ksutil.py: the real CLI and daemon, reused rather than copied
sys.path.insert(0, str(REPO / "tests" / "keysvc"))


def make_install(prefix: Path, *args: str, timeout: float = 600) -> None:
    """`make install PREFIX=prefix` from this checkout, with links only where `args` say."""
    res = subprocess.run(
        ["make", "--no-print-directory", "install", f"PREFIX={prefix}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
