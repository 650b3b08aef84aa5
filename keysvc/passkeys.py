"""Passkeys: a WebAuthn-style registration and assertion against a local relying party.

`register` (vhsm passkey generate NAME): python-fido2's `Fido2Server` is the relying party
(RP id `vhsm.local`, origin `https://vhsm.local`) and `Fido2Client` drives the first
authenticator found (PC/SC first, then USB HID; keysvc.protect_fido2). The server checks the
client data (type, origin, challenge), the RP id hash and the user-present flag; the attestation
statement is verified by python-fido2's verifier for its format: for `packed` self attestation
that is the signature over authData || clientDataHash with the new credential's own key (and the
algorithm matching that key); for `packed` with a certificate, `fido-u2f`, `tpm`, ... the
signature with the certificate's key. NOT verified: that such a certificate chains to a trusted
vendor root (no FIDO metadata service here), so an attestation certificate says nothing about
who made the authenticator. A `none` attestation is refused: it proves nothing about the key.
NAME -> credential id, COSE public key, signature counter, RP id, AAGUID, attestation type and
creation time are stored in `passkeys.json` in the data dir (0600, through keysvc.safefs).

`authenticate` (vhsm passkey authenticate NAME): a fresh random 32-byte challenge, an assertion
for the stored credential id only, its signature verified against the stored public key (by
`Fido2Server.authenticate_complete`), then the signature counter: when the stored or the new
count is non-zero the new one must be larger, else the assertion is refused as a possible clone
(WebAuthn section 7.2 step 21) and the stored count is left as it was. The new count is stored.

Every outcome is audited before it is reported (fail-closed: a change that cannot be audited is
not made): KEY_CREATED, AUTH_SUCCESS; AUTH_FAILURE for a refused registration or assertion;
SECURITY_VIOLATION for a bad attestation, a bad signature and a counter regression.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from keysvc import audit, paths, safefs
from keysvc.errors import (
    KeyExistsError,
    KeyNotFoundError,
    KeysvcError,
    MasterKeyError,
    VerificationFailed,
)
from keysvc.keystore import validate_name

FILE_NAME = "passkeys.json"
LOCK_NAME = ".passkeys.lock"
WHAT = "passkeys file"
FORMAT = "vhsm-passkeys"
VERSION = 1
DEFAULT_RP_ID = "vhsm.local"
MAX_FILE = 4 * 1024 * 1024
MAX_CRED_ID = 1023
MAX_COSE = 2048
_RP_ID = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
_HEX = re.compile(r"^(?:[0-9a-f]{2})+$")

PinSource = Callable[[], "str | None"]


class PasskeyError(KeysvcError):
    """A passkey operation failed (no authenticator, wrong PIN, refused by the authenticator,
    a malformed passkeys file)."""

    code = "passkey"


@dataclass
class Passkey:
    name: str
    credential_id: str  # hex
    public_key: str  # hex of the CBOR-encoded COSE key
    sign_count: int
    rp_id: str
    created: int
    aaguid: str
    attestation: str  # e.g. "packed self", "packed basic (certificate chain not checked)"
    last_used: int | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        del d["name"]
        return d


def _fido2() -> Any:
    try:
        import fido2.client  # noqa: F401
        import fido2.server  # noqa: F401
    except ImportError:
        raise PasskeyError(
            "passkeys need python-fido2: pip install 'fido2>=2' (and pyscard for PC/SC readers)"
        ) from None
    return fido2


# --- the passkeys file -------------------------------------------------------------------------


def _bad(d: safefs.Dir, why: str) -> PasskeyError:
    return PasskeyError(f"{WHAT} {d.path / FILE_NAME} is malformed ({why})")


def _parse_entry(d: safefs.Dir, name: str, e: Any) -> Passkey:
    if not isinstance(e, dict):
        raise _bad(d, name)
    try:
        validate_name(name)
    except KeysvcError:
        raise _bad(d, "a name") from None
    for field, limit in (("credential_id", MAX_CRED_ID), ("public_key", MAX_COSE)):
        v = e.get(field)
        if not isinstance(v, str) or not _HEX.match(v) or len(v) > 2 * limit:
            raise _bad(d, f"{name}.{field}")
    count, created, last = e.get("sign_count"), e.get("created"), e.get("last_used")
    if type(count) is not int or not 0 <= count < 2**32:
        raise _bad(d, f"{name}.sign_count")
    if type(created) is not int or (last is not None and type(last) is not int):
        raise _bad(d, f"{name}.created")
    rp_id = e.get("rp_id")
    if not isinstance(rp_id, str) or not _RP_ID.match(rp_id):
        raise _bad(d, f"{name}.rp_id")
    aaguid, att = e.get("aaguid"), e.get("attestation")
    if not isinstance(aaguid, str) or not re.fullmatch(r"[0-9a-f]{32}", aaguid):
        raise _bad(d, f"{name}.aaguid")
    if not isinstance(att, str) or len(att) > 200:
        raise _bad(d, f"{name}.attestation")
    return Passkey(
        name, e["credential_id"], e["public_key"], count, rp_id, created, aaguid, att, last
    )


def _load(d: safefs.Dir) -> dict[str, Passkey]:
    raw = d.read(FILE_NAME, WHAT, limit=MAX_FILE, owner_writes=True)
    if raw is None:
        return {}
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise _bad(d, "not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise _bad(d, "format")
    entries = doc.get("passkeys")
    if not isinstance(entries, dict):
        raise _bad(d, "passkeys")
    return {n: _parse_entry(d, n, e) for n, e in entries.items()}


def _dump(store: dict[str, Passkey]) -> bytes:
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "passkeys": {n: p.to_json() for n, p in sorted(store.items())},
    }
    return (json.dumps(doc, indent=1) + "\n").encode()


@contextmanager
def _locked(data_dir: str | os.PathLike[str] | None) -> Iterator[safefs.Dir]:
    """The data dir with the passkeys lock held: two runs at once must not lose a passkey or
    a counter update."""
    with (
        safefs.open_dir(paths.data_dir(data_dir), "data dir", PasskeyError) as d,
        d.exclusive(LOCK_NAME, "passkeys lock"),
    ):
        yield d


def _publish(
    d: safefs.Dir, store: dict[str, Passkey], log: Path, record: audit.AuditRecord
) -> None:
    """Temp file, audit line, rename: a change that cannot be audited is never made."""
    pending = d.prepare_replace(FILE_NAME, WHAT, _dump(store), mode=0o600)
    try:
        audit.writer_for(log).append([record])
    except BaseException:
        pending.discard()
        raise
    pending.publish()


def list_passkeys(data_dir: str | os.PathLike[str] | None) -> list[Passkey]:
    d = safefs.open_dir_if_exists(paths.data_dir(data_dir), "data dir", PasskeyError)
    if d is None:
        return []
    with d:
        return sorted(_load(d).values(), key=lambda p: p.name)


# --- the authenticator side ---------------------------------------------------------------------


@contextmanager
def _device(device: Any) -> Iterator[Any]:
    """The device given, else the first one found (PC/SC, then HID); found ones are closed."""
    from keysvc import protect_fido2

    if device is not None:
        yield device
        return
    try:
        found, note = protect_fido2._find()
    except MasterKeyError as e:
        raise PasskeyError(str(e)) from None
    if not found:
        why = f"; {note}" if note else ""
        raise PasskeyError(f"no FIDO2 authenticator found (PC/SC reader or USB key){why}")
    try:
        yield found[0]
    finally:
        for dev in found:
            try:
                dev.close()
            except Exception:  # noqa: BLE001, S110 - closing must not hide the real outcome
                pass


def _client(device: Any, rp_id: str, pin: PinSource | None) -> Any:
    from fido2.client import DefaultClientDataCollector, Fido2Client, UserInteraction

    class _Interaction(UserInteraction):
        def request_pin(self, permissions: Any, rp_id: str | None) -> str | None:
            return pin() if pin is not None else None

    try:
        return Fido2Client(device, DefaultClientDataCollector(f"https://{rp_id}"), _Interaction())
    except Exception as e:  # noqa: BLE001 - a broken transport
        raise PasskeyError(
            f"the FIDO2 authenticator does not answer ({type(e).__name__})"
        ) from None


def _call(what: str, name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """One client exchange; authenticator errors become one-line PasskeyErrors."""
    from fido2.client import ClientError, PinRequiredError
    from fido2.ctap import CtapError

    err = CtapError.ERR
    try:
        return fn(*args)
    except PinRequiredError:
        raise PasskeyError(
            "the FIDO2 authenticator has a PIN: give it (--pin-source, or at the prompt)"
        ) from None
    except ClientError as e:
        cause = e.cause
        code = cause.code if isinstance(cause, CtapError) else None
        if code == err.PIN_INVALID:
            raise PasskeyError("wrong PIN for the FIDO2 authenticator") from None
        if code in (err.PIN_BLOCKED, err.PIN_AUTH_BLOCKED):
            raise PasskeyError(
                "the FIDO2 authenticator's PIN is blocked (too many wrong PINs)"
            ) from None
        if code == err.NO_CREDENTIALS:
            raise PasskeyError(
                f"this authenticator does not hold passkey {name}'s credential"
            ) from None
        detail = err(code).name if code in err._value2member_map_ else (cause or e.code.name)
        raise PasskeyError(f"the FIDO2 authenticator refused the {what}: {detail}") from None
    except CtapError as e:
        raise PasskeyError(f"the FIDO2 authenticator refused the {what}: {e}") from None
    except (OSError, ValueError) as e:
        raise PasskeyError(f"FIDO2 {what} failed: {type(e).__name__}") from None


# --- audit --------------------------------------------------------------------------------------


def _record(event: str, name: str, user: str, details: str, ok: bool) -> audit.AuditRecord:
    return audit.AuditRecord(event, f"passkey:{name}", user, details, ok, os.getuid())


@contextmanager
def _audit_failures(log: Path, name: str, user: str, event: str) -> Iterator[None]:
    """Audit a failure (its message) before it reaches the caller. VerificationFailed is a
    SECURITY_VIOLATION; everything else `event` (AUTH_FAILURE)."""
    try:
        yield
    except audit.AuditError:
        raise
    except KeysvcError as e:
        ev = "SECURITY_VIOLATION" if isinstance(e, VerificationFailed) else event
        audit.writer_for(log).append([_record(ev, name, user, str(e), False)])
        raise


# --- registration -------------------------------------------------------------------------------


def _verify_attestation(att_obj: Any, client_data_hash: bytes) -> str:
    from fido2.attestation import Attestation, AttestationType
    from fido2.attestation.base import InvalidAttestation

    fmt = att_obj.fmt
    if fmt == "none":
        raise VerificationFailed(
            "the authenticator sent no attestation (format none): nothing proves the key; refused"
        )
    try:
        result = Attestation.for_type(fmt)().verify(
            att_obj.att_stmt, att_obj.auth_data, client_data_hash
        )
    except (InvalidAttestation, NotImplementedError, KeyError, TypeError, ValueError) as e:
        raise VerificationFailed(
            f"the {fmt} attestation does not verify ({type(e).__name__}); refused"
        ) from None
    kind = result.attestation_type
    if kind == AttestationType.SELF:
        return f"{fmt} self"
    return f"{fmt} {kind.name.lower()} (certificate chain not checked)"


def register(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None,
    audit_log: Path,
    user: str,
    device: Any = None,
    pin: PinSource | None = None,
    rp_id: str = DEFAULT_RP_ID,
) -> Passkey:
    """Create a credential for NAME on the authenticator, verify it, store and audit it."""
    _fido2()
    from fido2 import cbor
    from fido2.server import Fido2Server
    from fido2.webauthn import AttestationConveyancePreference, UserVerificationRequirement

    validate_name(name)
    if not _RP_ID.match(rp_id):
        raise PasskeyError("the relying party id must be a lower-case host name")
    with _locked(data_dir) as d, _audit_failures(audit_log, name, user, "KEY_CREATED"):
        store = _load(d)
        if name in store:
            raise KeyExistsError(f"passkey {name} already exists")
        attested: list[str] = []
        server = Fido2Server(
            {"id": rp_id, "name": "vhsm"},
            attestation=AttestationConveyancePreference.DIRECT,
            verify_attestation=lambda ao, cdh: attested.append(_verify_attestation(ao, cdh)),
        )
        options, state = server.register_begin(
            {"id": os.urandom(16), "name": name, "display_name": name},
            user_verification=UserVerificationRequirement.DISCOURAGED,
            challenge=os.urandom(32),
        )
        with _device(device) as dev:
            client = _client(dev, rp_id, pin)
            response = _call("registration", name, client.make_credential, options.public_key)
        try:
            auth_data = server.register_complete(state, response)
        except ValueError as e:
            raise VerificationFailed(f"registration refused: {e}") from None
        cred = auth_data.credential_data
        if cred is None or not attested:
            raise VerificationFailed("registration refused: no attested credential")
        pk = Passkey(
            name,
            bytes(cred.credential_id).hex(),
            cbor.encode(dict(cred.public_key)).hex(),
            auth_data.counter,
            rp_id,
            int(time.time()),
            bytes(cred.aaguid).hex(),
            attested[0],
        )
        store[name] = pk
        details = (
            f"passkey registered (rp {rp_id}, credential {pk.credential_id[:16]}..., "
            f"aaguid {pk.aaguid}, attestation {pk.attestation}, counter {pk.sign_count})"
        )
        _publish(d, store, audit_log, _record("KEY_CREATED", name, user, details, True))
        return pk


# --- assertion ---------------------------------------------------------------------------------


def authenticate(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None,
    audit_log: Path,
    user: str,
    device: Any = None,
    pin: PinSource | None = None,
) -> Passkey:
    """A fresh challenge, an assertion by NAME's credential, its signature and counter checked;
    the new counter stored. Returns the updated passkey."""
    _fido2()
    from fido2 import cbor
    from fido2.cose import CoseKey
    from fido2.server import Fido2Server
    from fido2.webauthn import AttestedCredentialData, UserVerificationRequirement

    with _locked(data_dir) as d, _audit_failures(audit_log, name, user, "AUTH_FAILURE"):
        store = _load(d)
        pk = store.get(name)
        if pk is None:
            raise KeyNotFoundError(f"unknown passkey {name}")
        try:
            key = CoseKey.parse(cbor.decode(bytes.fromhex(pk.public_key)))
        except Exception:  # noqa: BLE001 - whatever an edited file holds
            raise _bad(d, f"{name}.public_key is not a COSE key") from None
        cred = AttestedCredentialData.create(
            bytes.fromhex(pk.aaguid), bytes.fromhex(pk.credential_id), key
        )
        server = Fido2Server({"id": pk.rp_id, "name": "vhsm"})
        options, state = server.authenticate_begin(
            [cred],
            user_verification=UserVerificationRequirement.DISCOURAGED,
            challenge=os.urandom(32),
        )
        with _device(device) as dev:
            client = _client(dev, pk.rp_id, pin)
            selection = _call("assertion", name, client.get_assertion, options.public_key)
            response = selection.get_response(0)
        try:
            server.authenticate_complete(state, [cred], response)
        except ValueError as e:
            why = str(e).rstrip(".").lower() or "invalid"
            raise VerificationFailed(f"passkey {name}: assertion refused: {why}") from None
        count = response.response.authenticator_data.counter
        if (count or pk.sign_count) and count <= pk.sign_count:
            raise VerificationFailed(
                f"passkey {name}: signature counter went backwards or repeated ({count} after "
                f"{pk.sign_count}): possibly a cloned authenticator; refused"
            )
        pk.sign_count, pk.last_used = count, int(time.time())
        details = f"passkey assertion verified (rp {pk.rp_id}, counter {count})"
        _publish(d, store, audit_log, _record("AUTH_SUCCESS", name, user, details, True))
        return pk
