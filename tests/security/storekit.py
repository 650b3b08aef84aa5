"""Helpers of the token-store attack tests (test_store_*.py): a store holding real tokens made by
the real CLI, the CLI run under a memory cap (a runaway read fails the command, not the machine),
and what an attacker with write access to the raw store plants there."""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import stat
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from attack import REPO, env_for

MEMORY_CAP = 2 << 30  # address space of the CLI under attack (prlimit --as)
QUICK = 30.0  # seconds: every refusal is immediate; a hang fails the test by timeout
# offset of next_object_id in a metadata file, by format version (docs/FORMAT.md section 3)
NEXT_OBJECT_AT = {1: 110, 2: 118}
CHUNK_COUNT_AT = {1: 102, 2: 110}  # offset of chunk_count (u64)
OBJECT_COUNT_AT = 122  # offset of object_count (u32), format v2 only


def run_cli(
    *args: str,
    cwd: Path,
    env: dict[str, str],
    user: int | None = None,
    timeout: float = QUICK,
) -> subprocess.CompletedProcess[bytes]:
    """`vhsm ARGS` as attack.vhsm runs it, inside `prlimit --as`, optionally as another user."""
    return subprocess.run(
        ["prlimit", f"--as={MEMORY_CAP}", "--", sys.executable, "-m", "cli.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        timeout=timeout,
        user=user,
        group=None if user is None else pwd.getpwuid(user).pw_gid,
        extra_groups=[] if user is not None else None,
    )


@dataclass
class Scene:
    """A work directory with a key file, a store (VHSM_STORE) and tokens stored by the CLI."""

    work: Path
    store: Path = field(init=False)
    key: Path = field(init=False)

    def __post_init__(self) -> None:
        self.store = self.work / "store"
        self.key = self.work / "k.key"
        self.ok("token", "generate-key", str(self.key))

    @property
    def env(self) -> dict[str, str]:
        return env_for(VHSM_STORE=str(self.store))

    def run(
        self, *args: str, user: int | None = None, timeout: float = QUICK
    ) -> subprocess.CompletedProcess[bytes]:
        """Another user runs in a directory of its own (its audit log goes there)."""
        cwd = self.work
        if user is not None:
            cwd = self.work / f"home-{user}"
            if not cwd.exists():
                cwd.mkdir()
                os.chown(cwd, user, pwd.getpwuid(user).pw_gid)
        return run_cli(*args, cwd=cwd, env=self.env, user=user, timeout=timeout)

    def ok(self, *args: str, user: int | None = None) -> str:
        p = self.run(*args, user=user)
        assert p.returncode == 0, p.stderr.decode(errors="replace")
        return p.stdout.decode()

    def keyed(self, *args: str, user: int | None = None) -> subprocess.CompletedProcess[bytes]:
        return self.run(*args, "--key", str(self.key), user=user)

    def put(self, name: str, data: bytes, *extra: str) -> str:
        """Store a file named `name` holding `data`; returns its token."""
        src = self.work / name
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(data)
        return self.ok("token", "store", name, "--key", str(self.key), "-q", *extra).strip()

    def meta(self, tok: str) -> Path:
        return self.store / f"{tok}.metadata"

    def data(self, tok: str) -> Path:
        return self.store / f"{tok}.data"

    def gens(self, tok: str) -> list[Path]:
        """The token's generation files (format v2), oldest first."""
        return sorted(self.data(tok).glob("gen-" + "[0-9a-f]" * 16))

    def next_object(self, tok: str) -> int:
        with open(self.meta(tok), "rb") as f:
            head = f.read(NEXT_OBJECT_AT[2] + 4)
        version = int.from_bytes(head[8:10], "big")
        at = NEXT_OBJECT_AT[version]
        return int.from_bytes(head[at : at + 4], "big")

    def victim_dir(self) -> Path:
        """A directory outside the store with files an attack would destroy."""
        v = self.work / "victim"
        v.mkdir(exist_ok=True)
        for i in range(3):
            (v / f"precious{i}").write_bytes(f"precious {i}\n".encode() * 100)
        return v


def replace_with(path: Path, kind: str, target: Path | None = None) -> None:
    """Put an attacker's entry at `path`: "symlink" (to target), "fifo", "zero" (a character
    device like /dev/zero), "null" (like /dev/null), "hardlink" (to target), "dir"."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    if kind == "symlink":
        path.symlink_to(target)  # type: ignore[arg-type]
    elif kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind in ("zero", "null"):
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5 if kind == "zero" else 3))
    elif kind == "hardlink":
        os.link(target, path)  # type: ignore[arg-type]
    elif kind == "dir":
        path.mkdir()
    else:
        raise ValueError(kind)


def new_token_id() -> str:
    return str(uuid.uuid4())


def load_mount_helpers():  # type: ignore[no-untyped-def]
    """tests/mount/conftest.py's Mount (a real `vhsm mount` that always unmounts), loaded as a
    module of its own: conftest files cannot be imported by name across directories."""
    spec = importlib.util.spec_from_file_location(
        "mount_conftest_for_security", REPO / "tests" / "mount" / "conftest.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
