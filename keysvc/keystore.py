"""keystore.dat: the keys and their metadata, encrypted under the master key.

File format (JSON, one object; see docs/KEYSVC.md "Keystore file format"):

    {"format": "vhsm-keystore", "version": 1,
     "check": hex(HKDF(master, info="vhsm master key check v1")),   # wrong key detected first
     "salt": hex(16 random bytes),
     "entries": [{"name", "type", "version", "nonce", "ct"}, ...],     # one per key version
     "meta": {"nonce", "ct"}}                                          # all metadata, sealed

Entry ciphertext = AES-256-GCM(K_entry, nonce, private material,
                               AAD = "vhsm-keystore-v1 entry\\0" name \\0 type \\0 version),
so an entry cannot be renamed, retyped or moved to another version. The metadata block lists
every entry with the SHA-256 of its ciphertext (AAD "vhsm-keystore-v1 meta"), so entries cannot
be dropped, duplicated or rolled back one by one either. K_entry and K_meta are HKDF-SHA256 of
the master key with the file's salt and distinct info strings.

The file is replaced atomically (temp + fsync + rename + fsync dir) and read and written only
through keysvc.safefs (relative to the data dir's fd, checked, at most MAX_SIZE bytes). One
process at a time owns a keystore: an exclusive flock on `.keystore.lock` in the data dir (the
daemon holds it for life).
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keysvc import keytypes, lifecycle, masterkey, paths, safefs
from keysvc.errors import (
    InvalidInputError,
    KeyNotFoundError,
    KeystoreError,
    WrongMasterKeyError,
)

FORMAT = "vhsm-keystore"
VERSION = 1
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:+-]{0,127}")
DEFAULT_MAX_AGE_DAYS = 90.0
# Largest keystore.dat read or written: about 50,000 Ed25519 or 13,000 RSA-3072 key versions
# (docs/KEYSVC.md). A save that would exceed it fails instead of writing a file no later run
# would read back.
MAX_SIZE = 64 * 1024 * 1024


def validate_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):  # (match with `$` let a final newline through)
        raise InvalidInputError(
            "a key name must be 1-128 characters of letters, digits and . _ @ : + - "
            "(starting with a letter or digit)"
        )
    return name


@dataclass
class RotationPolicy:
    max_age_days: float = DEFAULT_MAX_AGE_DAYS  # 0 = no age limit
    max_uses: int = 0  # 0 = unlimited
    auto: bool = False  # the daemon rotates when due


@dataclass
class KeyVersion:
    version: int
    created: float
    material: bytes | None  # None once retired (below min_version) or destroyed
    obj: Any = field(default=None, repr=False, compare=False)  # loaded key, cached


@dataclass
class KeyRecord:
    name: str
    key_type: str
    state: str
    created: float
    last_rotated: float
    last_used: float | None = None
    use_count: int = 0
    uses_since_rotation: int = 0
    current: int = 1
    min_version: int = 1
    exportable: bool = False
    # offered by `vhsm ssh-agent` (asymmetric keys only); absent in older keystores = False
    ssh: bool = False
    policy: RotationPolicy = field(default_factory=RotationPolicy)
    versions: dict[int, KeyVersion] = field(default_factory=dict)

    def __repr__(self) -> str:  # never show material
        return f"KeyRecord({self.name!r}, {self.key_type}, {self.state}, v{self.current})"

    def key_obj(self, version: int | None = None) -> Any:
        v = self.versions.get(self.current if version is None else version)
        if v is None or v.material is None:
            raise KeyNotFoundError(f"key {self.name} has no usable version {version}")
        if v.obj is None:
            v.obj = keytypes.load(self.key_type, v.material)
        return v.obj

    def usable_versions(self) -> list[int]:
        """Versions still allowed to verify/decrypt, newest first."""
        return sorted(
            (n for n, v in self.versions.items() if n >= self.min_version and v.material),
            reverse=True,
        )

    def rotation_due(self, now: float | None = None) -> str | None:
        now = time.time() if now is None else now
        if self.state not in (lifecycle.ACTIVE, lifecycle.PRE_ACTIVE):
            return None
        p = self.policy
        age = (now - self.last_rotated) / 86400
        if p.max_age_days and age >= p.max_age_days:
            return f"age {age:.1f} days >= max {p.max_age_days:g} days"
        if p.max_uses and self.uses_since_rotation >= p.max_uses:
            return f"{self.uses_since_rotation} uses >= max {p.max_uses} uses"
        return None


def _derive(master_key: bytes, salt: bytes, info: bytes) -> AESGCM:
    return AESGCM(HKDF(hashes.SHA256(), 32, salt=salt, info=info).derive(master_key))


def _entry_aad(name: str, key_type: str, version: int) -> bytes:
    return b"vhsm-keystore-v1 entry\0%s\0%s\0%d" % (name.encode(), key_type.encode(), version)


_META_AAD = b"vhsm-keystore-v1 meta"


class Keystore:
    def __init__(self, path: Path, master_key: bytes, salt: bytes | None = None) -> None:
        self.path = path
        self._check = masterkey.check_value(master_key)
        self._mk = master_key
        self._set_salt(salt or os.urandom(16))
        self.keys: dict[str, KeyRecord] = {}
        # audit seq up to which use counters are included (see Service and replay_uses)
        self.uses_through: int | None = 0
        self._lock_fd: int | None = None
        self._dir: safefs.Dir | None = None
        self.exists = False

    def _set_salt(self, salt: bytes) -> None:
        self._salt = salt
        self._k_entry = _derive(self._mk, salt, b"vhsm keystore v1 entries")
        self._k_meta = _derive(self._mk, salt, b"vhsm keystore v1 meta")

    @property
    def check(self) -> str:
        return self._check

    def __repr__(self) -> str:
        return f"Keystore({str(self.path)!r}, {len(self.keys)} keys)"

    # -- opening

    def _data_dir(self) -> safefs.Dir:
        """The data dir's fd, kept open as long as the keystore is: every file is reached
        relative to it (keysvc.safefs)."""
        if self._dir is None:
            self._dir = safefs.open_dir(self.path.parent, "data dir", KeystoreError)
        return self._dir

    def _lock(self, lock_name: str, wait: float) -> None:
        fd = self._data_dir().open_lock(lock_name, "keystore lock")
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise KeystoreError(
                        f"keystore {self.path} is in use by another process "
                        "(is the daemon running with another socket?)"
                    ) from None
                time.sleep(0.05)
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._dir is not None:
            self._dir.close()
            self._dir = None

    def load(self) -> None:
        raw = self._data_dir().read(self.path.name, "keystore", limit=MAX_SIZE)
        if raw is None:
            self.keys = {}
            self.exists = False
            return
        try:
            doc = json.loads(raw)
            if doc.get("format") != FORMAT:
                raise ValueError
        except (ValueError, AttributeError):
            raise KeystoreError(f"{self.path} is not a vhsm keystore") from None
        if doc.get("version") != VERSION:
            raise KeystoreError(f"{self.path}: unsupported keystore version {doc.get('version')}")
        # The wrong-key check comes before any decryption (and in constant time).
        if not hmac.compare_digest(str(doc.get("check", "")).encode(), self._check.encode()):
            raise WrongMasterKeyError("wrong master key: it does not match this keystore")
        try:
            salt = bytes.fromhex(doc["salt"])
        except (KeyError, ValueError, TypeError):
            raise KeystoreError(f"{self.path} is malformed") from None
        if salt != self._salt:
            self._set_salt(salt)
        self._decode(doc)
        self.exists = True

    def _decode(self, doc: dict[str, Any]) -> None:
        try:
            meta_ct = bytes.fromhex(doc["meta"]["ct"])
            meta = json.loads(
                self._k_meta.decrypt(bytes.fromhex(doc["meta"]["nonce"]), meta_ct, _META_AAD)
            )
            digests: dict[str, str] = meta["entries"]
            # None: written before counters were stamped; replay_uses then starts at the log's end
            ut = meta.get("uses_through")
            uses_through = int(ut) if ut is not None else None
            keys: dict[str, KeyRecord] = {}
            for m in meta["keys"]:
                rec = KeyRecord(
                    name=m["name"],
                    key_type=m["key_type"],
                    state=m["state"],
                    created=m["created"],
                    last_rotated=m["last_rotated"],
                    last_used=m["last_used"],
                    use_count=m["use_count"],
                    uses_since_rotation=m["uses_since_rotation"],
                    current=m["current"],
                    min_version=m["min_version"],
                    exportable=m["exportable"],
                    ssh=bool(m.get("ssh", False)),
                    policy=RotationPolicy(**m["policy"]),
                )
                for v in m["versions"]:
                    rec.versions[v["version"]] = KeyVersion(v["version"], v["created"], None)
                keys[rec.name] = rec
            seen = set()
            for e in doc["entries"]:
                name, kt, ver = e["name"], e["type"], int(e["version"])
                ct = bytes.fromhex(e["ct"])
                ident = f"{name}\0{ver}"
                want = digests.get(ident)
                got = hashlib.sha256(ct).hexdigest()
                if want is None or not hmac.compare_digest(want, got) or ident in seen:
                    raise KeystoreError(
                        f"{self.path}: entry {name} v{ver} is not listed (tampered)"
                    )
                seen.add(ident)
                rec = keys[name]
                if rec.key_type != kt or ver not in rec.versions:
                    raise KeystoreError(f"{self.path}: entry {name} v{ver} does not match")
                rec.versions[ver].material = self._k_entry.decrypt(
                    bytes.fromhex(e["nonce"]), ct, _entry_aad(name, kt, ver)
                )
            if seen != set(digests):
                raise KeystoreError(f"{self.path}: entries are missing (tampered or truncated)")
        except InvalidTag:
            raise KeystoreError(f"{self.path} failed authentication (tampered)") from None
        except (KeyError, ValueError, TypeError):
            raise KeystoreError(f"{self.path} is malformed") from None
        self.keys = keys
        self.uses_through = uses_through

    # -- saving

    def serialize(self) -> bytes:
        entries = []
        digests = {}
        metas = []
        for rec in self.keys.values():
            versions = []
            for v in sorted(rec.versions.values(), key=lambda x: x.version):
                versions.append({"version": v.version, "created": v.created})
                if v.material is None:
                    continue
                nonce = os.urandom(12)
                ct = self._k_entry.encrypt(
                    nonce, v.material, _entry_aad(rec.name, rec.key_type, v.version)
                )
                entries.append(
                    {
                        "name": rec.name,
                        "type": rec.key_type,
                        "version": v.version,
                        "nonce": nonce.hex(),
                        "ct": ct.hex(),
                    }
                )
                digests[f"{rec.name}\0{v.version}"] = hashlib.sha256(ct).hexdigest()
            metas.append(
                {
                    "name": rec.name,
                    "key_type": rec.key_type,
                    "state": rec.state,
                    "created": rec.created,
                    "last_rotated": rec.last_rotated,
                    "last_used": rec.last_used,
                    "use_count": rec.use_count,
                    "uses_since_rotation": rec.uses_since_rotation,
                    "current": rec.current,
                    "min_version": rec.min_version,
                    "exportable": rec.exportable,
                    "ssh": rec.ssh,
                    "policy": asdict(rec.policy),
                    "versions": versions,
                }
            )
        nonce = os.urandom(12)
        meta_ct = self._k_meta.encrypt(
            nonce,
            json.dumps(
                {"keys": metas, "entries": digests, "uses_through": self.uses_through}
            ).encode(),
            _META_AAD,
        )
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "check": self._check,
            "salt": self._salt.hex(),
            "entries": entries,
            "meta": {"nonce": nonce.hex(), "ct": meta_ct.hex()},
        }
        return (json.dumps(doc, indent=1) + "\n").encode()

    def prepare_save(self) -> safefs.PendingFile:
        """Durable temp file with the new state; `publish` makes it keystore.dat."""
        data = self.serialize()
        if len(data) > MAX_SIZE:
            raise KeystoreError(
                f"keystore {self.path} would grow to {len(data)} bytes, beyond the "
                f"{MAX_SIZE >> 20} MiB limit; retire or destroy old key versions"
            )
        return self._data_dir().prepare_replace(self.path.name, "keystore", data, mode=0o600)

    def publish(self, pending: safefs.PendingFile) -> None:
        pending.publish()
        self.exists = True

    def save(self) -> None:
        self.publish(self.prepare_save())

    # -- lookups

    def get(self, name: str) -> KeyRecord:
        rec = self.keys.get(name)
        if rec is None:
            raise KeyNotFoundError(f"key {name} not found")
        return rec


def open_keystore(
    data_dir: str | os.PathLike[str] | None, master_key: bytes, *, lock_wait: float = 10.0
) -> Keystore:
    """Open (or prepare to create) the keystore of a data dir, with its lock held."""
    d = paths.data_dir(data_dir)
    ks = Keystore(d / paths.KEYSTORE_NAME, master_key)
    try:
        ks._lock(paths.KEYSTORE_LOCK_NAME, lock_wait)
        ks.load()
    except BaseException:
        ks.close()
        raise
    return ks
