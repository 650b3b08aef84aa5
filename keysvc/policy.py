"""Who may use which key for what, for callers of the daemon (identified by SO_PEERCRED).

Policy file (TOML; `--policy FILE`, else <data dir>/keysvc-policy.toml if present):

    [[allow]]
    users = ["alice", 1001]          # names or uids
    groups = ["release-signers"]     # names or gids (primary or supplementary)
    keys = ["release_*"]             # fnmatch patterns
    operations = ["sign", "verify", "export_public_key"]   # or ["*"]

The uid the daemon runs as (the owner) may do everything. Without a policy file nobody else may
do anything: the default is "only the owner". A uid no rule grants anything gets nothing, not
even `list` or `status`. A denial is audited as AUTH_FAILURE.

Group membership is looked up when a request is checked, cached per (uid, gid) for a few seconds
at most (`group_ttl`), and the cache goes with the Policy object, so SIGHUP (which loads a new
one) forgets it: removing a user from a group revokes what the group granted within the TTL.
User and group *names* in the file are resolved when it is loaded (again on SIGHUP).
"""

from __future__ import annotations

import fnmatch
import grp
import os
import pwd
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from keysvc import safefs
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
        "datakey",
        "rewrap",
        "export_public_key",
        "rotate",
        "retire",
        "set_state",
        "set_policy",
        # only where named: "*" does not grant these (keysvc/service.py, OpSpec.named_only)
        "audit_logs",
        "audit_verify",
    }
)
# Seconds a group lookup is trusted. getgrouplist() costs ~10 us with /etc/group and can cost
# milliseconds with a directory service; it runs in the daemon's worker thread, so it is not
# done for every request. 5 s bounds how long a removed group member keeps its access.
DEFAULT_GROUP_TTL = 5.0
MAX_POLICY_BYTES = 1024 * 1024


class PolicyError(KeysvcError):
    code = "policy"


@dataclass(frozen=True)
class Rule:
    uids: frozenset[int]
    gids: frozenset[int]
    keys: tuple[str, ...]
    operations: frozenset[str]

    def covers(self, key: str, op: str) -> bool:
        if "*" not in self.operations and op not in self.operations:
            return False
        return any(fnmatch.fnmatchcase(key, pat) for pat in self.keys)

    def grants_something(self) -> bool:
        return bool(self.operations and self.keys)


class GroupCache:
    """Supplementary groups of a uid, looked up again once `ttl` seconds have passed.
    Used by one thread at a time (the daemon's worker)."""

    def __init__(self, ttl: float = DEFAULT_GROUP_TTL) -> None:
        self.ttl = ttl
        self._cache: dict[tuple[int, int], tuple[float, frozenset[int]]] = {}

    def groups(self, uid: int, gid: int) -> frozenset[int]:
        now = time.monotonic()
        hit = self._cache.get((uid, gid))
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            gids = frozenset(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
        except KeyError:  # a uid without a passwd entry has its primary group only
            gids = frozenset({gid})
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[(uid, gid)] = (now + self.ttl, gids)
        return gids


def _ids(
    rule: int, field: str, value: object, lookup: Callable[[str], int], what: str
) -> frozenset[int]:
    if not isinstance(value, list):
        raise PolicyError(f"policy rule {rule}: {field} must be a list")
    out = set()
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | str):
            raise PolicyError(f"policy rule {rule}: {field} holds {v!r}, not a name or number")
        if isinstance(v, int):
            if not 0 <= v < 2**32:
                raise PolicyError(f"policy rule {rule}: {what} id {v} is out of range")
            out.add(v)
            continue
        try:
            out.add(lookup(v))
        except KeyError:
            raise PolicyError(f"policy: unknown {what} {v!r}") from None
    return frozenset(out)


def _strings(rule: int, field: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"policy rule {rule}: {field} must be a list of strings")
    return tuple(value)


def _read_policy_file(path: Path) -> str:
    """The policy text, through the keysvc safe-open rules (keysvc/safefs.py): never a symlink,
    FIFO or device (a FIFO would hang the daemon, /dev/zero exhaust its memory), only a file of
    a trusted owner that group and others cannot write, at most MAX_POLICY_BYTES."""
    data = safefs.read_file(
        path, "policy file", PolicyError, limit=MAX_POLICY_BYTES, owner_writes=True
    )
    if data is None:
        raise PolicyError(f"policy file {path} not found")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(f"policy file {path} is not UTF-8 text") from None


class Policy:
    def __init__(
        self,
        owner_uid: int,
        rules: list[Rule] | None = None,
        *,
        group_ttl: float = DEFAULT_GROUP_TTL,
    ) -> None:
        self.owner_uid = owner_uid
        self.rules = rules or []
        self._groups = GroupCache(group_ttl)

    @classmethod
    def load(
        cls, path: Path | None, owner_uid: int, *, group_ttl: float = DEFAULT_GROUP_TTL
    ) -> Policy:
        if path is None:
            return cls(owner_uid, group_ttl=group_ttl)
        try:
            doc = tomllib.loads(_read_policy_file(path))
        except tomllib.TOMLDecodeError as e:
            raise PolicyError(f"policy file {path}: {e}") from None
        allow = doc.get("allow", [])
        if not isinstance(allow, list) or not all(isinstance(r, dict) for r in allow):
            raise PolicyError(f"policy file {path}: allow must be a list of [[allow]] tables")
        rules = []
        for i, r in enumerate(allow, 1):
            ops = frozenset(_strings(i, "operations", r.get("operations", [])))
            bad = ops - OPERATIONS - {"*"}
            if bad:
                raise PolicyError(f"policy rule {i}: unknown operation {sorted(bad)[0]!r}")
            rules.append(
                Rule(
                    _ids(i, "users", r.get("users", []), lambda n: pwd.getpwnam(n).pw_uid, "user"),
                    _ids(
                        i, "groups", r.get("groups", []), lambda n: grp.getgrnam(n).gr_gid, "group"
                    ),
                    _strings(i, "keys", r.get("keys", ["*"])),
                    ops,
                )
            )
        return cls(owner_uid, rules, group_ttl=group_ttl)

    def _applies(self, rule: Rule, uid: int, gid: int) -> bool:
        # group membership is looked up only for rules that name groups and not this uid
        return uid in rule.uids or bool(rule.gids and rule.gids & self._groups.groups(uid, gid))

    def allows(self, uid: int, gid: int, key: str, op: str) -> bool:
        """May uid do op on key?"""
        if uid == self.owner_uid:
            return True
        return any(r.covers(key, op) and self._applies(r, uid, gid) for r in self.rules)

    def allows_named(self, uid: int, gid: int, op: str) -> bool:
        """May uid do op, by a rule that names op itself ("*" does not count)?"""
        if uid == self.owner_uid:
            return True
        return any(op in r.operations and self._applies(r, uid, gid) for r in self.rules)

    def grants_any(self, uid: int, gid: int) -> bool:
        """Does the policy give uid anything at all? (`list` and `status` need it.)"""
        if uid == self.owner_uid:
            return True
        return any(r.grants_something() and self._applies(r, uid, gid) for r in self.rules)
