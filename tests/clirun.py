"""Run the vhsm CLI as a subprocess (tests shared by several test directories)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

VHSM = [sys.executable, "-m", "cli.main"]


def vhsm(work: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`vhsm ARGS` in `work`, capturing text output; never raises on a non-zero exit."""
    return subprocess.run([*VHSM, *args], cwd=work, capture_output=True, text=True,
                          timeout=timeout)
