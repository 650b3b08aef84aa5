#!/usr/bin/env bash
# Back up a vhsm token store with rsync and scrub the copy without the key.
#
#   contrib/backup/backup-store.sh STORE_DIR BACKUP_ROOT
#
# Safe while `vhsm token store` runs: objects are immutable and a token is published by an atomic
# rename of its metadata, so the copy holds every token complete or not at all (leftovers of an
# unfinished store are removed by `vhsm token gc --store COPY`). For a mounted vault, unmount or
# snapshot first: a file rewritten during the copy may pair new metadata with old objects, which
# the --no-key scrub below reports (docs/FORMAT.md, section 9).
set -euo pipefail
store=${1:?usage: backup-store.sh STORE_DIR BACKUP_ROOT}
root=${2:?usage: backup-store.sh STORE_DIR BACKUP_ROOT}
dest="$root/$(date +%Y%m%d-%H%M%S)"
mkdir -p -m 0700 "$dest"
# Copy objects before metadata: a metadata file is never newer than the objects it names.
rsync -a --exclude='*.metadata' "$store/" "$dest/"
rsync -a "$store/" "$dest/"
vhsm token gc --store "$dest" >/dev/null
vhsm token verify --no-key --store "$dest"
echo "backup OK: $dest"
