"""A build check, not a behaviour test: the environment runs the pyfuse3 that `make` builds
(contrib/pyfuse3/install.sh: PyPI's 3.5.0 source plus nogil-copies.patch). Without the patch
the mount still works, but pyfuse3 holds the GIL while it copies each 1 MiB request and reply,
and sequential reads and writes lose speed (docs/MOUNT.md), which no functional test would
notice."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PATCH = REPO / "contrib" / "pyfuse3" / "nogil-copies.patch"


def _added_lines(patch: str) -> dict[str, list[str]]:
    """The lines the patch adds, per file (path inside the package's src/). install.sh has its
    own copy of this check on purpose: the test is the independent witness that the script's
    "already patched" answer is right."""
    added: dict[str, list[str]] = {}
    name = ""
    for line in patch.splitlines():
        if line.startswith("+++ b/src/"):
            name = line.removeprefix("+++ b/src/")
            added[name] = []
        elif line.startswith("+") and line[1:].strip():
            added[name].append(line[1:])
    return added


def test_installed_pyfuse3_is_the_patched_build() -> None:
    dist = importlib.metadata.distribution("pyfuse3")
    assert dist.version == "3.5.0"  # the version the patch is written against
    added = _added_lines(PATCH.read_text())
    assert set(added) == {"pyfuse3/handlers.pxi", "pyfuse3/internal.pxi"}
    for name, lines in added.items():
        installed = Path(str(dist.locate_file(name))).read_text()
        missing = [line for line in lines if line not in installed]
        assert not missing, f"pyfuse3 was not built with {PATCH.name} ({name}): run make"


def test_install_script_keeps_the_installed_patched_build() -> None:
    """`make` runs install.sh on every venv rebuild: with the patched build in place it must
    recognise it (no download, no rebuild, no output)."""
    pip = Path(sys.executable).with_name("pip")
    res = subprocess.run(
        ["bash", str(REPO / "contrib" / "pyfuse3" / "install.sh"), str(pip)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == ""
