"""The PKCS#11 protector: the master key sealed by an AES key that never leaves a token.

The token (SoftHSM2, a YubiHSM, a Nitrokey HSM, a smart card through OpenSC) is found by its
label, since slot ids change between runs; its serial is recorded and checked, so another token
given the same label cannot stand in for it. The wrapping key is found by `key_label` or created:
AES-256, on the token (CKA_TOKEN), private, sensitive, never extractable, usable only to encrypt
and decrypt, with a random CKA_ID. Unseal looks the key up by that id, not by label, so a key
later made under the same label is never used by mistake.

Mechanism: CKM_AES_GCM through C_Encrypt/C_Decrypt, computed inside the token, with the kind
and the parameters below as AAD, so an edit of any recorded field fails authentication.
SoftHSM2 2.6.1 lists CKM_AES_GCM with CKF_ENCRYPT|CKF_DECRYPT (not CKF_WRAP: it cannot wrap
with GCM) and checks the tag on C_Decrypt, which AES key wrap (RFC 5649, CKM_AES_KEY_WRAP_PAD)
would do too but without AAD. A token without CKM_AES_GCM is refused at seal time, naming the
mechanism; the recorded `mechanism` field leaves room for another one later.

The module path is never read from the sealed dict (it comes from a file an attacker may have
edited, and loading a module runs its code): it is the argument, else $VHSM_PKCS11_MODULE, else
the first of the usual Debian paths. python-pkcs11 is imported only when a token is used, so
the rest of keysvc works without it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from keysvc.errors import MasterKeyError, WrongMasterKeyError
from keysvc.pinsource import pin_from

__all__ = ["DEFAULT_KEY_LABEL", "Pkcs11Protector", "default_module", "pin_from"]

KEY_LEN = 32
DEFAULT_KEY_LABEL = "vhsm-master-wrap"
MECHANISM = "CKM_AES_GCM"
_NONCE_LEN = 12  # the GCM nonce; random per seal (the key seals a handful of blobs, ever)
_TAG_LEN = 16
_NEW_KEY_ID_LEN = 16
_MAX_KEY_ID = 64  # a key made by someone else may carry a longer CKA_ID; bounded all the same
_MAX_TOKEN_LABEL = 32  # CK_TOKEN_INFO.label is 32 bytes
_MAX_SERIAL = 16  # CK_TOKEN_INFO.serialNumber is 16 characters
_MAX_KEY_LABEL = 128
_AAD_PREFIX = b"vhsm master key pkcs11 v1\n"
_FIELDS = frozenset(
    ("token_label", "token_serial", "key_label", "key_id", "mechanism", "nonce", "ct")
)

# Where Debian puts PKCS#11 modules, in the order tried when none is named.
MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/*/softhsm/libsofthsm2.so",
    "/usr/lib/*/opensc-pkcs11.so",
    "/usr/lib/*/pkcs11/opensc-pkcs11.so",
)

# One protector operation at a time uses the module: each one initialises it and finalises it
# afterwards (so a token created or inserted since is seen, SoftHSM2 rereads SOFTHSM2_CONF, and
# no logged-in state outlives the call), and C_Finalize would cut another's sessions.
_module_lock = threading.Lock()


def default_module() -> str:
    """$VHSM_PKCS11_MODULE, else the first PKCS#11 module found in the usual Debian paths."""
    env = os.environ.get("VHSM_PKCS11_MODULE")
    if env:
        return env
    for pattern in MODULE_CANDIDATES:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    raise MasterKeyError(
        "no PKCS#11 module found: install one (apt install softhsm2, or opensc-pkcs11 for "
        "smart cards) or set VHSM_PKCS11_MODULE"
    )


def _p11() -> Any:
    try:
        import pkcs11
    except ImportError:
        raise MasterKeyError(
            "the pkcs11 protector needs python-pkcs11: install it with "
            "pip install python-pkcs11 (or vhsm[hardware])"
        ) from None
    return pkcs11


def _one_line(text: str) -> str:
    """Token labels come from the device: keep messages on one printable line."""
    return "".join(c if c.isprintable() else "?" for c in text)


@dataclass(frozen=True)
class _Sealed:
    token_label: str
    token_serial: str
    key_label: str
    key_id: bytes
    nonce: bytes
    ct: bytes

    def aad(self) -> bytes:
        return _aad(self.token_label, self.token_serial, self.key_label, self.key_id)


def _aad(token_label: str, serial: str, key_label: str, key_id: bytes) -> bytes:
    params = {
        "kind": Pkcs11Protector.kind,
        "mechanism": MECHANISM,
        "token_label": token_label,
        "token_serial": serial,
        "key_label": key_label,
        "key_id": key_id.hex(),
    }
    return _AAD_PREFIX + json.dumps(params, sort_keys=True, separators=(",", ":")).encode()


def _bad(what: str) -> MasterKeyError:
    return MasterKeyError(f"the pkcs11 sealed master key is malformed: {what}")


def _text(sealed: dict[str, object], name: str, limit: int) -> str:
    v = sealed[name]
    if not isinstance(v, str) or not v or len(v.encode()) > limit or not v.isprintable():
        raise _bad(f"{name} must be printable text of 1..{limit} bytes")
    return v


def _hex(sealed: dict[str, object], name: str, lo: int, hi: int) -> bytes:
    v = sealed[name]
    # bytes.fromhex alone would accept spaces; only lowercase hex digits, as seal writes them
    if (
        not isinstance(v, str)
        or not 2 * lo <= len(v) <= 2 * hi
        or len(v) % 2
        or v.strip("0123456789abcdef")
    ):
        size = f"{lo}" if lo == hi else f"{lo}..{hi}"
        raise _bad(f"{name} must be {size} bytes in lowercase hex")
    return bytes.fromhex(v)


def _parse(sealed: object) -> _Sealed:
    """Every field checked for type and size before use: the dict comes from a file."""
    if not isinstance(sealed, dict):
        raise _bad("not a JSON object")
    if set(sealed) != _FIELDS:
        raise _bad("unexpected or missing fields")
    if sealed["mechanism"] != MECHANISM:
        raise _bad(f"mechanism must be {MECHANISM}")
    return _Sealed(
        token_label=_text(sealed, "token_label", _MAX_TOKEN_LABEL),
        token_serial=_text(sealed, "token_serial", _MAX_SERIAL),
        key_label=_text(sealed, "key_label", _MAX_KEY_LABEL),
        key_id=_hex(sealed, "key_id", 1, _MAX_KEY_ID),
        nonce=_hex(sealed, "nonce", _NONCE_LEN, _NONCE_LEN),
        ct=_hex(sealed, "ct", KEY_LEN + _TAG_LEN, KEY_LEN + _TAG_LEN),
    )


class Pkcs11Protector:
    """Seals the master key with a non-extractable AES-256 key on a PKCS#11 token (module
    docstring). `pin` is the token's user PIN (see `pin_from` for unattended starts)."""

    kind: ClassVar[str] = "pkcs11"

    def __init__(
        self,
        token_label: str,
        pin: str,
        module: str | None = None,
        key_label: str = DEFAULT_KEY_LABEL,
    ) -> None:
        if not token_label or len(token_label.encode()) > _MAX_TOKEN_LABEL:
            raise MasterKeyError(f"a token label must be 1..{_MAX_TOKEN_LABEL} bytes")
        if not key_label or len(key_label.encode()) > _MAX_KEY_LABEL:
            raise MasterKeyError(f"a key label must be 1..{_MAX_KEY_LABEL} bytes")
        if not pin:
            raise MasterKeyError(f"the PIN for token {_one_line(token_label)} is empty")
        self.token_label = token_label
        self.key_label = key_label
        self.module = module or default_module()
        self._pin = pin

    @classmethod
    def for_sealed(
        cls, sealed: dict[str, object], pin: str, module: str | None = None
    ) -> Pkcs11Protector:
        """The protector that can unseal `sealed` (its token and key label read from it)."""
        s = _parse(sealed)
        return cls(s.token_label, pin, module, s.key_label)

    def __repr__(self) -> str:  # never the PIN
        return f"Pkcs11Protector(token_label={self.token_label!r}, module={self.module!r})"

    @property
    def _label(self) -> str:
        return _one_line(self.token_label)

    # -- the protector contract

    def seal(self, master_key: bytes) -> dict[str, object]:
        if len(master_key) != KEY_LEN:
            raise MasterKeyError(f"the master key must be {KEY_LEN} bytes")
        p11 = _p11()
        with self._module() as lib:
            token = self._only_token(lib)
            serial = _serial(token)
            self._check_mechanism(p11, token)
            with self._login(p11, token, rw=True) as session:
                key = self._wrapping_key(p11, session)
                key_id = bytes(key[p11.Attribute.ID])
                nonce = os.urandom(_NONCE_LEN)
                aad = _aad(self.token_label, serial, self.key_label, key_id)
                ct = bytes(
                    key.encrypt(
                        master_key,
                        mechanism=p11.Mechanism.AES_GCM,
                        mechanism_param=p11.mechanisms.GCMParams(nonce, aad),
                    )
                )
        if len(ct) != KEY_LEN + _TAG_LEN:
            raise MasterKeyError(f"token {self._label} returned {len(ct)} bytes for AES-GCM")
        return {
            "token_label": self.token_label,
            "token_serial": serial,
            "key_label": self.key_label,
            "key_id": key_id.hex(),
            "mechanism": MECHANISM,
            "nonce": nonce.hex(),
            "ct": ct.hex(),
        }

    def unseal(self, sealed: dict[str, object]) -> bytes:
        s = _parse(sealed)
        if s.token_label != self.token_label:
            raise MasterKeyError(
                f"the master key was sealed on token {_one_line(s.token_label)}, not {self._label}"
            )
        p11 = _p11()
        with self._module() as lib:
            token = self._token_with_serial(lib, s.token_serial)
            with self._login(p11, token, rw=False) as session:
                key = self._key_by_id(p11, session, s.key_id)
                try:
                    pt = bytes(
                        key.decrypt(
                            s.ct,
                            mechanism=p11.Mechanism.AES_GCM,
                            mechanism_param=p11.mechanisms.GCMParams(s.nonce, s.aad()),
                        )
                    )
                except (
                    p11.exceptions.EncryptedDataInvalid,
                    p11.exceptions.EncryptedDataLenRange,
                    # SoftHSM2 reports a GCM tag mismatch as CKR_GENERAL_ERROR
                    p11.exceptions.GeneralError,
                ):
                    raise WrongMasterKeyError(
                        f"the sealed master key does not authenticate under key {s.key_id.hex()} "
                        f"on token {self._label}: another key, or the sealed data was altered"
                    ) from None
        if len(pt) != KEY_LEN:
            raise WrongMasterKeyError(f"token {self._label} unsealed {len(pt)} bytes, not 32")
        return pt

    # -- the module, the token, the session

    @contextlib.contextmanager
    def _module(self) -> Iterator[Any]:
        p11 = _p11()
        path = self.module
        if not os.path.isabs(path):
            # dlopen of a bare name searches the library path: only an explicit file is loaded
            raise MasterKeyError(f"PKCS#11 module path {path} must be absolute")
        if not os.path.isfile(path):
            raise MasterKeyError(
                f"PKCS#11 module {path} does not exist: install it (apt install softhsm2 or "
                "opensc-pkcs11) or set VHSM_PKCS11_MODULE"
            )
        with _module_lock:
            try:
                lib = p11.lib(path)
            except p11.PKCS11Error as e:
                raise MasterKeyError(
                    f"cannot load PKCS#11 module {path}: {_one_line(str(e)) or type(e).__name__}"
                ) from None
            try:
                yield lib
            except p11.PKCS11Error as e:
                # anything not mapped to a clearer message below: one line, the error's name
                raise MasterKeyError(
                    f"PKCS#11 error with token {self._label} in {path}: {type(e).__name__}"
                ) from None
            finally:
                with contextlib.suppress(Exception):
                    lib.finalize()

    def _tokens(self, lib: Any) -> list[Any]:
        found = []
        for slot in lib.get_slots(token_present=True):
            try:
                token = slot.get_token()
            except _p11().PKCS11Error:
                continue  # removed between the two calls: not ours
            if token.label == self.token_label:
                found.append(token)
        if not found:
            raise MasterKeyError(f"no token labelled {self._label} in {self.module}")
        return found

    def _only_token(self, lib: Any) -> Any:
        tokens = self._tokens(lib)
        if len(tokens) > 1:
            raise MasterKeyError(
                f"{len(tokens)} tokens are labelled {self._label}; relabel all but one"
            )
        return tokens[0]

    def _token_with_serial(self, lib: Any, serial: str) -> Any:
        tokens = self._tokens(lib)
        same = [t for t in tokens if _serial(t) == serial]
        if not same:
            seen = ", ".join(_one_line(_serial(t)) for t in tokens)
            raise WrongMasterKeyError(
                f"token {self._label} has serial {seen}, but the master key was sealed on "
                f"serial {_one_line(serial)}: another token"
            )
        if len(same) > 1:
            raise MasterKeyError(f"{len(same)} tokens are labelled {self._label} with one serial")
        return same[0]

    def _check_mechanism(self, p11: Any, token: Any) -> None:
        mechs = token.slot.get_mechanisms()
        if p11.Mechanism.AES_GCM not in mechs:
            raise MasterKeyError(f"token {self._label} does not offer {MECHANISM}")

    @contextlib.contextmanager
    def _login(self, p11: Any, token: Any, *, rw: bool) -> Iterator[Any]:
        if token.flags & p11.TokenFlag.USER_PIN_LOCKED:
            # Not even one more try: it could not succeed, and some tokens count it.
            raise MasterKeyError(f"the user PIN of token {self._label} is locked")
        exc = p11.exceptions
        try:
            session = token.open(rw=rw, user_pin=self._pin)
        except (exc.PinIncorrect, exc.PinLenRange, exc.PinInvalid):
            raise WrongMasterKeyError(f"wrong PIN for token {self._label}") from None
        except exc.PinLocked:
            raise MasterKeyError(f"the user PIN of token {self._label} is locked") from None
        except exc.PinExpired:
            raise MasterKeyError(f"the user PIN of token {self._label} has expired") from None
        except exc.UserPinNotInitialized:
            raise MasterKeyError(f"token {self._label} has no user PIN set") from None
        try:
            yield session
        finally:
            with contextlib.suppress(Exception):
                session.close()

    # -- the wrapping key

    def _wrapping_key(self, p11: Any, session: Any) -> Any:
        A = p11.Attribute
        keys = list(
            session.get_objects({A.CLASS: p11.ObjectClass.SECRET_KEY, A.LABEL: self.key_label})
        )
        if len(keys) > 1:
            raise MasterKeyError(
                f"token {self._label} holds {len(keys)} keys labelled "
                f"{_one_line(self.key_label)}; keep one or choose another key label"
            )
        if keys:
            self._check_key(p11, keys[0])
            return keys[0]
        return session.generate_key(
            p11.KeyType.AES,
            8 * KEY_LEN,
            id=os.urandom(_NEW_KEY_ID_LEN),
            label=self.key_label,
            store=True,
            capabilities=p11.MechanismFlag.ENCRYPT | p11.MechanismFlag.DECRYPT,
            template={
                A.TOKEN: True,
                A.PRIVATE: True,
                A.SENSITIVE: True,
                A.EXTRACTABLE: False,
                # only sealing: no wrapping other keys out, no signing, no deriving
                A.WRAP: False,
                A.UNWRAP: False,
                A.SIGN: False,
                A.VERIFY: False,
                A.DERIVE: False,
            },
        )

    def _check_key(self, p11: Any, key: Any) -> None:
        """A key found by label (perhaps made by someone else) must be one we would make."""
        A = p11.Attribute
        name = f"key {_one_line(self.key_label)} on token {self._label}"
        if key[A.KEY_TYPE] != p11.KeyType.AES or key[A.VALUE_LEN] != KEY_LEN:
            raise MasterKeyError(f"{name} is not an AES-256 key")
        if not key[A.SENSITIVE] or key[A.EXTRACTABLE]:
            raise MasterKeyError(f"{name} is extractable or not sensitive; refusing to use it")
        if not key[A.ENCRYPT] or not key[A.DECRYPT]:
            raise MasterKeyError(f"{name} may not encrypt and decrypt")
        if not 1 <= len(bytes(key[A.ID])) <= _MAX_KEY_ID:
            raise MasterKeyError(f"{name} needs a CKA_ID of 1..{_MAX_KEY_ID} bytes")

    def _key_by_id(self, p11: Any, session: Any, key_id: bytes) -> Any:
        A = p11.Attribute
        keys = list(session.get_objects({A.CLASS: p11.ObjectClass.SECRET_KEY, A.ID: key_id}))
        if not keys:
            raise MasterKeyError(
                f"token {self._label} has no key with id {key_id.hex()}: the wrapping key is gone"
            )
        if len(keys) > 1:
            raise MasterKeyError(f"token {self._label} has {len(keys)} keys with id {key_id.hex()}")
        if keys[0][A.KEY_TYPE] != p11.KeyType.AES:
            raise MasterKeyError(f"key {key_id.hex()} on token {self._label} is not an AES key")
        return keys[0]


def _serial(token: Any) -> str:
    raw = token.serial
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
    return text.strip()
