"""File names in the mount's log.

The log is a plain file (`vhsm mount --background --log FILE`, or wherever the caller sends
stderr): the plaintext names the vault encrypts must not end up there. Log lines name inode
numbers and token ids; the names themselves are added only when debug logging is on
(`vhsm mount --debug`, documented as writing names), and then as repr(), so a name's control
characters cannot forge log lines or drive the terminal of whoever reads the log.
"""

from __future__ import annotations

import logging

log = logging.getLogger("vhsm.mount")


def logged_name(name: str | bytes) -> str:
    """`name` for a log line: repr() with debug logging on, else a placeholder."""
    return repr(name) if log.isEnabledFor(logging.DEBUG) else "<name>"
