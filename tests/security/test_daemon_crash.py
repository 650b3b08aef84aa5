"""A daemon that really crashes says so (issue 11, class 3): on stderr and in the audit log as
a crash, never as the normal "key service stopped", and it exits non-zero without saving
what it held in memory."""

from __future__ import annotations

import os
from pathlib import Path

from hostile import audit_lines, exchange, frame, key_service


def test_crash_is_logged_as_a_crash(shared_dir: Path) -> None:
    """keystore.dat replaced by a directory while the daemon runs: publishing a new key fails,
    and so does reloading the last durable keystore, so the daemon cannot go back to a state
    it knows is on disk. It stops, and that stop is a crash."""
    with key_service(shared_dir) as d:
        d.owner_ok()
        ks = d.data_dir / "keystore.dat"
        os.rename(ks, d.data_dir / "keystore.dat.saved")
        ks.mkdir()
        (ks / "x").write_text("in the way")
        r = exchange(d.sock, frame({"op": "generate", "key": "new"}), 1)
        assert r == [None]  # no answer: the daemon went down with the request
        rc = d.wait_exit()
        assert rc != 0
        err = d.stderr
        assert "key service crashed: KeystoreError" in err
        assert "key service stopped" not in err
        assert "Error: key service crashed: KeystoreError" in err  # the CLI's one line
        last = audit_lines(d.data_dir)[-1]
        assert last[1] == "CONFIG_CHANGE" and last[5] == "FAILURE"
        assert "key service crashed: KeystoreError" in last[4]
        assert not any("key service stopped" in ln[4] for ln in audit_lines(d.data_dir))
        # nothing was saved on the way down: the directory is still there, untouched
        assert sorted(p.name for p in ks.iterdir()) == ["x"]
