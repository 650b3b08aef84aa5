"""Tokens whose data keys are wrapped by the key service (`--key-service NAME`), in-process
(no daemon running): round trip, isolation from key files, and the key's lifecycle applying."""

from __future__ import annotations

from pathlib import Path

import pytest
from token_helpers import vhsm_in as vhsm


@pytest.fixture
def work(tmp_path: Path) -> Path:
    w = tmp_path / "work"
    w.mkdir()
    assert vhsm(w, "key", "generate-master-key").returncode == 0
    r = vhsm(w, "key", "generate", "vaultkey", "--type", "aes")
    assert r.returncode == 0, r.stderr
    (w / "doc.txt").write_bytes(b"wrapped by the key service\n" * 1000)
    return w


def _store(work: Path) -> str:
    r = vhsm(work, "token", "store", "doc.txt", "--key-service", "vaultkey", "--quiet")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_round_trip_and_audit(work: Path) -> None:
    tok = _store(work)
    r = vhsm(work, "token", "retrieve", tok, "out", "--key-service")
    assert r.returncode == 0, r.stderr
    assert (work / "out" / "doc.txt").read_bytes() == (work / "doc.txt").read_bytes()
    log = (work / "hsm_audit.log").read_text()
    assert "|ENCRYPTION|vaultkey|" in log  # the wrap, audited by the key service
    assert "|DECRYPTION|vaultkey|" in log  # the unwrap
    assert vhsm(work, "token", "verify", tok, "--key-service").returncode == 0


def test_key_file_cannot_open_key_service_token(work: Path) -> None:
    tok = _store(work)
    assert vhsm(work, "token", "generate-key", "f.key").returncode == 0
    r = vhsm(work, "token", "retrieve", tok, "out", "--key", "f.key")
    assert r.returncode == 1
    assert r.stderr.startswith("Error: wrong key") and r.stderr.count("\n") == 1
    assert not (work / "out").exists()


def test_destroyed_key_releases_nothing(work: Path) -> None:
    tok = _store(work)
    r = vhsm(work, "key", "set-state", "vaultkey", "deprecated")
    assert r.returncode == 0, r.stderr
    # DEPRECATED still processes: old tokens stay readable, new ones cannot be made
    assert vhsm(work, "token", "retrieve", tok, "before", "--key-service").returncode == 0
    r = vhsm(work, "token", "store", "doc.txt", "--key-service", "vaultkey")
    assert r.returncode == 1 and r.stderr.startswith("Error: ")
    r = vhsm(work, "key", "destroy", "vaultkey", "--confirm-destroy")
    assert r.returncode == 0, r.stderr
    r = vhsm(work, "token", "retrieve", tok, "out", "--key-service")
    assert r.returncode != 0
    assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1
    assert not (work / "out").exists()


def test_store_needs_a_key_name_and_one_kind_of_key(work: Path) -> None:
    r = vhsm(work, "token", "store", "doc.txt", "--key-service")
    assert r.returncode == 1 and "needs the name" in r.stderr
    assert vhsm(work, "token", "generate-key", "f.key").returncode == 0
    r = vhsm(work, "token", "store", "doc.txt", "--key", "f.key", "--key-service", "vaultkey")
    assert r.returncode == 1 and "exclude each other" in r.stderr
    assert not list((work / "secure_storage").glob("*.metadata"))
