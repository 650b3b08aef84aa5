#!/usr/bin/env bash
# harden.sh - production set-up of the vhsm key service, after `make install` (docs/DEPLOY.md).
# The addendum's hardening.sh, adapted:
#   1. the service user and group (hsm-service), created only on the real root (--root /)
#   2. the data dir (/opt/hsm) owned by it, 0700; master key, keystore, audit files in it 0600
#   3. the socket dir /run/vhsm (0750) now, and a tmpfiles.d entry for after a reboot
#   4. memory locking for the service user (limits.d; the unit sets LimitMEMLOCK itself)
#   5. audit log rotation that keeps the HMAC chain verifiable (contrib/keysvc/logrotate-hsm-audit)
#   6. the systemd units (key service, vault mount template) with their paths rewritten
#   7. the example access policy as the data dir's policy if there is none (it grants nothing)
# Left out on purpose: the addendum's `tpm2_clear` (it wipes the TPM's owner hierarchy, and
# with it every key sealed there), and disabling ssh/cups/bluetooth or enabling a firewall:
# machine policy, not vhsm's to change.
#
# Usage: harden.sh [--root DIR] [--prefix /opt/vhsm] [--data-dir /opt/hsm] [--user hsm-service]
#                  [--dry-run]
# --root DIR works on a tree below DIR (a chroot or an image being built; the tests use a temp
# dir): the user must already exist there, since users are never created outside --root /.
# Nothing is enabled or started: the script prints the commands for that. Idempotent.
set -euo pipefail

ROOT=/
PREFIX=/opt/vhsm
DATA=/opt/hsm
SVC_USER=hsm-service
DRY=0
HERE=$(cd "$(dirname "$0")" && pwd)
CONTRIB=$(dirname "$HERE") # contrib/ in a checkout, PREFIX/share/vhsm after make install

die() {
	echo "harden.sh: $*" >&2
	exit 1
}
while [ $# -gt 0 ]; do
	case "$1" in
	--root) ROOT=${2:?--root needs a directory}; shift 2 ;;
	--prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
	--data-dir) DATA=${2:?--data-dir needs a directory}; shift 2 ;;
	--user) SVC_USER=${2:?--user needs a name}; shift 2 ;;
	--dry-run) DRY=1; shift ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) die "unknown argument: $1 (see --help)" ;;
	esac
done
[ "$(id -u)" = 0 ] || die "run as root (it creates users and changes owners)"
ROOT=$(cd "$ROOT" && pwd) || die "no such root: $ROOT"
R=${ROOT%/} # "" for the real root: paths are "$R/opt/hsm"

run() {
	if [ "$DRY" = 1 ]; then
		printf '+ %s\n' "$*"
	else
		"$@"
	fi
}
# install(1) sets mode and owner as it creates the file: never a moment with looser modes
put() { # put MODE OWNER SRC DEST [sed-expr]
	local mode=$1 owner=$2 src=$3 dest=$4 expr=${5:-}
	if [ "$DRY" = 1 ]; then
		printf '+ install -m %s -o %s %s %s\n' "$mode" "${owner%%:*}" "$src" "$dest"
		return
	fi
	local tmp
	tmp=$(mktemp)
	if [ -n "$expr" ]; then sed -e "$expr" "$src" >"$tmp"; else cat "$src" >"$tmp"; fi
	install -D -m "$mode" -o "${owner%%:*}" -g "${owner##*:}" "$tmp" "$dest"
	rm -f "$tmp"
}

# 1. service user and group
if ! getent passwd "$SVC_USER" >/dev/null; then
	[ -z "$R" ] || die "user $SVC_USER does not exist; create it first (users are created only with --root /)"
	getent group "$SVC_USER" >/dev/null || run groupadd --system "$SVC_USER"
	run useradd --system --gid "$SVC_USER" --no-create-home --home-dir "$DATA" \
		--shell /usr/sbin/nologin "$SVC_USER"
fi
if [ "$DRY" = 1 ] && ! getent passwd "$SVC_USER" >/dev/null; then
	GROUP=$SVC_USER
else
	GROUP=$(id -gn "$SVC_USER")
fi
OWNER="$SVC_USER:$GROUP"

# 2. data dir and the key service's files in it
run mkdir -p "$R$DATA"
run chown "$OWNER" "$R$DATA"
run chmod 0700 "$R$DATA"
for f in master.key master.key.protected keystore.dat hsm_audit.log .hsm_audit.log.key \
	.hsm_audit.log.head .hsm_user keysvc-policy.toml; do
	p="$R$DATA/$f"
	if [ -f "$p" ] && [ ! -L "$p" ]; then
		run chown "$OWNER" "$p"
		run chmod 0600 "$p"
	fi
done

# 3. socket dir (systemd's RuntimeDirectory= makes it too; this serves other init systems)
run mkdir -p "$R/run/vhsm"
run chown "$OWNER" "$R/run/vhsm"
run chmod 0750 "$R/run/vhsm"
put 0644 root:root /dev/stdin "$R/etc/tmpfiles.d/vhsm.conf" <<EOF
# vhsm key service socket directory (contrib/hardening/harden.sh)
d /run/vhsm 0750 $SVC_USER $GROUP -
EOF

# 4. memory locking: a file of its own in limits.d, not an append to limits.conf
put 0644 root:root /dev/stdin "$R/etc/security/limits.d/vhsm.conf" <<EOF
# vhsm key service: lock key material in memory (contrib/hardening/harden.sh)
$SVC_USER soft memlock unlimited
$SVC_USER hard memlock unlimited
EOF

# 5. audit log rotation
put 0644 root:root "$CONTRIB/keysvc/logrotate-hsm-audit" "$R/etc/logrotate.d/hsm-audit" \
	"s|/opt/hsm/|$DATA/|g"

# 6. systemd units, pointing at this install and data dir
paths="s|/opt/vhsm/|$PREFIX/|g; s|/opt/hsm|$DATA|g; s|^User=hsm-service|User=$SVC_USER|; s|^Group=hsm-service|Group=$GROUP|"
put 0644 root:root "$CONTRIB/keysvc/vhsm-keysvc.service" \
	"$R/etc/systemd/system/vhsm-keysvc.service" "$paths"
put 0644 root:root "$CONTRIB/mount/vhsm-mount@.service" \
	"$R/etc/systemd/system/vhsm-mount@.service" "$paths"
run mkdir -p "$R/etc/vhsm/mount"
run chmod 0700 "$R/etc/vhsm/mount"

# 7. an access policy that starts as shipped (only the service user is served)
if [ ! -e "$R$DATA/keysvc-policy.toml" ]; then
	put 0600 "$OWNER" "$CONTRIB/keysvc/keysvc-policy.example.toml" "$R$DATA/keysvc-policy.toml"
fi

if [ -z "$R" ] && [ "$DRY" = 0 ] && [ -d /run/systemd/system ]; then
	systemctl daemon-reload
fi
cat <<EOF
hardened $ROOT for user $SVC_USER (data dir $DATA, install $PREFIX). Next:
  put master.key (0600, owner $SVC_USER) or master.key.protected in $DATA
  systemctl enable --now vhsm-keysvc        # also hsm-service.service
  usermod -aG $GROUP USER                    # who may reach the socket; rights: $DATA/keysvc-policy.toml
EOF
