"""The mount's background threads belong to whoever builds the Vault: importing the mount starts
no thread pool, and a closed Vault leaves none of its threads running (docs/MOUNT.md,
"Concurrency")."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from vhsmfs.backend import LocalBackend
from vhsmfs.keyfile import StaticKeyProvider
from vhsmfs.mount.vault import ROOT_INO, Vault
from vhsmfs.mount.workers import MountWorkers
from vhsmfs.store import TokenStore

REPO = Path(__file__).resolve().parents[2]


def test_importing_the_mount_makes_no_thread_pool() -> None:
    code = (
        "import gc, concurrent.futures as cf\n"
        "import vhsmfs.mount.runner, vhsmfs.mount.keyprefetch, vhsmfs.mount.wipequeue\n"
        "print(sum(isinstance(o, cf.ThreadPoolExecutor) for o in gc.get_objects()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "0"


def _vhsm_threads(before: set[threading.Thread]) -> list[str]:
    return [t.name for t in threading.enumerate() if t not in before and t.name.startswith("vhsm")]


def _use(v: Vault) -> None:
    """Work for every background part: key prefetch, write-back, read-ahead, a wipe."""
    v.load()
    for i in range(3):
        node = v.create(ROOT_INO, f"f{i}", 0o644, v.uid, v.gid)
        v.write(node, 0, os.urandom(3 << 20))
        v.flush(node)
        v.release(node)
    h = v.open(v.lookup(ROOT_INO, "f0").ino, truncate=False)
    for off in range(0, 3 << 20, 1 << 20):
        v.read(h, off, 1 << 20)
    v.release(h)
    v.unlink(ROOT_INO, "f1")
    v.flush_all()


def _store(root: Path) -> TokenStore:
    return TokenStore(LocalBackend(root), StaticKeyProvider(os.urandom(32)), chunk_size=4096)


def test_a_closed_vault_leaves_no_thread_running(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    v = Vault(_store(tmp_path / "a"))  # makes its own pools, and shuts them down in close()
    _use(v)
    assert _vhsm_threads(before)
    v.close()
    assert _vhsm_threads(before) == []
    # pools passed in stay up until their maker shuts them down
    with MountWorkers() as workers:
        v = Vault(_store(tmp_path / "b"), workers=workers)
        _use(v)
        v.close()
        assert "vhsm-delete" not in _vhsm_threads(before)
        assert workers.encrypt.submit(lambda: 1).result() == 1  # still up
    assert _vhsm_threads(before) == []
