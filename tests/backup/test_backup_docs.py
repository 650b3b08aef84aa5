"""docs/BACKUP.md, contrib/backup/backup-store.sh and the backup tests use one exclude list and
one reading of the tools' exit codes: the list lives in backup_harness.EXCLUDES, and this test
fails when the page or the script says something else."""

from __future__ import annotations

import re
from pathlib import Path

from backup_harness import (
    EXCLUDES,
    OK_CODES,
    REPO,
    borg_excludes,
    restic_excludes,
    rsync_excludes,
    tar_excludes,
)

DOC = (REPO / "docs" / "BACKUP.md").read_text()
SCRIPT = (REPO / "contrib" / "backup" / "backup-store.sh").read_text()


def section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", DOC, re.S | re.M)
    assert m, f"docs/BACKUP.md has no section '## {title}'"
    return m.group(1)


def test_doc_lists_the_excludes_the_tests_use() -> None:
    listed = re.findall(r"^- `STORE/(.+?)/`$", section("What to exclude"), re.M)
    assert listed == list(EXCLUDES)


def test_doc_commands_use_the_excludes_the_tests_use() -> None:
    commands = section("Commands").replace('"', "")
    for flags in (
        rsync_excludes(),
        tar_excludes(),
        restic_excludes(Path("$STORE")),
        borg_excludes(),
    ):
        assert " ".join(flags) in commands, f"docs/BACKUP.md does not show {' '.join(flags)}"


def test_script_uses_the_excludes_and_accepts_rsync_24() -> None:
    rsync_lines = [ln for ln in SCRIPT.splitlines() if ln.lstrip().startswith("rsync ")]
    assert len(rsync_lines) == 1, "backup-store.sh copies in one rsync pass"
    for flag in rsync_excludes():
        assert flag in rsync_lines[0]
    assert '"$rc" -ne 24' in SCRIPT


def test_doc_exit_codes_are_the_ones_the_tests_accept() -> None:
    table = section("Exit codes")
    for tool, codes in OK_CODES.items():
        row = next(ln for ln in table.splitlines() if ln.startswith(f"| {tool}"))
        benign = {int(c) for c in re.findall(r"\*\*(\d+)\*\*", row)}
        assert {0} | benign == codes, f"{tool}: the doc says {benign}, the tests accept {codes}"
