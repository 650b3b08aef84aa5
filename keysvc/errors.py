"""Errors of the key service.

Every message is one line, names no key material, and is fit to print as-is: the CLI prints
`Error: <message>` on stderr and exits with `exit_code`.
"""

from __future__ import annotations


class KeysvcError(Exception):
    """Base class: a failure the user can act on."""

    exit_code = 1
    # Wire name used by the daemon protocol so the client can rebuild the same exception.
    code = "error"


class AuditError(KeysvcError):
    """The audit log cannot be written (or read): the operation it guards fails (fail-closed)."""

    code = "audit"


class NoAuditLogError(AuditError):
    """Neither the audit log nor its head exists: nothing was ever logged there. Same wire
    code as AuditError (not in ERRORS_BY_CODE): only the CLI tells them apart."""


class AuditIntegrityError(KeysvcError):
    """`audit verify` found an edited, inserted, deleted, reordered or truncated line."""

    code = "audit_integrity"


class MasterKeyError(KeysvcError):
    """No master key, a malformed one, or a key file with unsafe permissions."""

    code = "master_key"


class NoMasterKeyError(MasterKeyError):
    """No master key anywhere it is looked for (argv, HSM_MASTER_KEY, the data dir's files)."""

    code = "no_master_key"


class WrongMasterKeyError(MasterKeyError):
    """The master key given is not the one the keystore was created with."""

    code = "wrong_master_key"


class NeedsPersonError(MasterKeyError):
    """Every protector slot that could unlock the master key needs someone present (a
    passphrase, a touch, a PIN) and nobody is: the daemon starts locked."""

    code = "needs_person"


class LockedError(KeysvcError):
    """The daemon started locked and waits for `vhsm keysvc unlock`."""

    code = "locked"


class KeystoreError(KeysvcError):
    """keystore.dat is unreadable, of a foreign format, or failed authentication."""

    code = "keystore"


class KeyNotFoundError(KeysvcError):
    code = "key_not_found"


class KeyExistsError(KeysvcError):
    code = "key_exists"


class KeyStateError(KeysvcError):
    """The key's lifecycle state forbids the operation, or the transition is not allowed."""

    code = "key_state"


class KeyTypeError(KeysvcError):
    """The key's type cannot do the operation (e.g. sign with an AES key)."""

    code = "key_type"


class InvalidInputError(KeysvcError):
    """Bad argument: unknown key type, malformed name, unreadable input file, bad ciphertext."""

    code = "invalid_input"


class VerificationFailed(KeysvcError):
    """A signature or MAC did not verify (exit 1, audited as FAILURE)."""

    code = "verify_failed"


class AccessDenied(KeysvcError):
    """The daemon's policy does not allow this caller to use this key for this operation."""

    code = "access_denied"


class DaemonError(KeysvcError):
    """The daemon cannot be reached or answered with a protocol error."""

    code = "daemon"


class ConfigError(KeysvcError):
    """The config file (keysvc/discovery.py) is unsafe, malformed or holds a wrong value."""

    code = "config"


ERRORS_BY_CODE: dict[str, type[KeysvcError]] = {
    cls.code: cls
    for cls in (
        KeysvcError,
        AuditError,
        AuditIntegrityError,
        MasterKeyError,
        NoMasterKeyError,
        WrongMasterKeyError,
        NeedsPersonError,
        LockedError,
        KeystoreError,
        KeyNotFoundError,
        KeyExistsError,
        KeyStateError,
        KeyTypeError,
        InvalidInputError,
        VerificationFailed,
        AccessDenied,
        DaemonError,
        ConfigError,
    )
}
