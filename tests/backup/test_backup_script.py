"""contrib/backup/backup-store.sh while a mount, the CLI and gc write to the store: every run
succeeds (rsync's exit 24 is not a failure), and every copy it leaves is complete: the same
checks as the copies of test_backup_consistency.py (gc, both verifies, every token retrieved
and compared with what the writers wrote)."""

from __future__ import annotations

import pytest
from backup_harness import REPO, Config, check_and_report

SCRIPT = REPO / "contrib" / "backup" / "backup-store.sh"


@pytest.mark.timeout(600)
def test_backup_store_script_while_writers_run(harness) -> None:  # type: ignore[no-untyped-def]
    h = harness(Config(copies_per_tool=0))
    try:
        h.take_script_copies(SCRIPT, 4)
    finally:
        h.stop()
    h.collect()
    check_and_report(h)
