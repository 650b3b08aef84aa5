"""The FIDO2 hmac-secret master-key protector (keysvc/protect_fido2.py).

The main tests go through the real PC/SC stack: pcscd with the vpcd reader driver in a private
namespace (pcsc_fixture.py), a software CTAP2 authenticator as the card behind vpcd
(virtual_ctap_card.py), and python-fido2's CtapPcscDevice found by the protector itself. A few
fast ones plug the same authenticator in as a CtapDevice to cover the APDU layer, parsing of the
sealed dict and PIN lock-out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pcsc_fixture import VPCD_PORTS, NsPcsc, require_stack

from keysvc.errors import MasterKeyError, WrongMasterKeyError
from keysvc.protect_fido2 import Fido2Protector

fido2 = pytest.importorskip("fido2", reason="pip install fido2")
from fido2 import cbor  # noqa: E402
from fido2.ctap2 import Ctap2, Info  # noqa: E402
from fido2.ctap2.pin import ClientPin  # noqa: E402
from virtual_ctap_card import (  # noqa: E402
    AID_FIDO,
    CtapApplet,
    VirtualAuthenticator,
    VirtualCtapDevice,
)

PIN = "4711-vhsm"
REPO = Path(__file__).resolve().parents[2]


def _seal(ns: NsPcsc, key: bytes, pin: str | None = None) -> dict[str, Any]:
    answer = ns.run_client({"op": "seal", "master_key": key.hex(), "pin": pin})
    assert "error" not in answer, answer
    sealed: dict[str, Any] = answer["sealed"]
    return sealed


def _unseal(ns: NsPcsc, sealed: dict[str, Any], pin: str | None = None) -> dict[str, Any]:
    return ns.run_client({"op": "unseal", "sealed": sealed, "pin": pin})


def _flip(hex_text: str, at: int = 0) -> str:
    raw = bytearray(bytes.fromhex(hex_text))
    raw[at] ^= 0x01
    return raw.hex()


# --- through pcscd + vpcd + the virtual card --------------------------------------------------


def test_pcsc_round_trip_with_pin(ns: NsPcsc) -> None:
    card = ns.start_card(os.urandom(32))
    assert ns.run_client({"op": "set_pin", "pin": PIN}) == {"retries": 8}
    key = os.urandom(32)
    sealed = _seal(ns, key, PIN)
    text = json.dumps(sealed)
    assert key.hex() not in text and PIN not in text  # public values only
    assert set(sealed) == {"rp_id", "credential_id", "salt", "nonce", "ct"}
    assert sealed["rp_id"] == "vhsm.local"
    assert _unseal(ns, sealed, PIN) == {"master_key": key.hex()}
    # python-fido2 over PC/SC chains long commands (getAssertion with hmac-secret is over
    # 250 bytes) and fetches long answers with GET RESPONSE: both went through the real stack.
    assert {"chained", "get-response"} <= card.apdu_events()


def test_pcsc_round_trip_without_pin_and_pin_then_required(ns: NsPcsc) -> None:
    ns.start_card(os.urandom(32))
    key = os.urandom(32)
    sealed = _seal(ns, key)
    assert _unseal(ns, sealed) == {"master_key": key.hex()}
    # A PIN set later makes the authenticator demand it, and with user verification the
    # hmac-secret differs (CredRandomWithUV): the old seal no longer opens.
    ns.run_client({"op": "set_pin", "pin": PIN})
    assert _unseal(ns, sealed) == {
        "error": "MasterKeyError",
        "message": "the FIDO2 authenticator has a PIN: give it",
    }
    assert _unseal(ns, sealed, PIN)["error"] == "WrongMasterKeyError"


def test_pcsc_wrong_pin(ns: NsPcsc) -> None:
    ns.start_card(os.urandom(32))
    ns.run_client({"op": "set_pin", "pin": PIN})
    key = os.urandom(32)
    sealed = _seal(ns, key, PIN)
    answer = _unseal(ns, sealed, "0000-wrong")
    assert answer == {
        "error": "WrongMasterKeyError",
        "message": "wrong PIN for the FIDO2 authenticator",
    }
    # A wrong PIN unlocks nothing, and the right one still works afterwards.
    assert _unseal(ns, sealed, PIN) == {"master_key": key.hex()}


def test_pcsc_other_authenticator_cannot_unseal(ns: NsPcsc) -> None:
    secret = os.urandom(32)
    card = ns.start_card(secret)
    key = os.urandom(32)
    sealed = _seal(ns, key)
    card.stop()
    other = ns.start_card(os.urandom(32), port=VPCD_PORTS[1])
    assert _unseal(ns, sealed) == {
        "error": "WrongMasterKeyError",
        "message": "this authenticator does not hold the credential",
    }
    other.stop()
    # The same authenticator (same secret) brought back opens it: the secret is what counts.
    ns.start_card(secret)
    assert _unseal(ns, sealed) == {"master_key": key.hex()}


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("salt", "the FIDO2 authenticator's secret does not open the protected master key"),
        ("credential_id", "this authenticator does not hold the credential"),
        ("ct", "the FIDO2 authenticator's secret does not open the protected master key"),
        ("nonce", "the FIDO2 authenticator's secret does not open the protected master key"),
    ],
)
def test_pcsc_tampered_sealed_fields(ns: NsPcsc, field: str, message: str) -> None:
    ns.start_card(os.urandom(32))
    key = os.urandom(32)
    sealed = _seal(ns, key)
    tampered = dict(sealed, **{field: _flip(sealed[field], at=len(sealed[field]) // 4)})
    assert _unseal(ns, tampered) == {"error": "WrongMasterKeyError", "message": message}
    assert _unseal(ns, sealed) == {"master_key": key.hex()}


def test_pcsc_other_rp_id_is_refused(ns: NsPcsc) -> None:
    ns.start_card(os.urandom(32))
    sealed = _seal(ns, os.urandom(32))
    # The credential id is bound to its RP id inside the authenticator.
    answer = _unseal(ns, dict(sealed, rp_id="evil.example"))
    assert answer["error"] == "WrongMasterKeyError"


def test_pcsc_namespace_leaves_the_host_alone(tmp_path: Path) -> None:
    require_stack()
    host_run = Path("/run/pcscd")
    before = sorted(p.name for p in host_run.iterdir()) if host_run.exists() else None
    pcsc = NsPcsc(tmp_path)
    try:
        pcsc.start()
        # The test pcscd's socket is in the private dir; the host's /run/pcscd is as it was.
        assert (pcsc.run_dir / "pcscd.comm").is_socket()
        after = sorted(p.name for p in host_run.iterdir()) if host_run.exists() else None
        assert after == before
    finally:
        pcsc.close()
    assert not (pcsc.run_dir / "pcscd.comm").exists()  # pcscd stopped and cleaned up


def test_pcsc_reader_without_card(ns: NsPcsc) -> None:
    # pcscd runs and lists the vpcd readers, but no card is in them.
    assert ns.run_client({"op": "devices"}) == {
        "devices": [],
        "readers": ["Virtual PCD 00 00", "Virtual PCD 00 01"],
    }
    answer = ns.run_client({"op": "seal", "master_key": os.urandom(32).hex()})
    assert answer == {
        "error": "MasterKeyError",
        "message": "no FIDO2 authenticator found (PC/SC reader or USB key)",
    }


def test_pcsc_no_pcscd(tmp_path: Path) -> None:
    require_stack()
    pcsc = NsPcsc(tmp_path)
    try:
        pcsc.start(with_pcscd=False)
        answer = pcsc.run_client({"op": "unseal", "sealed": _valid_sealed()})
    finally:
        pcsc.close()
    assert answer["error"] == "MasterKeyError"
    assert answer["message"] == "no FIDO2 authenticator found (PC/SC reader or USB key)"


def test_hid_transport() -> None:
    if not Path("/dev/uhid").exists():
        pytest.skip("no /dev/uhid on this machine: no virtual USB HID authenticator possible")
    pytest.skip("/dev/uhid exists, but no uhid-backed virtual authenticator is written yet")


# --- in-process: the authenticator as a CtapDevice ------------------------------------------


@pytest.fixture
def device() -> VirtualCtapDevice:
    return VirtualCtapDevice(VirtualAuthenticator(os.urandom(32)))


def _valid_sealed() -> dict[str, object]:
    return {
        "rp_id": "vhsm.local",
        "credential_id": "00" * 92,
        "salt": "11" * 32,
        "nonce": "22" * 12,
        "ct": "33" * 48,
    }


def test_ctapdevice_round_trip(device: VirtualCtapDevice) -> None:
    ClientPin(Ctap2(device)).set_pin(PIN)
    key = os.urandom(32)
    sealed = Fido2Protector(device, pin=PIN, rp_id="host.example").seal(key)
    assert json.loads(json.dumps(sealed)) == sealed
    # unseal takes the RP id from the sealed dict (the PIN token is bound to it too)
    assert Fido2Protector(device, pin=PIN).unseal(sealed) == key
    assert Fido2Protector.kind == "fido2-hmac-secret"


@pytest.mark.parametrize(
    "edit",
    [
        {"salt": "11" * 31},
        {"salt": "zz" * 32},
        {"salt": 5},
        {"salt": None},
        {"credential_id": ""},
        {"credential_id": "00" * 1024},
        {"nonce": "22" * 16},
        {"ct": "33" * 64},
        {"rp_id": "Evil Host"},
        {"rp_id": ["vhsm.local"]},
    ],
)
def test_malformed_sealed_is_a_clean_error(
    device: VirtualCtapDevice, edit: dict[str, object]
) -> None:
    sealed = {k: v for k, v in {**_valid_sealed(), **edit}.items() if v is not None}
    with pytest.raises(MasterKeyError, match="malformed") as info:
        Fido2Protector(device).unseal(sealed)
    assert not isinstance(info.value, WrongMasterKeyError)


def test_pin_lockout_and_messages(device: VirtualCtapDevice) -> None:
    ClientPin(Ctap2(device)).set_pin(PIN)
    sealed = Fido2Protector(device, pin=PIN).seal(os.urandom(32))
    for _ in range(7):
        with pytest.raises(WrongMasterKeyError) as info:
            Fido2Protector(device, pin="9999-bad").unseal(sealed)
        assert "9999" not in str(info.value) and PIN not in str(info.value)
    assert ClientPin(Ctap2(device)).get_pin_retries()[0] == 1
    with pytest.raises(MasterKeyError, match="blocked"):
        Fido2Protector(device, pin="9999-bad").unseal(sealed)
    with pytest.raises(MasterKeyError, match="blocked"):
        Fido2Protector(device, pin=PIN).unseal(sealed)


def test_authenticator_without_hmac_secret_is_refused() -> None:
    # The protector checks getInfo before registering anything.
    auth = VirtualAuthenticator(os.urandom(32))
    info = auth._get_info
    auth._get_info = lambda: {**info(), 2: []}  # type: ignore[method-assign]
    with pytest.raises(MasterKeyError, match="does not support hmac-secret"):
        Fido2Protector(VirtualCtapDevice(auth)).seal(os.urandom(32))


def test_applet_chaining_extended_and_get_response() -> None:
    applet = CtapApplet(VirtualAuthenticator(os.urandom(32)))
    assert applet.process(bytes.fromhex("00A4040008") + AID_FIDO) == b"FIDO_2_0\x90\x00"
    # Command chaining (CLA bit 0x10): the getInfo byte in a first block, an empty last one.
    assert applet.process(bytes.fromhex("9010000001") + b"\x04") == b"\x90\x00"
    resp = applet.process(bytes.fromhex("8010000000"))
    assert resp[-2:] == b"\x90\x00" and resp[0] == 0
    assert Info.from_dict(cbor.decode(resp[1:-2])).extensions == ["hmac-secret"]
    # The same as an extended APDU: 00 Lc1 Lc2 data Le1 Le2.
    ext = applet.process(bytes.fromhex("80100000000001") + b"\x04" + b"\x00\x00")
    assert ext[-2:] == b"\x90\x00" and ext[0] == 0
    # A response longer than 256 bytes comes in pieces behind SW 61xx.
    big = b"\x00" + b"x" * 400
    applet._auth.handle = lambda _req: big  # type: ignore[method-assign]
    first = applet.process(bytes.fromhex("8010000001") + b"\x04" + b"\x00")
    assert len(first) == 258 and first[-2:] == bytes([0x61, 145])
    part = applet.process(bytes.fromhex("00C0000040"))  # Le 0x40: 64 bytes, 81 left
    assert len(part) == 66 and part[-2:] == bytes([0x61, 81])
    rest = applet.process(bytes.fromhex("00C0000051"))
    assert first[:-2] + part[:-2] + rest[:-2] == big and rest[-2:] == b"\x90\x00"


def _python(code: str) -> str:
    """Run `code` in a fresh interpreter with this checkout importable; its stdout."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
    ).stdout


def test_module_imports_without_fido2(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['fido2'] = None\n"
        "import keysvc.protect_fido2 as p\n"
        "try:\n    p.Fido2Protector().seal(bytes(32))\n"
        "except p.MasterKeyError as e:\n    print(e)\n"
    )
    out = _python(code)
    assert out.strip() == (
        "the fido2 protector needs python-fido2: pip install fido2 (and pyscard for PC/SC readers)"
    )


def test_unusable_pcsc_is_named_when_nothing_is_found() -> None:
    # As with python-fido2 1.x next to pyscard >= 2.2.2: fido2.pcsc fails to import.
    sealed = _valid_sealed()
    code = (
        "import sys; sys.modules['fido2.pcsc'] = None\n"
        "import keysvc.protect_fido2 as p\n"
        f"try:\n    p.Fido2Protector().unseal({sealed!r})\n"
        "except p.MasterKeyError as e:\n    print(type(e).__name__, e)\n"
    )
    out = _python(code)
    assert out.startswith("MasterKeyError no FIDO2 authenticator found (PC/SC reader or USB key); ")
    assert "PC/SC unusable" in out and "pip install 'fido2>=2' pyscard" in out
