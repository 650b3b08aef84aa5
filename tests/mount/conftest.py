"""Fixtures that mount the vault for real (a `vhsm mount` subprocess) and ALWAYS unmount it.

Teardown never hangs: SIGTERM with a timeout, then `fusermount3 -u -z`, then SIGKILL, each step
bounded; a test that fails half-way leaves no mount and no process behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhsmfs.backend import LocalBackend
from vhsmfs.keyfile import StaticKeyProvider, generate_key_file, load_key_file
from vhsmfs.store import TokenStore

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0

FUSE_MISSING = not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None


def cli(
    *args: str,
    check: bool = True,
    timeout: float = 120,
    extra_env: dict[str, str] | None = None,
    **kw,
) -> subprocess.CompletedProcess:
    """Run the real `vhsm` CLI in a subprocess."""
    env = dict(os.environ, PYTHONPATH=str(REPO), **(extra_env or {}))
    res = subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=kw.pop("cwd", None),
        **kw,
    )
    if check and res.returncode != 0:
        raise AssertionError(
            f"vhsm {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
        )
    return res


def mounted(path: Path) -> bool:
    """In the mount table: unlike os.path.ismount, also true for a dead FUSE mount."""
    target = os.path.abspath(path).replace("\\", "\\134").replace(" ", "\\040")
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def force_unmount(mnt: Path) -> None:
    if mounted(mnt):
        subprocess.run(
            ["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=30, check=False
        )


class Mount:
    """One `vhsm mount` process in the foreground, with its log captured to a file."""

    def __init__(self, store: Path, mnt: Path, key: Path, extra: tuple[str, ...] = ()) -> None:
        self.store, self.mnt, self.key, self.extra = store, mnt, key, extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = store.parent / f"mount-{uuid.uuid4().hex[:8]}.log"

    def start(self) -> Mount:
        self.mnt.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cli.main",
                    "mount",
                    "--store",
                    str(self.store),
                    "--key",
                    str(self.key),
                    *self.extra,
                    str(self.mnt),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None:
                raise AssertionError(f"mount exited {self.proc.returncode}:\n{self.read_log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"mount not ready after {READY_TIMEOUT}s:\n{self.read_log()}")
            time.sleep(0.05)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def read_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Ask the mount to exit; fall back to a lazy unmount and SIGKILL. Returns the exit code
        if the process exited by itself."""
        proc = self.proc
        if proc is None:
            force_unmount(self.mnt)
            return None
        code = None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                code = proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                force_unmount(self.mnt)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
        else:
            code = proc.returncode
        force_unmount(self.mnt)
        self.proc = None
        return code

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=STOP_TIMEOUT)
        self.proc = None


@pytest.fixture
def is_mounted():
    """is_mounted(path): in the mount table, dead FUSE mounts included."""
    return mounted


@pytest.fixture
def run_cli():
    """The `vhsm` CLI in a subprocess: run_cli("token", "list", ...)."""
    return cli


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "vault.key"
    generate_key_file(path)
    return path


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def token_store(store_dir: Path, key_file: Path) -> TokenStore:
    """The same store, opened in-process: what the CLI sees."""
    return TokenStore(LocalBackend(store_dir), StaticKeyProvider(load_key_file(key_file)))


@pytest.fixture
def mounter(store_dir: Path, key_file: Path, tmp_path: Path) -> Iterator[callable]:
    """mounter() -> a started Mount of the test's store; every mount is stopped afterwards."""
    if FUSE_MISSING:
        # make test installs fuse3; a missing FUSE is a broken set-up, never a pass
        pytest.fail("FUSE is not available here (/dev/fuse, fusermount3)")
    mounts: list[Mount] = []

    def make(*extra: str, mnt: Path | None = None) -> Mount:
        m = Mount(store_dir, mnt or tmp_path / "mnt", key_file, extra)
        mounts.append(m)
        return m.start()

    yield make
    for m in mounts:
        m.stop()


@pytest.fixture
def vault(mounter) -> Mount:
    """A mounted vault at tmp_path/mnt over tmp_path/store."""
    return mounter()


@pytest.fixture(scope="session")
def tmpfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private tmpfs (large tests keep their store in RAM); a plain temp dir if mounting
    tmpfs is not allowed here."""
    path = tmp_path_factory.mktemp("tmpfs")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3g,mode=0700", "tmpfs", str(path)],
        capture_output=True,
        check=False,
        timeout=30,
    )
    yield path
    if res.returncode == 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False, timeout=30)
