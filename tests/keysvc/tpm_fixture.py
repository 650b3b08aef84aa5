"""A real software TPM 2.0 for tests: `swtpm socket --tpm2` on a free loopback port pair
(server P, control P+1), state in a temp dir, always stopped by its pid.

Reuse: `from tpm_fixture import swtpm_factory  # noqa: F401` in a test module (or conftest)
gives the `swtpm_factory` fixture; `swtpm_factory()` starts one more TPM (each with its own
fresh seeds, i.e. a different TPM) and returns a `Swtpm` whose `.tcti` is the TCTI string.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def _port_pair() -> int:
    """A port P with P and P+1 both free on 127.0.0.1 right now (swtpm may still lose a race
    to another process; start() retries)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
            if p >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", p + 1))
                except OSError:
                    continue
            return p
    raise RuntimeError("no free loopback port pair for swtpm")


@dataclass
class Swtpm:
    state: Path
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def start(self) -> Swtpm:
        self.state.mkdir(parents=True, exist_ok=True)
        log = self.state / "swtpm.log"
        for _ in range(5):
            self.port = _port_pair()
            # fmt: off
            self.proc = subprocess.Popen(
                ["swtpm", "socket", "--tpm2",
                 "--tpmstate", f"dir={self.state}",
                 "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                 "--ctrl", f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
                 "--flags", "not-need-init,startup-clear",
                 "--log", f"file={log}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            # fmt: on
            if self._wait_ready():
                return self
            self.stop()  # lost the port race, or failed: try another pair
        raise RuntimeError(f"swtpm did not start; see {log}")

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        """SIGTERM the pid we started, SIGKILL after STOP_TIMEOUT: never hangs."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        self.proc = None


def pcr_extend(tcti: str, index: int, data: bytes = b"\x01" * 32) -> None:
    """Extend one SHA-256 PCR (what a boot measurement would do between seal and unseal)."""
    from tpm2_pytss import ESAPI
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
    from tpm2_pytss.types import TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

    digests = TPML_DIGEST_VALUES([TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=data))])
    with ESAPI(tcti) as e:
        e.pcr_extend(ESYS_TR.parse(f"pcr{index}"), digests)


@pytest.fixture
def swtpm_factory(tmp_path: Path) -> Iterator[Callable[[], Swtpm]]:
    # a missing stack fails (never skips): a silently skipped TPM test would read as green
    if shutil.which("swtpm") is None:
        pytest.fail("swtpm is not installed: apt-get install swtpm swtpm-tools")
    try:
        import tpm2_pytss  # noqa: F401
    except ImportError:
        pytest.fail("tpm2-pytss is not installed: apt libtss2-dev, pip install tpm2-pytss")
    started: list[Swtpm] = []

    def start() -> Swtpm:
        t = Swtpm(tmp_path / f"swtpm{len(started)}")
        started.append(t)
        return t.start()

    try:
        yield start
    finally:
        for t in started:
            t.stop()


@pytest.fixture
def swtpm(swtpm_factory: Callable[[], Swtpm]) -> Swtpm:
    return swtpm_factory()


@contextmanager
def silent_tpm() -> Iterator[str]:
    """A TCTI where something listens on both ports but never answers (a hung TPM): the
    TCTI string, valid inside the `with`."""
    port = _port_pair()
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", port))
        b.bind(("127.0.0.1", port + 1))
        a.listen()
        b.listen()
        yield f"swtpm:host=127.0.0.1,port={port}"
