"""Errors of the token store. Every message is one line, names no key material, and is fit to
print as-is (the CLI prints `Error: <message>` and exits non-zero)."""

from __future__ import annotations


class VhsmError(Exception):
    """Base class: a failure the user can act on."""

    exit_code = 1


class KeyFileError(VhsmError):
    """A key file is missing, of the wrong size, or has unsafe permissions."""


class WrongKeyError(VhsmError):
    """The key given is not the key this token was stored with."""


class TokenNotFoundError(VhsmError):
    """No token with that id in this store."""


class BadTokenError(VhsmError):
    """The string given is not a token (a UUID)."""


class IntegrityError(VhsmError):
    """Stored data failed authentication or a checksum: modified, truncated, swapped or lost.

    As in Fernet, the reason never distinguishes *how* authentication failed beyond naming
    the part (metadata, manifest, chunk N) that did not check out.
    """


class InputError(VhsmError):
    """The input file or directory cannot be read."""


class OutputError(VhsmError):
    """The output cannot be written (exists, not writable, disk full)."""


class StoreError(VhsmError):
    """The store itself cannot be used (not writable, disk full, foreign format)."""
