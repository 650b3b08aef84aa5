"""Where the key service keeps its files.

compat.md: files live in the working directory by default so the addendum's backup and
monitoring scripts work as written. Precedence for each location (first match wins):

- data dir:   explicit argument (`--data-dir`) > $HSM_DATA_DIR > current directory.
  Holds keystore.dat, master.key (or master.key.protected), .hsm_user, the keystore lock
  and the daemon socket. Commands do not call `data_dir()` without an argument: they take
  the data dir from keysvc.discovery, which adds the config file's `data_dir` to this order.
- audit log:  explicit argument (`--audit-log`) > $HSM_AUDIT_LOG > <data dir>/hsm_audit.log.
  Its sidecars sit next to it as hidden files named after it: `.hsm_audit.log.key` (the
  HMAC chain key), `.hsm_audit.log.head` (last sequence number and chain value, kept outside
  the log so truncation of the tail is detected) and `.hsm_audit.log.lock` (the cross-process
  writer lock). Keeping them beside the log means one log always has exactly one chain.
- socket:     the lookup order is keysvc.discovery's (--socket, $HSM_SOCKET, the config
  file, $XDG_RUNTIME_DIR, /run/vhsm, then <data dir>/.vhsm-keysvc.sock).
"""

from __future__ import annotations

import os
from pathlib import Path

KEYSTORE_NAME = "keystore.dat"
MASTER_KEY_NAME = "master.key"
PROTECTED_MASTER_KEY_NAME = "master.key.protected"
AUDIT_LOG_NAME = "hsm_audit.log"
USER_FILE_NAME = ".hsm_user"
SOCKET_NAME = ".vhsm-keysvc.sock"
KEYSTORE_LOCK_NAME = ".keystore.lock"
POLICY_NAME = "keysvc-policy.toml"


def data_dir(override: str | os.PathLike[str] | None = None) -> Path:
    if override:
        return Path(override)
    env = os.environ.get("HSM_DATA_DIR")
    return Path(env) if env else Path.cwd()


def audit_log_path(
    override: str | os.PathLike[str] | None = None,
    data: str | os.PathLike[str] | None = None,
) -> Path:
    if override:
        return Path(override)
    env = os.environ.get("HSM_AUDIT_LOG")
    if env:
        return Path(env)
    return data_dir(data) / AUDIT_LOG_NAME


def audit_sidecar(log: Path, suffix: str) -> Path:
    """`.<logname>.<suffix>` beside the log (suffix: key, head, lock)."""
    return log.parent / f".{log.name}.{suffix}"


def user_file(data: str | os.PathLike[str] | None = None) -> Path:
    return data_dir(data) / USER_FILE_NAME
