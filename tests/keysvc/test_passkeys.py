"""Passkeys (keysvc/passkeys.py, `vhsm passkey ...`).

The first two tests run the real CLI inside the pcscd namespace (pcsc_fixture.py): pcscd + vpcd +
the software CTAP2 card (virtual_ctap_card.py), found by python-fido2's CtapPcscDevice. The
others plug the same authenticator straight into python-fido2 (`VirtualCtapDevice`) for speed,
some through a wrapper that alters what the authenticator answers (a forged attestation, an
assertion by another authenticator's key) to show the relying party refuses it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pcsc_fixture import CLIENT_TIMEOUT, REPO, VPCD_PORTS, NsPcsc

from keysvc import audit, passkeys
from keysvc.errors import KeyExistsError, KeyNotFoundError, VerificationFailed
from keysvc.passkeys import PasskeyError

pytest.importorskip("fido2", reason="pip install fido2")
from fido2 import cbor  # noqa: E402
from fido2.ctap2 import Ctap2  # noqa: E402
from fido2.ctap2.pin import ClientPin  # noqa: E402
from virtual_ctap_card import VirtualAuthenticator, VirtualCtapDevice  # noqa: E402

PIN = "4711-vhsm"


# --- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir(mode=0o700)
    return d


def _kw(data: Path) -> dict[str, Any]:
    return {"data_dir": data, "audit_log": data / "hsm_audit.log", "user": "tester"}


def _card(secret: bytes | None = None) -> VirtualCtapDevice:
    return VirtualCtapDevice(VirtualAuthenticator(secret or os.urandom(32)))


def _audit(data: Path) -> list[tuple[str, str, str, str]]:
    """(event, key, details, SUCCESS|FAILURE) of every line; the chain verified first."""
    log = data / "hsm_audit.log"
    assert audit.verify([log]).ok
    return [
        (e.event, e.key, e.details, "SUCCESS" if e.success else "FAILURE")
        for e in audit.read_entries(log)
    ]


def _stored(data: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((data / "passkeys.json").read_text())
    return doc["passkeys"]


def _edit(data: Path, name: str, **fields: Any) -> None:
    path = data / "passkeys.json"
    doc = json.loads(path.read_text())
    doc["passkeys"][name].update(fields)
    path.write_text(json.dumps(doc))


class Rewriting(VirtualCtapDevice):
    """A device whose CTAP2 requests and answers a test may rewrite (CBOR maps)."""

    def __init__(
        self,
        inner: VirtualCtapDevice,
        request: Callable[[int, dict[int, Any]], None] = lambda cmd, p: None,
        answer: Callable[[int, dict[int, Any]], None] = lambda cmd, r: None,
    ) -> None:
        self._inner, self._request, self._answer = inner, request, answer

    def call(
        self, cmd: int, data: bytes = b"", event: Any = None, on_keepalive: Any = None
    ) -> bytes:
        data = bytes(data)
        if data and data[0] in (0x01, 0x02) and len(data) > 1:
            params = cbor.decode(data[1:])
            self._request(data[0], params)
            data = data[:1] + cbor.encode(params)
        out = self._inner.call(cmd, data)
        if data and data[0] in (0x01, 0x02) and out[:1] == b"\x00":
            resp = cbor.decode(out[1:])
            self._answer(data[0], resp)
            out = b"\x00" + cbor.encode(resp)
        return out


# --- through the real PC/SC stack, the CLI run inside the namespace ---------------------------


def _vhsm(ns: NsPcsc, data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`vhsm passkey ARGS` inside the pcscd namespace (the worktree's code, as the CLI)."""
    env = {k: v for k, v in ns._env().items() if not k.startswith("HSM_")}
    env["HSM_DATA_DIR"] = str(data)
    proc = ns._popen(
        [*ns._nsenter(), sys.executable, "-m", "cli.main", "passkey", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    out, err = proc.communicate(timeout=CLIENT_TIMEOUT)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())


def test_pcsc_cli_generate_then_authenticate(ns: NsPcsc, data: Path) -> None:
    none = _vhsm(ns, data, "authenticate", "nope")
    assert none.returncode == 1 and none.stderr.splitlines()[-1] == "Error: unknown passkey nope"
    nocard = _vhsm(ns, data, "generate", "ssh")
    assert nocard.returncode == 1
    assert nocard.stderr.splitlines()[-1].startswith("Error: no FIDO2 authenticator found")
    assert not (data / "passkeys.json").exists()

    secret = os.urandom(32)
    card = ns.start_card(secret)
    gen = _vhsm(ns, data, "generate", "ssh")
    assert gen.returncode == 0, gen.stderr
    assert "Passkey ssh registered (rp vhsm.local, attestation packed self)" in gen.stdout
    st = (data / "passkeys.json").stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    entry = _stored(data)["ssh"]
    assert entry["rp_id"] == "vhsm.local" and entry["attestation"] == "packed self"
    assert entry["credential_id"] in gen.stdout and entry["sign_count"] >= 1
    first = entry["sign_count"]

    for _ in range(2):
        auth = _vhsm(ns, data, "authenticate", "ssh")
        assert auth.returncode == 0, auth.stderr
        assert "Passkey ssh authenticated (signature verified, counter" in auth.stdout
        assert _stored(data)["ssh"]["sign_count"] > first
        first = _stored(data)["ssh"]["sign_count"]

    again = _vhsm(ns, data, "generate", "ssh")
    assert again.returncode == 1 and again.stderr.splitlines()[-1] == (
        "Error: passkey ssh already exists"
    )
    listed = _vhsm(ns, data, "list")
    assert listed.stdout.split()[:2] == ["ssh", "vhsm.local"]

    # another authenticator in the reader does not hold the credential
    card.stop()
    other = ns.start_card(os.urandom(32), port=VPCD_PORTS[1])
    refused = _vhsm(ns, data, "authenticate", "ssh")
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[-1] == (
        "Error: this authenticator does not hold passkey ssh's credential"
    )
    assert _stored(data)["ssh"]["sign_count"] == first
    other.stop()

    events = _audit(data)
    assert [(e, k, ok) for e, k, _, ok in events] == [
        ("AUTH_FAILURE", "passkey:nope", "FAILURE"),
        ("KEY_CREATED", "passkey:ssh", "FAILURE"),
        ("KEY_CREATED", "passkey:ssh", "SUCCESS"),
        ("AUTH_SUCCESS", "passkey:ssh", "SUCCESS"),
        ("AUTH_SUCCESS", "passkey:ssh", "SUCCESS"),
        ("KEY_CREATED", "passkey:ssh", "FAILURE"),
        ("AUTH_FAILURE", "passkey:ssh", "FAILURE"),
    ]
    assert "attestation packed self" in events[2][2]
    assert "no FIDO2 authenticator found" in events[1][2]


def test_pcsc_cli_pin_and_tampered_key(ns: NsPcsc, data: Path) -> None:
    ns.start_card(os.urandom(32))
    assert ns.run_client({"op": "set_pin", "pin": PIN}) == {"retries": 8}
    (data / "pin").write_text("0000-wrong\n")
    (data / "pin").chmod(0o600)
    wrong = _vhsm(ns, data, "generate", "ssh", "--pin-source", f"file:{data / 'pin'}")
    assert wrong.returncode == 1
    assert wrong.stderr.splitlines()[-1] == "Error: wrong PIN for the FIDO2 authenticator"
    nopin = _vhsm(ns, data, "generate", "ssh")  # stdin is no terminal: no prompt
    assert nopin.stderr.splitlines()[-1].startswith("Error: the FIDO2 authenticator has a PIN")
    (data / "pin").write_text(PIN + "\n")
    pin = ("--pin-source", f"file:{data / 'pin'}")
    assert _vhsm(ns, data, "generate", "ssh", *pin).returncode == 0
    assert _vhsm(ns, data, "generate", "git", *pin).returncode == 0
    ok = _vhsm(ns, data, "authenticate", "ssh", *pin)
    assert ok.returncode == 0, ok.stderr
    _edit(data, "ssh", public_key=_stored(data)["git"]["public_key"])
    bad = _vhsm(ns, data, "authenticate", "ssh", *pin)
    assert bad.returncode == 1
    assert bad.stderr.splitlines()[-1] == (
        "Error: passkey ssh: assertion refused: invalid signature"
    )
    assert PIN not in (data / "hsm_audit.log").read_text()
    assert [(e, k, ok) for e, k, _, ok in _audit(data)] == [
        ("KEY_CREATED", "passkey:ssh", "FAILURE"),
        ("KEY_CREATED", "passkey:ssh", "FAILURE"),
        ("KEY_CREATED", "passkey:ssh", "SUCCESS"),
        ("KEY_CREATED", "passkey:git", "SUCCESS"),
        ("AUTH_SUCCESS", "passkey:ssh", "SUCCESS"),
        ("SECURITY_VIOLATION", "passkey:ssh", "FAILURE"),
    ]


# --- in process: the same authenticator as a python-fido2 CtapDevice ---------------------------


def test_register_and_authenticate_in_process(data: Path) -> None:
    dev = _card()
    pk = passkeys.register("web", device=dev, **_kw(data))
    assert pk.attestation == "packed self" and pk.sign_count == 1
    counts = [passkeys.authenticate("web", device=dev, **_kw(data)).sign_count for _ in range(3)]
    assert counts == sorted(set(counts)) and counts[0] > 1
    assert _stored(data)["web"]["sign_count"] == counts[-1]
    assert [e for e, *_ in _audit(data)] == ["KEY_CREATED"] + ["AUTH_SUCCESS"] * 3


def test_tampered_public_key_is_refused(data: Path) -> None:
    dev = _card()
    passkeys.register("web", device=dev, **_kw(data))
    passkeys.register("other", device=_card(), **_kw(data))
    before = _stored(data)["web"]["sign_count"]
    # a valid COSE key, but not the credential's: the signature cannot verify under it
    _edit(data, "web", public_key=_stored(data)["other"]["public_key"])
    with pytest.raises(VerificationFailed, match="assertion refused: invalid signature"):
        passkeys.authenticate("web", device=dev, **_kw(data))
    assert _stored(data)["web"]["sign_count"] == before  # nothing stored
    event, key, details, ok = _audit(data)[-1]
    assert (event, key, ok) == ("SECURITY_VIOLATION", "passkey:web", "FAILURE")
    assert "invalid signature" in details


def test_counter_regression_is_refused_as_a_clone(data: Path) -> None:
    secret = os.urandom(32)
    passkeys.register("web", device=_card(secret), **_kw(data))
    original = _card(secret)
    for _ in range(3):
        passkeys.authenticate("web", device=original, **_kw(data))
    stored = _stored(data)["web"]["sign_count"]
    # a clone: the same key material, its own counter starting again
    clone = _card(secret)
    with pytest.raises(VerificationFailed, match="counter went backwards.*cloned authenticator"):
        passkeys.authenticate("web", device=clone, **_kw(data))
    assert _stored(data)["web"]["sign_count"] == stored  # the regression is not stored
    assert _audit(data)[-1][0] == "SECURITY_VIOLATION"
    passkeys.authenticate("web", device=original, **_kw(data))  # the original still works


def test_a_repeated_counter_is_refused(data: Path) -> None:
    dev = _card()
    passkeys.register("web", device=dev, **_kw(data))
    nxt = passkeys.authenticate("web", device=dev, **_kw(data)).sign_count
    # the card's next assertion carries nxt + 2 (a silent probe, then the assertion): equal to
    # the stored count is not larger, so it is refused as well
    _edit(data, "web", sign_count=nxt + 2)
    with pytest.raises(VerificationFailed, match=rf"\({nxt + 2} after {nxt + 2}\)"):
        passkeys.authenticate("web", device=dev, **_kw(data))


def test_assertion_from_another_authenticator_is_refused(data: Path) -> None:
    a, b = _card(), _card()
    passkeys.register("web", device=a, **_kw(data))
    passkeys.register("b-key", device=b, **_kw(data))
    web_id = bytes.fromhex(_stored(data)["web"]["credential_id"])
    b_id = bytes.fromhex(_stored(data)["b-key"]["credential_id"])

    # plainly: B does not hold web's credential
    with pytest.raises(PasskeyError, match="does not hold passkey web's credential"):
        passkeys.authenticate("web", device=b, **_kw(data))

    # forged: B signs with its own credential and the answer claims web's credential id
    def ask_for_b(cmd: int, p: dict[int, Any]) -> None:
        if cmd == 0x02:
            p[3] = [{"type": "public-key", "id": b_id}]

    def claim_web(cmd: int, r: dict[int, Any]) -> None:
        if cmd == 0x02:
            r[1] = {"type": "public-key", "id": web_id}

    forger = Rewriting(b, request=ask_for_b, answer=claim_web)
    with pytest.raises(VerificationFailed, match="invalid signature"):
        passkeys.authenticate("web", device=forger, **_kw(data))
    events = _audit(data)
    assert [(e, k) for e, k, *_ in events[-2:]] == [
        ("AUTH_FAILURE", "passkey:web"),
        ("SECURITY_VIOLATION", "passkey:web"),
    ]


def test_forged_or_missing_attestation_is_refused(data: Path) -> None:
    def flip_sig(cmd: int, r: dict[int, Any]) -> None:
        if cmd == 0x01:
            sig = bytearray(r[3]["sig"])
            sig[-1] ^= 0x01
            r[3]["sig"] = bytes(sig)

    with pytest.raises(VerificationFailed, match="packed attestation does not verify"):
        passkeys.register("web", device=Rewriting(_card(), answer=flip_sig), **_kw(data))

    def strip(cmd: int, r: dict[int, Any]) -> None:
        if cmd == 0x01:
            r[1], r[3] = "none", {}

    with pytest.raises(VerificationFailed, match="format none"):
        passkeys.register("web", device=Rewriting(_card(), answer=strip), **_kw(data))
    assert not (data / "passkeys.json").exists()
    assert [(e, ok) for e, _, _, ok in _audit(data)] == [("SECURITY_VIOLATION", "FAILURE")] * 2


def test_unknown_and_existing_names(data: Path) -> None:
    with pytest.raises(KeyNotFoundError, match="unknown passkey web"):
        passkeys.authenticate("web", device=_card(), **_kw(data))
    passkeys.register("web", device=_card(), **_kw(data))
    with pytest.raises(KeyExistsError, match="passkey web already exists"):
        passkeys.register("web", device=_card(), **_kw(data))
    with pytest.raises(Exception, match="a key name must be"):
        passkeys.register("../x", device=_card(), **_kw(data))
    assert [(e, k, ok) for e, k, _, ok in _audit(data)] == [
        ("AUTH_FAILURE", "passkey:web", "FAILURE"),
        ("KEY_CREATED", "passkey:web", "SUCCESS"),
        ("KEY_CREATED", "passkey:web", "FAILURE"),
    ]


def test_pin(data: Path) -> None:
    dev = _card()
    ClientPin(Ctap2(dev)).set_pin(PIN)
    with pytest.raises(PasskeyError, match="has a PIN: give it"):
        passkeys.register("web", device=dev, **_kw(data))
    with pytest.raises(PasskeyError, match="^wrong PIN for the FIDO2 authenticator$"):
        passkeys.register("web", device=dev, pin=lambda: "0000-wrong", **_kw(data))
    passkeys.register("web", device=dev, pin=lambda: PIN, **_kw(data))
    with pytest.raises(PasskeyError, match="^wrong PIN"):
        passkeys.authenticate("web", device=dev, pin=lambda: "0000-wrong", **_kw(data))
    passkeys.authenticate("web", device=dev, pin=lambda: PIN, **_kw(data))
    assert [e for e, *_ in _audit(data)] == [
        "KEY_CREATED",
        "KEY_CREATED",
        "KEY_CREATED",
        "AUTH_FAILURE",
        "AUTH_SUCCESS",
    ]


def test_malformed_file_is_refused(data: Path) -> None:
    passkeys.register("web", device=_card(), **_kw(data))
    _edit(data, "web", public_key="zz")
    with pytest.raises(PasskeyError, match=r"malformed \(web.public_key\)"):
        passkeys.authenticate("web", device=_card(), **_kw(data))
    _edit(data, "web", public_key="a0", sign_count=-1)
    with pytest.raises(PasskeyError, match=r"malformed \(web.sign_count\)"):
        passkeys.authenticate("web", device=_card(), **_kw(data))
