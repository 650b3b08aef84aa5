"""Who may use which key for what, for callers of the daemon (identified by SO_PEERCRED).

Policy file (TOML; `--policy FILE`, else <data dir>/keysvc-policy.toml if present):

    [[allow]]
    users = ["alice", 1001]          # names or uids
    groups = ["release-signers"]     # names or gids (primary or supplementary)
    keys = ["release_*"]             # fnmatch patterns
    operations = ["sign", "verify", "export_public_key"]   # or ["*"]

The uid the daemon runs as (the owner) may do everything. Without a policy file nobody else may
do anything: the default is "only the owner". A denial is audited as AUTH_FAILURE.
"""

from __future__ import annotations

import fnmatch
import grp
import os
import pwd
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from keysvc.errors import KeysvcError

OPERATIONS = frozenset(
    {
        "generate",
        "list",
        "info",
        "sign",
        "verify",
        "encrypt",
        "decrypt",
        "wrap",
        "unwrap",
        "export_public_key",
        "rotate",
        "retire",
        "set_state",
        "set_policy",
    }
)


class PolicyError(KeysvcError):
    code = "policy"


@dataclass(frozen=True)
class Rule:
    uids: frozenset[int]
    gids: frozenset[int]
    keys: tuple[str, ...]
    operations: frozenset[str]

    def matches(self, uid: int, gids: frozenset[int], key: str, op: str) -> bool:
        if uid not in self.uids and not (gids & self.gids):
            return False
        if "*" not in self.operations and op not in self.operations:
            return False
        return any(fnmatch.fnmatchcase(key, pat) for pat in self.keys)


def _uid(v: object) -> int:
    if isinstance(v, int):
        return v
    try:
        return pwd.getpwnam(str(v)).pw_uid
    except KeyError:
        raise PolicyError(f"policy: unknown user {v!r}") from None


def _gid(v: object) -> int:
    if isinstance(v, int):
        return v
    try:
        return grp.getgrnam(str(v)).gr_gid
    except KeyError:
        raise PolicyError(f"policy: unknown group {v!r}") from None


@lru_cache(maxsize=256)
def groups_of(uid: int, gid: int) -> frozenset[int]:
    try:
        name = pwd.getpwuid(uid).pw_name
        return frozenset(os.getgrouplist(name, gid))
    except KeyError:
        return frozenset({gid})


class Policy:
    def __init__(self, owner_uid: int, rules: list[Rule] | None = None) -> None:
        self.owner_uid = owner_uid
        self.rules = rules or []

    @classmethod
    def load(cls, path: Path | None, owner_uid: int) -> Policy:
        if path is None:
            return cls(owner_uid)
        try:
            st = os.stat(path)
            if st.st_mode & 0o022:
                raise PolicyError(f"policy file {path} is writable by other users")
            doc = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise PolicyError(f"policy file {path} not found") from None
        except tomllib.TOMLDecodeError as e:
            raise PolicyError(f"policy file {path}: {e}") from None
        rules = []
        for i, r in enumerate(doc.get("allow", [])):
            ops = frozenset(str(o) for o in r.get("operations", []))
            bad = ops - OPERATIONS - {"*"}
            if bad:
                raise PolicyError(f"policy rule {i + 1}: unknown operation {sorted(bad)[0]!r}")
            rules.append(
                Rule(
                    frozenset(_uid(u) for u in r.get("users", [])),
                    frozenset(_gid(g) for g in r.get("groups", [])),
                    tuple(str(k) for k in r.get("keys", ["*"])),
                    ops,
                )
            )
        return cls(owner_uid, rules)

    def allows(self, uid: int, gid: int, key: str, op: str) -> bool:
        if uid == self.owner_uid:
            return True
        gids = groups_of(uid, gid)
        return any(r.matches(uid, gids, key, op) for r in self.rules)
