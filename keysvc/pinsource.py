"""Where a PIN comes from when nobody is there to type it (the daemon under systemd).

A source string names it: `env:NAME` (an environment variable), `file:PATH` (the first line of a
regular file only its owner can read), or `credential:NAME` (a systemd credential,
`LoadCredential=NAME:...`, read from `$CREDENTIALS_DIRECTORY/NAME`). Files go through
keysvc.safefs, so a symlink, a FIFO, a file of a third user or one that group or others may read
is refused before its contents are used. Messages name the source, never the PIN.
"""

from __future__ import annotations

import os

from keysvc import safefs
from keysvc.errors import MasterKeyError

# A PIN or passphrase is short; a file larger than this is not a PIN file.
MAX_PIN_FILE = 4096


def pin_from(source: str) -> str:
    """The PIN named by `source` (module docstring); MasterKeyError if it cannot be had."""
    how, sep, what = source.partition(":")
    if not sep or not what:
        raise MasterKeyError("a PIN source must be env:NAME, file:PATH or credential:NAME")
    if how == "env":
        pin = os.environ.get(what)
        if pin is None:
            raise MasterKeyError(f"the PIN variable {what} is not set")
        return _nonempty(pin, source)
    if how == "file":
        return _nonempty(_first_line(what, "PIN file"), source)
    if how == "credential":
        # A credential name is one path component: "../x" must not leave the directory.
        if "/" in what or what in (".", ".."):
            raise MasterKeyError(f"credential name {what!r} must be a plain file name")
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if not cred_dir:
            raise MasterKeyError(
                f"PIN source {source} needs $CREDENTIALS_DIRECTORY "
                "(systemd sets it for a unit with LoadCredential=)"
            )
        path = os.path.join(cred_dir, what)
        return _nonempty(_first_line(path, "PIN credential"), source)
    raise MasterKeyError("a PIN source must be env:NAME, file:PATH or credential:NAME")


def _first_line(path: str, what: str) -> str:
    raw = safefs.read_file(path, what, MasterKeyError, limit=MAX_PIN_FILE, secret=True)
    if raw is None:
        raise MasterKeyError(f"{what} {path} does not exist")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise MasterKeyError(f"{what} {path} is not UTF-8 text") from None
    # The first line without its line ending: `echo PIN > file` must work, and nothing after
    # the first line (a comment, a second secret) is ever taken as part of the PIN.
    return text.split("\n", 1)[0].removesuffix("\r")


def _nonempty(pin: str, source: str) -> str:
    if not pin:
        raise MasterKeyError(f"the PIN from {source} is empty")
    return pin
