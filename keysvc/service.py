"""The operations of the key service, executed in batches.

The daemon and the in-process CLI run the same code (`Service.execute`, then `Service.commit`;
`run_batch` does both), so they give the same results and write the same audit lines. The
daemon commits a batch in another thread while the next one executes. One batch:

1. every request is checked (master-key check value, access policy) and executed in order
   against the in-memory keystore, collecting one audit record per audited operation;
2. if the batch changed key material or lifecycle (or usage counters are due to be flushed),
   the new keystore is written to a durable temp file;
3. all audit records are appended with one write + one fdatasync (group commit);
4. only then is the temp keystore renamed into place and are the replies released.

If step 3 fails, nothing is published and every reply of the batch becomes an error: an
operation whose audit line is not durable never succeeds (fail-closed).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from keysvc import audit as audit_mod
from keysvc import keytypes, lifecycle, protocol, sshsig, sshwire
from keysvc.audit import AuditRecord, AuditWriter
from keysvc.denials import DenialBudget
from keysvc.errors import (
    AccessDenied,
    InvalidInputError,
    KeyExistsError,
    KeyStateError,
    KeysvcError,
    KeyTypeError,
    VerificationFailed,
    WrongMasterKeyError,
)
from keysvc.keystore import KeyRecord, Keystore, KeyVersion, RotationPolicy, validate_name
from keysvc.policy import Policy
from keysvc.safefs import discard

Reply = tuple[dict[str, Any], bytes]
MAX_DATA_KEY = protocol.MAX_DATA_KEY
DEFAULT_DATA_KEY = 32  # datakey: an AES-256 key
_KEY_SHOWN = 256  # a refused request's key name is clipped to this in its audit line


@dataclass(slots=True)
class Caller:
    uid: int
    gid: int
    pid: int
    user: str
    mk_check: str | None = None


def error_reply(e: KeysvcError) -> Reply:
    return {"ok": False, "error": e.code, "message": str(e)}, b""


@dataclass(frozen=True, slots=True)
class OpSpec:
    fn: Callable[[Service, dict[str, Any], bytes, Caller], tuple[dict[str, Any], bytes, str]]
    event: str | None  # audit event (None: not audited, e.g. list/info/status)
    needs_key: bool = True
    internal: bool = False  # only the daemon itself may call it
    # granted only to the owner and to policy rules naming the operation itself, never by
    # "*": reading the whole audit log shows every key and user, more than any key rule gives
    named_only: bool = False


@dataclass(slots=True)
class Pending:
    """An executed batch whose audit lines are not durable yet: its replies are held back."""

    records: list[AuditRecord]
    replies: list[Reply]
    structural: bool  # keys or lifecycle changed: undone from keystore.dat if the commit fails
    need_save: bool  # keystore.dat is saved with the batch (structural, or counters due)


class Service:
    def __init__(
        self,
        keystore: Keystore,
        writer: AuditWriter,
        *,
        policy: Policy | None = None,
        flush_interval: float = 0.0,
    ) -> None:
        self.ks = keystore
        self.audit = writer
        self.policy = policy
        self.flush_interval = flush_interval
        self._dirty = False  # usage counters changed since the last save
        self._structural = False  # this batch changed keys or lifecycle
        self._event_override: str | None = None
        self._follow_ups: list[tuple[str, str, str]] = []
        self._last_flush = time.monotonic()
        # last audit seq this service wrote or counted
        self._last_seq = keystore.uses_through or 0
        self.started = time.time()
        self.requests = 0
        self.batches = 0
        self.denials = DenialBudget()

    # -- batch execution

    def run_batch(self, items: list[tuple[dict[str, Any], bytes | None, Caller]]) -> list[Reply]:
        return self.commit(self.execute(items))

    def execute(
        self, items: list[tuple[dict[str, Any], bytes | None, Caller]], *, checked: bool = False
    ) -> Pending:
        """Step 1: check and execute every request; nothing is released yet. `checked`: the
        headers were checked against protocol.check_request already (the daemon's decoder
        does it once per distinct header)."""
        records: list[AuditRecord] = []
        replies: list[Reply] = []
        self._structural = False
        for req, blob, caller in items:
            replies.append(self._one(req, blob, caller, records, checked))
        self.requests += len(items)
        self.batches += 1
        return Pending(records, replies, self._structural, self._save_due())

    def _save_due(self) -> bool:
        return self._structural or (
            self._dirty and time.monotonic() - self._last_flush >= self.flush_interval
        )

    def admit(self, req: dict[str, Any], caller: Caller) -> KeysvcError | None:
        """Why the request may not run at all (None: it may): not a known operation, no
        usable key name, not allowed by the policy, a wrong master key.

        No side effects: the daemon asks as soon as a header arrives, before it buffers the
        payload; `_one` asks again and audits the refusal. The policy comes first, so a
        caller it denies learns nothing else."""
        op = req.get("op")
        spec = OPS.get(op) if isinstance(op, str) else None
        if spec is None or (spec.internal and caller.pid != os.getpid()):
            shown = op[:64] if isinstance(op, str) else op  # check_request: a str or None
            return InvalidInputError(f"unknown operation {shown!r}")
        key = req.get("key") or ""
        if not isinstance(key, str):
            return InvalidInputError("key must be a string")
        if self.policy is not None:
            if spec.named_only:
                if not self.policy.allows_named(caller.uid, caller.gid, op):
                    return AccessDenied(f"access denied: uid {caller.uid} may not {op}")
            elif spec.needs_key:
                if not self.policy.allows(caller.uid, caller.gid, key, op):
                    shown = key[:_KEY_SHOWN]  # a hostile name must not make the reply big
                    return AccessDenied(f"access denied: uid {caller.uid} may not {op} key {shown}")
            elif not self.policy.grants_any(caller.uid, caller.gid):
                return AccessDenied(f"access denied: uid {caller.uid} may not {op}")
        if caller.mk_check is not None and not hmac.compare_digest(
            caller.mk_check.encode(), self.ks.check.encode()
        ):
            return WrongMasterKeyError("wrong master key: it does not match the keystore")
        return None

    def _refused(
        self, req: dict[str, Any], caller: Caller, e: KeysvcError, records: list[AuditRecord]
    ) -> Reply:
        """Answer a refusal; access denials and wrong master keys are audited AUTH_FAILURE
        (within the caller's budget of lines, see keysvc.denials)."""
        if isinstance(e, AccessDenied | WrongMasterKeyError):
            records.extend(self.denial_summaries())
            if self.denials.take(caller.uid):
                key = req.get("key")
                key = key[:_KEY_SHOWN] if isinstance(key, str) and key else "N/A"
                details = (
                    "wrong master key"
                    if isinstance(e, WrongMasterKeyError)
                    else f"access denied: {req.get('op')} (pid {caller.pid})"
                )
                records.append(
                    AuditRecord("AUTH_FAILURE", key, caller.user, details, False, caller.uid)
                )
        return error_reply(e)

    def _one(
        self,
        req: dict[str, Any],
        blob: bytes | None,
        caller: Caller,
        records: list[AuditRecord],
        checked: bool = False,
    ) -> Reply:
        """One request. `blob` None: the daemon refused it when its header arrived and
        discarded its payload; it is refused now too, even if the policy changed meanwhile.
        A malformed request is refused before anything else and not audited, as the daemon
        refuses a malformed frame."""
        if not checked:
            try:
                protocol.check_request(req)
            except InvalidInputError as e:
                return error_reply(e)
        refusal = self.admit(req, caller)
        if refusal is None and blob is None:
            refusal = AccessDenied(f"access denied: uid {caller.uid} may not {req['op']}")
        if refusal is not None:
            return self._refused(req, caller, refusal, records)
        assert blob is not None
        op: str = req["op"]
        spec = OPS[op]
        key = req.get("key") or ""
        self._event_override = None
        self._follow_ups: list[tuple[str, str, str]] = []
        try:
            resp, out, details = spec.fn(self, req, blob, caller)
            event = self._event_override or spec.event
            if event:
                records.append(AuditRecord(event, key, caller.user, details, True, caller.uid))
            for ev, k, d in self._follow_ups:  # e.g. an automatic rotation the operation caused
                records.append(AuditRecord(ev, k, caller.user, d, True, caller.uid))
            resp["ok"] = True
            return resp, out
        except KeysvcError as e:
            event = self._event_override or spec.event
            if event:
                records.append(
                    AuditRecord(event, key, caller.user, f"{op} failed: {e}", False, caller.uid)
                )
            return error_reply(e)

    def denial_summaries(self) -> list[AuditRecord]:
        """Summary lines for refusals not logged one by one, once their window has ended
        (the daemon commits them with its periodic chores)."""
        return [
            AuditRecord("AUTH_FAILURE", "N/A", "vhsm-keysvc", self.denials.summary(uid, n), False)
            for uid, n in self.denials.due()
        ]

    def commit(self, pending: Pending) -> list[Reply]:
        """Steps 2-4: make the batch durable, then hand back its replies.

        A batch without `need_save` touches nothing but the audit writer and `_last_seq`, so
        the daemon commits it in another thread while the next batch executes (batches are
        still committed in the order they executed). A batch with `need_save` is committed
        only once every earlier batch is, and before the next one executes."""
        records, replies = pending.records, pending.replies
        saved: list[Path] = []
        now = time.monotonic()
        need_save = pending.need_save

        def save_stamped(last_seq: int) -> None:
            # under the audit writers' lock: the keystore records exactly which audit line its
            # use counters run to, so a crash can be made good from the log (replay_uses)
            self.ks.uses_through = last_seq
            saved.append(self.ks.prepare_save())

        try:
            if records:
                self._last_seq = self.audit.append(
                    records, before_write=save_stamped if need_save else None
                )
            elif need_save:
                save_stamped(self._last_seq)
        except KeysvcError as e:
            for tmp in saved:
                discard(tmp)
            if pending.structural:
                self.ks.load()  # back to the last durable state
            return [error_reply(e) if r[0].get("ok") else r for r in replies]
        if saved:
            try:
                self.ks.publish(saved[0])
            except KeysvcError as e:
                self.ks.load()
                return [error_reply(e) if r[0].get("ok") else r for r in replies]
            self._dirty = False
            self._last_flush = now
        return replies

    def flush(self) -> None:
        """Save usage counters (on shutdown, and periodically from the daemon)."""
        if self._dirty:
            self.ks.uses_through = self._last_seq
            self.ks.save()
            self._dirty = False
            self._last_flush = time.monotonic()

    # -- helpers

    def _used(self, rec: KeyRecord) -> None:
        rec.use_count += 1
        rec.uses_since_rotation += 1
        rec.last_used = time.time()
        self._dirty = True

    def _rotate(self, rec: KeyRecord) -> int:
        n = max(rec.versions) + 1
        now = time.time()
        rec.versions[n] = KeyVersion(n, now, keytypes.generate(rec.key_type))
        rec.current = n
        rec.last_rotated = now
        rec.uses_since_rotation = 0
        self._structural = True
        return n

    def _maybe_auto_rotate(self, rec: KeyRecord) -> None:
        p = rec.policy
        if p.auto and p.max_uses and rec.uses_since_rotation >= p.max_uses:
            uses = rec.uses_since_rotation
            n = self._rotate(rec)
            self._follow_ups.append(
                ("KEY_ROTATED", rec.name, f"Automatic rotation to version {n}: {uses} uses")
            )


# --- operations -----------------------------------------------------------------------------
# Each returns (reply fields, reply blob, audit details). Validation comes before any change.


def _generate(s: Service, req: dict[str, Any], blob: bytes, c: Caller) -> tuple[dict, bytes, str]:
    name = validate_name(req["key"])
    if name in s.ks.keys:
        raise KeyExistsError(f"key {name} already exists")
    kt = keytypes.normalize(req.get("type") or keytypes.ED25519)
    policy = _policy_from(req, RotationPolicy())
    ssh = bool(req.get("ssh"))
    if ssh:
        _check_ssh_type(name, kt)
    now = time.time()
    state = lifecycle.PRE_ACTIVE if req.get("pre_active") else lifecycle.ACTIVE
    rec = KeyRecord(
        name=name,
        key_type=kt,
        state=state,
        created=now,
        last_rotated=now,
        exportable=bool(req.get("exportable")),
        ssh=ssh,
        policy=policy,
    )
    rec.versions[1] = KeyVersion(1, now, keytypes.generate(kt))
    s.ks.keys[name] = rec
    s._structural = True
    what = "Key pair generated" if kt in keytypes.ASYMMETRIC else "Secret key generated"
    what += ", marked for SSH" if ssh else ""
    return {"type": kt, "state": state, "version": 1}, b"", f"{what} ({kt})"


def _check_ssh_type(name: str, key_type: str) -> None:
    if key_type not in keytypes.ASYMMETRIC:
        raise KeyTypeError(f"key {name} is {key_type}: only asymmetric keys can be used for SSH")


def _policy_from(req: dict[str, Any], base: RotationPolicy) -> RotationPolicy:
    """The rotation policy a request asks for. Its values were checked by
    protocol.check_request (finite, in range: `--max-age-days nan` is refused there)."""
    p = RotationPolicy(**asdict(base))
    if req.get("max_age_days") is not None:
        p.max_age_days = float(req["max_age_days"])
    if req.get("max_uses") is not None:
        p.max_uses = int(req["max_uses"])
    if req.get("auto_rotate") is not None:
        p.auto = bool(req["auto_rotate"])
    return p


def _list(s: Service, req: dict[str, Any], blob: bytes, c: Caller) -> tuple[dict, bytes, str]:
    names = sorted(s.ks.keys)
    if s.policy is not None:
        names = [n for n in names if any(s.policy.allows(c.uid, c.gid, n, o) for o in _ANY_OP)]
    return {"keys": names}, b"", ""


_ANY_OP = (
    "info",
    "sign",
    "verify",
    "encrypt",
    "decrypt",
    "export_public_key",
    "wrap",
    "unwrap",
    "datakey",
    "rewrap",
)


def key_info(rec: KeyRecord, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    return {
        "name": rec.name,
        "type": rec.key_type,
        "state": rec.state,
        "created": rec.created,
        "last_used": rec.last_used,
        "last_rotated": rec.last_rotated,
        "days_since_rotation": (now - rec.last_rotated) / 86400,
        "version": rec.current,
        "min_version": rec.min_version,
        "versions": sorted(rec.versions),
        "usable_versions": sorted(rec.usable_versions()),
        "use_count": rec.use_count,
        "uses_since_rotation": rec.uses_since_rotation,
        "exportable": rec.exportable,
        "ssh": rec.ssh,
        "policy": asdict(rec.policy),
        "rotation_due": rec.rotation_due(now),
    }


def version_details(rec: KeyRecord) -> list[dict[str, Any]]:
    """Every version, oldest first: number, creation time, state, and for asymmetric keys the
    public key's fingerprints. Symmetric keys get none: a digest of secret material would be a
    test for guesses of it, and a public value is all a fingerprint should identify."""
    usable = set(rec.usable_versions())
    out = []
    for n in sorted(rec.versions):
        v = rec.versions[n]
        if v.material is None:
            state = "destroyed" if rec.state == lifecycle.DESTROYED else "retired"
        else:
            state = "current" if n == rec.current else "previous"
        d: dict[str, Any] = {"version": n, "created": v.created, "state": state}
        d["usable"] = n in usable
        if rec.key_type in keytypes.ASYMMETRIC:
            d["fingerprint"] = d["spki_sha256"] = None
            if v.material is not None:
                pub = rec.key_obj(n).public_key()
                d["fingerprint"] = sshwire.fingerprint(pub)
                d["spki_sha256"] = hashlib.sha256(keytypes.public_der(pub)).hexdigest()
        out.append(d)
    return out


def _info(s: Service, req: dict[str, Any], blob: bytes, c: Caller) -> tuple[dict, bytes, str]:
    rec = s.ks.get(req["key"])
    info = key_info(rec)
    info["version_details"] = version_details(rec)
    return {"info": info}, b"", ""


def _signed_what(req: dict[str, Any], blob: bytes) -> str:
    """What the audit line says was signed or verified: a SHA-256 of the message, or the
    digest the client sent for a prehashed request (the message never reaches the daemon)."""
    if req.get("prehashed"):
        return f"{req.get('hash') or 'sha256'} digest {blob.hex()}"
    what = f"{len(blob)} bytes, sha256 {hashlib.sha256(blob).hexdigest()}"
    if blob.startswith(sshsig.MAGIC):
        # an SSH signature signs a digest of the file: name it, so the line can be matched
        # with `sha512sum FILE`
        try:
            namespace, hash_name, digest = sshsig.parse_signed_data(blob)
        except sshwire.SshWireError:
            return what
        what += f", SSHSIG namespace {namespace!r} {hash_name} {digest.hex()}"
    return what


def _sign(s: Service, req: dict[str, Any], blob: bytes, c: Caller) -> tuple[dict, bytes, str]:
    rec = s.ks.get(req["key"])
    if rec.key_type not in keytypes.SIGNING:
        raise KeyTypeError(f"key {rec.name} is {rec.key_type}: it cannot sign")
    lifecycle.check_use(rec.name, rec.state, "apply")
    if req.get("ssh") and not rec.ssh:
        raise KeyStateError(f"key {rec.name} is not marked for SSH")
    version = rec.current
    if req.get("version") is not None:
        # an older version signs only while it is usable (not retired): the ssh-agent offers
        # it so that servers still listing the old public key keep working until retirement
        version = int(req["version"])
        if version not in rec.usable_versions():
            raise KeyStateError(f"key {rec.name} has no usable version {version}")
    hash_name, prehashed = req.get("hash"), bool(req.get("prehashed"))
    sig = keytypes.sign(rec.key_type, rec.key_obj(version), blob, hash_name, prehashed)
    s._used(rec)
    s._maybe_auto_rotate(rec)
    via = " through ssh-agent" if req.get("ssh") else ""
    return {"version": version}, sig, f"Signed {_signed_what(req, blob)} with v{version}{via}"


def _verify(s: Service, req: dict[str, Any], blob: bytes, c: Caller) -> tuple[dict, bytes, str]:
    rec = s.ks.get(req["key"])
    if rec.key_type not in keytypes.SIGNING:
        raise KeyTypeError(f"key {rec.name} is {rec.key_type}: it cannot verify")
    lifecycle.check_use(rec.name, rec.state, "process")
    try:
        n = int(req["sig_len"])
    except (KeyError, TypeError, ValueError):
        raise InvalidInputError("verify needs sig_len") from None
    if not 0 <= n <= len(blob):
        raise InvalidInputError("sig_len out of range")
    sig, data = blob[:n], blob[n:]
    hash_name, prehashed = req.get("hash"), bool(req.get("prehashed"))
    versions = rec.usable_versions()
    if req.get("version") is not None:  # a format that names the version (SSHSIG, JSON)
        versions = [v for v in versions if v == req["version"]]
    for v in versions:
        if keytypes.verify(rec.key_type, rec.key_obj(v), data, sig, hash_name, prehashed):
            s._used(rec)  # counted on success only, like every use (replay_uses agrees)
            return {"version": v}, b"", f"Signature verified with v{v} ({_signed_what(req, data)})"
    raise VerificationFailed(f"signature verification failed for key {rec.name}")


def _export_public(
    s: Service, req: dict[str, Any], blob: bytes, c: Caller
) -> tuple[dict, bytes, str]:
    rec = s.ks.get(req["key"])
    if rec.key_type not in keytypes.ASYMMETRIC:
        raise KeyTypeError(f"key {rec.name} is {rec.key_type}: it has no public key")
    lifecycle.check_use(rec.name, rec.state, "public")
    v = int(req.get("version") or rec.current)
    if v not in rec.usable_versions():
        raise KeyStateError(f"key {rec.name} has no usable version {v}")
    pem = keytypes.public_pem(rec.key_type, rec.key_obj(v))
    return {"version": v}, pem, f"Public key exported (v{v})"


def _aes(s: Service, req: dict[str, Any], use: str) -> KeyRecord:
    rec = s.ks.get(req["key"])
    if rec.key_type not in keytypes.SYMMETRIC_CIPHER:
        raise KeyTypeError(f"key {rec.name} is {rec.key_type}: it cannot encrypt or wrap")
    lifecycle.check_use(rec.name, rec.state, use)
    return rec


def _aad(req: dict[str, Any]) -> bytes:
    a = req.get("aad") or ""
    if not isinstance(a, str):
        raise InvalidInputError("aad must be a string")
    return a.encode()


def _old_version(rec: KeyRecord, blob: bytes, *, wrapped: bool) -> int:
    v = keytypes.blob_version(blob, wrapped=wrapped)
    if v not in rec.usable_versions():
        raise KeyStateError(f"key {rec.name} version {v} is retired or unknown")
    return v


def _encrypt(s: Service, req: dict[str, Any], blob: bytes, c: Caller) -> tuple[dict, bytes, str]:
    rec = _aes(s, req, "apply")
    ct = keytypes.encrypt(rec.key_obj(), rec.name, rec.current, blob, _aad(req))
    s._used(rec)
    s._maybe_auto_rotate(rec)
    return {"version": rec.current}, ct, f"Encrypted {len(blob)} bytes with v{rec.current}"


def _decrypt(s: Service, req: dict[str, Any], blob: bytes, c: Caller) -> tuple[dict, bytes, str]:
    rec = _aes(s, req, "decrypt")
    v = _old_version(rec, blob, wrapped=False)
    pt = keytypes.decrypt(rec.key_obj(v), rec.name, blob, _aad(req))
    s._used(rec)
    return {"version": v}, pt, f"Decrypted {len(pt)} bytes with v{v}"


def _wrap(s: Service, req: dict[str, Any], blob: bytes, c: Caller) -> tuple[dict, bytes, str]:
    rec = _aes(s, req, "apply")
    if not 1 <= len(blob) <= MAX_DATA_KEY:
        raise InvalidInputError(f"a data key must be 1-{MAX_DATA_KEY} bytes")
    w = keytypes.wrap(rec.key_obj(), rec.name, rec.current, blob)
    s._used(rec)
    s._maybe_auto_rotate(rec)
    return {"version": rec.current}, w, f"Data key wrapped with v{rec.current}"


def _unwrap(s: Service, req: dict[str, Any], blob: bytes, c: Caller) -> tuple[dict, bytes, str]:
    rec = _aes(s, req, "decrypt")
    v = _old_version(rec, blob, wrapped=True)
    dk = keytypes.decrypt(rec.key_obj(v), rec.name, blob, wrapped=True)
    s._used(rec)
    return {"version": v}, dk, f"Data key unwrapped with v{v}"


def _datakey(s: Service, req: dict[str, Any], blob: bytes, c: Caller) -> tuple[dict, bytes, str]:
    """A new random data key wrapped under the current version (Vault transit
    datakey/plaintext and datakey/wrapped). Payload: the wrapped key, then the plaintext unless
    `wrapped_only` (then it never leaves the service). The audit line names sizes only."""
    rec = _aes(s, req, "apply")
    n = int(req.get("bytes") or DEFAULT_DATA_KEY)
    dk = os.urandom(n)
    w = keytypes.wrap(rec.key_obj(), rec.name, rec.current, dk)
    version = rec.current
    s._used(rec)
    s._maybe_auto_rotate(rec)
    wrapped_only = bool(req.get("wrapped_only"))
    what = "wrapped only" if wrapped_only else "plaintext and wrapped"
    reply = {"version": version, "bytes": n, "wrapped_len": len(w)}
    return (
        reply,
        w if wrapped_only else w + dk,
        f"Data key of {n} bytes generated ({what}, v{version})",
    )


def _rewrap(s: Service, req: dict[str, Any], blob: bytes, c: Caller) -> tuple[dict, bytes, str]:
    """A wrapped key or ciphertext of this key, re-encrypted under the current version inside
    the service: the plaintext never reaches the caller (Vault transit rewrap)."""
    rec = _aes(s, req, "apply")
    wrapped = keytypes.blob_is_wrapped(blob)
    old = _old_version(rec, blob, wrapped=wrapped)
    aad = b"" if wrapped else _aad(req)
    pt = keytypes.decrypt(rec.key_obj(old), rec.name, blob, aad, wrapped=wrapped)
    new = rec.current
    if wrapped:
        out = keytypes.wrap(rec.key_obj(), rec.name, new, pt)
    else:
        out = keytypes.encrypt(rec.key_obj(), rec.name, new, pt, aad)
    s._used(rec)
    s._maybe_auto_rotate(rec)
    kind = "wrapped" if wrapped else "ciphertext"
    details = f"Rewrapped {'wrapped key' if wrapped else 'ciphertext'} v{old} -> v{new}"
    return {"version": new, "old_version": old, "kind": kind}, out, details


def _rotate(s: Service, req: dict[str, Any], blob: bytes, c: Caller) -> tuple[dict, bytes, str]:
    rec = s.ks.get(req["key"])
    if rec.state not in (lifecycle.ACTIVE, lifecycle.PRE_ACTIVE, lifecycle.SUSPENDED):
        raise KeyStateError(f"key {rec.name} is {rec.state}: it cannot be rotated")
    n = s._rotate(rec)
    return {"version": n}, b"", f"Rotated to version {n}"


def _retire(s: Service, req: dict[str, Any], blob: bytes, c: Caller) -> tuple[dict, bytes, str]:
    rec = s.ks.get(req["key"])
    try:
        m = int(req["min_version"])
    except (KeyError, TypeError, ValueError):
        raise InvalidInputError("retire needs a minimum version") from None
    if m <= rec.min_version or m > rec.current:
        raise InvalidInputError(
            f"minimum version must be above {rec.min_version} and at most {rec.current}"
        )
    for n, v in rec.versions.items():
        if n < m:
            v.material = None  # wiped: retired versions can never be used again
            v.obj = None
    rec.min_version = m
    s._structural = True
    return {"min_version": m}, b"", f"Versions below {m} retired"


def _set_state(s: Service, req: dict[str, Any], blob: bytes, c: Caller) -> tuple[dict, bytes, str]:
    rec = s.ks.get(req["key"])
    new = lifecycle.normalize(str(req.get("state", "")))
    if new == lifecycle.DESTROYED:
        s._event_override = "KEY_DELETED"
    lifecycle.check_transition(rec.name, rec.state, new)
    if new == lifecycle.DESTROYED and not req.get("confirm_destroy"):
        raise KeyStateError(f"destroying key {rec.name} needs the explicit --confirm-destroy flag")
    old = rec.state
    rec.state = new
    if new == lifecycle.DESTROYED:
        for v in rec.versions.values():  # material wiped, metadata kept
            v.material = None
            v.obj = None
    s._structural = True
    return {"state": new}, b"", f"State {old} -> {new}"


def _set_policy(s: Service, req: dict[str, Any], blob: bytes, c: Caller) -> tuple[dict, bytes, str]:
    rec = s.ks.get(req["key"])
    policy = _policy_from(req, rec.policy)
    if req.get("ssh"):
        _check_ssh_type(rec.name, rec.key_type)
    rec.policy = policy
    if req.get("ssh") is not None:
        rec.ssh = bool(req["ssh"])
    s._structural = True
    p = rec.policy
    mode = "automatic" if p.auto else "manual"
    return (
        {"policy": asdict(p), "ssh": rec.ssh},
        b"",
        f"Rotation policy: max age {p.max_age_days:g} days, max uses {p.max_uses}, {mode}; "
        f"SSH {'yes' if rec.ssh else 'no'}",
    )


def _ssh_identities(
    s: Service, req: dict[str, Any], blob: bytes, c: Caller
) -> tuple[dict, bytes, str]:
    """What `vhsm ssh-agent` offers this caller: every usable version (newest first) of each
    ACTIVE key marked for SSH that the policy lets the caller sign with. One request per
    listing, so the agent needs no `info` grant and causes no denials for keys it may not use;
    public keys only, so not audited (like `list`). Each signature is checked again by `sign`."""
    out = []
    for name in sorted(s.ks.keys):
        rec = s.ks.keys[name]
        if not rec.ssh or rec.key_type not in keytypes.ASYMMETRIC:
            continue
        if rec.state != lifecycle.ACTIVE:
            continue
        if s.policy is not None and not s.policy.allows(c.uid, c.gid, name, "sign"):
            continue
        for v in rec.usable_versions():
            pub = sshwire.public_blob(rec.key_obj(v).public_key())
            out.append(
                {
                    "key": name,
                    "version": v,
                    "type": rec.key_type,
                    "created": rec.created,
                    "blob": base64.b64encode(pub).decode("ascii"),
                }
            )
    return {"identities": out}, b"", ""


def _status(s: Service, req: dict[str, Any], blob: bytes, c: Caller) -> tuple[dict, bytes, str]:
    return (
        {
            "pid": os.getpid(),
            "uptime": time.time() - s.started,
            "keys": len(s.ks.keys),
            "requests": s.requests,
            "batches": s.batches,
            "keystore": str(s.ks.path),
            "audit_log": str(s.audit.path),
        },
        b"",
        "",
    )


def _audit_logs(s: Service, req: dict[str, Any], blob: bytes, c: Caller) -> tuple[dict, bytes, str]:
    """The daemon's own log, read by the daemon: `vhsm audit logs` works for a caller the
    policy allows even where it cannot open the data dir (read-only, not audited)."""
    days = req.get("days")  # absent: every entry (`audit export` without --days)
    entries = audit_mod.entries_since(s.audit.path, None if days is None else float(days))
    out = audit_mod.entries_to_json(entries)
    if len(out) > protocol.MAX_PAYLOAD:
        raise InvalidInputError(
            f"the {len(entries)} entries asked for exceed one reply (256 MiB): ask for fewer days"
        )
    return {"count": len(entries)}, out, ""


def _audit_verify(
    s: Service, req: dict[str, Any], blob: bytes, c: Caller
) -> tuple[dict, bytes, str]:
    """`vhsm audit verify` of the daemon's live log (read-only, not audited)."""
    r = audit_mod.verify([s.audit.path])
    reply = {"verified": r.ok, "entries": r.entries, "last_seq": r.last_seq, "message": r.message}
    return reply, b"", ""


def _auto_rotate(
    s: Service, req: dict[str, Any], blob: bytes, c: Caller
) -> tuple[dict, bytes, str]:
    """Rotate every key whose policy is automatic and due. Audited per key by the caller."""
    rotated = []
    for rec in s.ks.keys.values():
        if rec.policy.auto and rec.state == lifecycle.ACTIVE:
            reason = rec.rotation_due()
            if reason:
                n = s._rotate(rec)
                rotated.append((rec.name, n, reason))
    return {"rotated": rotated}, b"", ""


OPS: dict[str, OpSpec] = {
    "generate": OpSpec(_generate, "KEY_CREATED"),
    "list": OpSpec(_list, None, needs_key=False),
    "info": OpSpec(_info, None),
    "sign": OpSpec(_sign, "SIGN_OPERATION"),
    "verify": OpSpec(_verify, "VERIFY_OPERATION"),
    "export_public_key": OpSpec(_export_public, "KEY_ACCESSED"),
    "encrypt": OpSpec(_encrypt, "ENCRYPTION"),
    "decrypt": OpSpec(_decrypt, "DECRYPTION"),
    "wrap": OpSpec(_wrap, "ENCRYPTION"),
    "unwrap": OpSpec(_unwrap, "DECRYPTION"),
    "datakey": OpSpec(_datakey, "ENCRYPTION"),
    "rewrap": OpSpec(_rewrap, "ENCRYPTION"),
    "rotate": OpSpec(_rotate, "KEY_ROTATED"),
    "retire": OpSpec(_retire, "KEY_MODIFIED"),
    "set_state": OpSpec(_set_state, "KEY_MODIFIED"),
    "set_policy": OpSpec(_set_policy, "KEY_MODIFIED"),
    "ssh_identities": OpSpec(_ssh_identities, None, needs_key=False),
    "status": OpSpec(_status, None, needs_key=False),
    "audit_logs": OpSpec(_audit_logs, None, needs_key=False, named_only=True),
    "audit_verify": OpSpec(_audit_verify, None, needs_key=False, named_only=True),
    "_auto_rotate": OpSpec(_auto_rotate, None, needs_key=False, internal=True),
}


USE_EVENTS = frozenset({"SIGN_OPERATION", "VERIFY_OPERATION", "ENCRYPTION", "DECRYPTION"})


def replay_uses(service: Service) -> int:
    """Count the uses the log records after the keystore's `uses_through` (a daemon killed
    between two saves of its counters): the audit log, not keystore.dat, is the record of
    every acknowledged use. Returns how many were added."""
    ks = service.ks
    if ks.uses_through is None:
        # a keystore from before counters were stamped: nothing to tie them to; start now
        head = audit_mod.read_head(service.audit.path)
        service._last_seq = ks.uses_through = head[0] if head else 0
        return 0
    added = 0
    last = ks.uses_through
    for e in audit_mod.entries_after(service.audit.path, ks.uses_through):
        last = max(last, e.seq)
        rec = ks.keys.get(e.key)
        if rec is None or not e.success or e.event not in USE_EVENTS:
            continue
        rec.use_count += 1
        rec.uses_since_rotation += 1
        try:
            t = time.mktime(time.strptime(e.timestamp, audit_mod.TS_FORMAT))
        except ValueError:
            t = time.time()
        rec.last_used = max(rec.last_used or 0.0, t)
        added += 1
    service._last_seq = last
    if added:
        service._dirty = True
    return added


def auto_rotate_batch(service: Service, caller: Caller) -> list[tuple[str, int, str]]:
    """Run one auto-rotation pass as its own batch (audited KEY_ROTATED per key)."""
    records: list[AuditRecord] = []
    service._structural = False
    reply = service._one({"op": "_auto_rotate"}, b"", caller, records, checked=True)
    rotated = reply[0].get("rotated", [])
    for name, n, reason in rotated:
        records.append(
            AuditRecord(
                "KEY_ROTATED",
                name,
                caller.user,
                f"Automatic rotation to version {n}: {reason}",
                True,
                caller.uid,
            )
        )
    service.commit(Pending(records, [reply], service._structural, service._save_due()))
    return rotated
