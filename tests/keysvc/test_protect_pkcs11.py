"""The PKCS#11 master-key protector against a real SoftHSM2 token (softhsm_fixture), and
pin_from with real files, symlinks, FIFOs and environment variables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from softhsm_fixture import MODULE, SoftHsm, make_softhsm

from keysvc.errors import MasterKeyError, WrongMasterKeyError
from keysvc.masterkey import sealed_document
from keysvc.protect_pkcs11 import DEFAULT_KEY_LABEL, Pkcs11Protector, pin_from

LABEL = "vhsm-test"
PIN = "pin-8a7c31e9"  # distinctive, so a leak into a message or the sealed dict is found


@pytest.fixture
def hsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SoftHsm]:
    h = make_softhsm(tmp_path)
    monkeypatch.setenv("SOFTHSM2_CONF", str(h.conf))
    monkeypatch.delenv("VHSM_PKCS11_MODULE", raising=False)
    h.init_token(LABEL, PIN)
    yield h
    # the token dir goes with tmp_path; make sure no test leaves the module initialised on
    # the old configuration for the next one
    pkcs11.lib(MODULE).finalize()


@pytest.fixture
def master() -> bytes:
    return os.urandom(32)


def _expect(cls: type[Exception], fn: object, *args: object) -> str:
    """The message of the exception `fn(*args)` raises, checked to be exactly `cls`, one line,
    and free of the PIN."""
    with pytest.raises(MasterKeyError) as ei:
        fn(*args)  # type: ignore[operator]
    assert type(ei.value) is cls, f"{type(ei.value).__name__}: {ei.value}"
    msg = str(ei.value)
    assert "\n" not in msg and PIN not in msg
    return msg


# -- sealing and unsealing


def test_round_trip(hsm: SoftHsm, master: bytes) -> None:
    sealed = Pkcs11Protector(LABEL, PIN).seal(master)
    text = json.dumps(sealed)  # JSON-able
    assert master.hex() not in text and PIN not in text
    assert sealed["token_label"] == LABEL
    assert sealed["token_serial"] == hsm.serial(LABEL)
    assert sealed["key_label"] == DEFAULT_KEY_LABEL
    assert sealed["mechanism"] == "CKM_AES_GCM"
    # a fresh protector (as after a restart) unseals it, also one built from the sealed dict
    assert Pkcs11Protector(LABEL, PIN).unseal(json.loads(text)) == master
    assert Pkcs11Protector.for_sealed(sealed, PIN).unseal(sealed) == master
    # sealing again reuses the key found by label, with a new nonce
    again = Pkcs11Protector(LABEL, PIN).seal(master)
    assert again["key_id"] == sealed["key_id"] and again["nonce"] != sealed["nonce"]
    with hsm.session(LABEL, PIN) as s:
        assert len(list(s.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}))) == 1


def test_round_trip_through_the_master_key_document(hsm: SoftHsm, master: bytes) -> None:
    doc = json.loads(sealed_document(master, Pkcs11Protector(LABEL, PIN)))
    assert doc["protector"] == "pkcs11"
    assert Pkcs11Protector(LABEL, PIN).unseal(doc["sealed"]) == master


def test_wrapping_key_stays_in_the_token(hsm: SoftHsm, master: bytes) -> None:
    sealed = Pkcs11Protector(LABEL, PIN).seal(master)
    with hsm.session(LABEL, PIN, rw=True) as s:
        key = s.get_key(ObjectClass.SECRET_KEY, id=bytes.fromhex(str(sealed["key_id"])))
        assert key[Attribute.LABEL] == DEFAULT_KEY_LABEL
        assert key[Attribute.TOKEN] and key[Attribute.PRIVATE]
        assert key[Attribute.SENSITIVE] and key[Attribute.ALWAYS_SENSITIVE]
        assert not key[Attribute.EXTRACTABLE] and key[Attribute.NEVER_EXTRACTABLE]
        assert not key[Attribute.WRAP] and not key[Attribute.UNWRAP]
        assert key[Attribute.VALUE_LEN] == 32
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            key[Attribute.VALUE]
        # wrapping it out under a key we could export is refused by the token
        outer = s.generate_key(
            KeyType.AES,
            256,
            label="outer",
            capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP,
            template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: False},
        )
        for mech in (Mechanism.AES_KEY_WRAP_PAD, Mechanism.AES_KEY_WRAP):
            with pytest.raises(pkcs11.exceptions.KeyUnextractable):
                outer.wrap_key(key, mechanism=mech)
        # and it can be made neither extractable nor insensitive afterwards
        for attr, value in ((Attribute.EXTRACTABLE, True), (Attribute.SENSITIVE, False)):
            with pytest.raises(pkcs11.exceptions.PKCS11Error):
                key[attr] = value


def test_existing_extractable_key_under_the_label_is_refused(hsm: SoftHsm, master: bytes) -> None:
    with hsm.session(LABEL, PIN, rw=True) as s:
        s.generate_key(
            KeyType.AES,
            256,
            id=b"\x01",
            label=DEFAULT_KEY_LABEL,
            store=True,
            template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: True},
        )
    msg = _expect(MasterKeyError, Pkcs11Protector(LABEL, PIN).seal, master)
    assert "extractable" in msg


# -- the PIN


def test_wrong_pin(hsm: SoftHsm, master: bytes) -> None:
    sealed = Pkcs11Protector(LABEL, PIN).seal(master)
    wrong = PIN + "x"
    for call in (Pkcs11Protector(LABEL, wrong).unseal, Pkcs11Protector(LABEL, wrong).seal):
        msg = _expect(WrongMasterKeyError, call, sealed if call.__name__ == "unseal" else master)
        assert msg == f"wrong PIN for token {LABEL}"
        assert wrong not in msg


def test_locked_pin(hsm: SoftHsm, master: bytes) -> None:
    sealed = Pkcs11Protector(LABEL, PIN).seal(master)
    hsm.lock_user_pin(LABEL)
    msg = _expect(MasterKeyError, Pkcs11Protector(LABEL, PIN).unseal, sealed)
    assert "locked" in msg and LABEL in msg


# -- the token, the key, the module


def test_another_token_with_the_same_labels_cannot_unseal(hsm: SoftHsm, master: bytes) -> None:
    """The token is replaced by another with the same token and key labels (and its own key):
    the serial tells them apart; with the serial edited to match, the key id does; with the
    key id edited to the new key's too, the AES-GCM tag does."""
    sealed = Pkcs11Protector(LABEL, PIN).seal(master)
    hsm.delete_token(LABEL)
    hsm.init_token(LABEL, PIN)
    other = Pkcs11Protector(LABEL, PIN).seal(os.urandom(32))  # a key under the same label
    assert other["key_id"] != sealed["key_id"] and other["token_serial"] != sealed["token_serial"]
    p = Pkcs11Protector(LABEL, PIN)
    msg = _expect(WrongMasterKeyError, p.unseal, sealed)
    assert "another token" in msg
    same_serial = {**sealed, "token_serial": other["token_serial"]}
    msg = _expect(MasterKeyError, p.unseal, same_serial)
    assert "no key with id" in msg
    same_key = {**same_serial, "key_id": other["key_id"]}
    msg = _expect(WrongMasterKeyError, p.unseal, same_key)
    assert "does not authenticate" in msg


def test_missing_token(hsm: SoftHsm, master: bytes) -> None:
    msg = _expect(MasterKeyError, Pkcs11Protector("no-such-token", PIN).seal, master)
    assert "no token labelled no-such-token" in msg
    sealed = Pkcs11Protector(LABEL, PIN).seal(master)
    hsm.delete_token(LABEL)
    msg = _expect(MasterKeyError, Pkcs11Protector(LABEL, PIN).unseal, sealed)
    assert f"no token labelled {LABEL}" in msg


def test_two_tokens_with_one_label(hsm: SoftHsm, master: bytes) -> None:
    """Sealing needs one token with the label; unsealing picks it among several by serial."""
    sealed = Pkcs11Protector(LABEL, PIN).seal(master)
    hsm.init_token(LABEL, PIN)
    msg = _expect(MasterKeyError, Pkcs11Protector(LABEL, PIN).seal, master)
    assert "2 tokens are labelled" in msg
    assert Pkcs11Protector(LABEL, PIN).unseal(sealed) == master


def test_missing_key(hsm: SoftHsm, master: bytes) -> None:
    sealed = Pkcs11Protector(LABEL, PIN).seal(master)
    with hsm.session(LABEL, PIN, rw=True) as s:
        s.get_key(ObjectClass.SECRET_KEY, label=DEFAULT_KEY_LABEL).destroy()
    msg = _expect(MasterKeyError, Pkcs11Protector(LABEL, PIN).unseal, sealed)
    assert "wrapping key is gone" in msg


def test_missing_module(
    hsm: SoftHsm, master: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = str(tmp_path / "no" / "libpkcs11.so")
    msg = _expect(MasterKeyError, Pkcs11Protector(LABEL, PIN, module=gone).seal, master)
    assert gone in msg
    monkeypatch.setenv("VHSM_PKCS11_MODULE", gone)
    msg = _expect(MasterKeyError, Pkcs11Protector(LABEL, PIN).seal, master)
    assert gone in msg
    not_a_module = tmp_path / "junk.so"
    not_a_module.write_bytes(b"not an ELF file")
    msg = _expect(
        MasterKeyError, Pkcs11Protector(LABEL, PIN, module=str(not_a_module)).seal, master
    )
    assert f"cannot load PKCS#11 module {not_a_module}" in msg
    msg = _expect(MasterKeyError, Pkcs11Protector(LABEL, PIN, module="libsofthsm2.so").seal, master)
    assert "must be absolute" in msg


# -- the sealed dict comes from a file an attacker may edit


def _flip(hexstr: object) -> str:
    b = bytearray(bytes.fromhex(str(hexstr)))
    b[-1] ^= 1
    return b.hex()


@pytest.mark.parametrize(
    ("field", "change", "error", "says"),
    [
        ("ct", _flip, WrongMasterKeyError, "does not authenticate"),
        ("nonce", _flip, WrongMasterKeyError, "does not authenticate"),
        ("key_label", lambda v: "other-label", WrongMasterKeyError, "does not authenticate"),
        ("token_serial", lambda v: "0123456789abcdef", WrongMasterKeyError, "another token"),
        ("key_id", _flip, MasterKeyError, "no key with id"),
        ("token_label", lambda v: "other", MasterKeyError, "sealed on token other"),
        ("mechanism", lambda v: "CKM_AES_KEY_WRAP_PAD", MasterKeyError, "malformed"),
        ("ct", lambda v: str(v)[:-2], MasterKeyError, "malformed"),
        ("ct", lambda v: str(v).upper(), MasterKeyError, "malformed"),
        ("nonce", lambda v: str(v)[:2] + " " + str(v)[3:], MasterKeyError, "malformed"),
        ("key_id", lambda v: "", MasterKeyError, "malformed"),
        ("key_id", lambda v: "00" * 65, MasterKeyError, "malformed"),
        ("token_label", lambda v: "x" * 33, MasterKeyError, "malformed"),
        ("token_label", lambda v: "a\nb", MasterKeyError, "malformed"),
        ("token_serial", lambda v: 12345, MasterKeyError, "malformed"),
        ("key_label", lambda v: None, MasterKeyError, "malformed"),
    ],
)
def test_tampered_sealed_fields(
    hsm: SoftHsm, master: bytes, field: str, change: object, error: type[Exception], says: str
) -> None:
    sealed = Pkcs11Protector(LABEL, PIN).seal(master)
    bad = {**sealed, field: change(sealed[field])}  # type: ignore[operator]
    msg = _expect(error, Pkcs11Protector(LABEL, PIN).unseal, bad)
    assert says in msg
    assert Pkcs11Protector(LABEL, PIN).unseal(sealed) == master  # the original still opens


@pytest.mark.parametrize(
    "shape",
    [
        lambda s: [s],
        lambda s: {k: v for k, v in s.items() if k != "nonce"},
        lambda s: {**s, "module": "/tmp/evil.so"},
    ],
)
def test_malformed_sealed_dict(hsm: SoftHsm, master: bytes, shape: object) -> None:
    sealed = Pkcs11Protector(LABEL, PIN).seal(master)
    msg = _expect(MasterKeyError, Pkcs11Protector(LABEL, PIN).unseal, shape(sealed))  # type: ignore[operator]
    assert "malformed" in msg


# -- pin_from


def _secret_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_pin_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VHSM_TEST_PIN", PIN)
    assert pin_from("env:VHSM_TEST_PIN") == PIN
    monkeypatch.setenv("VHSM_TEST_PIN", "")
    assert "empty" in _expect(MasterKeyError, pin_from, "env:VHSM_TEST_PIN")
    monkeypatch.delenv("VHSM_TEST_PIN")
    assert "not set" in _expect(MasterKeyError, pin_from, "env:VHSM_TEST_PIN")


def test_pin_from_file(tmp_path: Path) -> None:
    f = _secret_file(tmp_path / "pin", PIN + "\r\nsecond line is not the PIN\n")
    assert pin_from(f"file:{f}") == PIN
    f0400 = _secret_file(tmp_path / "pin0400", PIN, 0o400)  # no newline, read-only: fine
    assert pin_from(f"file:{f0400}") == PIN
    assert "does not exist" in _expect(MasterKeyError, pin_from, f"file:{tmp_path / 'nope'}")
    empty = _secret_file(tmp_path / "empty", "\nPIN on line two\n")
    assert "empty" in _expect(MasterKeyError, pin_from, f"file:{empty}")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_pin_file_open_to_others_refused(tmp_path: Path, mode: int) -> None:
    f = _secret_file(tmp_path / "pin", PIN, mode)
    msg = _expect(MasterKeyError, pin_from, f"file:{f}")
    assert "readable or writable by other users" in msg


def test_pin_file_symlink_and_fifo_refused(tmp_path: Path) -> None:
    target = _secret_file(tmp_path / "real-pin", PIN)
    link = tmp_path / "pin-link"
    link.symlink_to(target)
    assert "symbolic link" in _expect(MasterKeyError, pin_from, f"file:{link}")
    fifo = tmp_path / "pin-fifo"
    os.mkfifo(fifo, 0o600)
    assert "FIFO" in _expect(MasterKeyError, pin_from, f"file:{fifo}")  # and never blocks


def test_pin_from_systemd_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o500)
    _secret_file(creds / "vhsm-pin", PIN + "\n", 0o400)  # as LoadCredential= leaves it
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert pin_from("credential:vhsm-pin") == PIN
    for name in ("../pin", "..", "a/b"):
        assert "plain file name" in _expect(MasterKeyError, pin_from, f"credential:{name}")
    (tmp_path / "group-readable").mkdir()
    loose = _secret_file(tmp_path / "group-readable" / "vhsm-pin", PIN, 0o440)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(loose.parent))
    assert "other users" in _expect(MasterKeyError, pin_from, "credential:vhsm-pin")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    assert "CREDENTIALS_DIRECTORY" in _expect(MasterKeyError, pin_from, "credential:vhsm-pin")


@pytest.mark.parametrize("source", ["", "env:", "file:", "prompt:x", "PIN", "plain:" + PIN])
def test_pin_source_syntax(source: str) -> None:
    assert "env:NAME, file:PATH or credential:NAME" in _expect(MasterKeyError, pin_from, source)


def test_keysvc_works_without_python_pkcs11(tmp_path: Path) -> None:
    """python-pkcs11 is imported only when a token is used: keysvc imports without it, and the
    protector then says how to install it."""
    code = (
        "import sys; sys.modules['pkcs11'] = None\n"  # makes `import pkcs11` fail
        "import keysvc.masterkey, keysvc.protect_pkcs11 as m\n"
        "from keysvc.errors import MasterKeyError\n"
        f"p = m.Pkcs11Protector('t', 'p', module={MODULE!r})\n"
        "try:\n"
        "    p.seal(bytes(32))\n"
        "except MasterKeyError as e:\n"
        "    print(e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "needs python-pkcs11: install it with pip install python-pkcs11" in out.stdout


def test_module_defaults(hsm: SoftHsm, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Pkcs11Protector(LABEL, PIN).module == MODULE  # found in the Debian path
    monkeypatch.setenv("VHSM_PKCS11_MODULE", "/opt/hsm/lib.so")
    assert Pkcs11Protector(LABEL, PIN).module == "/opt/hsm/lib.so"
    assert Pkcs11Protector(LABEL, PIN, module=MODULE).module == MODULE  # the argument wins
    assert PIN not in repr(Pkcs11Protector(LABEL, PIN))
