"""A build check, not a behaviour test: the environment runs the pyfuse3 that `make` builds
(contrib/pyfuse3/install.sh: PyPI's 3.5.0 source plus read-reply-nogil.patch). Without the
patch the mount still works, but every 1 MiB read reply is copied into the kernel with the GIL
held and sequential reads lose about a quarter of their speed (docs/MOUNT.md), which no
functional test would notice."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PATCH = REPO / "contrib" / "pyfuse3" / "read-reply-nogil.patch"


def _added_lines(patch: str) -> list[str]:
    return [
        line[1:]
        for line in patch.splitlines()
        if line.startswith("+") and not line.startswith("+++") and line[1:].strip()
    ]


def test_installed_pyfuse3_is_the_patched_build() -> None:
    dist = importlib.metadata.distribution("pyfuse3")
    assert dist.version == "3.5.0"  # the version the patch is written against
    installed = Path(str(dist.locate_file("pyfuse3/handlers.pxi"))).read_text()
    added = _added_lines(PATCH.read_text())
    assert len(added) >= 5
    missing = [line for line in added if line not in installed]
    assert not missing, f"pyfuse3 was not built with {PATCH.name}: run make (or its install.sh)"
