"""FIDO2 hmac-secret protector: a security key's secret (a touch, and the PIN if it has one)
unlocks the master key.

seal: makeCredential (ES256, non-resident, hmac-secret) for `rp_id`, then getAssertion with a
fresh random 32-byte salt; the authenticator returns HMAC-SHA-256(CredRandom, salt), a secret
that only this authenticator can compute again and that never leaves it unencrypted (PIN/UV
auth protocol 2 encrypts salt and output on the wire). HKDF turns it into a KEK that wraps the
master key with AES-256-GCM; the AAD binds the kind, the RP id and the credential id.
The sealed dict holds only public values: rp_id, credential id, salt, nonce, ciphertext.

unseal: getAssertion with that credential id and salt, re-derive, unwrap. Another
authenticator does not hold the credential (CTAP2_ERR_NO_CREDENTIALS); an edited salt gives
another secret and the unwrap fails; both are WrongMasterKeyError.

Devices: the one given, else the first found over PC/SC (`fido2.pcsc`, needs pyscard), then
USB HID. python-fido2 is imported lazily so the rest of keysvc works without it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keysvc.errors import MasterKeyError, WrongMasterKeyError

if TYPE_CHECKING:
    from fido2.ctap import CtapDevice
    from fido2.ctap2 import Ctap2
    from fido2.ctap2.pin import PinProtocol

KEY_LEN = 32
SALT_LEN = 32
MAX_CRED_ID = 1023  # CTAP2: credential ids are at most 1023 bytes
_RP_ID = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
_log = logging.getLogger(__name__)
_INSTALL = "pip install fido2 (and pyscard for PC/SC readers)"


def _fido2() -> Any:
    try:
        import fido2.ctap2  # noqa: F401
        import fido2.ctap2.pin  # noqa: F401
    except ImportError:
        raise MasterKeyError(f"the fido2 protector needs python-fido2: {_INSTALL}") from None
    return fido2


def _pcsc_devices() -> tuple[list[CtapDevice], str]:
    """FIDO cards in PC/SC readers, and why PC/SC is unusable ("" when it is usable)."""
    try:
        from fido2.pcsc import CtapPcscDevice
    except ImportError as e:
        # Said, not swallowed: python-fido2 1.x's fido2.pcsc fails to import with pyscard
        # >= 2.2.2, and a user with a card in a reader deserves to know why it is not seen.
        return [], f"PC/SC unusable ({e}): pip install 'fido2>=2' pyscard"
    try:
        return list(CtapPcscDevice.list_devices()), ""
    except Exception as e:  # noqa: BLE001 - no pcscd or no reader: no devices over PC/SC
        _log.debug("no FIDO2 devices over PC/SC: %s", type(e).__name__)
        return [], ""


def _hid_devices() -> list[CtapDevice]:
    try:
        from fido2.hid import CtapHidDevice

        return list(CtapHidDevice.list_devices())
    except Exception as e:  # noqa: BLE001 - no hidraw access: no devices over HID
        _log.debug("no FIDO2 devices over HID: %s", type(e).__name__)
        return []


def _find() -> tuple[list[CtapDevice], str]:
    _fido2()
    pcsc, note = _pcsc_devices()
    return pcsc + _hid_devices(), note


def find_devices() -> list[CtapDevice]:
    """Authenticators present: PC/SC readers with a FIDO card first, then USB HID keys. A stack
    that is missing (no pyscard, no pcscd, no hidraw) simply contributes none."""
    return _find()[0]


def _aad(rp_id: str, cred_id: bytes) -> bytes:
    return b"vhsm master key fido2-hmac-secret v1\0" + rp_id.encode() + b"\0" + cred_id


def _kek(secret: bytes) -> bytes:
    return HKDF(hashes.SHA256(), KEY_LEN, salt=None, info=b"vhsm fido2 hmac-secret kek v1").derive(
        secret
    )


def _hex_field(sealed: dict[str, object], name: str, lo: int, hi: int) -> bytes:
    value = sealed.get(name)
    if not isinstance(value, str) or not lo * 2 <= len(value) <= hi * 2:
        raise MasterKeyError(f"protected master key file is malformed ({name})")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise MasterKeyError(f"protected master key file is malformed ({name})") from None


class Fido2Protector:
    """Seals the master key with a FIDO2 authenticator's hmac-secret. `pin` is needed when the
    authenticator has a PIN (then user verification is part of the secret: the output with a
    PIN differs from the one without, so setting a PIN later invalidates the seal)."""

    kind: ClassVar[str] = "fido2-hmac-secret"

    def __init__(
        self,
        device: CtapDevice | None = None,
        pin: str | None = None,
        rp_id: str = "vhsm.local",
        ask_pin: Callable[[str], str] | None = None,
    ) -> None:
        if not _RP_ID.match(rp_id):
            raise MasterKeyError("the FIDO2 relying party id must be a lower-case host name")
        self._device = device
        self._pin = pin or None
        # asked only when the authenticator turns out to have a PIN (most keys without one
        # would otherwise get a pointless prompt)
        self._ask_pin = ask_pin
        self.rp_id = rp_id

    # --- device plumbing ------------------------------------------------------------------

    @contextmanager
    def _open(self) -> Iterator[Ctap2]:
        """The given device, else the first one found; devices this opened are closed after."""
        fido2 = _fido2()
        found: list[CtapDevice] = []
        device = self._device
        if device is None:
            found, note = _find()
            if not found:
                why = f"; {note}" if note else ""
                raise MasterKeyError(f"no FIDO2 authenticator found (PC/SC reader or USB key){why}")
            device = found[0]
        try:
            try:
                ctap = fido2.ctap2.Ctap2(device)
            except Exception as e:  # noqa: BLE001 - a CTAP1-only key, or a broken transport
                raise MasterKeyError(
                    f"the FIDO2 authenticator does not answer CTAP2 ({type(e).__name__})"
                ) from None
            if "hmac-secret" not in ctap.info.extensions:
                raise MasterKeyError("the FIDO2 authenticator does not support hmac-secret")
            yield ctap
        finally:
            for dev in found:
                try:
                    dev.close()
                except Exception as e:  # noqa: BLE001 - closing must not hide the real outcome
                    _log.debug("closing a FIDO2 device failed: %s", type(e).__name__)

    def _protocol(self, ctap: Ctap2) -> PinProtocol:
        pin_mod = _fido2().ctap2.pin
        if 2 in ctap.info.pin_uv_protocols:
            return pin_mod.PinProtocolV2()
        return pin_mod.PinProtocolV1()

    def _pin_token(self, ctap: Ctap2, protocol: PinProtocol, rp_id: str) -> bytes | None:
        """A pinUvAuthToken for makeCredential + getAssertion on rp_id, or None without a PIN."""
        pin_mod = _fido2().ctap2.pin
        if not ctap.info.options.get("clientPin"):
            return None
        if self._pin is None and self._ask_pin is not None:
            self._pin = self._ask_pin("FIDO2 PIN: ") or None
        if self._pin is None:
            raise MasterKeyError("the FIDO2 authenticator has a PIN: give it")
        perms = pin_mod.ClientPin.PERMISSION.MAKE_CREDENTIAL
        perms |= pin_mod.ClientPin.PERMISSION.GET_ASSERTION
        return pin_mod.ClientPin(ctap, protocol).get_pin_token(self._pin, perms, rp_id)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one CTAP exchange, turning authenticator errors into one-line keysvc errors."""
        from fido2.ctap import CtapError

        err = CtapError.ERR
        try:
            return fn(*args, **kwargs)
        except CtapError as e:
            code = e.code
            if code == err.PIN_INVALID:
                raise WrongMasterKeyError("wrong PIN for the FIDO2 authenticator") from None
            if code in (err.PIN_BLOCKED, err.PIN_AUTH_BLOCKED):
                raise MasterKeyError(
                    "the FIDO2 authenticator's PIN is blocked (too many wrong PINs)"
                ) from None
            if code == err.NO_CREDENTIALS:
                raise WrongMasterKeyError(
                    "this authenticator does not hold the credential"
                ) from None
            name = err(code).name if code in err._value2member_map_ else hex(code)
            raise MasterKeyError(f"the FIDO2 authenticator refused {what}: {name}") from None
        except (OSError, ValueError) as e:
            raise MasterKeyError(f"FIDO2 {what} failed: {type(e).__name__}") from None

    def _hmac_secret(self, ctap: Ctap2, cred_id: bytes, salt: bytes, rp_id: str) -> bytes:
        """getAssertion for cred_id with hmac-secret(salt); returns the 32-byte output."""
        pin_mod = _fido2().ctap2.pin
        protocol = self._protocol(ctap)
        token = self._call("the PIN", self._pin_token, ctap, protocol, rp_id)
        # Key agreement for hmac-secret: the salt travels encrypted and MACed under it.
        resp = self._call(
            "key agreement",
            ctap.client_pin,
            protocol.VERSION,
            pin_mod.ClientPin.CMD.GET_KEY_AGREEMENT,
        )
        key_agreement, shared = protocol.encapsulate(resp[pin_mod.ClientPin.RESULT.KEY_AGREEMENT])
        salt_enc = protocol.encrypt(shared, salt)
        ext = {
            1: key_agreement,
            2: salt_enc,
            3: protocol.authenticate(shared, salt_enc),
            4: protocol.VERSION,
        }
        cdh = os.urandom(32)  # no web origin: a random challenge (nothing verifies it here)
        assertion = self._call(
            "the assertion",
            ctap.get_assertion,
            rp_id,
            cdh,
            [{"type": "public-key", "id": cred_id}],
            {"hmac-secret": ext},
            None,
            protocol.authenticate(token, cdh) if token else None,
            protocol.VERSION if token else None,
        )
        exts = assertion.auth_data.extensions or {}
        out_enc = exts.get("hmac-secret")
        if not isinstance(out_enc, bytes):
            raise MasterKeyError("the FIDO2 authenticator returned no hmac-secret output")
        try:
            out = protocol.decrypt(shared, out_enc)
        except ValueError:  # not a whole number of AES blocks
            out = b""
        if len(out) != SALT_LEN:
            raise MasterKeyError("the FIDO2 authenticator returned a malformed hmac-secret output")
        return out

    # --- the protector contract -------------------------------------------------------------

    def seal(self, master_key: bytes) -> dict[str, object]:
        if len(master_key) != KEY_LEN:
            raise MasterKeyError("a master key must be 32 bytes")
        with self._open() as ctap:
            return self._seal(ctap, master_key)

    def _seal(self, ctap: Ctap2, master_key: bytes) -> dict[str, object]:
        protocol = self._protocol(ctap)
        token = self._call("the PIN", self._pin_token, ctap, protocol, self.rp_id)
        cdh = os.urandom(32)
        att = self._call(
            "the registration",
            ctap.make_credential,
            cdh,
            {"id": self.rp_id, "name": "vhsm"},
            {"id": hashlib.sha256(os.urandom(16)).digest()[:16], "name": "vhsm master key"},
            [{"type": "public-key", "alg": -7}],
            None,
            {"hmac-secret": True},
            {"rk": False},
            protocol.authenticate(token, cdh) if token else None,
            protocol.VERSION if token else None,
        )
        cred = att.auth_data.credential_data
        if cred is None or (att.auth_data.extensions or {}).get("hmac-secret") is not True:
            raise MasterKeyError("the FIDO2 authenticator did not enable hmac-secret")
        cred_id = bytes(cred.credential_id)
        salt, nonce = os.urandom(SALT_LEN), os.urandom(12)
        kek = _kek(self._hmac_secret(ctap, cred_id, salt, self.rp_id))
        ct = AESGCM(kek).encrypt(nonce, master_key, _aad(self.rp_id, cred_id))
        return {
            "rp_id": self.rp_id,
            "credential_id": cred_id.hex(),
            "salt": salt.hex(),
            "nonce": nonce.hex(),
            "ct": ct.hex(),
        }

    def unseal(self, sealed: dict[str, object]) -> bytes:
        # Everything below comes from a file an attacker may have edited: bound and type it.
        if not isinstance(sealed, dict):
            raise MasterKeyError("protected master key file is malformed")
        rp_id = sealed.get("rp_id")
        if not isinstance(rp_id, str) or not _RP_ID.match(rp_id):
            raise MasterKeyError("protected master key file is malformed (rp_id)")
        cred_id = _hex_field(sealed, "credential_id", 1, MAX_CRED_ID)
        salt = _hex_field(sealed, "salt", SALT_LEN, SALT_LEN)
        nonce = _hex_field(sealed, "nonce", 12, 12)
        ct = _hex_field(sealed, "ct", KEY_LEN + 16, KEY_LEN + 16)
        with self._open() as ctap:
            kek = _kek(self._hmac_secret(ctap, cred_id, salt, rp_id))
        try:
            return AESGCM(kek).decrypt(nonce, ct, _aad(rp_id, cred_id))
        except InvalidTag:
            raise WrongMasterKeyError(
                "the FIDO2 authenticator's secret does not open the protected master key"
            ) from None
