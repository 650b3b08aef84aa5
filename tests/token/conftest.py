"""Fixtures of the token store suite: a CLI runner, library stores, tmpfs mounts and an
unprivileged subprocess. Every fixture cleans up after itself, on failure too."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from token_helpers import UNPRIVILEGED, Cli

from vhsmfs.backend import LocalBackend
from vhsmfs.keyfile import StaticKeyProvider
from vhsmfs.store import TokenStore


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    work = tmp_path / "work"
    work.mkdir()
    return Cli(work)


@pytest.fixture
def master_key() -> bytes:
    return os.urandom(32)


@pytest.fixture
def make_store(tmp_path: Path, master_key: bytes) -> Callable[..., TokenStore]:
    """Library-level store factory: TokenStore over a LocalBackend in tmp_path."""

    def make(
        root: Path | None = None,
        *,
        chunk_size: int = 512,
        key: bytes | None = None,
        parallel: int = 1,
        keyless: bool = False,
    ) -> TokenStore:
        keys = None if keyless else StaticKeyProvider(key if key is not None else master_key)
        return TokenStore(
            LocalBackend(root or tmp_path / "store"), keys, chunk_size=chunk_size, parallel=parallel
        )

    return make


def _umount(path: Path) -> None:
    r = subprocess.run(["umount", str(path)], capture_output=True)
    if r.returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """mount(name, size) -> a fresh tmpfs under tmp_path; always unmounted afterwards.
    Needs root (as the whole suite does); fails, never skips, when mount is refused."""
    mounted: list[Path] = []

    def mount(name: str, size: str = "2m") -> Path:
        d = tmp_path / name
        d.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(d)],
            check=True,
            capture_output=True,
        )
        mounted.append(d)
        return d

    try:
        yield mount
    finally:
        for d in reversed(mounted):
            _umount(d)


@pytest.fixture(scope="session")
def unprivileged_ok(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The setpriv prefix, after checking it really makes mode bits apply (else every test that
    relies on it would pass vacuously)."""
    d = tmp_path_factory.mktemp("privcheck")
    f = d / "secret"
    f.write_bytes(b"x")
    f.chmod(0)
    r = subprocess.run(UNPRIVILEGED + ["cat", str(f)], capture_output=True)
    assert r.returncode != 0, "setpriv did not drop CAP_DAC_OVERRIDE: mode tests would be void"
    r = subprocess.run(UNPRIVILEGED + ["true"], capture_output=True)
    assert r.returncode == 0, r.stderr
    return UNPRIVILEGED
