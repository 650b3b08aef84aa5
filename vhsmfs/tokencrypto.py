"""Per-token keys and the chunk record cipher (AES-256-GCM).

Keys: HKDF-SHA256(ikm, salt, info) with distinct info strings for chunk data, metadata and the
key-check value, each bound to the token id, so no two tokens and no two purposes share a key.
Records: nonce(12) || ciphertext || tag(16), nonce random per record (never reused on rewrite).
"""

from __future__ import annotations

import hmac
import os
import uuid
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vhsmfs.format import (
    CHUNK_AAD_TAIL,
    FORMAT_VERSION,
    NONCE_LEN,
    RECORD_OVERHEAD,
    chunk_aad_prefix,
    record_checksum,
)


def _infos(version: int) -> tuple[bytes, bytes, bytes]:
    """HKDF info prefixes (chunk data, metadata, key check) of a format version."""
    v = b"vhsm token v%d " % version
    return v + b"chunk data key", v + b"metadata key", v + b"key check"


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


class ChunkAuthError(Exception):
    """A record failed authentication; carries the chunk index (no key material)."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


class TokenKeys:
    """The derived keys of one token. Holds AESGCM objects, never exposes key bytes."""

    __slots__ = ("token_id", "version", "key_check", "_data", "_meta", "_aad_prefix", "_digest")

    def __init__(
        self, ikm: bytes, salt: bytes, token_id: uuid.UUID, version: int = FORMAT_VERSION
    ) -> None:
        bound = token_id.bytes + version.to_bytes(2, "big")
        info_data, info_meta, info_check = _infos(version)
        self.token_id = token_id
        self.version = version
        self.key_check = _hkdf(ikm, salt, info_check + bound)
        self._data = AESGCM(_hkdf(ikm, salt, info_data + bound))
        self._meta = AESGCM(_hkdf(ikm, salt, info_meta + bound))
        self._aad_prefix = chunk_aad_prefix(token_id, version)
        self._digest = record_checksum(version)

    def __repr__(self) -> str:
        return f"TokenKeys({self.token_id})"

    def key_matches(self, stored_check: bytes) -> bool:
        return hmac.compare_digest(self.key_check, stored_check)

    # -- metadata -------------------------------------------------------------------------
    def seal_metadata(self, plaintext: bytes, header_bytes: bytes) -> tuple[bytes, bytes]:
        nonce = os.urandom(NONCE_LEN)
        return nonce, self._meta.encrypt(nonce, plaintext, header_bytes)

    def open_metadata(self, nonce: bytes, ciphertext: bytes, header_bytes: bytes) -> bytes | None:
        try:
            return self._meta.decrypt(nonce, ciphertext, header_bytes)
        except InvalidTag:
            return None

    # -- chunks -----------------------------------------------------------------------------
    def encrypt_run(
        self,
        plaintext: bytes | bytearray | memoryview,
        first_index: int,
        chunk_size: int,
        final_index: int,
    ) -> tuple[bytearray, list[tuple[int, bytes]]]:
        """encrypt_run_into() a new buffer: (records, per chunk (length, checksum))."""
        n = -(-len(plaintext) // chunk_size) if len(plaintext) else 1
        out = bytearray(len(plaintext) + n * RECORD_OVERHEAD)
        return out, self.encrypt_run_into(
            plaintext, first_index, chunk_size, final_index, memoryview(out)
        )

    def encrypt_run_into(
        self,
        plaintext: bytes | bytearray | memoryview,
        first_index: int,
        chunk_size: int,
        final_index: int,
        dst: memoryview,
    ) -> list[tuple[int, bytes]]:
        """Encrypt consecutive chunks starting at `first_index` into `dst`, records back to
        back (dst must hold the plaintext plus RECORD_OVERHEAD per chunk). Returns, per chunk,
        (record length, checksum of the record: XXH3-128 in format v2). The chunk whose index
        is `final_index` carries the final marker."""
        src = memoryview(plaintext)
        n = -(-len(src) // chunk_size) if len(src) else 1
        return self._encrypt_into(
            [src[k * chunk_size : (k + 1) * chunk_size] for k in range(n)],
            range(first_index, first_index + n),
            final_index,
            dst,
        )

    def encrypt_chunks(
        self,
        chunks: Sequence[bytes | bytearray | memoryview],
        first_index: int | Sequence[int],
        final_index: int,
    ) -> tuple[bytearray, list[tuple[int, bytes]]]:
        """encrypt_run_into() a new buffer, for plaintext given chunk by chunk (consecutive
        indexes from `first_index`, or one index per chunk), so callers holding separate chunk
        buffers need not join them first. Records are bound to their index, not to their place:
        the chunks of one call need not be neighbours in the file."""
        indexes = (
            range(first_index, first_index + len(chunks))
            if isinstance(first_index, int)
            else first_index
        )
        out = bytearray(sum(map(len, chunks)) + len(chunks) * RECORD_OVERHEAD)
        return out, self._encrypt_into(chunks, indexes, final_index, memoryview(out))

    def _encrypt_into(
        self,
        chunks: Sequence[bytes | bytearray | memoryview],
        indexes: Sequence[int],
        final_index: int,
        dst: memoryview,
    ) -> list[tuple[int, bytes]]:
        nonces = os.urandom(NONCE_LEN * len(chunks))  # one syscall per run, not per chunk
        prefix, tail, aead, digest = self._aad_prefix, CHUNK_AAD_TAIL.pack, self._data, self._digest
        entries: list[tuple[int, bytes]] = []
        pos = 0
        for k, (index, piece) in enumerate(zip(indexes, chunks, strict=True)):
            nonce = nonces[k * NONCE_LEN : (k + 1) * NONCE_LEN]
            rlen = len(piece) + RECORD_OVERHEAD
            dst[pos : pos + NONCE_LEN] = nonce
            aead.encrypt_into(
                nonce,
                piece,
                prefix + tail(index, index == final_index),
                dst[pos + NONCE_LEN : pos + rlen],
            )
            entries.append((rlen, digest(dst[pos : pos + rlen])))
            pos += rlen
        return entries

    def decrypt_run(
        self,
        records: bytes | bytearray | memoryview,
        lengths: list[int],
        first_index: int,
        final_index: int,
    ) -> bytearray:
        """Authenticate and decrypt consecutive records; raise ChunkAuthError on the first bad one.

        Nothing is returned unless every record in the run authenticated.
        """
        out = bytearray(sum(lengths) - len(lengths) * RECORD_OVERHEAD)
        self.decrypt_run_into(records, lengths, first_index, final_index, memoryview(out))
        return out

    def decrypt_run_into(
        self,
        records: bytes | bytearray | memoryview,
        lengths: list[int],
        first_index: int,
        final_index: int,
        dst: memoryview,
    ) -> None:
        """decrypt_run() into a buffer of the caller's, which must be private to it: after a
        ChunkAuthError it may hold unauthenticated plaintext and must be discarded unread."""
        src = memoryview(records)
        prefix, tail, aead = self._aad_prefix, CHUNK_AAD_TAIL.pack, self._data
        spos = dpos = 0
        for k, rlen in enumerate(lengths):
            index = first_index + k
            plen = rlen - RECORD_OVERHEAD
            if plen < 0 or spos + rlen > len(src) or dpos + plen > len(dst):
                raise ChunkAuthError(index)
            try:
                aead.decrypt_into(
                    src[spos : spos + NONCE_LEN],
                    src[spos + NONCE_LEN : spos + rlen],
                    prefix + tail(index, index == final_index),
                    dst[dpos : dpos + plen],
                )
            except InvalidTag:
                raise ChunkAuthError(index) from None
            spos += rlen
            dpos += plen
