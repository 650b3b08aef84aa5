"""`vhsm scan-hardware` / `hsm_enhanced -scan_hardware` against real stacks started by the
fixtures: swtpm (tpm_fixture), a SoftHSM2 token (softhsm_fixture), and pcscd with vpcd and the
virtual FIDO2 card in a private namespace (pcsc_fixture + virtual_ctap_card). The CLI always
runs as a subprocess; the tests parse its `--json` report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from pcsc_fixture import VPCD_PORTS, NsPcsc
from softhsm_fixture import MODULE, make_softhsm
from tpm_fixture import Swtpm, _port_pair, silent_tpm
from virtual_ctap_card import AAGUID, ATR

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 60
STACKS = ["tpm", "pkcs11", "pcsc", "fido2"]
VHSM = [sys.executable, "-m", "cli.main", "scan-hardware"]
HSM = [sys.executable, "-c", "from cli.compat import main; main()", "-scan_hardware"]


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    """An environment where nothing is present unless a test adds it: the TCTI names a port
    nobody listens on, SoftHSM2 has an empty token dir, libpcsclite a socket that does not
    exist (the machine's own pcscd, if any, stays out of the test)."""
    conf = tmp / "empty-softhsm2.conf"
    if not conf.exists():
        (tmp / "no-tokens").mkdir()
        conf.write_text(f"directories.tokendir = {tmp / 'no-tokens'}\nobjectstore.backend = file\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PKCS11_MODULE",)}
    env.update(
        PYTHONPATH=str(REPO),
        TPM2TOOLS_TCTI=f"swtpm:host=127.0.0.1,port={_port_pair()}",
        SOFTHSM2_CONF=str(conf),
        VHSM_PKCS11_MODULE=MODULE,
        PCSCLITE_CSOCK_NAME=str(tmp / "no-pcscd.comm"),
    )
    env.update(extra)
    return env


def _scan(env: dict[str, str], *args: str, cmd: list[str] = VHSM) -> dict[str, Any]:
    p = subprocess.run(
        [*cmd, *args, "-json" if cmd is HSM else "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert p.returncode == 0, p.stderr
    rep: dict[str, Any] = json.loads(p.stdout)
    assert list(rep) == STACKS
    return rep


def _text(env: dict[str, str], cmd: list[str] = VHSM) -> str:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    return p.stdout


# --- TPM: swtpm -----------------------------------------------------------------------------


def test_tpm_manufacturer_firmware_and_banks(swtpm: Swtpm, tmp_path: Path) -> None:
    env = _env(tmp_path, TPM2TOOLS_TCTI=swtpm.tcti)
    tpm = _scan(env)["tpm"]
    assert tpm["status"] == "present" and tpm["tcti"] == swtpm.tcti
    assert tpm["manufacturer"] == "IBM"  # swtpm is libtpms, IBM's reference TPM
    assert tpm["vendor"] == "SW TPM"
    assert len(tpm["firmware"].split(".")) == 4
    assert tpm["pcr_banks"] == ["sha1", "sha256", "sha384", "sha512"]  # swtpm's default
    out = _text(env)
    assert f"IBM SW TPM, firmware {tpm['firmware']}" in out and swtpm.tcti in out


def test_tpm_that_never_answers_does_not_hang_the_scan(tmp_path: Path) -> None:
    with silent_tpm() as tcti:
        env = _env(tmp_path, TPM2TOOLS_TCTI=tcti, VHSM_SCAN_TIMEOUT="1.5")
        t0 = time.monotonic()
        rep = _scan(env)
        assert time.monotonic() - t0 < 20
    assert rep["tpm"] == {"status": "error", "error": f"no answer at TCTI {tcti} within 1.5 s"}
    assert rep["pkcs11"]["status"] == "not present"  # the scan went on
    assert rep["fido2"]["status"] == "not present"


# --- PKCS#11: SoftHSM2 ----------------------------------------------------------------------


def test_softhsm_token_label_serial_mechanisms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hsm = make_softhsm(tmp_path)
    hsm.init_token("scan-label", "1234-pin")
    monkeypatch.setenv("SOFTHSM2_CONF", str(hsm.conf))  # for the fixture's own look at it
    serial = hsm.serial("scan-label")
    env = _env(tmp_path, SOFTHSM2_CONF=str(hsm.conf))
    for cmd in (VHSM, HSM):
        p11 = _scan(env, cmd=cmd)["pkcs11"]
        assert p11["status"] == "present"
        assert p11["modules"][0]["path"] == MODULE  # $VHSM_PKCS11_MODULE first
        assert p11["modules"][0]["manufacturer"] == "SoftHSM"
        tokens = [s["token"] | s for m in p11["modules"] for s in m["slots"] if s.get("token")]
        (tok,) = [t for t in tokens if t["label"] == "scan-label"]
        assert tok["serial"] == serial and tok["model"] == "SoftHSM v2"
        assert {"AES-GCM", "ECDSA"} <= set(tok["mechanisms"])
    out = _text(env, HSM)
    assert f"PKCS#11 module {MODULE}: SoftHSM (1 token(s))" in out  # compat lines kept
    assert f"token 'scan-label' in slot {tok['slot']}: SoftHSM project SoftHSM v2" in out
    assert f"serial {serial}" in out


def test_pkcs11_module_that_fails_is_one_line_and_scan_goes_on(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-module.so"
    bad.write_bytes(b"not an ELF file")
    rep = _scan(_env(tmp_path, VHSM_PKCS11_MODULE=str(bad)))
    first = rep["pkcs11"]["modules"][0]
    assert first["path"] == str(bad) and "\n" not in first["error"]
    assert [s["status"] for s in rep.values()][2:] == ["not present", "not present"]


# --- nothing present / libraries missing ----------------------------------------------------


def test_nothing_present(tmp_path: Path) -> None:
    env = _env(tmp_path)
    rep = _scan(env)
    assert {k: v["status"] for k, v in rep.items()} == dict.fromkeys(STACKS, "not present")
    assert rep["pcsc"]["reason"] == "no PC/SC service (is pcscd running?)"
    assert rep["fido2"]["devices"] == []
    out = _text(env)
    assert out.startswith("=== Hardware Scan ===\nSTACK")
    rows = out.splitlines()[2:6]  # the table, one row per stack
    titles = ("TPM 2.0", "PKCS#11", "Smart-card readers (PC/SC)", "FIDO2 devices")
    for title, row in zip(titles, rows, strict=True):
        assert row.startswith(title + " ") and "  not present  " in row


def test_missing_libraries_say_how_to_install(tmp_path: Path) -> None:
    block = (
        "import sys\n"
        "for m in ('tpm2_pytss', 'pkcs11', 'smartcard', 'fido2'):\n"
        "    sys.modules[m] = None  # makes `import m` fail\n"
        "sys.argv = ['vhsm', 'scan-hardware'] + sys.argv[1:]\n"
        "from cli.main import main\n"
        "main()\n"
    )
    env = _env(tmp_path)
    rep = _scan(env, cmd=[sys.executable, "-c", block])
    assert {k: v["status"] for k, v in rep.items()} == dict.fromkeys(STACKS, "library missing")
    assert "pip install tpm2-pytss" in rep["tpm"]["install"]
    assert "pip install python-pkcs11" in rep["pkcs11"]["install"]
    assert "pip install pyscard" in rep["pcsc"]["install"]
    assert "pip install 'fido2>=2'" in rep["fido2"]["install"]
    out = _text(env, [sys.executable, "-c", block])
    assert out.count("library missing") == 4 and "install: pip install tpm2-pytss" in out


# --- PC/SC + FIDO2: pcscd, vpcd and the virtual CTAP2 card in a private namespace ----------


def test_pcsc_reader_atr_and_fido2_authenticator(ns: NsPcsc, tmp_path: Path) -> None:
    ns.start_card(os.urandom(32), VPCD_PORTS[0])
    env = _env(tmp_path)
    del env["PCSCLITE_CSOCK_NAME"]  # the namespace's own pcscd
    p = ns.run([*VHSM, "--json"], env=env)
    assert p.returncode == 0, p.stderr.decode()
    rep = json.loads(p.stdout)
    pcsc = rep["pcsc"]
    assert pcsc["status"] == "present"
    readers = {r["name"]: r for r in pcsc["readers"]}
    with_card = [r for r in readers.values() if r["atr"]]
    assert [r["atr"] for r in with_card] == [ATR.hex().upper()]
    assert with_card[0]["name"].startswith("Virtual PCD")
    assert len(readers) == len(VPCD_PORTS)  # the empty slot is listed, without an ATR
    assert [r["card"] for r in readers.values() if not r["atr"]] == ["no card"]
    fido = rep["fido2"]
    assert fido["status"] == "present"
    (dev,) = [d for d in fido["devices"] if d["transport"] == "pcsc"]
    assert dev["name"] == with_card[0]["name"]
    assert dev["aaguid"] == str(uuid.UUID(bytes=AAGUID))
    assert dev["versions"] == ["FIDO_2_0", "FIDO_2_1"]
    assert dev["extensions"] == ["hmac-secret"]
    text = ns.run(VHSM, env=env)
    out = text.stdout.decode()
    assert f"card ATR {ATR.hex().upper()}" in out and "': no card" in out
    assert f"AAGUID {uuid.UUID(bytes=AAGUID)}, versions FIDO_2_0 FIDO_2_1" in out
