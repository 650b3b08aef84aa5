"""Fixtures of the backup-consistency tests: the harness (store, real mount, writers, backup
tools), always stopped and unmounted afterwards, and the seed that makes a run repeatable."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from backup_harness import FUSE_MISSING, Config, Harness, missing_tools


@pytest.fixture
def seed() -> int:
    """VHSM_BACKUP_SEED=N repeats a run's schedule (operations, sizes, copy moments, tools);
    otherwise a fresh one, printed on failure."""
    value = os.environ.get("VHSM_BACKUP_SEED")
    s = int(value) if value else random.SystemRandom().randrange(1 << 32)
    print(f"backup test seed: {s} (VHSM_BACKUP_SEED={s} repeats it)")
    return s


@pytest.fixture
def harness(tmp_path: Path, seed: int) -> Iterator[Callable[[Config], Harness]]:
    """harness(cfg) -> a started Harness; stopped (writers killed, mount unmounted) afterwards,
    whatever the test did."""
    if FUSE_MISSING:
        # make test installs fuse3; a missing FUSE is a broken set-up, never a pass
        pytest.fail("FUSE is not available here (/dev/fuse, fusermount3)")
    missing = missing_tools()
    if missing:
        pytest.fail(f"backup tools missing (make test installs them with apt): {missing}")
    made: list[Harness] = []

    def make(cfg: Config) -> Harness:
        h = Harness(tmp_path / f"run{len(made)}", seed, cfg)
        made.append(h)
        h.start()
        return h

    try:
        yield make
    finally:
        for h in made:
            h.stop()
