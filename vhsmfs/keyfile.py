"""Key files (32 raw bytes, mode 0600) and the key-provider interface.

The token store never reads a key file itself: it asks a KeyProvider for the input keying
material of each token. A key file is the simple provider; the key service (keysvc) can be
another, returning a data key it wraps so that only a wrapped blob is stored with the token.
"""

from __future__ import annotations

import os
import stat
import uuid
from typing import Protocol

from vhsmfs.errors import KeyFileError
from vhsmfs.outfile import PendingFile, check_destination
from vhsmfs.safefs import SafeDir

KEY_LEN = 32


class KeyProvider(Protocol):
    def new_token_key(self, token_id: uuid.UUID) -> tuple[bytes, bytes]:
        """Keying material for a new token and an opaque reference stored with it."""
        ...

    def token_key(self, token_id: uuid.UUID, key_ref: bytes) -> bytes:
        """The keying material of an existing token from the reference stored with it.
        Raises LookupError if the token is not under this provider's keys."""
        ...


class StaticKeyProvider:
    """Every token derives its keys from one 32-byte master key (a key file)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_LEN:
            raise KeyFileError(f"a key must be {KEY_LEN} bytes, got {len(key)}")
        self._key = key

    def new_token_key(self, token_id: uuid.UUID) -> tuple[bytes, bytes]:
        return self._key, b""

    def token_key(self, token_id: uuid.UUID, key_ref: bytes) -> bytes:
        if key_ref:
            raise LookupError("this token was stored with the key service (--key-service)")
        return self._key

    def __repr__(self) -> str:  # never show the key
        return "StaticKeyProvider(<key>)"


def generate_key_file(path: str | os.PathLike[str], *, force: bool = False) -> None:
    """Write 32 random bytes with mode 0600, atomically. An existing FILE is replaced only with
    force and only if it is a regular file: never a link, device or FIFO (as root that would
    replace /dev/null), whatever force says (vhsmfs.outfile)."""
    path = os.fspath(path)
    parent, name = os.path.split(path)
    if not name or name in (".", ".."):
        raise KeyFileError(f"{path} is a directory")
    try:
        directory = SafeDir.open_root(parent or ".", "key file", trust_owner=False)
    except OSError as e:
        raise KeyFileError(f"cannot write key file {path}: {e.strerror}") from None
    with directory:
        if directory.lstat(name) is not None and not force:
            raise KeyFileError(f"{path} already exists (use --force to overwrite)")
        check_destination(directory, name, force=force)
        out = PendingFile(directory, name)
        try:
            out.write(os.urandom(KEY_LEN))
            out.finish(0o600, None)
            out.publish(force=force)
        finally:
            out.close()


def load_key_file(path: str | os.PathLike[str]) -> bytes:
    """Read a key file, refusing group/other-accessible ones (as ssh does for private keys)."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO must not block
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except OSError as e:
        raise KeyFileError(f"cannot read key file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"key file {path} is accessible by other users (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
            )
        data = os.read(fd, KEY_LEN + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_LEN:
        raise KeyFileError(f"key file {path} must hold exactly {KEY_LEN} bytes")
    return data
