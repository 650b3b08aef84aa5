"""Key types: generation, signing, verification, encryption and wrapping, via `cryptography`.

Private material is serialized compactly for the keystore: Ed25519 as 32 raw bytes, ECDSA and
RSA as PKCS#8 DER, AES and HMAC as 32 raw bytes. Loaded key objects are cached by the keystore.
"""

from __future__ import annotations

import hmac
import os
import struct
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keysvc.errors import InvalidInputError, KeyTypeError

ED25519 = "ed25519"
ECDSA_P256 = "ecdsa-p256"
RSA_3072 = "rsa-3072"
AES_256_GCM = "aes-256-gcm"
HMAC_SHA256 = "hmac-sha256"

KEY_TYPES = (ED25519, ECDSA_P256, RSA_3072, AES_256_GCM, HMAC_SHA256)
ALIASES = {
    "ed25519": ED25519,
    "ecdsa": ECDSA_P256,
    "ecdsa-p256": ECDSA_P256,
    "p256": ECDSA_P256,
    "ec": ECDSA_P256,
    "rsa": RSA_3072,
    "rsa-3072": RSA_3072,
    "rsa3072": RSA_3072,
    "aes": AES_256_GCM,
    "aes-256-gcm": AES_256_GCM,
    "aes256": AES_256_GCM,
    "hmac": HMAC_SHA256,
    "hmac-sha256": HMAC_SHA256,
}
ASYMMETRIC = frozenset({ED25519, ECDSA_P256, RSA_3072})
SIGNING = frozenset({ED25519, ECDSA_P256, RSA_3072, HMAC_SHA256})
SYMMETRIC_CIPHER = frozenset({AES_256_GCM})

# Ciphertext and wrapped-key blobs carry the key version so that decrypt picks the right one.
_CT_MAGIC = b"VHE1"
_WRAP_MAGIC = b"VHW1"
_NONCE = 12


def normalize(type_name: str) -> str:
    t = ALIASES.get(type_name.strip().lower())
    if t is None:
        raise InvalidInputError(
            f"unknown key type {type_name!r} (choose from {', '.join(KEY_TYPES)})"
        )
    return t


def generate(key_type: str) -> bytes:
    if key_type == ED25519:
        return ed25519.Ed25519PrivateKey.generate().private_bytes_raw()
    if key_type == ECDSA_P256:
        k: Any = ec.generate_private_key(ec.SECP256R1())
    elif key_type == RSA_3072:
        k = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    elif key_type in (AES_256_GCM, HMAC_SHA256):
        return os.urandom(32)
    else:
        raise InvalidInputError(f"unknown key type {key_type!r}")
    return k.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load(key_type: str, material: bytes) -> Any:
    """The object used for operations (a cryptography key, or the raw secret)."""
    if key_type == ED25519:
        return ed25519.Ed25519PrivateKey.from_private_bytes(material)
    if key_type in (ECDSA_P256, RSA_3072):
        return serialization.load_der_private_key(material, password=None)
    if key_type == AES_256_GCM:
        return AESGCM(material)
    return material  # HMAC secret


HASHES = {"sha256": hashes.SHA256, "sha512": hashes.SHA512}
DIGEST_SIZES = {"sha256": 32, "sha512": 64}


def _hash_of(key_type: str, hash_name: str | None, prehashed: bool) -> Any:
    """The cryptography hash (or Prehashed wrapper) for ECDSA/RSA; refuses what a type cannot
    do. Ed25519 signs the message itself (pure Ed25519 has no prehashed mode here)."""
    name = hash_name or "sha256"
    if name not in HASHES:
        raise InvalidInputError(f"unknown hash {name!r} (choose sha256 or sha512)")
    if key_type == ECDSA_P256 and name != "sha256":
        raise InvalidInputError("an ECDSA P-256 key signs with sha256")
    if key_type in (ED25519, HMAC_SHA256) and (hash_name or prehashed):
        raise InvalidInputError(f"a {key_type} key signs the message itself (no hash choice)")
    h = HASHES[name]()
    return utils.Prehashed(h) if prehashed else h


def sign(
    key_type: str, key: Any, data: bytes, hash_name: str | None = None, prehashed: bool = False
) -> bytes:
    """Ed25519: 64 raw bytes. ECDSA: DER, SHA-256. RSA: PKCS#1 v1.5, SHA-256 (`openssl dgst`)
    or SHA-512. With `prehashed`, `data` is the digest of the message (ECDSA and RSA only):
    the signature is the same as over the message."""
    if key_type in (ECDSA_P256, RSA_3072):
        h = _hash_of(key_type, hash_name, prehashed)
        if prehashed and len(data) != DIGEST_SIZES[hash_name or "sha256"]:
            raise InvalidInputError("a prehashed request carries exactly one digest")
        if key_type == ECDSA_P256:
            return key.sign(data, ec.ECDSA(h))
        return key.sign(data, padding.PKCS1v15(), h)
    _hash_of(key_type, hash_name, prehashed)
    if key_type == ED25519:
        return key.sign(data)
    if key_type == HMAC_SHA256:
        m = crypto_hmac.HMAC(key, hashes.SHA256())
        m.update(data)
        return m.finalize()
    raise KeyTypeError(f"a {key_type} key cannot sign")


def verify(
    key_type: str,
    key: Any,
    data: bytes,
    signature: bytes,
    hash_name: str | None = None,
    prehashed: bool = False,
) -> bool:
    try:
        if key_type in (ECDSA_P256, RSA_3072):
            h = _hash_of(key_type, hash_name, prehashed)
            if prehashed and len(data) != DIGEST_SIZES[hash_name or "sha256"]:
                raise InvalidInputError("a prehashed request carries exactly one digest")
            if key_type == ECDSA_P256:
                key.public_key().verify(signature, data, ec.ECDSA(h))
            else:
                key.public_key().verify(signature, data, padding.PKCS1v15(), h)
            return True
        _hash_of(key_type, hash_name, prehashed)
        if key_type == ED25519:
            key.public_key().verify(signature, data)
        elif key_type == HMAC_SHA256:
            return hmac.compare_digest(sign(key_type, key, data), signature)
        else:
            raise KeyTypeError(f"a {key_type} key cannot verify signatures")
    except InvalidSignature:
        return False
    return True


def public_pem(key_type: str, key: Any) -> bytes:
    if key_type not in ASYMMETRIC:
        raise KeyTypeError(f"a {key_type} key has no public key")
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_der(public_key: Any) -> bytes:
    """SubjectPublicKeyInfo DER (what `openssl pkey -pubin -outform DER` writes)."""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _aad(domain: bytes, name: str, version: int, aad: bytes) -> bytes:
    return domain + name.encode() + b"\0" + str(version).encode() + b"\0" + aad


def encrypt(key: AESGCM, name: str, version: int, plaintext: bytes, aad: bytes = b"") -> bytes:
    nonce = os.urandom(_NONCE)
    ct = key.encrypt(nonce, plaintext, _aad(b"vhsm-encrypt-v1\0", name, version, aad))
    return _CT_MAGIC + struct.pack(">I", version) + nonce + ct


def wrap(key: AESGCM, name: str, version: int, data_key: bytes) -> bytes:
    nonce = os.urandom(_NONCE)
    ct = key.encrypt(nonce, data_key, _aad(b"vhsm-wrap-v1\0", name, version, b""))
    return _WRAP_MAGIC + struct.pack(">I", version) + nonce + ct


def blob_version(blob: bytes, *, wrapped: bool) -> int:
    magic = _WRAP_MAGIC if wrapped else _CT_MAGIC
    if len(blob) < 8 + _NONCE + 16 or blob[:4] != magic:
        what = "wrapped key" if wrapped else "ciphertext"
        raise InvalidInputError(f"input is not a vhsm {what}")
    return struct.unpack(">I", blob[4:8])[0]


def blob_is_wrapped(blob: bytes) -> bool:
    """Whether `blob` is a wrapped key (True) or a ciphertext (False), by its magic; anything
    else is refused (rewrap takes either)."""
    if blob[:4] == _WRAP_MAGIC:
        return True
    if blob[:4] == _CT_MAGIC:
        return False
    raise InvalidInputError("input is neither a vhsm wrapped key nor a vhsm ciphertext")


def decrypt(
    key: AESGCM, name: str, blob: bytes, aad: bytes = b"", *, wrapped: bool = False
) -> bytes:
    version = blob_version(blob, wrapped=wrapped)
    domain = b"vhsm-wrap-v1\0" if wrapped else b"vhsm-encrypt-v1\0"
    try:
        return key.decrypt(
            blob[8 : 8 + _NONCE], blob[8 + _NONCE :], _aad(domain, name, version, aad)
        )
    except InvalidTag:
        raise InvalidInputError(
            "decryption failed: wrong key, wrong AAD or tampered data"
        ) from None
