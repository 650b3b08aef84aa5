#!/usr/bin/env bash
# Back up a vhsm token store with rsync, then make the copy consistent and scrub it without the
# key (docs/BACKUP.md).
#
#   contrib/backup/backup-store.sh STORE_DIR BACKUP_ROOT
#
# Writes BACKUP_ROOT/<date-time>/ and prints "backup OK: <that directory>" when the copy holds
# only complete tokens. Safe while `vhsm token store/delete/gc` run and while the store is
# mounted (ARCHITECTURE.md rule 8): one rsync pass copies the store in whatever order it walks
# it, then `vhsm token gc --store COPY` brings every token back to its newest complete
# generation (or removes a token stored or deleted while the copy ran), and
# `vhsm token verify --no-key --store COPY` checks every byte of every token. Exits non-zero
# if any step fails. VHSM=/path/to/vhsm picks the command (default: vhsm on PATH);
# RSYNC_OPTS adds rsync options (split on spaces), e.g. RSYNC_OPTS="--bwlimit=20m".
set -euo pipefail
store=${1:?usage: backup-store.sh STORE_DIR BACKUP_ROOT}
root=${2:?usage: backup-store.sh STORE_DIR BACKUP_ROOT}
vhsm=${VHSM:-vhsm}

[ -f "$store/VHSM-STORE" ] || { echo "backup-store.sh: $store is not a vhsm store" >&2; exit 2; }
mkdir -p -m 0700 "$root"
dest="$root/$(date +%Y%m%d-%H%M%S)"
# A fresh directory every run: never rsync into an older copy (mkdir fails if it exists).
mkdir -m 0700 "$dest"

# The exclude list of docs/BACKUP.md: STORE/.tmp/ holds files being written (never part of a
# commit). The leading / anchors it at the top of the store.
rc=0
# shellcheck disable=SC2086  # RSYNC_OPTS is a list of options
rsync -a ${RSYNC_OPTS:-} --exclude=/.tmp/ "$store/" "$dest/" || rc=$?
# 24 = "some files vanished before they could be transferred". In a live store that is a file
# removed between rsync's listing and its copy: an object or generation file pruned after the
# grace period, or a token deleted meanwhile. Neither is needed by the newest complete
# generation the copy holds of each token, and gc below removes a token left incomplete, so
# the copy is good. Every other non-zero code is a real failure.
if [ "$rc" -ne 0 ] && [ "$rc" -ne 24 ]; then
    echo "backup-store.sh: rsync failed with exit code $rc; $dest is incomplete" >&2
    exit "$rc"
fi
"$vhsm" token gc --store "$dest" >/dev/null
"$vhsm" token verify --no-key --store "$dest"
echo "backup OK: $dest"
