"""Protector slots: several protectors wrap the same master key and any one unlocks it (like
LUKS key slots). master.key.protected, format version 2:

    {"format": "vhsm-master-key", "version": 2, "check": check_value(master key),
     "slots": [{"id": 1, "kind": "passphrase-argon2id", "label": "ops", "added": 1764780000,
                "params": {...}, "sealed": {...}}, ...]}

`sealed` is what the protector's `seal` returned; `params` holds the non-secret arguments its
class is rebuilt from at unlock (a PKCS#11 token label, a TPM's PCR list, a PIN *source* such
as `credential:vhsm-pin`), never a PIN or passphrase. `check` lets unlock refuse a slot that
unwraps some other 32 bytes (a slot pasted in from another file), compared in constant time.

Version 1 (one passphrase protector, no check) is read as one slot with id 1 and written back
as version 2 on the first change. The file is parsed strictly (types, sizes, count), read and
replaced only through keysvc.safefs (0600, atomic), and changes are serialized by an flock on
`.master.key.protected.lock`. Every add and remove is audited (CONFIG_CHANGE) before the new
file is published; a failed unlock is audited AUTH_FAILURE by the caller that has an audit log.
"""

from __future__ import annotations

import getpass
import hmac
import importlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keysvc import audit, masterkey, paths, safefs
from keysvc.errors import MasterKeyError, NeedsPersonError, WrongMasterKeyError

FORMAT = "vhsm-master-key"
VERSION = 2
MAX_SLOTS = 32
MAX_LABEL = 64
LOCK_NAME = ".master.key.protected.lock"
WHAT = "protected master key"  # the name safefs errors use for the file
PASSPHRASE = masterkey.PassphraseProtector.kind
FIDO2 = "fido2-hmac-secret"
FIDO2_CLASS = "Fido2Protector"
_KIND_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_PARAM_NAME_RE = re.compile(r"[a-z_]{1,32}")
_MAX_PARAM_STR = 1024
_MAX_ID = 1 << 31

# a secret the user supplies for a slot: (prompt) -> secret; raises MasterKeyError if none
SecretSource = Callable[[str], str]
Builder = Callable[[dict[str, Any], SecretSource], masterkey.Protector]


@dataclass(frozen=True)
class Kind:
    """How to rebuild a protector of one kind from a slot's params. `person`: unlocking needs
    someone present (a passphrase, a touch, a typed PIN), so unattended unlock tries these last."""

    build: Builder
    person: bool
    params: tuple[str, ...] = ()  # the params this kind accepts


@dataclass
class Slot:
    id: int
    kind: str
    label: str
    added: int
    sealed: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "label": self.label,
            "added": self.added,
            "params": self.params,
            "sealed": self.sealed,
        }

    def public(self) -> dict[str, Any]:
        """What `protector list` shows: never the sealed blob (no secret is in it, but nothing
        there helps the reader either)."""
        return {"id": self.id, "kind": self.kind, "label": self.label, "added": self.added}


# builds the protector for a slot, or None when the caller cannot satisfy that slot
Opener = Callable[[Slot], masterkey.Protector | None]


@dataclass
class SlotFile:
    check: str | None  # None only for a version 1 file not yet upgraded
    slots: list[Slot]
    version: int = VERSION

    def dump(self) -> bytes:
        if self.check is None:
            raise MasterKeyError("cannot write a protected master key without its check value")
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "check": self.check,
            "slots": [s.to_json() for s in self.slots],
        }
        data = (json.dumps(doc, indent=1) + "\n").encode()
        if len(data) > masterkey.MAX_PROTECTED:
            raise MasterKeyError(
                f"the protected master key would exceed {masterkey.MAX_PROTECTED} bytes; "
                "remove a slot first"
            )
        return data


# --- kinds -------------------------------------------------------------------------------------


def _hardware(module: str, cls_name: str, kind: str) -> Any:
    """The class of a hardware protector, imported only when a slot of its kind is used: a
    build without that module (or its library) still handles every other kind."""
    try:
        mod = importlib.import_module(module)
        return getattr(mod, cls_name)
    except ImportError as e:
        # the module is there but its library is not (tpm2-pytss, python-pkcs11, fido2)
        why = "" if e.name in (None, module) else f" (it needs the Python module {e.name})"
        raise MasterKeyError(f"protector kind {kind} is not available in this build{why}") from None
    except AttributeError:
        raise MasterKeyError(f"protector kind {kind} is not available in this build") from None


def pin_from(source: str, kind: str) -> str:
    """A PIN from `env:NAME`, `file:PATH` or `credential:NAME`, read by the PKCS#11 helper's
    `pin_from` (keysvc.pinsource, re-exported by keysvc.protect_pkcs11) for the FIDO2 kind too:
    one implementation of the systemd credential rules."""
    try:
        fn = _hardware("keysvc.pinsource", "pin_from", kind)
    except MasterKeyError:
        fn = _hardware("keysvc.protect_pkcs11", "pin_from", kind)
    pin: str = fn(source)
    return pin


def _pin(params: dict[str, Any], secret: SecretSource, kind: str) -> str | None:
    src = params.get("pin_source")
    return pin_from(src, kind) if src else secret(f"{kind} PIN: ")


def _build_passphrase(params: dict[str, Any], secret: SecretSource) -> masterkey.Protector:
    return masterkey.PassphraseProtector(secret("Master key passphrase: "))


def _build_tpm(params: dict[str, Any], secret: SecretSource) -> masterkey.Protector:
    cls = _hardware("keysvc.protect_tpm", "TpmProtector", "tpm2")
    tcti = params.get("tcti") or os.environ.get("TPM2TOOLS_TCTI")
    p: masterkey.Protector = cls(tcti=tcti, pcrs=tuple(params.get("pcrs") or ()))
    return p


def _build_pkcs11(params: dict[str, Any], secret: SecretSource) -> masterkey.Protector:
    cls = _hardware("keysvc.protect_pkcs11", "Pkcs11Protector", "pkcs11")
    if not params.get("token_label"):
        raise MasterKeyError("a pkcs11 protector needs --token-label")
    p: masterkey.Protector = cls(
        params["token_label"],
        _pin(params, secret, "pkcs11"),
        module=params.get("module"),
        key_label=params.get("key_label") or "vhsm-master-wrap",
    )
    return p


def _build_fido2(params: dict[str, Any], secret: SecretSource) -> masterkey.Protector:
    cls = _hardware("keysvc.protect_fido2", FIDO2_CLASS, FIDO2)
    pin = pin_from(params["pin_source"], FIDO2) if params.get("pin_source") else None
    p: masterkey.Protector = cls(
        pin=pin, rp_id=params.get("rp_id") or "vhsm.local", ask_pin=None if pin else secret
    )
    return p


# Params used when a slot is added but never written to (nor read from) the file: the PKCS#11
# module path is code that vhsm loads, so at unlock it comes from $VHSM_PKCS11_MODULE or the
# usual Debian paths (keysvc.protect_pkcs11.default_module), never from a file on disk.
NOT_STORED = frozenset({"module"})

KINDS: dict[str, Kind] = {
    PASSPHRASE: Kind(_build_passphrase, person=True),
    "tpm2": Kind(_build_tpm, person=False, params=("tcti", "pcrs")),
    "pkcs11": Kind(
        _build_pkcs11, person=False, params=("token_label", "module", "key_label", "pin_source")
    ),
    FIDO2: Kind(_build_fido2, person=True, params=("pin_source", "rp_id")),
}


def kind_of(name: str) -> Kind:
    k = KINDS.get(name)
    if k is None:
        raise MasterKeyError(
            f"unknown protector kind {name[:40]!r} (known: {', '.join(sorted(KINDS))})"
        )
    return k


def build(kind: str, params: dict[str, Any], secret: SecretSource) -> masterkey.Protector:
    """A protector of `kind` from its params; secrets come from `secret` (prompt or env)."""
    k = kind_of(kind)
    unknown = set(params) - set(k.params)
    if unknown:
        raise MasterKeyError(f"protector kind {kind} takes no {', '.join(sorted(unknown))}")
    return k.build(params, secret)


# --- parsing -----------------------------------------------------------------------------------


def _bad(path: Path, why: str) -> MasterKeyError:
    return MasterKeyError(f"{WHAT} {path} is malformed: {why}")


def _json_value_ok(v: Any, depth: int = 0) -> bool:
    """A sealed blob or params value: JSON scalars, lists and string-keyed objects, shallow."""
    if depth > 4:
        return False
    if v is None or isinstance(v, bool | int | float):
        return True
    if isinstance(v, str):
        return len(v) <= masterkey.MAX_PROTECTED
    if isinstance(v, list):
        return len(v) <= 256 and all(_json_value_ok(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return len(v) <= 64 and all(
            isinstance(k, str) and len(k) <= 64 and _json_value_ok(x, depth + 1)
            for k, x in v.items()
        )
    return False


def validate_label(label: str) -> str:
    if len(label) > MAX_LABEL or not label.isprintable():
        raise MasterKeyError(f"a slot label must be at most {MAX_LABEL} printable characters")
    return label


def _slot(d: Any, path: Path) -> Slot:
    if not isinstance(d, dict):
        raise _bad(path, "a slot is not an object")
    sid, kind, label, added = d.get("id"), d.get("kind"), d.get("label"), d.get("added")
    sealed, params = d.get("sealed"), d.get("params", {})
    if type(sid) is not int or not 1 <= sid < _MAX_ID:
        raise _bad(path, "a slot id is not a positive integer")
    if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
        raise _bad(path, f"slot {sid} has no valid kind")
    if not isinstance(label, str) or len(label) > MAX_LABEL or not label.isprintable():
        raise _bad(path, f"slot {sid} has an invalid label")
    if type(added) not in (int, float) or not 0 <= added < 1e11:
        raise _bad(path, f"slot {sid} has an invalid time")
    if not isinstance(sealed, dict) or not _json_value_ok(sealed):
        raise _bad(path, f"slot {sid} has an invalid sealed blob")
    if not isinstance(params, dict) or not all(
        isinstance(k, str)
        and _PARAM_NAME_RE.fullmatch(k)
        and (
            v is None
            or (isinstance(v, str) and len(v) <= _MAX_PARAM_STR)
            or (isinstance(v, list) and len(v) <= 24 and all(type(x) is int for x in v))
        )
        for k, v in params.items()
    ):
        raise _bad(path, f"slot {sid} has invalid parameters")
    if set(params) & NOT_STORED:
        # a module path read from this file would be code loaded into vhsm (often root)
        raise _bad(path, f"slot {sid} names a {'/'.join(sorted(set(params) & NOT_STORED))}")
    return Slot(sid, kind, label, int(added), sealed, params)


def parse(raw: bytes, path: Path) -> SlotFile:
    """A version 1 or 2 file, every field checked; MasterKeyError naming what is wrong."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise MasterKeyError(f"{path} is not a vhsm protected master key") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise MasterKeyError(f"{path} is not a vhsm protected master key")
    version = doc.get("version")
    if version == 1:
        prot, sealed = doc.get("protector"), doc.get("sealed")
        if prot != PASSPHRASE or not isinstance(sealed, dict) or not _json_value_ok(sealed):
            raise _bad(path, "version 1 holds one passphrase protector")
        return SlotFile(None, [Slot(1, PASSPHRASE, "", 0, sealed)], version=1)
    if version != VERSION:
        raise MasterKeyError(f"{path} has unsupported version {str(version)[:20]}")
    check, raw_slots = doc.get("check"), doc.get("slots")
    if not isinstance(check, str) or not _HEX64_RE.fullmatch(check):
        raise _bad(path, "no valid check value")
    if not isinstance(raw_slots, list) or not 1 <= len(raw_slots) <= MAX_SLOTS:
        raise _bad(path, f"it must hold 1 to {MAX_SLOTS} slots")
    slots = [_slot(s, path) for s in raw_slots]
    if len({s.id for s in slots}) != len(slots):
        raise _bad(path, "two slots have the same id")
    return SlotFile(check, slots)


# --- unlock ------------------------------------------------------------------------------------


def env_or_prompt(env: str) -> SecretSource:
    """A secret from $env, else a prompt on a terminal, else a one-line error naming $env."""

    def get(prompt: str) -> str:
        v = os.environ.get(env)
        if v:
            return v
        if sys.stdin.isatty():
            return getpass.getpass(prompt)
        raise NeedsPersonError(f"master.key.protected needs a secret: set {env}")

    return get


def _passphrase_source() -> SecretSource:
    """HSM_MASTER_PASSPHRASE or a prompt, asked at most once per unlock."""
    cache: list[str] = []
    base = env_or_prompt("HSM_MASTER_PASSPHRASE")

    def get(prompt: str) -> str:
        if not cache:
            try:
                cache.append(base(prompt))
            except MasterKeyError:
                raise NeedsPersonError(
                    "master.key.protected needs a passphrase: set HSM_MASTER_PASSPHRASE"
                ) from None
        return cache[0]

    return get


def unlock(sf: SlotFile, path: Path, opener: Opener, refused: list[str] | None = None) -> bytes:
    """The master key from the first slot that `opener` can build a protector for and that
    unseals to the key `check` names. Slots needing no person are tried first. Raises
    WrongMasterKeyError when slots were tried and none opened, MasterKeyError when none could
    be tried (the first reason why). `refused` collects the slots that were tried and said no
    (wrong secret, wrong device, changed PCRs), also when a later slot unlocks."""
    order = sorted(sf.slots, key=lambda s: KINDS[s.kind].person if s.kind in KINDS else True)
    tried: list[str] = []
    reasons: list[str] = []
    waiting: str | None = None  # why a slot needs a secret nobody is there to give
    for slot in order:
        try:
            prot = opener(slot)
        except WrongMasterKeyError:  # e.g. a token that refused the PIN at login
            tried.append(str(slot.id))
            continue
        except MasterKeyError as e:
            if isinstance(e, NeedsPersonError) and waiting is None:
                waiting = str(e)
            reasons.append(str(e))
            continue
        if prot is None:
            continue
        tried.append(str(slot.id))
        try:
            key = prot.unseal(slot.sealed)
        except WrongMasterKeyError as e:
            reasons.append(f"slot {slot.id}: {e}")  # secret-free one line: which device said no
            # A passphrase is not aimed at one slot: another passphrase slot opening with it
            # is the normal case, not an attempt to audit. A device that said no is.
            if refused is not None and slot.kind != PASSPHRASE:
                refused.append(f"slot {slot.id} ({slot.kind}): {e}")
            continue
        except MasterKeyError as e:
            reasons.append(f"slot {slot.id}: {e}")
            continue
        if not isinstance(key, bytes) or len(key) != masterkey.KEY_LEN:
            reasons.append(f"slot {slot.id} did not unseal a 32-byte key")
            continue
        # constant time: the check of a key that is almost right must not say how close it is
        if sf.check is not None and not hmac.compare_digest(
            masterkey.check_value(key).encode(), sf.check.encode()
        ):
            reasons.append(f"slot {slot.id} unseals a key that does not match the file's check")
            if refused is not None:
                refused.append(f"slot {slot.id} ({slot.kind}): does not match the file's check")
            continue
        return key
    if tried:
        what = "wrong passphrase or protector" + (f" ({'; '.join(reasons)})" if reasons else "")
        raise WrongMasterKeyError(
            f"{what}: no protector slot of {path} unlocked the master key "
            f"(tried slot {', '.join(tried)})"
        )
    if waiting is not None:  # nothing failed: someone has to unlock it (`vhsm keysvc unlock`)
        raise NeedsPersonError(waiting)
    raise MasterKeyError(reasons[0] if reasons else f"no protector slot of {path} can be used")


def default_opener(passphrase: SecretSource | None = None) -> Opener:
    """Rebuild each slot's protector from its params; passphrase and PINs from the
    environment or a prompt."""
    pw = passphrase or _passphrase_source()
    pins = env_or_prompt("HSM_PROTECTOR_PIN")

    def open_slot(slot: Slot) -> masterkey.Protector:
        return build(slot.kind, slot.params, pw if slot.kind == PASSPHRASE else pins)

    return open_slot


def unattended_opener() -> Opener:
    """The daemon's opener at start: nobody is there to touch a security key, so FIDO2 slots
    wait for `vhsm keysvc unlock --fido2` (NeedsPersonError: the daemon starts locked when no
    other slot opens); everything else as `default_opener`."""
    base = default_opener()

    def open_slot(slot: Slot) -> masterkey.Protector:
        if slot.kind == FIDO2:
            raise NeedsPersonError(
                "a FIDO2 slot needs a touch of the security key: run vhsm keysvc unlock --fido2"
            )
        return base(slot)

    return open_slot


def kind_opener(kind: str, secret: str) -> Opener:
    """The daemon's opener for `vhsm keysvc unlock`: only slots of `kind` (passphrase: the
    secret is the passphrase; FIDO2: the PIN, asked for only if the authenticator has one)."""

    def give(_prompt: str) -> str:
        if not secret:
            raise MasterKeyError("the FIDO2 authenticator has a PIN: give it")
        return secret

    def open_slot(slot: Slot) -> masterkey.Protector | None:
        if slot.kind != kind:
            return None  # only what the person came to unlock with (no surprise touch)
        return build(slot.kind, slot.params, give)

    return open_slot


def audit_auth_failure(log: Path, user: str, details: str) -> None:
    audit.writer_for(log).append(
        [audit.AuditRecord("AUTH_FAILURE", "N/A", user, details, False, os.getuid())]
    )


def unlock_file(
    raw: bytes,
    path: Path,
    *,
    opener: Opener | None = None,
    audit_log: Path | None = None,
    user: str = "vhsm",
) -> bytes:
    """`unlock` of the file's contents; a refused unlock is audited AUTH_FAILURE when the
    caller names its audit log (fail-closed: if that write fails, its error wins)."""
    sf = parse(raw, path)
    refused: list[str] = []
    try:
        key = unlock(sf, path, opener or default_opener(), refused)
    except WrongMasterKeyError as e:
        if audit_log is not None:
            audit_auth_failure(audit_log, user, f"master key unlock refused: {e}")
        raise
    if refused and audit_log is not None:
        # a wrong PIN or a foreign security key is an authentication failure even when
        # another slot then unlocks: the log must show the attempt (fail-closed if it cannot)
        details = f"protector slot refused before another unlocked: {'; '.join(refused)}"
        audit_auth_failure(audit_log, user, details)
    return key


# --- changes -----------------------------------------------------------------------------------


@contextmanager
def _locked(data_dir: Path) -> Iterator[safefs.Dir]:
    """The data dir, with the slot file's lock held: two `protector add` at once would each
    write back the file they read, and one slot would be lost."""
    with (
        safefs.open_dir(data_dir, "data dir", MasterKeyError) as d,
        d.exclusive(LOCK_NAME, "protected master key lock"),
    ):
        yield d


def _read(d: safefs.Dir) -> SlotFile | None:
    raw = d.read(paths.PROTECTED_MASTER_KEY_NAME, WHAT, limit=masterkey.MAX_PROTECTED, secret=True)
    return None if raw is None else parse(raw, d.path / paths.PROTECTED_MASTER_KEY_NAME)


def read_slots(data_dir: str | os.PathLike[str] | None) -> SlotFile | None:
    d = safefs.open_dir_if_exists(paths.data_dir(data_dir), "data dir", MasterKeyError)
    if d is None:
        return None
    with d:
        return _read(d)


def _publish(d: safefs.Dir, sf: SlotFile, record: audit.AuditRecord, log: Path) -> None:
    """Write the new file as a temp, audit the change, then rename it into place: a change
    that cannot be audited is never made, and a crash leaves the old file or the new one."""
    pending = d.prepare_replace(paths.PROTECTED_MASTER_KEY_NAME, WHAT, sf.dump(), mode=0o600)
    try:
        audit.writer_for(log).append([record])
    except BaseException:
        pending.discard()
        raise
    pending.publish()


@dataclass
class Unlocked:
    """The master key and where it came from, for a change to the slots."""

    key: bytes
    source: str


def _verify_against(sf: SlotFile, key: bytes, path: Path) -> None:
    if sf.check is None:
        raise MasterKeyError(
            f"{path} is version 1: unlock it with its passphrase (HSM_MASTER_PASSPHRASE), "
            "not with a raw master key"
        )
    if not hmac.compare_digest(masterkey.check_value(key).encode(), sf.check.encode()):
        raise WrongMasterKeyError(f"wrong master key: it does not match {path}")


def unlock_for_change(
    data_dir: str | os.PathLike[str] | None,
    hex_arg: str | None,
    *,
    audit_log: Path,
    user: str,
    opener: Opener | None = None,
) -> Unlocked:
    """The master key a slot change starts from. A raw key (argv, HSM_MASTER_KEY, or a
    master.key still beside the protected file) is used as `resolve` would use it, and must
    match the protected file's check; otherwise the slots unlock it (`opener`, by default the
    environment or prompts). A refused key or unlock is audited AUTH_FAILURE."""
    d = safefs.open_dir(paths.data_dir(data_dir), "data dir", MasterKeyError)
    with d:
        prot = d.path / paths.PROTECTED_MASTER_KEY_NAME
        raw = d.read(prot.name, WHAT, limit=masterkey.MAX_PROTECTED, secret=True)
        has_raw_file = d.lstat(paths.MASTER_KEY_NAME) is not None
    if raw is None or hex_arg or os.environ.get("HSM_MASTER_KEY") or has_raw_file:
        key, source = masterkey.resolve(hex_arg, data_dir)
        if raw is not None:
            try:
                _verify_against(parse(raw, prot), key, prot)
            except WrongMasterKeyError as e:
                audit_auth_failure(audit_log, user, f"master key unlock refused: {e}")
                raise
        return Unlocked(key, source)
    key = unlock_file(raw, prot, opener=opener, audit_log=audit_log, user=user)
    return Unlocked(key, str(prot))


def add_slot(
    data_dir: str | os.PathLike[str] | None,
    unlocked: Unlocked,
    protector: masterkey.Protector,
    *,
    params: dict[str, Any],
    label: str,
    audit_log: Path,
    user: str,
    remove_raw: bool = False,
) -> Slot:
    """Seal the master key with `protector` into a new slot (converting a version 1 file, or
    creating the file around a raw key) and audit it. `remove_raw` deletes a raw master.key
    afterwards, once the new file is durable: the raw file would otherwise still be used first."""
    validate_label(label)
    with _locked(paths.data_dir(data_dir)) as d:
        prot = d.path / paths.PROTECTED_MASTER_KEY_NAME
        sf = _read(d)
        if sf is None:
            sf = SlotFile(masterkey.check_value(unlocked.key), [])
        elif sf.check is None:
            # version 1: the key came from its own slot (unlock_for_change), so it is the one
            sf.check = masterkey.check_value(unlocked.key)
        else:
            _verify_against(sf, unlocked.key, prot)
        if len(sf.slots) >= MAX_SLOTS:
            raise MasterKeyError(f"{prot} already holds {MAX_SLOTS} slots")
        sealed = protector.seal(unlocked.key)
        slot = Slot(
            max((s.id for s in sf.slots), default=0) + 1,
            protector.kind,
            label,
            int(time.time()),
            sealed,
            {k: v for k, v in params.items() if v not in (None, "", []) and k not in NOT_STORED},
        )
        sf.slots.append(slot)
        record = audit.AuditRecord(
            "CONFIG_CHANGE",
            "N/A",
            user,
            f"master key protector slot {slot.id} added ({slot.kind}, label {label!r}, "
            f"unlocked from {Path(unlocked.source).name})",
            True,
            os.getuid(),
        )
        _publish(d, sf, record, audit_log)
        if remove_raw and d.lstat(paths.MASTER_KEY_NAME) is not None:
            os.unlink(paths.MASTER_KEY_NAME, dir_fd=d.fd)
            d.fsync()
            audit.writer_for(audit_log).append(
                [
                    audit.AuditRecord(
                        "CONFIG_CHANGE",
                        "N/A",
                        user,
                        "raw master.key removed (the master key is now only in protector slots)",
                        True,
                        os.getuid(),
                    )
                ]
            )
        return slot


def remove_slot(
    data_dir: str | os.PathLike[str] | None,
    unlocked: Unlocked,
    slot_id: int,
    *,
    audit_log: Path,
    user: str,
) -> Slot:
    """Remove slot `slot_id` (audited); the last slot is never removed (the key would be lost)."""
    with _locked(paths.data_dir(data_dir)) as d:
        prot = d.path / paths.PROTECTED_MASTER_KEY_NAME
        sf = _read(d)
        if sf is None:
            raise MasterKeyError(f"{prot} does not exist: there are no protector slots")
        if sf.check is None:
            sf.check = masterkey.check_value(unlocked.key)
        else:
            _verify_against(sf, unlocked.key, prot)
        slot = next((s for s in sf.slots if s.id == slot_id), None)
        if slot is None:
            raise MasterKeyError(f"{prot} has no slot {slot_id}")
        if len(sf.slots) == 1:
            raise MasterKeyError(
                f"slot {slot_id} is the last protector slot; removing it would lose the master "
                "key (add another first)"
            )
        sf.slots.remove(slot)
        record = audit.AuditRecord(
            "CONFIG_CHANGE",
            "N/A",
            user,
            f"master key protector slot {slot.id} removed ({slot.kind}, label {slot.label!r})",
            True,
            os.getuid(),
        )
        _publish(d, sf, record, audit_log)
        return slot


def first_slot(master_key: bytes, protector: masterkey.Protector, label: str = "") -> bytes:
    """The contents of a new master.key.protected with one slot (generate-master-key)."""
    slot = Slot(1, protector.kind, label, int(time.time()), protector.seal(master_key))
    return SlotFile(masterkey.check_value(master_key), [slot]).dump()


def new_secret_source() -> SecretSource:
    """The secret of a slot being added: a passphrase from HSM_NEW_MASTER_PASSPHRASE (the
    unlocking one stays HSM_MASTER_PASSPHRASE, so both can be given to a script) or a PIN
    from HSM_PROTECTOR_PIN; else typed twice on a terminal; else a one-line error."""

    def get(prompt: str) -> str:
        env = "HSM_NEW_MASTER_PASSPHRASE" if "passphrase" in prompt else "HSM_PROTECTOR_PIN"
        v = os.environ.get(env)
        if v:
            return v
        if not sys.stdin.isatty():
            raise MasterKeyError(f"the new protector slot needs a secret: set {env}")
        first = getpass.getpass(f"New slot: {prompt}")
        if getpass.getpass("Again: ") != first:
            raise MasterKeyError("the two entries differ")
        return first

    return get


def parse_pcrs(text: str) -> list[int]:
    """`--pcrs 0,7` -> [0, 7] (SHA-256 bank PCR indexes 0-23)."""
    try:
        pcrs = sorted({int(p) for p in text.split(",") if p.strip()})
    except ValueError:
        raise MasterKeyError(f"--pcrs takes PCR numbers like 0,7, not {text[:40]!r}") from None
    if not pcrs or any(not 0 <= p <= 23 for p in pcrs):
        raise MasterKeyError("--pcrs takes PCR numbers from 0 to 23, like 0,7")
    return pcrs


def fmt_added(ts: int) -> str:
    """When a slot was added, for `protector list` ("unknown" for a version 1 slot)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "unknown"


def unlock_data_dir(
    data_dir: str | os.PathLike[str] | None, opener: Opener, *, audit_log: Path, user: str
) -> bytes:
    """The master key from <data dir>/master.key.protected through `opener` (the daemon's
    `vhsm keysvc unlock`); a refused unlock is audited AUTH_FAILURE."""
    with safefs.open_dir(paths.data_dir(data_dir), "data dir", MasterKeyError) as d:
        prot = d.path / paths.PROTECTED_MASTER_KEY_NAME
        raw = d.read(prot.name, WHAT, limit=masterkey.MAX_PROTECTED, secret=True)
    if raw is None:
        raise MasterKeyError(f"{prot} does not exist")
    return unlock_file(raw, prot, opener=opener, audit_log=audit_log, user=user)
