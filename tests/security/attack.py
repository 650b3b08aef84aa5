"""Helpers for the attack tests: the real CLI as a subprocess (as root or as a second Unix user),
snapshots of the files an attack aims at, and the checks every refusal must pass.

Named `attack` (not helpers/util) so the module name is unique across the test tree."""

from __future__ import annotations

import hashlib
import os
import resource
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TIMEOUT = 60


def env_for(home: Path | None = None, **extra: str) -> dict[str, str]:
    """A clean environment: this checkout's code first (PYTHONPATH), the venv's scripts on PATH,
    no HSM_*/VHSM_*/TOKEN_* settings inherited from the caller."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HSM_", "VHSM_", "TOKEN_", "PYTEST_", "SOFTHSM2"))
    }
    env["PATH"] = f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin"
    env["PYTHONPATH"] = str(REPO)
    if home is not None:
        env["HOME"] = str(home)
    env.update(extra)
    return env


def vhsm(
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    user: int | None = None,
    group: int | None = None,
    input: bytes | None = None,
    timeout: float = TIMEOUT,
    entry: str = "cli.main",
    max_memory: int | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """`vhsm ARGS` (the real CLI, `python -m cli.main`; entry="cli.compat" runs `hsm_enhanced`),
    optionally as another uid/gid with no supplementary groups and with its address space capped
    at `max_memory` bytes (so an attack that makes it read without end fails instead of taking
    the machine's memory). Never raises on a non-zero exit; a hang fails the test by timeout."""

    def cap() -> None:
        if max_memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (max_memory, max_memory))

    return subprocess.run(
        [sys.executable, "-m", entry, *args],
        cwd=cwd,
        env=env if env is not None else env_for(),
        input=input,
        capture_output=True,
        timeout=timeout,
        user=user,
        group=group,
        extra_groups=[] if user is not None else None,
        preexec_fn=cap if max_memory is not None else None,
    )


def assert_one_line_error(p: subprocess.CompletedProcess[bytes], *fragments: str) -> str:
    """A refusal: non-zero exit, no traceback, stderr is one `Error: ...` line naming what it
    should. Returns that line."""
    err = p.stderr.decode(errors="replace")
    assert p.returncode != 0, f"exit 0 (stdout {p.stdout!r}, stderr {err!r})"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error: ")]
    assert len(errors) == 1, f"expected one 'Error: ...' line, got {err!r}"
    for f in fragments:
        assert f in errors[0], f"{f!r} not in {errors[0]!r}"
    return errors[0]


@dataclass(frozen=True)
class Snapshot:
    """What an attack could change about a path (lstat, without following it): type, mode,
    owner, size, times, link count, and the bytes of a regular file."""

    kind: int
    mode: int
    uid: int
    size: int
    mtime_ns: int
    nlink: int
    digest: str | None
    target: str | None


def snapshot(path: Path) -> Snapshot | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    digest = target = None
    if stat.S_ISREG(st.st_mode):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    elif stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
    return Snapshot(
        stat.S_IFMT(st.st_mode),
        stat.S_IMODE(st.st_mode),
        st.st_uid,
        st.st_size,
        st.st_mtime_ns,
        st.st_nlink,
        digest,
        target,
    )


def tree_snapshot(root: Path) -> dict[str, Snapshot | None]:
    """Snapshots of root and everything below it (symlinks not followed)."""
    out: dict[str, Snapshot | None] = {".": snapshot(root)}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            out[str(p.relative_to(root))] = snapshot(p)
    return out
