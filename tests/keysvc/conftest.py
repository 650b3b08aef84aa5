"""Fixtures for the key service tests: a private working directory with a master key, and the
real daemon started and always stopped (see ksutil)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from ksutil import Daemon, Work
from pcsc_fixture import NsPcsc, require_stack
from tpm_fixture import swtpm, swtpm_factory  # noqa: F401  (a real swtpm, for any test)


@pytest.fixture
def work(tmp_path: Path) -> Work:
    """A fresh directory with a master key (master.key, 0600)."""
    d = tmp_path / "w"
    d.mkdir()
    w = Work(d)
    out = w.hsm("-generate_master_key").stdout
    w.master_hex = out.split()[-1]  # type: ignore[attr-defined]
    return w


@pytest.fixture
def daemon_factory(work: Work) -> Iterator[type[Daemon]]:
    started: list[Daemon] = []

    class _D(Daemon):
        def start(self) -> Daemon:
            started.append(self)
            return super().start()

    yield _D
    for d in started:
        d.stop()


@pytest.fixture
def daemon(work: Work, daemon_factory: type[Daemon]) -> Daemon:
    return daemon_factory(work).start()


@pytest.fixture
def ns(tmp_path: Path) -> Iterator[NsPcsc]:
    """pcscd + vpcd in a private namespace (pcsc_fixture). A missing stack fails the test, as
    the swtpm fixture does: `make` installs it, so a skip would only hide a broken set-up."""
    require_stack()
    pcsc = NsPcsc(tmp_path)
    try:
        yield pcsc.start()
    finally:
        pcsc.close()
