#!/usr/bin/env bash
# Install pyfuse3 3.5.0 from its PyPI source release with vhsm's one-hunk patch
# (read-reply-nogil.patch: large read replies are copied into the kernel without holding
# the GIL, so the mount's decryption threads keep running meanwhile; see docs/MOUNT.md).
# Usage: contrib/pyfuse3/install.sh PATH/TO/VENV/bin/pip
# Does nothing if the patched build is installed already. Needs fuse3 headers (libfuse3-dev,
# pkg-config) and a C compiler; pip fetches the build tools (setuptools, Cython) from PyPI.
set -euo pipefail
PIP=${1:?usage: $0 PIP}
HERE=$(cd "$(dirname "$0")" && pwd)
VERSION=3.5.0
SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
PATCH="$HERE/read-reply-nogil.patch"
PY="$(dirname "$PIP")/python"

installed=$("$PY" - <<'PY' 2>/dev/null || true
import importlib.metadata as md, pathlib
dist = md.distribution("pyfuse3")
pxi = pathlib.Path(dist.locate_file("pyfuse3/handlers.pxi"))
print(dist.version, "patched" if "vhsm:" in pxi.read_text() else "stock")
PY
)
if [ "$installed" = "$VERSION patched" ]; then
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PIP" download -q --no-binary :all: --no-deps "pyfuse3==$VERSION" -d "$work"
echo "$SHA256  $work/pyfuse3-$VERSION.tar.gz" | sha256sum -c --quiet
tar -xzf "$work/pyfuse3-$VERSION.tar.gz" -C "$work"
patch -s -d "$work/pyfuse3-$VERSION" -p1 < "$PATCH"
"$PIP" install -q --no-deps --force-reinstall "$work/pyfuse3-$VERSION"
echo "installed pyfuse3 $VERSION with contrib/pyfuse3/read-reply-nogil.patch"
