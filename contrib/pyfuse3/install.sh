#!/usr/bin/env bash
# Install pyfuse3 3.5.0 from its PyPI source release with vhsm's patch, nogil-copies.patch:
# pyfuse3 copies each request out of the kernel, a write's data into a bytes object and a read's
# reply back into the kernel while holding the GIL (about 150-300 µs per 1 MiB), which stalls the
# mount's encryption, hashing and read-ahead threads. The patch lets go of the GIL around those
# copies (docs/MOUNT.md, "Concurrency"). The mount also runs on a stock pyfuse3, only slower.
# Usage: contrib/pyfuse3/install.sh PATH/TO/VENV/bin/pip
# Does nothing if this patched build is installed already. Needs fuse3 headers (libfuse3-dev,
# pkg-config), patch and a C compiler; pip fetches the build tools (setuptools, Cython).
set -euo pipefail
PIP=${1:?usage: $0 PIP}
HERE=$(cd "$(dirname "$0")" && pwd)
VERSION=3.5.0
SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
PATCH="$HERE/nogil-copies.patch"
PY="$(dirname "$PIP")/python"

# Installed already? Every line the patch adds must be in the installed sources.
if "$PY" - "$PATCH" "$VERSION" <<'PY' 2>/dev/null; then
import importlib.metadata as md, pathlib, sys
patch, version = pathlib.Path(sys.argv[1]).read_text(), sys.argv[2]
dist = md.distribution("pyfuse3")
if dist.version != version:
    sys.exit(1)
files, added = {}, []
for line in patch.splitlines():
    if line.startswith("+++ b/src/"):
        name = line[len("+++ b/src/"):]
        files[name] = pathlib.Path(str(dist.locate_file(name))).read_text()
    elif line.startswith("+") and line[1:].strip():
        added.append((name, line[1:]))
sys.exit(0 if all(text in files[name] for name, text in added) else 1)
PY
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PIP" download -q --no-binary :all: --no-deps "pyfuse3==$VERSION" -d "$work"
echo "$SHA256  $work/pyfuse3-$VERSION.tar.gz" | sha256sum -c --quiet
tar -xzf "$work/pyfuse3-$VERSION.tar.gz" -C "$work"
patch -s -d "$work/pyfuse3-$VERSION" -p1 < "$PATCH"
"$PIP" install -q --no-deps --force-reinstall "$work/pyfuse3-$VERSION"
echo "installed pyfuse3 $VERSION with contrib/pyfuse3/nogil-copies.patch"
