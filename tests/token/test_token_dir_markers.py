"""Directories made through the mount are stored as directory-marker tokens: the token CLI
lists them as directories and `retrieve` recreates a directory, never an empty file."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from token_helpers import vhsm_in as vhsm


def test_mount_made_directory_lists_and_retrieves_as_directory(tmp_path: Path) -> None:
    work = tmp_path / "work"
    vault = work / "vault"
    vault.mkdir(parents=True)
    assert vhsm(work, "token", "generate-key", "k.key").returncode == 0
    r = vhsm(
        work, "mount", "--store", "secure_storage", "--key", "k.key", "--background", str(vault)
    )
    assert r.returncode == 0, r.stderr
    try:
        os.mkdir(vault / "reports", 0o750)
    finally:
        if vhsm(work, "umount", str(vault)).returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(vault)], capture_output=True)

    rows = json.loads(vhsm(work, "token", "list", "--key", "k.key", "--json").stdout)
    dirs = [row for row in rows if row["kind"] == "dir"]
    assert [d["name"] for d in dirs] == ["reports"]
    table = vhsm(work, "token", "list", "--key", "k.key").stdout
    assert "reports/" in table

    r = vhsm(work, "token", "retrieve", dirs[0]["token"], "out", "--key", "k.key")
    assert r.returncode == 0, r.stderr
    got = work / "out" / "reports"
    assert got.is_dir()
    assert r.stdout.strip() == "out/reports"
    assert got.stat().st_mode & 0o777 == 0o750
