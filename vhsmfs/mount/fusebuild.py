"""Which pyfuse3 the mount would run, found without importing it.

pyfuse3 is an optional dependency (the `mount` extra): signing-only installs leave it out, and
`vhsm mount` then says in one line how to get it. `make` and `make install` build pyfuse3 3.5.0
with contrib/pyfuse3/nogil-copies.patch; a plain `pip install 'vhsm[mount]'` gets PyPI's build,
which holds the GIL while it copies each request and reply (docs/MOUNT.md, "Concurrency").
The patched build is recognised by the comments the patch adds to the Cython sources that
pyfuse3 installs beside its extension module (built from the same tree), as
contrib/pyfuse3/install.sh recognises it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

# One comment line from each file nogil-copies.patch changes.
PATCH_MARKERS = {
    "pyfuse3/handlers.pxi": "# vhsm: a large request is copied without the GIL",
    "pyfuse3/internal.pxi": "# vhsm: reading a request copies it out of the kernel",
}
INSTALL_HINT = (
    "the mount needs pyfuse3, which this install lacks: pip install 'vhsm[mount]' "
    "(needs libfuse3-dev, pkg-config and a C compiler), or `make install`, which builds "
    "vhsm's faster patched pyfuse3"
)
STOCK_COST = (
    "it holds the GIL while copying each request and reply (150-300 us per MiB), so large "
    "sequential reads run about 30% and writes about 10% slower than with vhsm's patched "
    "build (contrib/pyfuse3/install.sh; `make install` uses it)"
)


def available() -> bool:
    try:
        return importlib.util.find_spec("pyfuse3") is not None
    except ValueError:  # sys.modules["pyfuse3"] is None: imports of it are blocked
        return False


def patched() -> bool:
    """True when the installed pyfuse3 was built with contrib/pyfuse3/nogil-copies.patch."""
    try:
        dist = importlib.metadata.distribution("pyfuse3")
    except importlib.metadata.PackageNotFoundError:
        return False
    for name, marker in PATCH_MARKERS.items():
        try:
            text = Path(str(dist.locate_file(name))).read_text(errors="replace")
        except OSError:  # a wheel without its sources: not ours
            return False
        if marker not in text:
            return False
    return True


def describe() -> tuple[bool, str]:
    """(patched, one line naming the build that runs and, for PyPI's, what it costs)."""
    try:
        version = importlib.metadata.version("pyfuse3")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    if patched():
        return True, f"pyfuse3 {version} with vhsm's nogil-copies patch"
    return False, f"pyfuse3 {version} as published on PyPI, without vhsm's patch: {STOCK_COST}"
