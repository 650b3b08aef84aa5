"""TpmProtector against a real software TPM (swtpm + tpm2-pytss), no mocks of the library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tpm_fixture import Swtpm, _port_pair, pcr_extend, silent_tpm

from keysvc.errors import MasterKeyError, WrongMasterKeyError
from keysvc.protect_tpm import TpmProtector


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg and "Traceback" not in msg
    return msg


def _raw_unseal_kek(tcti: str, sealed: dict[str, object]) -> bytes:
    """The KEK straight from the TPM, with tpm2-pytss and nothing of the protector's session
    code: lets a test look for it in the sealed dict."""
    from tpm2_pytss import ESAPI
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE
    from tpm2_pytss.types import TPM2B_PRIVATE, TPM2B_PUBLIC, TPML_PCR_SELECTION

    from keysvc.protect_tpm import _primary_template, _tss

    with ESAPI(tcti) as e:
        prim = e.create_primary(None, _primary_template(_tss()))[0]
        pub = TPM2B_PUBLIC.unmarshal(bytes.fromhex(str(sealed["public"])))[0]
        priv = TPM2B_PRIVATE.unmarshal(bytes.fromhex(str(sealed["private"])))[0]
        obj = e.load(prim, priv, pub)
        session = ESYS_TR.PASSWORD
        if sealed["pcrs"]:
            session = e.start_auth_session(
                ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, None, TPM2_ALG.SHA256
            )
            pcrs = ",".join(map(str, sealed["pcrs"]))  # type: ignore[call-overload]
            e.policy_pcr(session, None, TPML_PCR_SELECTION.parse(f"sha256:{pcrs}"))
        kek = bytes(e.unseal(obj, session1=session))
        if sealed["pcrs"]:
            e.flush_context(session)
        e.flush_context(obj)
        e.flush_context(prim)
    return kek


def test_seal_unseal_round_trip(swtpm: Swtpm, monkeypatch: pytest.MonkeyPatch) -> None:
    mk = os.urandom(32)
    sealed = TpmProtector(swtpm.tcti).seal(mk)
    assert TpmProtector.kind == "tpm2"
    assert json.loads(json.dumps(sealed)) == sealed  # JSON-able as is
    assert sealed["pcrs"] == []
    # a fresh protector (new connection, primary re-created from the template) unseals it
    assert TpmProtector(swtpm.tcti).unseal(sealed) == mk
    # no argument: the TCTI comes from $TPM2TOOLS_TCTI
    monkeypatch.setenv("TPM2TOOLS_TCTI", swtpm.tcti)
    assert TpmProtector().tcti == swtpm.tcti
    assert TpmProtector().unseal(sealed) == mk
    # two seals of the same key share nothing: new KEK, new nonce
    again = TpmProtector(swtpm.tcti).seal(mk)
    assert again["ct"] != sealed["ct"] and again["private"] != sealed["private"]


def test_default_tcti_is_the_kernel_resource_manager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TPM2TOOLS_TCTI", raising=False)
    assert TpmProtector().tcti == "device:/dev/tpmrm0"
    assert TpmProtector("mssim:port=1").tcti == "mssim:port=1"


def test_pcr_policy_unseals_until_a_sealed_pcr_is_extended(swtpm: Swtpm) -> None:
    mk = os.urandom(32)
    sealed = TpmProtector(swtpm.tcti, pcrs=[23, 7]).seal(mk)
    assert sealed["pcrs"] == [7, 23] and sealed["pcr_bank"] == "sha256"
    # the PCRs are taken from the sealed dict, whatever the unsealing protector was built with
    assert TpmProtector(swtpm.tcti).unseal(sealed) == mk
    pcr_extend(swtpm.tcti, 16)  # not in the policy: still unseals
    assert TpmProtector(swtpm.tcti).unseal(sealed) == mk
    pcr_extend(swtpm.tcti, 23)
    with pytest.raises(WrongMasterKeyError) as ei:
        TpmProtector(swtpm.tcti).unseal(sealed)
    msg = _one_line(ei.value)
    assert msg.startswith("the TPM refused to unseal: PCRs changed") and "sha256:7,23" in msg
    # a key sealed now, to the new values, unseals again
    resealed = TpmProtector(swtpm.tcti, pcrs=[7, 23]).seal(mk)
    assert TpmProtector(swtpm.tcti).unseal(resealed) == mk


def test_blob_from_another_tpm_is_refused(swtpm_factory: Callable[[], Swtpm]) -> None:
    first, second = swtpm_factory(), swtpm_factory()
    mk = os.urandom(32)
    for pcrs in ([], [7]):
        sealed = TpmProtector(first.tcti, pcrs).seal(mk)
        with pytest.raises(WrongMasterKeyError) as ei:
            TpmProtector(second.tcti).unseal(sealed)
        assert "another TPM" in _one_line(ei.value)
        # with the file edited to name the second TPM's primary key, the TPM itself refuses
        # to load the object (its integrity is bound to the first TPM's seed)
        edited = dict(sealed, primary_name=TpmProtector(second.tcti).seal(mk)["primary_name"])
        with pytest.raises(WrongMasterKeyError) as ei:
            TpmProtector(second.tcti).unseal(edited)
        assert "another TPM" in _one_line(ei.value)
        assert TpmProtector(first.tcti).unseal(sealed) == mk  # still fine on its own TPM


def _flip(hexstr: object, at: int) -> str:
    b = bytearray(bytes.fromhex(str(hexstr)))
    b[at % len(b)] ^= 0x01
    return b.hex()


# edits an attacker with the file can make that keep the structure valid: authentication fails
AUTH_TAMPERS: dict[str, Callable[[dict[str, object]], None]] = {
    "private-mac": lambda s: s.update(private=_flip(s["private"], 5)),
    "private-data": lambda s: s.update(private=_flip(s["private"], -1)),
    "public-policy": lambda s: s.update(public=_flip(s["public"], -1)),
    "nonce": lambda s: s.update(nonce=_flip(s["nonce"], 0)),
    "ct": lambda s: s.update(ct=_flip(s["ct"], 3)),
    "pcrs-dropped": lambda s: s.update(pcrs=[7]),
    "pcrs-emptied": lambda s: s.update(pcrs=[]),
    "primary-name": lambda s: s.update(primary_name=_flip(s["primary_name"], -1)),
}


@pytest.mark.parametrize("name", sorted(AUTH_TAMPERS))
def test_tampered_blob_is_refused(swtpm: Swtpm, name: str) -> None:
    mk = os.urandom(32)
    sealed = TpmProtector(swtpm.tcti, pcrs=[7, 23]).seal(mk)
    AUTH_TAMPERS[name](sealed)
    with pytest.raises(WrongMasterKeyError) as ei:
        TpmProtector(swtpm.tcti).unseal(sealed)
    _one_line(ei.value)


# malformed values (wrong types, sizes, unknown names): MasterKeyError before the TPM is asked
MALFORMED: dict[str, Callable[[dict[str, object]], None]] = {
    "missing-private": lambda s: s.pop("private"),
    "public-not-hex": lambda s: s.update(public="zz" + str(s["public"])[2:]),
    "public-too-long": lambda s: s.update(public="00" * 5000),
    "public-trailing": lambda s: s.update(public=str(s["public"]) + "00"),
    "public-garbage": lambda s: s.update(public="ffff" + "00" * 40),
    "private-number": lambda s: s.update(private=12),
    "nonce-short": lambda s: s.update(nonce="00" * 11),
    "ct-long": lambda s: s.update(ct=str(s["ct"]) + "00"),
    "primary-name-short": lambda s: s.update(primary_name="000b"),
    "pcrs-string": lambda s: s.update(pcrs="7"),
    "pcrs-bool": lambda s: s.update(pcrs=[True]),
    "pcrs-out-of-range": lambda s: s.update(pcrs=[24]),
    "pcrs-repeat": lambda s: s.update(pcrs=[7, 7]),
    "pcrs-huge": lambda s: s.update(pcrs=list(range(1000))),
    "primary-unknown": lambda s: s.update(primary="rsa2048"),
    "bank-unknown": lambda s: s.update(pcr_bank="sha1"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_sealed_dict_is_a_clean_error(swtpm: Swtpm, name: str) -> None:
    mk = os.urandom(32)
    sealed = TpmProtector(swtpm.tcti, pcrs=[7, 23]).seal(mk)
    MALFORMED[name](sealed)
    with pytest.raises(MasterKeyError) as ei:
        TpmProtector(swtpm.tcti).unseal(sealed)
    assert type(ei.value) is MasterKeyError, ei.value  # not an authentication failure
    assert "malformed" in _one_line(ei.value) or "unknown" in str(ei.value)


def test_not_a_dict_is_a_clean_error(swtpm: Swtpm) -> None:
    with pytest.raises(MasterKeyError):
        TpmProtector(swtpm.tcti).unseal(["not", "a", "dict"])  # type: ignore[arg-type]


def test_tpm_gone_between_seal_and_unseal(swtpm: Swtpm) -> None:
    sealed = TpmProtector(swtpm.tcti).seal(os.urandom(32))
    swtpm.stop()
    with pytest.raises(MasterKeyError) as ei:
        TpmProtector(swtpm.tcti).unseal(sealed)
    assert type(ei.value) is MasterKeyError
    assert f"no TPM reachable at TCTI {swtpm.tcti!r}" in _one_line(ei.value)


def test_tss_library_logs_stay_quiet(swtpm: Swtpm) -> None:
    """The TSS C library logs each TPM error to stderr; the CLI's error must stay one line."""
    sealed = TpmProtector(swtpm.tcti, [23]).seal(os.urandom(32))
    pcr_extend(swtpm.tcti, 23)
    script = """if 1:
        import json, sys
        from keysvc.errors import MasterKeyError
        from keysvc.protect_tpm import TpmProtector
        try:
            TpmProtector(sys.argv[1]).unseal(json.loads(sys.argv[2]))
        except MasterKeyError as e:
            print(type(e).__name__)
        try:
            TpmProtector("swtpm:host=127.0.0.1,port=1").seal(bytes(32))
        except MasterKeyError as e:
            print(type(e).__name__)
    """
    env = {k: v for k, v in os.environ.items() if k != "TSS2_LOG"}
    p = subprocess.run(
        [sys.executable, "-c", script, swtpm.tcti, json.dumps(sealed)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert p.stdout.split() == ["WrongMasterKeyError", "MasterKeyError"], p.stderr
    assert p.stderr == ""


def test_a_tpm_that_never_answers_times_out() -> None:
    """Something listens at the TCTI's ports but never answers: a clear error, not a hang."""
    with silent_tpm() as tcti:
        t0 = time.monotonic()
        with pytest.raises(MasterKeyError) as ei:
            TpmProtector(tcti, timeout=1.5).seal(os.urandom(32))
        assert time.monotonic() - t0 < 10
    assert f"the TPM at TCTI {tcti!r} did not answer within 1.5 s" == _one_line(ei.value)


def test_no_tpm_at_the_tcti() -> None:
    port = _port_pair()  # nothing listens there
    for tcti in (f"swtpm:host=127.0.0.1,port={port}", "device:/nonexistent/tpmrm0"):
        with pytest.raises(MasterKeyError) as ei:
            TpmProtector(tcti).seal(os.urandom(32))
        assert type(ei.value) is MasterKeyError
        assert f"no TPM reachable at TCTI {tcti!r}" in _one_line(ei.value)


def test_sealed_dict_holds_no_copy_of_the_master_key_or_kek(swtpm: Swtpm) -> None:
    mk = os.urandom(32)
    for pcrs in ([], [7]):
        sealed = TpmProtector(swtpm.tcti, pcrs).seal(mk)
        kek = _raw_unseal_kek(swtpm.tcti, sealed)
        text = json.dumps(sealed)
        raw = b"".join(bytes.fromhex(str(sealed[k])) for k in ("public", "private", "ct"))
        for secret in (mk, kek):
            assert len(secret) == 32
            assert secret.hex() not in text and secret.hex().upper() not in text
            assert secret not in raw and secret not in text.encode()


def test_kek_never_crosses_the_tpm_bus_in_clear(
    swtpm: Swtpm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tss2's pcap TCTI records every command and response, as a bus sniffer would."""
    mk = os.urandom(32)
    cap, control = tmp_path / "protector.pcap", tmp_path / "control.pcap"
    monkeypatch.setenv("TCTI_PCAP_FILE", str(cap))
    for pcrs in ([], [7]):
        sealed = TpmProtector(f"pcap:{swtpm.tcti}", pcrs).seal(mk)
        assert TpmProtector(f"pcap:{swtpm.tcti}").unseal(sealed) == mk
        # control: an unseal without parameter encryption shows the KEK in the capture
        monkeypatch.setenv("TCTI_PCAP_FILE", str(control))
        kek = _raw_unseal_kek(f"pcap:{swtpm.tcti}", sealed)
        monkeypatch.setenv("TCTI_PCAP_FILE", str(cap))
        assert kek in control.read_bytes()
        seen = cap.read_bytes()
        assert len(seen) > 1000  # the protector's traffic was captured
        assert kek not in seen and mk not in seen


def test_transient_handles_are_flushed(swtpm: Swtpm) -> None:
    """swtpm has no resource manager and 3 transient object slots: a leaked handle per call
    (also on the failure paths) would make this loop fail with an out-of-memory TPM error."""
    mk = os.urandom(32)
    sealed = TpmProtector(swtpm.tcti, [23]).seal(mk)
    bad = dict(sealed, private=_flip(sealed["private"], 5))
    for _ in range(4):
        assert TpmProtector(swtpm.tcti).unseal(sealed) == mk
        with pytest.raises(WrongMasterKeyError):
            TpmProtector(swtpm.tcti).unseal(bad)
    pcr_extend(swtpm.tcti, 23)
    for _ in range(4):
        with pytest.raises(WrongMasterKeyError):
            TpmProtector(swtpm.tcti).unseal(sealed)
    assert TpmProtector(swtpm.tcti).unseal(TpmProtector(swtpm.tcti).seal(mk)) == mk


def test_missing_library_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tpm2_pytss", None)  # import fails as if not installed
    with pytest.raises(MasterKeyError) as ei:
        TpmProtector("swtpm:port=1").seal(os.urandom(32))
    assert "pip install tpm2-pytss" in _one_line(ei.value)


def test_bad_pcr_arguments_are_refused() -> None:
    for pcrs in ([24], [-1], [1, 1]):
        with pytest.raises(MasterKeyError):
            TpmProtector("swtpm:port=1", pcrs)
    with pytest.raises(MasterKeyError):
        TpmProtector("swtpm:port=1").seal(b"short")
