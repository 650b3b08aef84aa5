"""Key lifecycle states (NIST SP 800-57 Part 1, section 7) and what each state allows.

A key is generated ACTIVE (or PRE_ACTIVE on request). Only the transitions in TRANSITIONS are
allowed; everything else is refused and audited as a failed KEY_MODIFIED.
"""

from __future__ import annotations

from keysvc.errors import KeyStateError

PRE_ACTIVE = "PRE_ACTIVE"
ACTIVE = "ACTIVE"
DEPRECATED = "DEPRECATED"  # NIST "deactivated": process (verify/decrypt) only
SUSPENDED = "SUSPENDED"
COMPROMISED = "COMPROMISED"
DESTROYED = "DESTROYED"

STATES = (PRE_ACTIVE, ACTIVE, DEPRECATED, SUSPENDED, COMPROMISED, DESTROYED)

TRANSITIONS: dict[str, frozenset[str]] = {
    PRE_ACTIVE: frozenset({ACTIVE, COMPROMISED, DESTROYED}),
    ACTIVE: frozenset({DEPRECATED, SUSPENDED, COMPROMISED}),
    SUSPENDED: frozenset({ACTIVE, DEPRECATED, COMPROMISED}),
    DEPRECATED: frozenset({COMPROMISED, DESTROYED}),
    COMPROMISED: frozenset({DESTROYED}),
    DESTROYED: frozenset(),
}

# "apply" = create protection (sign, encrypt, wrap); "process" = use protection (verify,
# decrypt, unwrap); "public" = export the public key.
_ALLOWED: dict[str, frozenset[str]] = {
    PRE_ACTIVE: frozenset({"public"}),
    ACTIVE: frozenset({"apply", "process", "public"}),
    SUSPENDED: frozenset({"process", "public"}),
    DEPRECATED: frozenset({"process", "public"}),
    # A compromised key may still decrypt data it protected (to recover it), but its
    # signatures prove nothing any more, so it does not verify.
    COMPROMISED: frozenset({"decrypt"}),
    DESTROYED: frozenset(),
}


def normalize(state: str) -> str:
    s = state.strip().upper().replace("-", "_")
    if s == "PREACTIVE":
        s = PRE_ACTIVE
    if s not in STATES:
        raise KeyStateError(f"unknown state {state!r} (one of {', '.join(STATES)})")
    return s


def check_transition(name: str, current: str, new: str) -> None:
    if new not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "none"
        raise KeyStateError(
            f"key {name}: transition {current} -> {new} is not allowed (from {current}: {allowed})"
        )


def check_use(name: str, state: str, use: str) -> None:
    """use: apply | process | decrypt | public."""
    allowed = _ALLOWED[state]
    if use in allowed or (use == "decrypt" and "process" in allowed):
        return
    verb = {"apply": "sign/encrypt with", "process": "verify with", "public": "export"}.get(
        use, "decrypt with"
    )
    raise KeyStateError(f"key {name} is {state}: cannot {verb} it")
