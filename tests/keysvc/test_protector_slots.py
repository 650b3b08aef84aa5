"""Protector slots (keysvc.protectorslots, `vhsm key protector ...`): several protectors wrap
the same master key, any one unlocks it, changes and refused unlocks are audited.

Library tests use real passphrase slots at a tiny Argon2 cost (the cost is stored in the slot,
so unlock uses it too) or `FakeProtector`; the CLI tests run `vhsm` as a subprocess with the
real default cost."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, ClassVar

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from ksutil import Daemon, Work

from keysvc import audit, masterkey, paths, protectorslots
from keysvc.errors import MasterKeyError, NeedsPersonError, WrongMasterKeyError
from keysvc.protectorslots import Kind, Slot, Unlocked

FAKE = "test-fake"


class FakeProtector:
    """A FAKE protector for tests only: AES-GCM under SHA-256(secret), no Argon2, no device.
    Registered as kind "test-fake" by the `fake_kind` fixture, never by the product."""

    kind: ClassVar[str] = FAKE

    def __init__(self, secret: str) -> None:
        self._k = hashlib.sha256(secret.encode()).digest()

    def seal(self, master_key: bytes) -> dict[str, object]:
        nonce = os.urandom(12)
        return {"nonce": nonce.hex(), "ct": AESGCM(self._k).encrypt(nonce, master_key, b"").hex()}

    def unseal(self, sealed: dict[str, object]) -> bytes:
        try:
            nonce, ct = bytes.fromhex(str(sealed["nonce"])), bytes.fromhex(str(sealed["ct"]))
            return AESGCM(self._k).decrypt(nonce, ct, b"")
        except InvalidTag:
            raise WrongMasterKeyError("fake: wrong secret") from None


def cheap(passphrase: str) -> masterkey.PassphraseProtector:
    """A real passphrase protector at a tiny Argon2 cost (the test is not about the cost)."""
    return masterkey.PassphraseProtector(passphrase, t=1, m_kib=64, p=1)


@pytest.fixture
def fake_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    def build(params: dict[str, Any], secret: protectorslots.SecretSource) -> FakeProtector:
        return FakeProtector(secret("fake secret: "))

    monkeypatch.setitem(protectorslots.KINDS, FAKE, Kind(build, person=False))


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data dir with a raw master.key; no HSM_* variable leaks in from the environment."""
    for k in list(os.environ):
        if k.startswith("HSM_"):
            monkeypatch.delenv(k)
    d = tmp_path / "data"
    d.mkdir(mode=0o700)
    masterkey.generate(d)
    return d


def log(d: Path) -> Path:
    return d / paths.AUDIT_LOG_NAME


def raw_key(d: Path) -> bytes:
    return (d / paths.MASTER_KEY_NAME).read_bytes()


def opener_for(secret: str) -> protectorslots.Opener:
    """Every slot gets `secret` (passphrase, fake secret, PIN)."""
    return lambda slot: protectorslots.build(slot.kind, slot.params, lambda _p: secret)


def add(d: Path, prot: masterkey.Protector, unlock_secret: str | None = None) -> Slot:
    """Add a slot, unlocking through the slot secret `unlock_secret` (else the raw key)."""
    opener = None if unlock_secret is None else opener_for(unlock_secret)
    unlocked = protectorslots.unlock_for_change(
        d, None, audit_log=log(d), user="tester", opener=opener
    )
    return protectorslots.add_slot(
        d, unlocked, prot, params={}, label=f"l{prot.kind}", audit_log=log(d), user="tester"
    )


def unlock_with(d: Path, secret: str) -> bytes:
    raw = (d / paths.PROTECTED_MASTER_KEY_NAME).read_bytes()
    return protectorslots.unlock_file(
        raw,
        d / paths.PROTECTED_MASTER_KEY_NAME,
        opener=opener_for(secret),
        audit_log=log(d),
        user="tester",
    )


def two_passphrase_slots(d: Path) -> bytes:
    """Slots 1 ("one") and 2 ("two") over the raw key, which is then removed; returns it."""
    key = raw_key(d)
    add(d, cheap("one"))
    (d / paths.MASTER_KEY_NAME).unlink()
    add(d, cheap("two"), unlock_secret="one")  # unlocked through slot 1
    return key


def doc(d: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads((d / paths.PROTECTED_MASTER_KEY_NAME).read_text())
    return out


def write_doc(d: Path, content: dict[str, Any]) -> None:
    p = d / paths.PROTECTED_MASTER_KEY_NAME
    p.write_text(json.dumps(content))
    p.chmod(0o600)


# --- unlock ------------------------------------------------------------------------------------


def test_either_passphrase_slot_unlocks(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = two_passphrase_slots(data)
    assert [s["id"] for s in doc(data)["slots"]] == [1, 2]
    assert unlock_with(data, "one") == key
    assert unlock_with(data, "two") == key
    # the ordinary path (masterkey.resolve, as the CLI and the daemon use it)
    monkeypatch.setenv("HSM_MASTER_PASSPHRASE", "two")
    assert masterkey.resolve(None, data)[0] == key


def test_removed_slot_no_longer_unlocks(data: Path) -> None:
    key = two_passphrase_slots(data)
    unlocked = Unlocked(unlock_with(data, "two"), "test")
    protectorslots.remove_slot(data, unlocked, 1, audit_log=log(data), user="tester")
    assert [s["id"] for s in doc(data)["slots"]] == [2]
    assert unlock_with(data, "two") == key
    with pytest.raises(WrongMasterKeyError, match="wrong passphrase"):
        unlock_with(data, "one")


def test_removing_the_last_slot_is_refused(data: Path) -> None:
    add(data, cheap("one"))
    before = (data / paths.PROTECTED_MASTER_KEY_NAME).read_bytes()
    with pytest.raises(MasterKeyError, match="last protector slot"):
        protectorslots.remove_slot(
            data, Unlocked(raw_key(data), "t"), 1, audit_log=log(data), user="t"
        )
    assert (data / paths.PROTECTED_MASTER_KEY_NAME).read_bytes() == before


def test_version1_file_unlocks_and_becomes_version2_on_add(data: Path) -> None:
    key = raw_key(data)
    v1 = masterkey.sealed_document(key, cheap("old"))
    (data / paths.MASTER_KEY_NAME).unlink()
    (data / paths.PROTECTED_MASTER_KEY_NAME).write_bytes(v1)
    (data / paths.PROTECTED_MASTER_KEY_NAME).chmod(0o600)
    assert json.loads(v1)["version"] == 1
    assert unlock_with(data, "old") == key
    add(data, cheap("new"), unlock_secret="old")
    d = doc(data)
    assert d["version"] == 2 and d["check"] == masterkey.check_value(key)
    assert [(s["id"], s["kind"]) for s in d["slots"]] == [
        (1, "passphrase-argon2id"),
        (2, "passphrase-argon2id"),
    ]
    assert unlock_with(data, "old") == key and unlock_with(data, "new") == key


def test_tampered_check_is_refused(data: Path, fake_kind: None) -> None:
    add(data, FakeProtector("s"))
    d = doc(data)
    d["check"] = masterkey.check_value(os.urandom(32))
    write_doc(data, d)
    with pytest.raises(WrongMasterKeyError, match="does not match the file's check"):
        unlock_with(data, "s")


def test_slot_unwrapping_another_key_is_refused(data: Path, fake_kind: None) -> None:
    """A slot pasted in from another file (sealing some other key) opens with its secret but
    is refused by the check; the genuine slot beside it still unlocks."""
    key = raw_key(data)
    add(data, FakeProtector("genuine"))
    foreign = FakeProtector("mallory").seal(os.urandom(32))
    d = doc(data)
    d["slots"].insert(
        0, {"id": 9, "kind": FAKE, "label": "", "added": 0, "params": {}, "sealed": foreign}
    )
    write_doc(data, d)
    with pytest.raises(WrongMasterKeyError, match="slot 9 unseals a key that does not match"):
        unlock_with(data, "mallory")
    assert unlock_with(data, "genuine") == key


def test_explicit_key_must_match_the_check(data: Path, fake_kind: None) -> None:
    add(data, FakeProtector("s"))
    other = os.urandom(32).hex()
    with pytest.raises(WrongMasterKeyError, match="does not match"):
        protectorslots.unlock_for_change(data, other, audit_log=log(data), user="t")
    assert protectorslots.unlock_for_change(
        data, raw_key(data).hex(), audit_log=log(data), user="t"
    ).key == raw_key(data)


def test_raw_master_key_beside_the_file_must_match(data: Path, fake_kind: None) -> None:
    """A master.key left beside the protected file is what `resolve` uses first, so a change
    may start from it, but only if it is the key the slots hold."""
    add(data, FakeProtector("s"))
    (data / paths.MASTER_KEY_NAME).write_bytes(os.urandom(32))
    with pytest.raises(WrongMasterKeyError, match="does not match"):
        add(data, FakeProtector("t"))
    assert [s["id"] for s in doc(data)["slots"]] == [1]
    [fail] = [e for e in audit.read_entries(log(data)) if e.event == "AUTH_FAILURE"]
    assert "master key unlock refused" in fail.details


# --- audit -------------------------------------------------------------------------------------


def test_add_remove_and_refused_unlock_are_audited(
    data: Path, fake_kind: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    add(data, FakeProtector("a"))
    add(data, FakeProtector("b"), unlock_secret="a")
    protectorslots.remove_slot(
        data, Unlocked(raw_key(data), "t"), 1, audit_log=log(data), user="tester"
    )
    (data / paths.MASTER_KEY_NAME).unlink()
    monkeypatch.setenv("HSM_MASTER_PASSPHRASE", "x")  # not asked: no passphrase slot
    with pytest.raises(WrongMasterKeyError):
        unlock_with(data, "wrong")
    entries = list(audit.read_entries(log(data)))
    changes = [e.details for e in entries if e.event == "CONFIG_CHANGE" and e.user == "tester"]
    assert any("slot 1 added (test-fake" in c for c in changes)
    assert any("slot 2 added (test-fake" in c for c in changes)
    assert any("slot 1 removed (test-fake" in c for c in changes)
    failures = [e for e in entries if e.event == "AUTH_FAILURE"]
    assert len(failures) == 1 and not failures[0].success
    assert "master key unlock refused" in failures[0].details
    assert audit.verify([log(data)]).ok


def test_resolve_audits_a_refused_unlock(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    two_passphrase_slots(data)
    monkeypatch.setenv("HSM_MASTER_PASSPHRASE", "nope")
    with pytest.raises(WrongMasterKeyError):
        masterkey.resolve(None, data, audit_log=log(data), user="someone")
    [fail] = [e for e in audit.read_entries(log(data)) if e.event == "AUTH_FAILURE"]
    assert fail.user == "someone" and "tried slot 1, 2" in fail.details


def test_unaudited_change_is_not_made(data: Path, fake_kind: None) -> None:
    """The audit line is written before the new file is published: if the log cannot be
    written, the file stays as it was and no temp file is left."""
    add(data, FakeProtector("a"))
    before = (data / paths.PROTECTED_MASTER_KEY_NAME).read_bytes()
    bad_log = data / "no-such-dir" / "audit.log"
    with pytest.raises(Exception, match="audit"):
        protectorslots.add_slot(
            data,
            Unlocked(raw_key(data), "t"),
            FakeProtector("b"),
            params={},
            label="",
            audit_log=bad_log,
            user="t",
        )
    assert (data / paths.PROTECTED_MASTER_KEY_NAME).read_bytes() == before
    assert not [p for p in os.listdir(data) if p.endswith(".tmp")]


# --- the file ----------------------------------------------------------------------------------


def test_file_is_0600(data: Path, fake_kind: None) -> None:
    old = os.umask(0o022)  # a umask that would leave a plain create at 0644
    try:
        add(data, FakeProtector("a"))
    finally:
        os.umask(old)
    st = os.lstat(data / paths.PROTECTED_MASTER_KEY_NAME)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_planted_symlink_is_refused(data: Path, tmp_path: Path, fake_kind: None) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    os.symlink(target, data / paths.PROTECTED_MASTER_KEY_NAME)
    with pytest.raises(MasterKeyError, match="symbolic link"):
        add(data, FakeProtector("a"))
    with pytest.raises(MasterKeyError, match="symbolic link"):
        protectorslots.read_slots(data)
    assert target.read_bytes() == b"precious"
    assert os.path.islink(data / paths.PROTECTED_MASTER_KEY_NAME)


BAD_FIELDS: dict[str, tuple[Any, str]] = {
    "check not hex": ({"check": "zz" * 32}, "no valid check value"),
    "no slots": ({"slots": []}, "1 to 32 slots"),
    "too many slots": ({"slots": [None] * 33}, "1 to 32 slots"),
    "id a string": ({"slot0": {"id": "1"}}, "slot id"),
    "id a bool": ({"slot0": {"id": True}}, "slot id"),
    "label not a string": ({"slot0": {"label": 5}}, "invalid label"),
    "label too long": ({"slot0": {"label": "x" * 65}}, "invalid label"),
    "label with a newline": ({"slot0": {"label": "a\nb"}}, "invalid label"),
    "kind uppercase": ({"slot0": {"kind": "TPM"}}, "no valid kind"),
    "sealed a list": ({"slot0": {"sealed": [1]}}, "invalid sealed blob"),
    "params a secret-looking dict": ({"slot0": {"params": {"pin": {"x": 1}}}}, "parameters"),
    "added negative": ({"slot0": {"added": -1}}, "invalid time"),
}


@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_malformed_fields_are_refused(data: Path, fake_kind: None, case: str) -> None:
    add(data, FakeProtector("a"))
    change, message = BAD_FIELDS[case]
    d = doc(data)
    for k, v in change.items():
        if k == "slot0":
            d["slots"][0].update(v)
        else:
            d[k] = v
    write_doc(data, d)
    with pytest.raises(MasterKeyError, match=message):
        unlock_with(data, "a")


def test_duplicate_slot_ids_are_refused(data: Path, fake_kind: None) -> None:
    add(data, FakeProtector("a"))
    d = doc(data)
    d["slots"].append(dict(d["slots"][0]))
    write_doc(data, d)
    with pytest.raises(MasterKeyError, match="same id"):
        unlock_with(data, "a")


# --- kinds -------------------------------------------------------------------------------------


def test_kind_whose_module_is_missing_is_a_clean_error(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def build(params: dict[str, Any], secret: protectorslots.SecretSource) -> Any:
        return protectorslots._hardware("keysvc.protect_absent_x", "AbsentProtector", "absent")

    monkeypatch.setitem(protectorslots.KINDS, "absent", Kind(build, person=False))
    with pytest.raises(MasterKeyError, match=r"^protector kind absent is not available"):
        protectorslots.build("absent", {}, lambda _p: "")
    # a slot of that kind: unlock says so in one line when nothing else can be tried...
    add(data, cheap("p"))
    d = doc(data)
    d["slots"][0]["kind"] = "absent"
    write_doc(data, d)
    with pytest.raises(MasterKeyError, match="^protector kind absent is not available") as e:
        unlock_with(data, "p")
    assert "\n" not in str(e.value) and not isinstance(e.value, WrongMasterKeyError)


def test_kind_whose_library_is_missing_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kind's module exists but the library it wraps is not installed."""
    (tmp_path / "vhsm_test_needs_lib.py").write_text("import vhsm_test_no_such_lib\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MasterKeyError) as e:
        protectorslots._hardware("vhsm_test_needs_lib", "P", "x")
    assert str(e.value) == (
        "protector kind x is not available in this build "
        "(it needs the Python module vhsm_test_no_such_lib)"
    )


def test_unknown_kind_slot_does_not_block_the_others(data: Path) -> None:
    """A slot of a kind this build does not know (added by a newer one) is skipped."""
    key = two_passphrase_slots(data)
    d = doc(data)
    d["slots"][0]["kind"] = "from-the-future"
    write_doc(data, d)
    assert unlock_with(data, "two") == key


# --- CLI ---------------------------------------------------------------------------------------


def only_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    return lines[0]


def test_cli_add_list_remove(tmp_path: Path) -> None:
    w = Work(tmp_path)
    key_hex = w.hsm("-generate_master_key").stdout.split()[-1]
    env = w.env
    add_pw = ("key", "protector", "add", "passphrase-argon2id", "--label")
    w.vhsm(*add_pw, "ops", env={**env, "HSM_NEW_MASTER_PASSPHRASE": "alpha"})
    both = {**env, "HSM_MASTER_PASSPHRASE": "alpha", "HSM_NEW_MASTER_PASSPHRASE": "beta"}
    w.vhsm(*add_pw, "backup", "--remove-raw", env=both)
    prot = tmp_path / "master.key.protected"
    assert not (tmp_path / "master.key").exists()
    assert stat.S_IMODE(os.lstat(prot).st_mode) == 0o600

    listed = json.loads(w.vhsm("key", "protector", "list", "--json").stdout)
    assert [(s["id"], s["kind"], s["label"]) for s in listed] == [
        (1, "passphrase-argon2id", "ops"),
        (2, "passphrase-argon2id", "backup"),
    ]
    assert all(set(s) == {"id", "kind", "label", "added"} for s in listed)
    text = w.vhsm("key", "protector", "list").stdout
    assert "ops" in text and "backup" in text and "salt" not in text and "ct" not in text

    beta = {**env, "HSM_MASTER_PASSPHRASE": "beta"}
    alpha = {**env, "HSM_MASTER_PASSPHRASE": "alpha"}
    w.vhsm("key", "--no-daemon", "generate", "k", env=alpha)
    assert w.vhsm("key", "--no-daemon", "list", env=beta).stdout.split() == ["k"]
    w.vhsm("key", "protector", "remove", "1", env=beta)
    assert [s["id"] for s in json.loads(w.vhsm("key", "protector", "list", "--json").stdout)] == [2]
    p = w.vhsm("key", "--no-daemon", "list", env=alpha, check=False)
    assert p.returncode == 1 and "wrong passphrase" in only_error_line(p.stderr)
    p = w.vhsm("key", "protector", "remove", "2", env=beta, check=False)
    assert p.returncode == 1 and "last protector slot" in only_error_line(p.stderr)
    # the raw key still matches the check, so it may authorize changes too
    w.vhsm("key", "--no-daemon", "list", env={**env, "HSM_MASTER_KEY": key_hex})

    details = [f[4] for f in w.events("CONFIG_CHANGE")]
    assert any("slot 1 added (passphrase-argon2id, label 'ops'" in d for d in details)
    assert any("slot 2 added" in d for d in details)
    assert any("raw master.key removed" in d for d in details)
    assert any("slot 1 removed" in d for d in details)
    assert any("master key unlock refused" in f[4] for f in w.events("AUTH_FAILURE"))
    for secret in ("alpha", "beta", key_hex):
        assert secret not in w.log.read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("bogus",), "unknown protector kind 'bogus'"),
        (("passphrase-argon2id", "--tcti", "x"), "takes no tcti"),
        (("tpm2", "--pcrs", "0,99"), "PCR numbers from 0 to 23"),
    ],
)
def test_cli_bad_kind_is_one_line(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    w = Work(tmp_path)
    w.hsm("-generate_master_key")
    p = w.vhsm("key", "protector", "add", *args, check=False)
    assert p.returncode == 1 and message in only_error_line(p.stderr)
    assert not (tmp_path / "master.key.protected").exists()


def test_daemon_start_with_a_refused_unlock_is_audited(tmp_path: Path) -> None:
    """The daemon unlocks through the slots at start; a wrong passphrase stops it with one
    line and leaves an AUTH_FAILURE by vhsm-keysvc in its audit log."""
    w = Work(tmp_path)
    env = {**w.env, "HSM_MASTER_PASSPHRASE": "right"}
    w.vhsm("key", "generate-master-key", "--passphrase", env=env)
    sock = str(tmp_path / "s.sock")
    wrong = {**w.env, "HSM_MASTER_PASSPHRASE": "wrong"}
    p = w.vhsm("keysvc", "serve", "--no-harden", "--socket", sock, env=wrong, check=False)
    assert p.returncode == 1 and "wrong passphrase" in only_error_line(p.stderr)
    [fail] = w.events("AUTH_FAILURE")
    assert fail[3] == "vhsm-keysvc" and "master key unlock refused" in fail[4]
    assert not os.path.exists(sock)


# --- locked start (stretch) --------------------------------------------------------------------


def test_missing_passphrase_is_needs_person(data: Path) -> None:
    """No passphrase and no terminal: NeedsPersonError (the daemon's cue to start locked),
    not a refused unlock, and nothing audited."""
    two_passphrase_slots(data)
    with pytest.raises(NeedsPersonError, match="set HSM_MASTER_PASSPHRASE"):
        masterkey.resolve(None, data, audit_log=log(data), user="t")
    assert not [e for e in audit.read_entries(log(data)) if e.event == "AUTH_FAILURE"]


def test_daemon_starts_locked_and_unlocks(tmp_path: Path) -> None:
    w = Work(tmp_path)
    pw = {**w.env, "HSM_MASTER_PASSPHRASE": "Pw-right-7f3a"}
    w.vhsm("key", "generate-master-key", "--passphrase", env=pw)
    w.vhsm("key", "--no-daemon", "generate", "k1", env=pw)
    d = Daemon(w).start()  # its environment has no passphrase: it starts locked
    try:
        assert "starting locked" in d.stderr
        assert "LOCKED" in w.vhsm("keysvc", "status").stdout
        p = w.vhsm("key", "list", check=False)
        assert p.returncode == 1 and "locked" in only_error_line(p.stderr)
        bad = {**w.env, "HSM_MASTER_PASSPHRASE": "Pw-wrong-91c2"}
        p = w.vhsm("keysvc", "unlock", env=bad, check=False)
        assert p.returncode == 1 and "wrong passphrase" in only_error_line(p.stderr)
        assert "LOCKED" in w.vhsm("keysvc", "status").stdout
        assert "unlocked" in w.vhsm("keysvc", "unlock", env=pw).stdout
        assert w.vhsm("key", "list").stdout.split() == ["k1"]  # through the daemon
        assert "already unlocked" in w.vhsm("keysvc", "unlock", env=pw).stdout
    finally:
        assert d.stop() == 0
    assert any("master key unlock refused" in f[4] for f in w.events("AUTH_FAILURE"))
    assert any("key service unlocked" in f[4] for f in w.events("AUTH_SUCCESS"))
    assert "Pw-right" not in w.log.read_text() and "Pw-wrong" not in w.log.read_text()
