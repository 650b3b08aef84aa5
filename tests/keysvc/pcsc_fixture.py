"""TEST FIXTURE: the real PC/SC stack (pcscd + the vpcd reader driver) in a private namespace,
with virtual cards (virtual_ctap_card.py) and clients that reach it.

How it is isolated (this is what works on these machines; tried and kept):

- A holder process `unshare --mount --net -- sh -c SCRIPT` creates a private mount and network
  namespace. SCRIPT brings loopback up and bind-mounts a private temp dir on /run/pcscd (when
  the host has no /run/pcscd to mount over, a tmpfs on /run inside the namespace gives it one:
  nothing is created on the host). It then waits on its stdin, so it also ends if pytest dies.
- pcscd runs inside via `nsenter -t HOLDER --mount --net -- pcscd -f -c CONFDIR` with a private
  reader.conf.d naming only vpcd. Its socket (pcscd.comm) lands in the private dir, so the
  machine's own pcscd (if any) and its /run/pcscd are never touched, and vpcd's ports
  35963/35964 exist only on the namespace's loopback: helpers running in parallel never clash.
- Cards and clients must reach that pcscd and those ports, so they run as subprocesses entered
  into the same namespaces with nsenter (`NsPcsc.run_client`, `NsPcsc.start_card`). Moving the
  pytest process itself in with setns() was not used: it would be one-way, and libpcsclite
  caches the socket path per process.

Every process is started by this fixture, killed by its pid (SIGTERM, then SIGKILL after a
timeout) in `close()`, and also gets PR_SET_PDEATHSIG so that a killed pytest takes it along.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
VPCD_DRIVER = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
VPCD_PORTS = (35963, 35964)  # vpcd opens two slots: "Virtual PCD 00 00" and "... 00 01"
START_TIMEOUT = 15.0
CLIENT_TIMEOUT = 60.0

_HOLDER_SCRIPT = r"""
set -e
priv="$1"
if [ ! -d /run/pcscd ]; then mount -t tmpfs -o mode=0755 vhsm-test-run /run; mkdir /run/pcscd; fi
mount --bind "$priv" /run/pcscd
ip link set lo up
echo ready
exec cat >/dev/null
"""


def require_stack() -> None:
    """Fail (not skip) when the PC/SC test stack cannot run: `make` installs it, so a skip
    would only hide a broken set-up (the swtpm fixture does the same)."""
    why = missing_tools()
    if why:
        pytest.fail(f"the PC/SC test stack cannot run: {why}")


def missing_tools() -> str | None:
    """Why the PC/SC fixture cannot run here, or None."""
    for tool in ("unshare", "nsenter", "pcscd", "ip"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"{tool} not found (apt install pcscd vsmartcard-vpcd util-linux iproute2)"
    if not VPCD_DRIVER.exists():
        return "vpcd reader driver missing (apt install vsmartcard-vpcd)"
    if os.geteuid() != 0:
        return "namespaces for pcscd need root"
    try:
        import fido2.pcsc  # noqa: F401
    except ImportError as e:
        return (
            f"python-fido2's PC/SC transport does not import ({e}): pip install 'fido2>=2' pyscard"
        )
    return None


def _die_with_parent() -> None:
    # Runs in the child before exec: nsenter execs its target in place (no PID namespace), so
    # the signal is inherited by pcscd / the card / the client too.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _read_line(stream: IO[bytes], timeout: float, what: str) -> bytes:
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise TimeoutError(f"{what}: no answer within {timeout} s")
    return stream.readline()


def _stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


class Card:
    """A running virtual card process on one vpcd slot."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log

    def apdu_events(self) -> set[str]:
        """The APDU paths the card saw: "chained", "get-response", "extended"."""
        lines = self.log.read_text().splitlines()
        return {line.split(" ", 1)[1] for line in lines if line.startswith("apdu ")}

    def stop(self) -> None:
        _stop(self.proc)


class NsPcsc:
    """pcscd in a private mount+net namespace; see the module docstring."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.run_dir = tmp / "run-pcscd"
        self.conf_dir = tmp / "reader.conf.d"
        self.run_dir.mkdir(mode=0o755)
        self.conf_dir.mkdir()
        # Only vpcd: the machine's other reader configs (serial readers) stay out of the test.
        (self.conf_dir / "vpcd").write_text(
            'FRIENDLYNAME "Virtual PCD"\n'
            f"DEVICENAME   /dev/null:0x{VPCD_PORTS[0]:04X}\n"
            f"LIBPATH      {VPCD_DRIVER}\n"
            f"CHANNELID    0x{VPCD_PORTS[0]:04X}\n"
        )
        self._procs: list[subprocess.Popen[bytes]] = []
        self.holder: subprocess.Popen[bytes] | None = None
        self.pcscd: subprocess.Popen[bytes] | None = None

    # --- processes ------------------------------------------------------------------------

    def _popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, preexec_fn=_die_with_parent, **kw)  # noqa: S603
        self._procs.append(proc)
        return proc

    def _nsenter(self) -> list[str]:
        return self.enter()

    def enter(self, wd: Path | None = None) -> list[str]:
        """The argv prefix that runs a command inside the namespace (entering a mount
        namespace moves the cwd to its root, so a command that works in a directory names it)."""
        assert self.holder is not None
        where = [f"--wd={wd}"] if wd is not None else []
        return ["nsenter", "-t", str(self.holder.pid), "--mount", "--net", *where, "--"]

    def start(self, with_pcscd: bool = True) -> NsPcsc:
        self.holder = self._popen(
            [
                "unshare",
                "--mount",
                "--net",
                "--",
                "sh",
                "-c",
                _HOLDER_SCRIPT,
                "sh",
                str(self.run_dir),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.holder.stdout is not None
        line = _read_line(self.holder.stdout, START_TIMEOUT, "namespace holder")
        if line.strip() != b"ready":
            err = self.holder.stderr.read().decode(errors="replace") if self.holder.stderr else ""
            raise RuntimeError(f"namespace holder failed: {err.strip()}")
        if with_pcscd:
            self.start_pcscd()
        return self

    def start_pcscd(self) -> None:
        log = open(self.tmp / "pcscd.log", "wb")  # noqa: SIM115 - closed with the process
        with log:
            self.pcscd = self._popen(
                [*self._nsenter(), "pcscd", "--foreground", "--debug", "-c", str(self.conf_dir)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        sock = self.run_dir / "pcscd.comm"
        deadline = time.monotonic() + START_TIMEOUT
        while not sock.exists():
            if self.pcscd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pcscd did not start; see {self.tmp / 'pcscd.log'}")
            time.sleep(0.05)

    def start_card(self, secret: bytes, port: int = VPCD_PORTS[0]) -> Card:
        """A virtual CTAP2 card on vpcd's slot at `port`; returns once pcscd powered it up."""
        argv = [*self._nsenter(), sys.executable, str(HERE / "virtual_ctap_card.py")]
        with open(self.tmp / f"card-{port}.log", "ab") as log:
            proc = self._popen(
                [*argv, "--port", str(port)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=self._env(),
            )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(secret.hex().encode() + b"\n")  # not argv: ps shows argv to all
        proc.stdin.flush()
        line = _read_line(proc.stdout, START_TIMEOUT, "virtual card")
        if line.strip() != b"ready":
            _stop(proc)
            raise RuntimeError(f"virtual card did not come up; see {self.tmp}/card-{port}.log")
        self._wait_visible(port)
        return Card(proc, port, self.tmp / f"card-{port}.log")

    def _wait_visible(self, port: int) -> None:
        """Until a client sees the card in its reader: "ready" means pcscd asked for the ATR,
        and on a loaded machine a client listing devices right after could still find the
        reader empty (a test failed that way about 1 run in 5 under load)."""
        reader = f"Virtual PCD 00 {VPCD_PORTS.index(port):02d}"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            seen = self.run_client({"op": "devices"})["devices"]
            if any(reader in d for d in seen):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the virtual card in {reader} is not visible to clients")
            time.sleep(0.1)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE)])
        return env

    def run_client(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run one fido2_pcsc_client.py request inside the namespace; its JSON answer."""
        proc = self._popen(
            [*self._nsenter(), sys.executable, str(HERE / "fido2_pcsc_client.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self._env(),
        )
        try:
            out, err = proc.communicate(json.dumps(request).encode(), timeout=CLIENT_TIMEOUT)
        finally:
            _stop(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"client failed ({proc.returncode}): {err.decode()[-2000:]}")
        answer: dict[str, Any] = json.loads(out)
        return answer

    def run(
        self, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """Run any command inside the namespace (e.g. the vhsm CLI), with the repository on
        PYTHONPATH; returns it finished (stdout, stderr captured), killed after CLIENT_TIMEOUT."""
        proc = self._popen(
            [*self._nsenter(), *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**self._env(), **(env or {})},
        )
        try:
            out, err = proc.communicate(timeout=CLIENT_TIMEOUT)
        finally:
            _stop(proc)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def close(self) -> None:
        """Stop everything this fixture started, newest first (each by its own pid)."""
        for proc in reversed(self._procs):
            _stop(proc)
        self._procs.clear()
