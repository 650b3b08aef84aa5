"""`vhsm key sign/verify/export-public --format ...`: signature and public key files that
standard tools read (OpenSSL, ssh-keygen -Y, minisign, signify). docs/KEYSVC.md "Signature
formats".

The files are streamed here through the hash each format prescribes, in 1 MiB reads, so a file
of any size is signed with flat memory; the key service signs (and verifies) only what the
format's signature covers, and its audit line records that. Formats that sign the message itself
(raw Ed25519 and HMAC, signify) send it whole, up to the protocol's MAX_PAYLOAD. The format code
is in keysvc.sshsig, keysvc.minisign and keysvc.sshwire; this module only does the I/O and the
requests.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization

from keysvc import keytypes, minisign, sshsig, sshwire, userfiles
from keysvc.client import Context
from keysvc.errors import InvalidInputError, KeyTypeError, VerificationFailed
from keysvc.protocol import MAX_PAYLOAD

SIGN_FORMATS = ("raw", "sshsig", "minisign", "signify")
EXPORT_FORMATS = ("pem", "openssh", "minisign", "signify", "allowed-signers")
DEFAULT_NAMESPACE = "file"
READ_SIZE = 1 << 20
# A raw signature of an input up to this size is one request carrying the whole input, exactly
# as before formats existed (no `info` request, so a policy granting only `sign` still works).
# Beyond it the key type decides: ECDSA and RSA get a streamed digest, Ed25519 and HMAC the
# whole message up to MAX_PAYLOAD.
SMALL_INPUT = READ_SIZE
MAX_SIGNATURE_FILE = sshsig.MAX_ARMORED


@dataclass(frozen=True, slots=True)
class Signed:
    version: int
    data: bytes
    text: bool  # a text file (armored, minisign: UTF-8 comments), not raw bytes


@dataclass(frozen=True, slots=True)
class Verified:
    version: int
    note: str | None = None  # e.g. minisign's trusted comment, shown after the success line


# --- input ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _open(path: str) -> Iterator[int]:
    if path == "-":
        yield sys.stdin.fileno()
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidInputError(f"cannot read {path}: {e.strerror}") from None
    try:
        yield fd
    finally:
        os.close(fd)


def _hash_fd(fd: int, h: Any, name: str) -> None:
    """Feed everything left on fd to h, 1 MiB at a time into one reused buffer."""
    buf = bytearray(READ_SIZE)
    view = memoryview(buf)
    try:
        with open(fd, "rb", buffering=0, closefd=False) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
    except OSError as e:
        raise InvalidInputError(f"cannot read {name}: {e.strerror}") from None


def hash_file(path: str, h: Any) -> bytes:
    """The digest of a whole input ('-' = stdin), streamed."""
    with _open(path) as fd:
        _hash_fd(fd, h, _shown(path))
    return bytes(h.digest())


def _shown(path: str) -> str:
    return "standard input" if path == "-" else path


def _head(fd: int, name: str, limit: int) -> bytes:
    """Up to limit + 1 bytes (one more tells "larger than limit"), read unbuffered: what
    follows is read from the same descriptor, so nothing may be read ahead of it."""
    parts: list[bytes] = []
    total = 0
    try:
        while total <= limit:
            chunk = os.read(fd, min(READ_SIZE, limit + 1 - total))
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
    except OSError as e:
        raise InvalidInputError(f"cannot read {name}: {e.strerror}") from None
    return b"".join(parts)


def _whole(fd: int, path: str, head: bytes, key: str, key_type: str, room: int) -> bytes:
    """The whole message, for a signature over the message itself: bounded by what one
    request may carry (`room`), refused with the reason and the way out."""
    st = os.fstat(fd)
    if not (stat.S_ISREG(st.st_mode) and st.st_size > room):
        data = head + _head(fd, _shown(path), room - len(head))
        if len(data) <= room:
            return data
    hint = (
        ": --format sshsig or --format minisign sign a digest and take files of any size"
        if key_type == keytypes.ED25519
        else ""
    )
    raise InvalidInputError(
        f"input {_shown(path)} is larger than {MAX_PAYLOAD >> 20} MiB, the most a {key_type} "
        f"signature over the whole message can cover (key {key}){hint}"
    )


def read_signature_file(path: str) -> bytes:
    return userfiles.read_input(path, limit=MAX_SIGNATURE_FILE)


# --- requests ---------------------------------------------------------------------------------


def _info(ctx: Context, name: str) -> dict[str, Any]:
    reply, _ = ctx.execute({"op": "info", "key": name})
    return dict(reply["info"])


def _public_key(ctx: Context, name: str, version: int | None) -> tuple[int, Any]:
    reply, pem = ctx.execute({"op": "export_public_key", "key": name, "version": version})
    return int(reply["version"]), serialization.load_pem_public_key(pem)


def _signing_key(ctx: Context, name: str) -> tuple[int, str, Any]:
    """(current version, key type, its public key), asked before signing: a key that cannot
    make the format fails before the file is read. `export_public_key` rather than `info`, so
    the operations a signer is usually granted (sign, verify, export_public_key) suffice."""
    version, public_key = _public_key(ctx, name, None)
    return version, sshwire.public_key_type(public_key), public_key


def _signer(ctx: Context, name: str, version: int, known: tuple[int, Any]) -> Any:
    """The public key of the version that signed: the one fetched before signing, unless a
    rotation happened in between."""
    return known[1] if known[0] == version else _public_key(ctx, name, version)[1]


def _raw_ed25519(public_key: Any) -> bytes:
    return bytes(
        public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def _need_ed25519(name: str, key_type: str, fmt: str) -> None:
    if key_type != keytypes.ED25519:
        raise KeyTypeError(f"{fmt} signs with Ed25519 keys only; key {name} is {key_type}")


def _sign(ctx: Context, name: str, data: bytes, **opts: Any) -> tuple[int, bytes]:
    req: dict[str, Any] = {"op": "sign", "key": name}
    req.update({k: v for k, v in opts.items() if v is not None})
    reply, sig = ctx.execute(req, data)
    return int(reply["version"]), sig


def _verify(
    ctx: Context, name: str, data: bytes, sig: bytes, version: int | None = None, **opts: Any
) -> int:
    req: dict[str, Any] = {"op": "verify", "key": name, "sig_len": len(sig), "version": version}
    req.update({k: v for k, v in opts.items() if v is not None})
    reply, _ = ctx.execute(req, sig + data)
    return int(reply["version"])


def _failed(e: VerificationFailed, reason: str | None) -> VerificationFailed:
    return VerificationFailed(f"{e}: {reason}") if reason else e


# --- raw --------------------------------------------------------------------------------------


def sign_raw(ctx: Context, name: str, infile: str) -> Signed:
    """Ed25519: 64 bytes; ECDSA: DER over SHA-256; RSA: PKCS#1 v1.5 over SHA-256; HMAC: 32
    bytes. Identical to `openssl dgst -sha256 -sign` / `pkeyutl -rawin` for any size."""
    with _open(infile) as fd:
        head = _head(fd, _shown(infile), SMALL_INPUT)
        if len(head) <= SMALL_INPUT:
            version, sig = _sign(ctx, name, head)
            return Signed(version, sig, False)
        key_type = _info(ctx, name)["type"]
        if key_type in (keytypes.ECDSA_P256, keytypes.RSA_3072):
            h = hashlib.sha256(head)
            _hash_fd(fd, h, _shown(infile))
            version, sig = _sign(ctx, name, h.digest(), hash="sha256", prehashed=True)
        else:
            data = _whole(fd, infile, head, name, key_type, MAX_PAYLOAD)
            version, sig = _sign(ctx, name, data)
    return Signed(version, sig, False)


def verify_raw(ctx: Context, name: str, infile: str, sig: bytes) -> Verified:
    with _open(infile) as fd:
        head = _head(fd, _shown(infile), SMALL_INPUT)
        if len(head) <= SMALL_INPUT:
            return Verified(_verify(ctx, name, head, sig))
        key_type = _info(ctx, name)["type"]
        if key_type in (keytypes.ECDSA_P256, keytypes.RSA_3072):
            h = hashlib.sha256(head)
            _hash_fd(fd, h, _shown(infile))
            return Verified(_verify(ctx, name, h.digest(), sig, hash="sha256", prehashed=True))
        data = _whole(fd, infile, head, name, key_type, MAX_PAYLOAD - len(sig))
    return Verified(_verify(ctx, name, data, sig))


# --- sshsig -----------------------------------------------------------------------------------


def _namespace(namespace: str | None) -> str:
    try:
        return sshsig.check_namespace(DEFAULT_NAMESPACE if namespace is None else namespace)
    except sshwire.SshWireError as e:
        raise InvalidInputError(f"--namespace: {e}") from None


def sign_sshsig(ctx: Context, name: str, infile: str, namespace: str | None) -> Signed:
    """PROTOCOL.sshsig: the key signs the namespace and a SHA-512 of the file."""
    ns = _namespace(namespace)
    current, key_type, public_key = _signing_key(ctx, name)
    algorithm = sshwire.signature_algorithm(key_type, "sha512")
    digest = hash_file(infile, sshsig.new_hash(sshsig.DEFAULT_HASH))
    data = sshsig.signed_data(ns, sshsig.DEFAULT_HASH, digest)
    version, raw = _sign(ctx, name, data, hash=sshwire.SIGNATURE_ALGORITHMS[algorithm][1])
    public_key = _signer(ctx, name, version, (current, public_key))
    sig = sshsig.Signature(
        public_key=sshwire.public_blob(public_key),
        namespace=ns,
        hash_algorithm=sshsig.DEFAULT_HASH,
        signature=sshwire.signature_blob(algorithm, raw),
    )
    return Signed(version, sshsig.armor(sig).encode("ascii"), True)


def _matching_version(
    ctx: Context, name: str, versions: list[int], matches: Any
) -> tuple[int | None, Any]:
    """The newest usable version whose public key `matches`."""
    for v in sorted(versions, reverse=True):
        _, public_key = _public_key(ctx, name, v)
        if matches(public_key):
            return v, public_key
    return None, None


def verify_sshsig(
    ctx: Context, name: str, infile: str, text: bytes, namespace: str | None
) -> Verified:
    ns = _namespace(namespace)
    try:
        sig = sshsig.dearmor(text)
        algorithm, raw = sshwire.parse_signature_blob(sig.signature)
        signer = sshwire.load_public_blob(sig.public_key)
    except sshwire.SshWireError as e:
        raise InvalidInputError(f"not a valid SSH signature: {e}") from None
    info = _info(ctx, name)
    signer_type, hash_name = sshwire.SIGNATURE_ALGORITHMS[algorithm]
    if signer_type != info["type"] or sshwire.public_key_type(signer) != info["type"]:
        raise VerificationFailed(
            f"the signature is by an {algorithm} key; key {name} is {info['type']}"
        )
    version, _ = _matching_version(
        ctx, name, info["usable_versions"], lambda k: sshwire.public_blob(k) == sig.public_key
    )
    digest = hash_file(infile, sshsig.new_hash(sig.hash_algorithm))
    # the namespace the caller expects, not the file's: a signature made for another purpose
    # fails verification (and is audited as a failure)
    data = sshsig.signed_data(ns, sig.hash_algorithm, digest)
    try:
        return Verified(_verify(ctx, name, data, raw, version, hash=hash_name))
    except VerificationFailed as e:
        reason = None
        if sig.namespace != ns:
            reason = f"it was made for namespace {sig.namespace!r}, not {ns!r}"
        elif version is None:
            reason = f"it is by {sshwire.fingerprint(signer)}, not a usable version of {name}"
        raise _failed(e, reason) from None


# --- minisign and signify ---------------------------------------------------------------------


def _default_trusted_comment(infile: str, name: str, version: int) -> str:
    base = "-" if infile == "-" else os.path.basename(infile)
    # one line: a control character in a file name must not end the comment
    base = "".join(ch if ch.isprintable() else "?" for ch in base)
    return f"timestamp:{int(time.time())} file:{base} vhsm key:{name} v{version}"


def _minisign_error(e: minisign.MinisignError, what: str) -> InvalidInputError:
    return InvalidInputError(f"{what}: {e}")


def sign_minisign(ctx: Context, name: str, infile: str, trusted_comment: str | None) -> Signed:
    """minisign's default algorithm "ED": Ed25519 over BLAKE2b-512 of the file, then the
    global signature over that signature and the trusted comment."""
    if trusted_comment is not None:
        try:
            minisign.check_comment(trusted_comment, minisign.MAX_TRUSTED_COMMENT, "trusted comment")
        except minisign.MinisignError as e:
            raise _minisign_error(e, "--trusted-comment") from None
    current, key_type, public_key = _signing_key(ctx, name)
    _need_ed25519(name, key_type, "minisign")
    digest = hash_file(infile, minisign.new_hash())
    version, sig = _sign(ctx, name, digest)
    public_key = _signer(ctx, name, version, (current, public_key))
    comment = trusted_comment or _default_trusted_comment(infile, name, version)
    again, glob = _sign(ctx, name, minisign.global_signed(sig, comment))
    if again != version:
        raise VerificationFailed(f"key {name} was rotated while signing; sign again")
    out = minisign.Signature(
        algorithm=minisign.PREHASHED,
        key_id=minisign.key_id(_raw_ed25519(public_key)),
        signature=sig,
        untrusted_comment=f"signature from vhsm key {name} v{version}",
        trusted_comment=comment,
        global_signature=glob,
    )
    return Signed(version, minisign.signature_file(out).encode(), True)


def sign_signify(ctx: Context, name: str, infile: str) -> Signed:
    """signify's only algorithm (minisign's legacy "Ed"): Ed25519 over the whole file."""
    current, key_type, public_key = _signing_key(ctx, name)
    _need_ed25519(name, key_type, "signify")
    with _open(infile) as fd:
        data = _whole(fd, infile, b"", name, key_type, MAX_PAYLOAD)
    version, sig = _sign(ctx, name, data)
    public_key = _signer(ctx, name, version, (current, public_key))
    out = minisign.Signature(
        algorithm=minisign.LEGACY,
        key_id=minisign.key_id(_raw_ed25519(public_key)),
        signature=sig,
        untrusted_comment=f"verify with {name}.pub (vhsm key {name} v{version})",
    )
    return Signed(version, minisign.signature_file(out).encode(), True)


def verify_minisign(ctx: Context, name: str, infile: str, text: bytes, fmt: str) -> Verified:
    """A minisign (both algorithms) or signify signature: the file signature, then for minisign
    the global signature over the trusted comment, both by the version the key id names."""
    try:
        sig = minisign.parse_signature(text)
    except minisign.MinisignError as e:
        raise _minisign_error(e, f"not a valid {fmt} signature") from None
    if (sig.trusted_comment is None) != (fmt == "signify"):
        other = "signify" if sig.trusted_comment is None else "minisign"
        raise InvalidInputError(f"this is a {other} signature, not {fmt} (--format {other})")
    info = _info(ctx, name)
    _need_ed25519(name, info["type"], fmt)
    version, _ = _matching_version(
        ctx,
        name,
        info["usable_versions"],
        lambda k: minisign.key_id(_raw_ed25519(k)) == sig.key_id,
    )
    if sig.algorithm == minisign.PREHASHED:
        data = hash_file(infile, minisign.new_hash())
    else:
        with _open(infile) as fd:
            data = _whole(fd, infile, b"", name, info["type"], MAX_PAYLOAD - 64)
    try:
        version = _verify(ctx, name, data, sig.signature, version)
        if sig.trusted_comment is None:
            return Verified(version)
        assert sig.global_signature is not None
        signed = minisign.global_signed(sig.signature, sig.trusted_comment)
        version = _verify(ctx, name, signed, sig.global_signature, version)
    except VerificationFailed as e:
        reason = None
        if version is None:
            kid = minisign.key_id_text(sig.key_id)
            reason = f"it is by key id {kid}, not a usable version of {name}"
        raise _failed(e, reason) from None
    return Verified(version, f"Trusted comment: {sig.trusted_comment}")


# --- dispatch ---------------------------------------------------------------------------------


def sign(
    ctx: Context,
    name: str,
    infile: str,
    fmt: str = "raw",
    *,
    namespace: str | None = None,
    trusted_comment: str | None = None,
) -> Signed:
    if namespace is not None and fmt != "sshsig":
        raise InvalidInputError("--namespace applies to --format sshsig only")
    if trusted_comment is not None and fmt != "minisign":
        raise InvalidInputError("--trusted-comment applies to --format minisign only")
    if fmt == "sshsig":
        return sign_sshsig(ctx, name, infile, namespace)
    if fmt == "minisign":
        return sign_minisign(ctx, name, infile, trusted_comment)
    if fmt == "signify":
        return sign_signify(ctx, name, infile)
    return sign_raw(ctx, name, infile)


def detect_format(sig: bytes) -> str:
    """By the file's first line: armor, a minisign/signify comment line, else raw bytes."""
    if sshsig.is_armored(sig):
        return "sshsig"
    if minisign.is_minisign(sig):
        lines = [ln for ln in sig.splitlines() if ln.strip()]
        return "signify" if len(lines) == 2 else "minisign"
    return "raw"


def verify(
    ctx: Context,
    name: str,
    infile: str,
    sigfile: str,
    fmt: str | None = None,
    *,
    namespace: str | None = None,
) -> Verified:
    if infile == "-" and sigfile == "-":
        raise InvalidInputError("the file and the signature cannot both come from stdin")
    sig = read_signature_file(sigfile)
    fmt = fmt or detect_format(sig)
    if namespace is not None and fmt != "sshsig":
        raise InvalidInputError("--namespace applies to --format sshsig only")
    if fmt == "sshsig":
        return verify_sshsig(ctx, name, infile, sig, namespace)
    if fmt in ("minisign", "signify"):
        return verify_minisign(ctx, name, infile, sig, fmt)
    return verify_raw(ctx, name, infile, sig)


def signature_json(name: str, fmt: str, signed: Signed) -> dict[str, Any]:
    return {
        "key": name,
        "version": signed.version,
        "format": fmt,
        "signature": (
            signed.data.decode() if signed.text else base64.b64encode(signed.data).decode()
        ),
    }


# --- public keys ------------------------------------------------------------------------------


def _ssh_option_value(value: str, what: str) -> str:
    """A principal or namespace as allowed_signers takes it: no blanks, quotes or commas
    (they would split or end the field), no control characters."""
    if not value or any(ch in value for ch in ' \t",') or not value.isprintable():
        raise InvalidInputError(
            f"{what} {value!r}: no blanks, quotes, commas or control characters"
        )
    return value


def export_public(
    ctx: Context,
    name: str,
    fmt: str,
    version: int | None = None,
    *,
    principal: str | None = None,
    namespaces: tuple[str, ...] = (),
) -> bytes:
    if (principal is not None or namespaces) and fmt != "allowed-signers":
        raise InvalidInputError("--principal and --namespace apply to --format allowed-signers")
    if fmt == "pem":
        _, pem = ctx.execute({"op": "export_public_key", "key": name, "version": version})
        return pem
    if fmt == "allowed-signers":
        who = _ssh_option_value(principal or name, "principal")
        opts = ""
        if namespaces:
            ns = ",".join(_ssh_option_value(n, "namespace") for n in namespaces)
            opts = f'namespaces="{ns}" '
        versions = [version] if version else _info(ctx, name)["usable_versions"]
        lines = []
        for v in versions:
            v, public_key = _public_key(ctx, name, v)
            lines.append(f"{who} {opts}{sshwire.public_line(public_key)} vhsm:{name}:v{v}\n")
        return "".join(lines).encode()
    v, public_key = _public_key(ctx, name, version)
    if fmt == "openssh":
        return f"{sshwire.public_line(public_key)} vhsm:{name}:v{v}\n".encode()
    if sshwire.public_key_type(public_key) != keytypes.ED25519:
        raise KeyTypeError(f"{fmt} keys are Ed25519 only; key {name} is not")
    comment = "signify public key" if fmt == "signify" else None
    return minisign.public_key_file(_raw_ed25519(public_key), comment).encode()
