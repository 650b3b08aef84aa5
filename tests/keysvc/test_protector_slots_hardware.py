"""Protector slots with real hardware stacks, through the CLI as a user runs it: a PKCS#11 slot
on a real SoftHSM2 token and a TPM slot on a real swtpm unlock the key service unattended, and
each failure (wrong PIN, PCRs changed, a module path planted in the file) is one line."""

from __future__ import annotations

import json
from pathlib import Path

from ksutil import Work
from softhsm_fixture import MODULE, make_softhsm
from tpm_fixture import Swtpm, pcr_extend

from keysvc import audit

PIN = "4821-pin"


def only_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    return lines[0]


def _slots(w: Work) -> list[dict[str, object]]:
    doc = json.loads((w.path / "master.key.protected").read_text())
    slots: list[dict[str, object]] = doc["slots"]
    return slots


def test_pkcs11_slot_unlocks_unattended_and_never_stores_the_module(tmp_path: Path) -> None:
    hsm = make_softhsm(tmp_path)
    hsm.init_token("vhsm-test", PIN)
    d = tmp_path / "w"
    d.mkdir()
    w = Work(d)
    w.hsm("-generate_master_key")
    env = {**w.env, **hsm.env, "VHSM_TEST_PIN": PIN}
    w.vhsm(
        "key", "protector", "add", "pkcs11", "--label", "token", "--token-label", "vhsm-test",
        "--module", MODULE, "--pin-source", "env:VHSM_TEST_PIN", "--remove-raw", env=env,
    )  # fmt: skip
    assert not (d / "master.key").exists()
    (slot,) = _slots(w)
    assert slot["kind"] == "pkcs11"
    params = slot["params"]
    assert isinstance(params, dict) and "module" not in params  # code is never named on disk
    assert PIN not in (d / "master.key.protected").read_text()

    # unattended: the PIN from its source, the module from the usual Debian path
    w.vhsm("key", "--no-daemon", "generate", "k", env=env)
    assert w.vhsm("key", "--no-daemon", "list", env=env).stdout.split() == ["k"]

    p = w.vhsm("key", "--no-daemon", "list", env={**env, "VHSM_TEST_PIN": "0000"}, check=False)
    line = only_error_line(p.stderr)
    assert p.returncode == 1 and "0000" not in line and PIN not in line

    # a module path planted in the file is refused before anything is loaded
    doc = json.loads((d / "master.key.protected").read_text())
    doc["slots"][0]["params"]["module"] = str(tmp_path / "evil.so")
    (d / "master.key.protected").write_text(json.dumps(doc))
    p = w.vhsm("key", "--no-daemon", "list", env=env, check=False)
    assert p.returncode == 1 and "names a module" in only_error_line(p.stderr)


def test_tpm_slot_unlocks_until_a_sealed_pcr_changes(tmp_path: Path, swtpm: Swtpm) -> None:
    d = tmp_path / "w"
    d.mkdir()
    w = Work(d)
    w.hsm("-generate_master_key")
    env = w.env
    w.vhsm(
        "key", "protector", "add", "tpm2", "--label", "tpm", "--tcti", swtpm.tcti,
        "--pcrs", "23", "--remove-raw", env=env,
    )  # fmt: skip
    (slot,) = _slots(w)
    assert slot["kind"] == "tpm2" and slot["params"] == {"tcti": swtpm.tcti, "pcrs": [23]}
    w.vhsm("key", "--no-daemon", "generate", "k", env=env)
    assert w.vhsm("key", "--no-daemon", "list", env=env).stdout.split() == ["k"]

    pcr_extend(swtpm.tcti, 23)
    p = w.vhsm("key", "--no-daemon", "list", env=env, check=False)
    assert p.returncode == 1 and "PCRs changed" in only_error_line(p.stderr)


def test_a_refused_hardware_slot_is_audited_when_another_slot_unlocks(
    tmp_path: Path, swtpm: Swtpm
) -> None:
    d = tmp_path / "w"
    d.mkdir()
    w = Work(d)
    w.hsm("-generate_master_key")
    w.vhsm(
        "key", "protector", "add", "tpm2", "--tcti", swtpm.tcti, "--pcrs", "23", "--remove-raw",
    )  # fmt: skip
    w.vhsm(
        "key", "protector", "add", "passphrase-argon2id",
        env={**w.env, "HSM_NEW_MASTER_PASSPHRASE": "fallback-pw"},
    )  # fmt: skip
    pcr_extend(swtpm.tcti, 23)
    env = {**w.env, "HSM_MASTER_PASSPHRASE": "fallback-pw"}
    w.vhsm("key", "--no-daemon", "generate", "k", env=env)  # the passphrase slot unlocks
    failures = [e for e in audit.read_entries(d / "hsm_audit.log") if e.event == "AUTH_FAILURE"]
    assert len(failures) == 1, failures
    assert "slot 1 (tpm2)" in failures[0].details and "PCRs changed" in failures[0].details
    assert audit.verify([d / "hsm_audit.log"]).ok
