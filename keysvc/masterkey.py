"""The 32-byte master key: where it comes from, and protectors that keep it at rest.

Sources, first match wins: `-master_key HEX` (argv; warned about), $HSM_MASTER_KEY (hex),
<data dir>/master.key (32 raw bytes, must be 0600), <data dir>/master.key.protected (protector
slots, any one of which unlocks the key: keysvc.protectorslots). Both files are read and written
only through keysvc.safefs (relative to the data dir's fd, checked, bounded).

The keystore only ever sees 32 bytes: protectors are a registry of `Protector` classes keyed by
`kind`, so a TPM, PKCS#11 or FIDO2 protector is one new class here and nothing else changes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Protocol

from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keysvc import paths, safefs
from keysvc.errors import MasterKeyError, NoMasterKeyError, WrongMasterKeyError

KEY_LEN = 32
MAX_PROTECTED = 64 * 1024  # master.key.protected: small JSON; room for larger protectors


def parse_hex(text: str) -> bytes:
    t = text.strip().lower()
    if len(t) != 2 * KEY_LEN or any(c not in "0123456789abcdef" for c in t):
        raise MasterKeyError("a master key must be 64 hex characters (32 bytes)")
    return bytes.fromhex(t)


def check_value(master_key: bytes) -> str:
    """A public fingerprint of the master key (HKDF, one-way): lets the keystore and the daemon
    detect a wrong master key before decrypting anything, without ever sending the key."""
    return (
        HKDF(hashes.SHA256(), 32, salt=None, info=b"vhsm master key check v1")
        .derive(master_key)
        .hex()
    )


class Protector(Protocol):
    """Seals the master key at rest. `seal` returns JSON-able parameters (including the
    ciphertext); `unseal` gets them back and returns the 32 bytes or raises."""

    kind: ClassVar[str]

    def seal(self, master_key: bytes) -> dict[str, object]: ...

    def unseal(self, sealed: dict[str, object]) -> bytes: ...


class PassphraseProtector:
    """Argon2id (RFC 9106 second recommendation: t=3, 64 MiB) derives a KEK from the passphrase;
    AES-256-GCM seals the master key. Parameters are stored with the blob so they can grow."""

    kind: ClassVar[str] = "passphrase-argon2id"
    _AAD = b"vhsm master key passphrase v1"

    def __init__(self, passphrase: str, *, t: int = 3, m_kib: int = 65536, p: int = 2) -> None:
        if not passphrase:
            raise MasterKeyError("the passphrase is empty")
        self._pw = passphrase.encode()
        self._t, self._m, self._p = t, m_kib, p

    def _kek(self, salt: bytes, t: int, m: int, p: int) -> bytes:
        return hash_secret_raw(
            self._pw, salt, time_cost=t, memory_cost=m, parallelism=p, hash_len=32, type=Type.ID
        )

    def seal(self, master_key: bytes) -> dict[str, object]:
        salt, nonce = os.urandom(16), os.urandom(12)
        kek = self._kek(salt, self._t, self._m, self._p)
        ct = AESGCM(kek).encrypt(nonce, master_key, self._AAD)
        return {
            "t": self._t,
            "m_kib": self._m,
            "p": self._p,
            "salt": salt.hex(),
            "nonce": nonce.hex(),
            "ct": ct.hex(),
        }

    def unseal(self, sealed: dict[str, object]) -> bytes:
        try:
            kek = self._kek(
                bytes.fromhex(str(sealed["salt"])),
                int(str(sealed["t"])),
                int(str(sealed["m_kib"])),
                int(str(sealed["p"])),
            )
            return AESGCM(kek).decrypt(
                bytes.fromhex(str(sealed["nonce"])), bytes.fromhex(str(sealed["ct"])), self._AAD
            )
        except InvalidTag:
            raise WrongMasterKeyError("wrong passphrase for the protected master key") from None
        except (KeyError, ValueError):
            raise MasterKeyError("protected master key file is malformed") from None


# kind -> factory taking the secret the user supplies (passphrase, PIN, ...)
PROTECTORS: dict[str, type[PassphraseProtector]] = {PassphraseProtector.kind: PassphraseProtector}


def sealed_document(master_key: bytes, protector: Protector) -> bytes:
    """The contents of master.key.protected."""
    doc = {
        "format": "vhsm-master-key",
        "version": 1,
        "protector": protector.kind,
        "sealed": protector.seal(master_key),
    }
    return (json.dumps(doc, indent=1) + "\n").encode()


def unseal_document(raw: bytes, path: Path, secret: str) -> bytes:
    """The master key from a version 1 or 2 file, through its passphrase slots."""
    from keysvc import protectorslots  # it imports this module

    def opener(slot: protectorslots.Slot) -> Protector | None:
        return PassphraseProtector(secret) if slot.kind == PassphraseProtector.kind else None

    return protectorslots.unlock_file(raw, path, opener=opener)


def resolve(
    hex_arg: str | None,
    data_dir: str | os.PathLike[str] | None,
    *,
    audit_log: Path | None = None,
    user: str = "vhsm",
    opener: Any = None,
) -> tuple[bytes, str]:
    """(master key, where it came from). Raises MasterKeyError when there is none. A refused
    unlock of master.key.protected is audited AUTH_FAILURE in `audit_log` when one is given."""
    if hex_arg:
        return parse_hex(hex_arg), "argv"
    env = os.environ.get("HSM_MASTER_KEY")
    if env:
        return parse_hex(env), "HSM_MASTER_KEY"
    d = safefs.open_dir_if_exists(paths.data_dir(data_dir), "data dir", MasterKeyError)
    if d is not None:
        with d:
            raw = d.read(paths.MASTER_KEY_NAME, "master key file", limit=KEY_LEN, secret=True)
            if raw is not None:
                key_file = d.path / paths.MASTER_KEY_NAME
                if len(raw) != KEY_LEN:
                    raise MasterKeyError(f"master key file {key_file} must hold exactly 32 bytes")
                return raw, str(key_file)
            prot = d.path / paths.PROTECTED_MASTER_KEY_NAME
            sealed = d.read(prot.name, "protected master key", limit=MAX_PROTECTED, secret=True)
            if sealed is not None:
                from keysvc import protectorslots  # it imports this module

                key = protectorslots.unlock_file(
                    sealed, prot, opener=opener, audit_log=audit_log, user=user
                )
                return key, str(prot)
            if d.lstat(paths.KEYSTORE_NAME) is not None:
                # a new master key could never open this keystore: do not suggest one
                raise NoMasterKeyError(
                    f"no master key for the keystore in {d.path}: pass -master_key or set "
                    "HSM_MASTER_KEY"
                )
    raise NoMasterKeyError(
        "no master key: pass -master_key, set HSM_MASTER_KEY, or run generate-master-key"
    )


def generate(
    data_dir: str | os.PathLike[str] | None, *, passphrase: str | None = None, force: bool = False
) -> tuple[bytes, Path]:
    """Create a new random master key file (raw 0600, or passphrase-protected: a version 2
    slot file with one passphrase slot)."""
    name = paths.PROTECTED_MASTER_KEY_NAME if passphrase else paths.MASTER_KEY_NAME
    with safefs.open_dir(paths.data_dir(data_dir), "data dir", MasterKeyError) as d:
        if not force:
            for existing in (paths.MASTER_KEY_NAME, paths.PROTECTED_MASTER_KEY_NAME):
                if d.lstat(existing) is not None:
                    raise MasterKeyError(
                        f"{d.path / existing} already exists; refusing to replace a master key "
                        "(keys under it would be lost)"
                    )
        key = os.urandom(KEY_LEN)
        data = key
        if passphrase:
            from keysvc import protectorslots  # it imports this module

            data = protectorslots.first_slot(key, PassphraseProtector(passphrase))
        d.replace(name, "master key file", data, mode=0o600)
        return key, d.path / name
