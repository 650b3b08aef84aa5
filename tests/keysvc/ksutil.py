"""Helpers shared by the key service tests: the real CLI run as a subprocess in a private
working directory, and the real daemon (started with a timeout, always stopped).

Named ksutil (not imported from conftest) so the module name is unique across the test tree."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
VHSM = str(BIN / "vhsm")
HSM = str(BIN / "hsm_enhanced")
TIMEOUT = 60


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HSM_", "SOFTHSM2"))}
    env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update(extra)
    return env


@dataclass
class Work:
    """A working directory: the CLI runs with cwd=path, so files live there (compat.md)."""

    path: Path
    env: dict[str, str] = field(default_factory=clean_env)

    def run(
        self,
        *args: str,
        check: bool = True,
        input: bytes | None = None,
        env: dict[str, str] | None = None,
        user: str | None = None,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(
            list(args),
            cwd=cwd or self.path,
            env=env or self.env,
            input=input.decode() if input is not None else None,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            user=user,
        )
        if check and p.returncode != 0:
            raise AssertionError(
                f"{args} exited {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
            )
        return p

    def hsm(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run(HSM, *args, **kw)  # type: ignore[arg-type]

    def vhsm(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run(VHSM, *args, **kw)  # type: ignore[arg-type]

    @property
    def log(self) -> Path:
        return self.path / "hsm_audit.log"

    def audit_lines(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [
            line.split("|")
            for line in self.log.read_text().splitlines()
            if line and not line.startswith("#")
        ]

    def events(self, event: str | None = None) -> list[list[str]]:
        return [f for f in self.audit_lines() if event is None or f[1] == event]


class Daemon:
    def __init__(
        self,
        work: Work,
        *extra: str,
        sock: Path | None = None,
        prefix: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.work = work
        self.prefix = prefix or []  # e.g. nsenter into the PC/SC test namespace
        self.env = env
        self.sock = sock or work.path / ".vhsm-keysvc.sock"
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path = work.path.parent / f"daemon-{time.monotonic_ns()}.err"

    def start(self) -> Daemon:
        args = [*self.prefix, VHSM, "keysvc", "serve", "--socket", str(self.sock), *self.extra]
        self._err = open(self.stderr_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            args,
            cwd=self.work.path,
            env=self.env or self.work.env,
            stdin=subprocess.DEVNULL,  # never a terminal: a locked start must not prompt
            stderr=self._err,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited: {self.stderr_path.read_text()}")
            if self.sock.exists():
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(_short(self.sock))
                    return self
                except OSError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise AssertionError("daemon did not start within 30 s")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._err.close()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self._err.close()
        self.proc = None


def openssl_verify_ed25519(
    work: Work, pub: Path, data: Path, sig: Path
) -> subprocess.CompletedProcess[str]:
    """Verify a raw Ed25519 signature with OpenSSL (never raises on failure)."""
    return work.run(
        "openssl",
        "pkeyutl",
        "-verify",
        "-pubin",
        "-inkey",
        str(pub),
        "-rawin",
        "-in",
        str(data),
        "-sigfile",
        str(sig),
        check=False,
    )


def _short(path: Path) -> str:
    s = str(path)
    if len(s) <= 100:
        return s
    # keysvc.sockpath does the same for the CLI; tests connect directly
    fd = os.open(path.parent, os.O_PATH)
    _fds.append(fd)
    return f"/proc/self/fd/{fd}/{path.name}"


_fds: list[int] = []
