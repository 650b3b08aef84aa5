"""TPM 2.0 protector: the master key is wrapped by a KEK that only this TPM will release.

Seal: re-create a primary key under the owner hierarchy from a fixed template (same TPM, same
owner seed -> the same key, so nothing persistent is needed in the TPM), seal a random 32-byte
KEK under it as a keyed-hash sealed data object (with a PolicyPCR policy over the SHA-256 bank
when PCR indexes are given), keep the object's public/private blobs, and AES-256-GCM-wrap the
master key with the KEK. Unseal does the reverse; the TPM refuses to load the blobs on another
TPM and refuses to unseal when the PCRs differ.

The KEK crosses the TPM bus only inside a session salted by the primary key with AES-CFB
parameter encryption, so a bus sniffer sees neither it nor the master key; the primary key's
name is stored at seal and checked at unseal before any salt is sent to it.

tpm2-pytss is imported lazily: the rest of keysvc works without it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, ClassVar, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keysvc.errors import MasterKeyError, WrongMasterKeyError

DEFAULT_TCTI = "device:/dev/tpmrm0"  # the kernel resource manager
KEY_LEN = 32
NONCE_LEN = 12
CT_LEN = KEY_LEN + 16  # master key + GCM tag
MAX_BLOB = 2048  # bytes; a keyed-hash sealed object's blobs are ~80 (public) and ~160 (private)
PCR_MAX = 23  # PC Client TPMs have PCRs 0..23
PRIMARY = "ecc-p256-aes128cfb-v1"  # names the fixed template below; stored so it can change
PCR_BANK = "sha256"
TIMEOUT = 60.0  # seconds for one seal or unseal; a TPM takes well under a second
NAME_LEN = 34  # a TPM name: 2-byte algorithm id + SHA-256 digest
_AAD_PREFIX = b"vhsm master key tpm2 v1\0"
_ANOTHER_TPM = (
    "the TPM refused the sealed object: it was sealed by another TPM (or before its owner "
    "hierarchy was cleared) or the file was altered"
)
_T = TypeVar("_T")
_INSTALL = "install tpm2-pytss (pip install tpm2-pytss; it builds against apt libtss2-dev)"


def _tss() -> SimpleNamespace:
    """The tpm2-pytss names this module uses, imported on first use."""
    # The TSS C library logs every TPM error response to stderr (several lines for a PCR
    # mismatch); our errors are one line, so silence it unless the user asked for its logs.
    os.environ.setdefault("TSS2_LOG", "all+none")
    try:
        from tpm2_pytss import ESAPI, TSS2_Exception  # type: ignore[import-not-found]
        from tpm2_pytss.constants import (  # type: ignore[import-not-found]
            ESYS_TR,
            TPM2_ALG,
            TPM2_ECC,
            TPM2_RC,
            TPM2_SE,
            TPMA_OBJECT,
            TPMA_SESSION,
        )
        from tpm2_pytss.types import (  # type: ignore[import-not-found]
            TPM2B_PRIVATE,
            TPM2B_PUBLIC,
            TPM2B_SENSITIVE_CREATE,
            TPM2B_SENSITIVE_DATA,
            TPML_PCR_SELECTION,
            TPMS_SENSITIVE_CREATE,
            TPMT_PUBLIC,
        )
    except (ImportError, OSError):  # OSError: the libtss2 shared libraries are missing
        raise MasterKeyError(f"the TPM protector needs tpm2-pytss: {_INSTALL}") from None
    return SimpleNamespace(
        ESAPI=ESAPI,
        TSS2_Exception=TSS2_Exception,
        ESYS_TR=ESYS_TR,
        TPM2_ALG=TPM2_ALG,
        TPM2_ECC=TPM2_ECC,
        TPM2_RC=TPM2_RC,
        TPM2_SE=TPM2_SE,
        TPMA_OBJECT=TPMA_OBJECT,
        TPMA_SESSION=TPMA_SESSION,
        TPM2B_PRIVATE=TPM2B_PRIVATE,
        TPM2B_PUBLIC=TPM2B_PUBLIC,
        TPM2B_SENSITIVE_CREATE=TPM2B_SENSITIVE_CREATE,
        TPM2B_SENSITIVE_DATA=TPM2B_SENSITIVE_DATA,
        TPML_PCR_SELECTION=TPML_PCR_SELECTION,
        TPMS_SENSITIVE_CREATE=TPMS_SENSITIVE_CREATE,
        TPMT_PUBLIC=TPMT_PUBLIC,
    )


def _primary_template(t: SimpleNamespace) -> Any:
    """A storage key like the TCG's ECC SRK: restricted decrypt, AES-128-CFB for children.
    Spelled out field by field (not a library default) because any change re-derives a
    different key and every blob sealed before would stop loading."""
    pub = t.TPMT_PUBLIC(
        type=t.TPM2_ALG.ECC,
        nameAlg=t.TPM2_ALG.SHA256,
        objectAttributes=t.TPMA_OBJECT.FIXEDTPM
        | t.TPMA_OBJECT.FIXEDPARENT
        | t.TPMA_OBJECT.SENSITIVEDATAORIGIN
        | t.TPMA_OBJECT.USERWITHAUTH
        | t.TPMA_OBJECT.NODA
        | t.TPMA_OBJECT.RESTRICTED
        | t.TPMA_OBJECT.DECRYPT,
    )
    ecc = pub.parameters.eccDetail
    ecc.symmetric.algorithm = t.TPM2_ALG.AES
    ecc.symmetric.keyBits.aes = 128
    ecc.symmetric.mode.aes = t.TPM2_ALG.CFB
    ecc.scheme.scheme = t.TPM2_ALG.NULL
    ecc.curveID = t.TPM2_ECC.NIST_P256
    ecc.kdf.scheme = t.TPM2_ALG.NULL
    return t.TPM2B_PUBLIC(pub)


def _pcr_selection(t: SimpleNamespace, pcrs: Sequence[int]) -> Any:
    return t.TPML_PCR_SELECTION.parse(f"{PCR_BANK}:" + ",".join(str(i) for i in pcrs))


def _check_pcrs(pcrs: object) -> list[int]:
    if not isinstance(pcrs, list | tuple) or len(pcrs) > PCR_MAX + 1:
        raise MasterKeyError("TPM PCR selection must be a list of PCR indexes")
    # bool is an int subclass: refuse it so `true` in an edited file is not PCR 1
    if any(type(i) is not int or not 0 <= i <= PCR_MAX for i in pcrs):
        raise MasterKeyError(f"TPM PCR indexes must be integers 0..{PCR_MAX}")
    if len(set(pcrs)) != len(pcrs):
        raise MasterKeyError("TPM PCR indexes must not repeat")
    return sorted(pcrs)


def _hex_field(sealed: dict[str, object], name: str, lo: int, hi: int) -> bytes:
    v = sealed.get(name)
    if not isinstance(v, str) or not 2 * lo <= len(v) <= 2 * hi:
        raise MasterKeyError(f"protected master key file is malformed ({name})")
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise MasterKeyError(f"protected master key file is malformed ({name})") from None


def _aad(pcrs: list[int], public: bytes, primary_name: bytes) -> bytes:
    """Binds the parameters to the wrapped key: editing the PCR list or swapping the sealed
    object for another one of this TPM fails authentication instead of being obeyed."""
    params = {
        "primary": PRIMARY,
        "primary_name": primary_name.hex(),
        "pcr_bank": PCR_BANK,
        "pcrs": pcrs,
        "public": public.hex(),
    }
    return _AAD_PREFIX + json.dumps(params, sort_keys=True, separators=(",", ":")).encode()


class TpmProtector:
    """Seals the master key to a TPM 2.0, optionally to the current values of some PCRs."""

    kind: ClassVar[str] = "tpm2"

    def __init__(
        self, tcti: str | None = None, pcrs: Sequence[int] = (), *, timeout: float = TIMEOUT
    ) -> None:
        self.tcti = tcti or os.environ.get("TPM2TOOLS_TCTI") or DEFAULT_TCTI
        self.pcrs = _check_pcrs(list(pcrs))
        self.timeout = timeout

    def _bounded(self, fn: Callable[..., _T], *args: Any) -> _T:
        """fn(*args) in a worker thread, given up after self.timeout: the TSS socket TCTIs
        (swtpm, mssim) wait forever for an endpoint that accepts but never answers, and the
        daemon's start must fail with a clear line instead of hanging. (The C call releases
        the GIL; a stuck worker is a daemon thread and dies with the process.)"""
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = fn(*args)
            except BaseException as e:  # handed to the caller below
                box["error"] = e

        worker = threading.Thread(target=run, name="vhsm-tpm", daemon=True)
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():
            raise MasterKeyError(
                f"the TPM at TCTI {self.tcti!r} did not answer within {self.timeout:g} s"
            )
        if "error" in box:
            raise box["error"]
        return box["value"]  # type: ignore[no-any-return]

    # -- TPM plumbing ---------------------------------------------------------------------

    @contextmanager
    def _session(self) -> Iterator[tuple[SimpleNamespace, Any, Any, bytes]]:
        """(names, ESAPI context, primary key handle, primary key name); flushes and closes
        on the way out: without a resource manager (swtpm, /dev/tpm0) leaked transient
        handles would stay in the TPM and fill its object slots."""
        t = _tss()
        try:
            ectx = t.ESAPI(self.tcti)
        except t.TSS2_Exception as e:
            raise MasterKeyError(f"no TPM reachable at TCTI {self.tcti!r}: {_line(e)}") from None
        handles: list[Any] = []
        try:
            primary, primary_pub = self._call(
                t, "create the primary key", ectx.create_primary, None, _primary_template(t)
            )[:2]
            handles.append(primary)
            name = bytes(primary_pub.get_name())
            yield t, _Flusher(ectx, handles), primary, name
        finally:
            for h in reversed(handles):
                try:
                    ectx.flush_context(h)
                except t.TSS2_Exception:
                    pass  # best effort: the context is being closed anyway
            ectx.close()

    def _call(self, t: SimpleNamespace, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except t.TSS2_Exception as e:
            raise _map_error(t, e, what, self.pcrs, self.tcti) from None

    def _param_session(
        self, t: SimpleNamespace, ectx: Any, primary: Any, kind: Any, attrs: Any
    ) -> Any:
        """A session salted by the primary key that encrypts the first command or response
        parameter (the KEK) with AES-128-CFB."""
        s = self._call(
            t,
            "start a session",
            ectx.start_auth_session,
            primary,
            t.ESYS_TR.NONE,
            kind,
            "aes128cfb",
            t.TPM2_ALG.SHA256,
        )
        ectx.track(s)
        self._call(
            t,
            "start a session",
            ectx.trsess_set_attributes,
            s,
            attrs | t.TPMA_SESSION.CONTINUESESSION,
        )
        return s

    def _policy_digest(self, t: SimpleNamespace, ectx: Any) -> bytes:
        trial = self._call(
            t,
            "compute the PCR policy",
            ectx.start_auth_session,
            t.ESYS_TR.NONE,
            t.ESYS_TR.NONE,
            t.TPM2_SE.TRIAL,
            None,
            t.TPM2_ALG.SHA256,
        )
        ectx.track(trial)
        # an empty pcrDigest: the TPM uses the PCRs' current values
        self._call(
            t, "compute the PCR policy", ectx.policy_pcr, trial, None, _pcr_selection(t, self.pcrs)
        )
        return bytes(self._call(t, "compute the PCR policy", ectx.policy_get_digest, trial))

    # -- Protector -----------------------------------------------------------------------

    def seal(self, master_key: bytes) -> dict[str, object]:
        if len(master_key) != KEY_LEN:
            raise MasterKeyError("a master key must be 32 bytes")
        kek = os.urandom(KEY_LEN)
        public, private, primary_name = self._bounded(self._seal_kek, kek)
        nonce = os.urandom(NONCE_LEN)
        ct = AESGCM(kek).encrypt(nonce, master_key, _aad(self.pcrs, public, primary_name))
        return {
            "primary": PRIMARY,
            "primary_name": primary_name.hex(),
            "pcr_bank": PCR_BANK,
            "pcrs": list(self.pcrs),
            "public": public.hex(),
            "private": private.hex(),
            "nonce": nonce.hex(),
            "ct": ct.hex(),
        }

    def _seal_kek(self, kek: bytes) -> tuple[bytes, bytes, bytes]:
        """(public blob, private blob, primary key name) of a new sealed object holding kek."""
        with self._session() as (t, ectx, primary, primary_name):
            attrs = t.TPMA_OBJECT.FIXEDTPM | t.TPMA_OBJECT.FIXEDPARENT | t.TPMA_OBJECT.NODA
            policy = b""
            if self.pcrs:
                policy = self._policy_digest(t, ectx)
            else:
                attrs |= t.TPMA_OBJECT.USERWITHAUTH  # empty auth value: possession of the TPM
            tmpl = t.TPMT_PUBLIC(
                type=t.TPM2_ALG.KEYEDHASH,
                nameAlg=t.TPM2_ALG.SHA256,
                objectAttributes=attrs,
                authPolicy=policy,
            )
            tmpl.parameters.keyedHashDetail.scheme.scheme = t.TPM2_ALG.NULL
            sens = t.TPM2B_SENSITIVE_CREATE(
                t.TPMS_SENSITIVE_CREATE(data=t.TPM2B_SENSITIVE_DATA(kek))
            )
            s = self._param_session(t, ectx, primary, t.TPM2_SE.HMAC, t.TPMA_SESSION.DECRYPT)
            priv, pub = self._call(
                t, "seal the key", ectx.create, primary, sens, t.TPM2B_PUBLIC(tmpl), session1=s
            )[:2]
            return bytes(pub.marshal()), bytes(priv.marshal()), primary_name

    def unseal(self, sealed: dict[str, object]) -> bytes:
        if not isinstance(sealed, dict):
            raise MasterKeyError("protected master key file is malformed (sealed)")
        if sealed.get("primary") != PRIMARY or sealed.get("pcr_bank") != PCR_BANK:
            raise MasterKeyError("protected master key file names an unknown TPM key template")
        try:
            pcrs = _check_pcrs(sealed.get("pcrs"))
        except MasterKeyError as e:
            raise MasterKeyError(f"protected master key file is malformed: {e}") from None
        primary_name = _hex_field(sealed, "primary_name", NAME_LEN, NAME_LEN)
        public = _hex_field(sealed, "public", 1, MAX_BLOB)
        private = _hex_field(sealed, "private", 1, MAX_BLOB)
        nonce = _hex_field(sealed, "nonce", NONCE_LEN, NONCE_LEN)
        ct = _hex_field(sealed, "ct", CT_LEN, CT_LEN)
        # the PCRs come from the file, not from how this protector was built: they are the
        # ones the object was sealed to (and the AAD stops an edit to them)
        unsealer = TpmProtector(self.tcti, pcrs, timeout=self.timeout)
        kek = self._bounded(unsealer._unseal_kek, public, private, primary_name)
        try:
            return AESGCM(kek).decrypt(nonce, ct, _aad(pcrs, public, primary_name))
        except InvalidTag:
            raise WrongMasterKeyError(
                "the TPM-protected master key failed authentication (file altered)"
            ) from None

    def _unseal_kek(self, public: bytes, private: bytes, primary_name: bytes) -> bytes:
        with self._session() as (t, ectx, primary, name):
            # Checked before anything is sent under it: another TPM (or a cleared owner
            # hierarchy) derives another key, and an interposer's substitute key would
            # otherwise receive the session salt that protects the KEK on the bus.
            if name != primary_name:
                raise WrongMasterKeyError(_ANOTHER_TPM)
            pub, priv = (
                _unmarshal(t, t.TPM2B_PUBLIC, public),
                _unmarshal(t, t.TPM2B_PRIVATE, private),
            )
            obj = self._call(t, "load the sealed object", ectx.load, primary, priv, pub)
            ectx.track(obj)
            if self.pcrs:
                s = self._param_session(t, ectx, primary, t.TPM2_SE.POLICY, t.TPMA_SESSION.ENCRYPT)
                self._call(t, "unseal", ectx.policy_pcr, s, None, _pcr_selection(t, self.pcrs))
            else:
                s = self._param_session(t, ectx, primary, t.TPM2_SE.HMAC, t.TPMA_SESSION.ENCRYPT)
            kek = bytes(self._call(t, "unseal", ectx.unseal, obj, session1=s))
        if len(kek) != KEY_LEN:
            raise WrongMasterKeyError("the TPM unsealed an object that is not a vhsm key")
        return kek


class _Flusher:
    """The ESAPI context, plus `track(handle)` so every transient handle gets flushed."""

    def __init__(self, ectx: Any, handles: list[Any]) -> None:
        self._ectx, self._handles = ectx, handles

    def track(self, handle: Any) -> None:
        self._handles.append(handle)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ectx, name)


def _unmarshal(t: SimpleNamespace, cls: Any, raw: bytes) -> Any:
    try:
        obj, used = cls.unmarshal(raw)
    except (t.TSS2_Exception, ValueError, TypeError):
        raise MasterKeyError("protected master key file is malformed (TPM blob)") from None
    if used != len(raw):
        raise MasterKeyError("protected master key file is malformed (TPM blob)")
    return obj


def _line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _map_error(t: SimpleNamespace, e: Any, what: str, pcrs: list[int], tcti: str) -> MasterKeyError:
    err = e.error
    if err in (t.TPM2_RC.POLICY_FAIL, t.TPM2_RC.PCR_CHANGED):
        sel = f"{PCR_BANK}:" + ",".join(map(str, pcrs))
        return WrongMasterKeyError(
            f"the TPM refused to unseal: PCRs changed since the master key was sealed ({sel})"
        )
    if what == "unseal" and err == t.TPM2_RC.AUTH_UNAVAILABLE:
        # the file says "no PCRs" for an object that can only be used through its PCR policy
        return WrongMasterKeyError(
            "the TPM refused to unseal: the file's PCR selection does not match the sealed "
            "object (file altered)"
        )
    if what == "load the sealed object" and err == t.TPM2_RC.INTEGRITY:
        return WrongMasterKeyError(_ANOTHER_TPM)
    if what == "create the primary key" and err in (t.TPM2_RC.BAD_AUTH, t.TPM2_RC.AUTH_FAIL):
        return MasterKeyError(
            f"the TPM at TCTI {tcti!r} has an owner hierarchy password, which the TPM "
            "protector does not support"
        )
    if what == "load the sealed object" and e.fmt1 and e.parameter:
        # a structurally odd blob that still unmarshals (wrong type, attributes, sizes)
        return WrongMasterKeyError(f"the TPM refused the sealed object ({_line(e)})")
    return MasterKeyError(f"TPM error ({what}) at TCTI {tcti!r}: {_line(e)}")
