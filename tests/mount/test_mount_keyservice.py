"""`vhsm mount --key-service NAME`: files created through the mount get data keys wrapped by the
key service (detached mount process included); the CLI and the mount read each other's tokens."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest


@pytest.fixture
def vhsm(run_cli):  # type: ignore[no-untyped-def]
    """vhsm(work, *args): the CLI in `work`, never raising on a non-zero exit."""
    return lambda work, *args: run_cli(*args, check=False, cwd=work)


def test_key_service_mount_round_trip(tmp_path: Path, vhsm) -> None:  # type: ignore[no-untyped-def]
    work = tmp_path / "work"
    vault = work / "vault"
    vault.mkdir(parents=True)
    assert vhsm(work, "key", "generate-master-key").returncode == 0
    assert vhsm(work, "key", "generate", "vaultkey", "--type", "aes").returncode == 0
    (work / "cli.txt").write_text("stored by the CLI\n")
    r = vhsm(work, "token", "store", "cli.txt", "--key-service", "vaultkey", "-q")
    assert r.returncode == 0, r.stderr
    cli_token = r.stdout.strip()

    r = vhsm(
        work,
        "mount",
        "--store",
        "secure_storage",
        "--key-service",
        "vaultkey",
        "--background",
        str(vault),
    )
    assert r.returncode == 0, r.stderr
    try:
        assert (vault / cli_token / "cli.txt").read_text() == "stored by the CLI\n"
        (vault / "mounted.txt").write_bytes(b"written through the mount\n" * 100)
    finally:
        if vhsm(work, "umount", str(vault)).returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(vault)], capture_output=True)

    rows = json.loads(vhsm(work, "token", "list", "--key-service", "--json").stdout)
    [mounted] = [row for row in rows if row["name"] == "mounted.txt"]
    r = vhsm(work, "token", "retrieve", mounted["token"], "out", "--key-service")
    assert r.returncode == 0, r.stderr
    assert (work / "out" / "mounted.txt").read_bytes() == b"written through the mount\n" * 100
    # a key file cannot open what the key service wrapped
    assert vhsm(work, "token", "generate-key", "f.key").returncode == 0
    r = vhsm(work, "token", "retrieve", mounted["token"], "out2", "--key", "f.key")
    assert r.returncode == 1 and r.stderr.startswith("Error: wrong key")


def test_key_service_mount_needs_a_key_name(tmp_path: Path, vhsm) -> None:  # type: ignore[no-untyped-def]
    vault = tmp_path / "vault"
    vault.mkdir()
    r = vhsm(tmp_path, "mount", "--store", "s", "--key-service", "--background", str(vault))
    assert r.returncode == 1 and "needs the name" in r.stderr
    assert not (tmp_path / "s").exists()
