#!/usr/bin/env bash
# `make demo`: the main job end to end on the embedded defaults, in ./demo (recreated each run).
# Token store: key, store, list, verify (with and without key), retrieve, compare, delete.
# The vault mount (when available): mount, copy a file in and out, unmount.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$top/.venv/bin:$PATH"
demo="$top/demo"
if mountpoint -q "$demo/vault" 2>/dev/null; then fusermount3 -u "$demo/vault" || true; fi
rm -rf "$demo"
mkdir -p "$demo"
cd "$demo"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

head -c 3000000 /dev/urandom > report.bin
printf 'quarterly numbers\n' > contract.txt
step vhsm token generate-key doc_master.key
TOKEN1=$(vhsm token store contract.txt --key doc_master.key | grep "Token:" | awk '{print $2}')
echo "stored contract.txt as $TOKEN1"
step vhsm token store report.bin --key doc_master.key
step vhsm token list --key doc_master.key
step vhsm token verify --key doc_master.key
step vhsm token verify --no-key
step vhsm token retrieve "$TOKEN1" retrieved_docs/ --key doc_master.key
step cmp contract.txt retrieved_docs/contract.txt
echo "retrieved file is identical"
step tail -n 3 hsm_audit.log

if vhsm mount --help >/dev/null 2>&1; then
  mkdir -p vault
  step vhsm mount --store secure_storage --key doc_master.key --background vault
  trap 'vhsm umount vault 2>/dev/null || fusermount3 -u vault 2>/dev/null || true' EXIT
  step ls -l vault
  step cp report.bin vault/
  step cmp report.bin vault/report.bin
  step ls -l vault/"$TOKEN1"
  step cp vault/"$TOKEN1"/contract.txt from_vault.txt
  step cmp contract.txt from_vault.txt
  step vhsm umount vault
  trap - EXIT
  step vhsm token list --key doc_master.key
fi
printf '\ndemo finished: everything above round-tripped through the encrypted store in %s\n' "$demo"
