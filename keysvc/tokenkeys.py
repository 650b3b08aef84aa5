"""Token keys from the key service: a key provider for the token store and the mount.

Each token gets its own random 32-byte data key, wrapped by a named AES-256-GCM key of the key
service; only the wrapped blob is stored with the token (its `key_ref`). Retrieving asks the key
service to unwrap it, so the key service's access policy, lifecycle states (a DESTROYED key
unwraps nothing; new tokens need a key whose state allows applying protection), rotation (old
versions keep unwrapping until retired) and audit log all apply to the vault. The data key
never leaves this process except wrapped.

This implements vhsmfs's KeyProvider protocol structurally: keysvc does not import vhsmfs.

key_ref layout: b"VKS1" || u16 len(name) || name (UTF-8) || wrapped data key (keysvc wrap blob).
"""

from __future__ import annotations

import os
import struct
import uuid

from keysvc.client import Context
from keysvc.errors import InvalidInputError, KeysvcError

REF_MAGIC = b"VKS1"
DATA_KEY_LEN = 32


class TokenKeyError(KeysvcError, LookupError):
    """A token's key reference cannot be used with the key service. A LookupError, which is
    how a key provider tells the token store "this token is not under my key"."""


def encode_ref(key_name: str, wrapped: bytes) -> bytes:
    name = key_name.encode()
    return REF_MAGIC + struct.pack(">H", len(name)) + name + wrapped


def decode_ref(key_ref: bytes) -> tuple[str, bytes]:
    if not key_ref:
        raise TokenKeyError("this token was stored with a key file, not the key service (--key)")
    if key_ref[:4] != REF_MAGIC or len(key_ref) < 6:
        raise TokenKeyError("this token's key reference is not a key-service reference")
    (n,) = struct.unpack_from(">H", key_ref, 4)
    if len(key_ref) < 6 + n:
        raise TokenKeyError("this token's key reference is truncated")
    return key_ref[6 : 6 + n].decode(errors="replace"), key_ref[6 + n :]


class KeyServiceTokenKeys:
    """KeyProvider backed by the key service (the daemon when it runs, else in-process)."""

    def __init__(self, key_name: str, context: Context | None = None) -> None:
        if not key_name:
            raise InvalidInputError("--key-service needs the name of an AES key")
        self.key_name = key_name
        self.context = context or Context()
        self._cache: dict[bytes, bytes] = {}  # key_ref -> data key: one unwrap per token

    def new_token_key(self, token_id: uuid.UUID) -> tuple[bytes, bytes]:
        data_key = os.urandom(DATA_KEY_LEN)
        _reply, wrapped = self.context.execute({"op": "wrap", "key": self.key_name}, data_key)
        ref = encode_ref(self.key_name, wrapped)
        self._cache[ref] = data_key
        return data_key, ref

    def token_key(self, token_id: uuid.UUID, key_ref: bytes) -> bytes:
        cached = self._cache.get(key_ref)
        if cached is not None:
            return cached
        name, wrapped = decode_ref(key_ref)
        try:
            _reply, data_key = self.context.execute({"op": "unwrap", "key": name}, wrapped)
        except KeysvcError as e:
            # "cannot open this token" for the token store (a LookupError), with the reason:
            # a mount then skips the token instead of failing its whole scan
            raise TokenKeyError(f"the key service did not unwrap its key: {e}") from None
        if len(data_key) != DATA_KEY_LEN:
            raise TokenKeyError(f"key service returned a malformed data key for token {token_id}")
        self._cache[key_ref] = data_key
        return data_key

    def __repr__(self) -> str:
        return f"KeyServiceTokenKeys({self.key_name!r})"
