"""Breaks in the audit chain: how they are recorded, acknowledged and told apart from rotation.

A writer that finds the log shorter than the head records, emptied or deleted, or its head gone
while the audit key shows a chain existed, cannot continue the chain it knows. It still writes
(an audited operation must not fail because someone damaged the log), but first appends a
chained `SECURITY_VIOLATION` line whose details start with `audit chain break: `. `audit verify`
fails on every such line that no later, chained acknowledgment covers: an operator who reset the
log on purpose (or restored it from a backup) records `CONFIG_CHANGE` `audit chain break
acknowledged: <reason>` with `vhsm audit acknowledge --reason TEXT`, which covers every break
before it in the chain.

A rotation is not a break: logrotate (contrib/keysvc/logrotate-hsm-audit: rename, `nocreate`
or `create`, `delaycompress`) leaves the old file beside the log as `<log>.N` or `<log>-DATE`,
ending with the entry the head records. The writer looks for such a file before it decides.

This module holds only names and rules; keysvc.audit does the reading and writing.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

BREAK_EVENT = "SECURITY_VIOLATION"
ACK_EVENT = "CONFIG_CHANGE"
WRITER_USER = "vhsm"  # the user field of lines the writer adds on its own
BREAK_PREFIX = "audit chain break: "
# What writers before chain breaks had their own name recorded for a cut tail: still a break.
LEGACY_BREAK_PREFIX = "audit log truncated: "
ACK_PREFIX = "audit chain break acknowledged: "
ACK_HINT = "if the reset was deliberate: vhsm audit acknowledge --reason TEXT"
# Compressed rotations cannot be read from the end cheaply; `delaycompress` keeps the newest
# rotated file plain until the next rotation, which is the one the writer needs.
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".lzma", ".Z", ".br")


def is_break(event: str, user: str, details: str) -> bool:
    return (
        event == BREAK_EVENT
        and user == WRITER_USER
        and details.startswith((BREAK_PREFIX, LEGACY_BREAK_PREFIX))
    )


def is_ack(event: str, details: str) -> bool:
    return event == ACK_EVENT and details.startswith(ACK_PREFIX)


@dataclass
class Breaks:
    """Chain breaks met while reading the chain in order, and how many were acknowledged."""

    open: list[tuple[str, int, str]] = field(default_factory=list)  # (where, seq, details)
    acknowledged: int = 0

    def see(self, where: str, seq: int, event: str, user: str, details: str) -> None:
        if is_break(event, user, details):
            self.open.append((where, seq, details))
        elif is_ack(event, details):
            self.acknowledged += len(self.open)
            self.open.clear()

    def first_open(self) -> str | None:
        """The verify failure for the first unacknowledged break, or None."""
        if not self.open:
            return None
        where, seq, details = self.open[0]
        reason = details.removeprefix(BREAK_PREFIX)
        return f"{where}: unacknowledged audit chain break at seq {seq} ({reason}); {ACK_HINT}"


def rotated_siblings(log: Path) -> list[Path]:
    """Plain rotated copies of `log` beside it (`<name>.N`, `<name>-DATE...`), newest first.
    Only regular files (lstat: a symlink is never followed); compressed ones are skipped."""
    pattern = re.compile(re.escape(log.name) + r"(\.\d+|-[0-9A-Za-z_.-]+)")
    found: list[tuple[int, Path]] = []
    try:
        names = os.listdir(log.parent)
    except OSError:
        return []
    for name in names:
        if not pattern.fullmatch(name) or name.endswith(_COMPRESSED):
            continue
        path = log.parent / name
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            found.append((st.st_mtime_ns, path))
    return [p for _, p in sorted(found, reverse=True)]
