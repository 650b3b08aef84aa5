"""The real key service daemon under attack: start it on a store in a shared directory (so a
second user can reach its socket), raw frames, raw socket clients run as root or as another
uid, and what the daemon uses (RSS, open fds, stderr).

Named `hostile` (not helpers/util) so the module name is unique across the test tree."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from attack import env_for, vhsm

START_TIMEOUT = 30.0


def frame(header: dict[str, Any] | bytes | str, payload: bytes = b"", *, version: int = 1) -> bytes:
    """A request frame with any header, including JSON the real client would never send."""
    if isinstance(header, dict):
        raw = json.dumps(header).encode()
    elif isinstance(header, str):
        raw = header.encode("utf-8", "surrogatepass")
    else:
        raw = header
    body = struct.pack(">BI", version, len(raw)) + raw + payload
    return struct.pack(">I", len(body)) + body


def read_frame(s: socket.socket) -> dict[str, Any] | None:
    """One reply header (the payload is skipped); None when the daemon closed the connection."""
    head = _read_exact(s, 4)
    if head is None:
        return None
    body = _read_exact(s, struct.unpack(">I", head)[0])
    if body is None:
        return None
    _version, jlen = struct.unpack_from(">BI", body, 0)
    return json.loads(body[5 : 5 + jlen])


def _read_exact(s: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = s.recv(min(n - len(buf), 1 << 20))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def exchange(sock_path: Path, data: bytes, replies: int, timeout: float = 20) -> list[Any]:
    """Send `data` on a new connection and read up to `replies` reply headers (as root)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        s.sendall(data)
        out: list[Any] = []
        for _ in range(replies):
            r = read_frame(s)
            out.append(r)
            if r is None:
                break
        return out


# The same exchange run as another uid: a stdlib-only script (the other user needs no access
# to this checkout). argv: socket path, replies to read; stdin: the bytes to send.
_EXCHANGE = r"""
import json, socket, struct, sys
def rd(s, n):
    b = bytearray()
    while len(b) < n:
        try:
            c = s.recv(n - len(b))
        except ConnectionResetError:
            return None
        if not c:
            return None
        b += c
    return bytes(b)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
s.connect(sys.argv[1])
s.sendall(sys.stdin.buffer.read())
out = []
for _ in range(int(sys.argv[2])):
    h = rd(s, 4)
    body = rd(s, struct.unpack(">I", h)[0]) if h else None
    if body is None:
        out.append(None)
        break
    out.append(json.loads(body[5 : 5 + struct.unpack_from(">BI", body, 0)[1]]))
print(json.dumps(out))
"""


def exchange_as(uid: int, gid: int, sock_path: Path, data: bytes, replies: int) -> list[Any]:
    p = subprocess.run(
        [sys.executable, "-c", _EXCHANGE, str(sock_path), str(replies)],
        input=data,
        capture_output=True,
        timeout=60,
        user=uid,
        group=gid,
        extra_groups=[],
        env={"PATH": "/usr/bin:/bin"},
    )
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    return json.loads(p.stdout)


def as_user(uid: int, gid: int, code: str, *args: str) -> subprocess.Popen[bytes]:
    """A stdlib-only Python script run as another uid; stdin/stdout are pipes."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        user=uid,
        group=gid,
        extra_groups=[],
        env={"PATH": "/usr/bin:/bin"},
    )


class KeyService:
    """`vhsm keysvc serve` on data_dir, socket mode 0666 (the policy decides), always stopped."""

    def __init__(
        self,
        data_dir: Path,
        sock: Path,
        *extra: str,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.sock = sock
        self.extra = list(extra)
        self.preexec_fn = preexec_fn
        self.err_path = data_dir.parent / f"daemon-{time.monotonic_ns()}.err"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> KeyService:
        args = [sys.executable, "-m", "cli.main", "keysvc", "serve", "--no-harden"]
        args += ["--data-dir", str(self.data_dir), "--socket", str(self.sock)]
        args += ["--socket-mode", "0666", *self.extra]
        self._err = open(self.err_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            args,
            cwd=self.data_dir,
            env=env_for(),
            stdin=subprocess.DEVNULL,  # never a terminal: a locked start must not prompt
            stdout=subprocess.DEVNULL,
            stderr=self._err,
            start_new_session=True,
            preexec_fn=self.preexec_fn,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited: {self.stderr}")
            if "listening on" in self.stderr:
                return self
            time.sleep(0.05)
        self.stop()
        raise AssertionError("daemon did not start in time")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def wait_stderr(self, text: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.stderr:
            assert time.monotonic() < deadline, f"no {text!r} on stderr: {self.stderr}"
            time.sleep(0.05)

    def sighup(self, expect: str) -> None:
        """Reload the policy and wait for the daemon to say `expect` about it."""
        before = self.stderr.count(expect)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while self.stderr.count(expect) <= before:
            assert time.monotonic() < deadline, f"no {expect!r} after SIGHUP: {self.stderr}"
            time.sleep(0.05)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._err.close()
        return self.proc.returncode

    def wait_exit(self, timeout: float = 20) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def owner_ok(self) -> None:
        """The owner is still served: a well-formed status and a signature."""
        st, sig = exchange(
            self.sock, frame({"op": "status"}) + frame({"op": "sign", "key": "k"}, b"m"), 2
        )
        assert st is not None and st["ok"], (st, self.stderr)
        assert sig is not None and sig["ok"], (sig, self.stderr)


def make_store(data_dir: Path) -> None:
    """A data dir with a master key and an Ed25519 key `k`, made by the real CLI."""
    data_dir.mkdir(mode=0o700)
    env = env_for(HSM_DATA_DIR=str(data_dir))
    for args in (["key", "generate-master-key"], ["key", "--no-daemon", "generate", "k"]):
        p = vhsm(*args, cwd=data_dir, env=env)
        assert p.returncode == 0, p.stderr


@contextmanager
def key_service(
    shared: Path, *extra: str, policy: str | None = "", **kw: Any
) -> Iterator[KeyService]:
    """A store in shared/data (0700) and its daemon on shared/keysvc.sock (0666). `policy`:
    the policy file's text (written 0600 root-owned; "" = nobody but the owner), None for
    no --policy option."""
    data = shared / "data"
    make_store(data)
    args = list(extra)
    if policy is not None:
        pf = shared / "policy.toml"
        pf.write_text(policy)
        os.chmod(pf, 0o600)
        args += ["--policy", str(pf)]
    d = KeyService(data, shared / "keysvc.sock", *args, **kw)
    try:
        yield d.start()
    finally:
        d.stop()


def audit_lines(data_dir: Path) -> list[list[str]]:
    log = data_dir / "hsm_audit.log"
    return [ln.split("|") for ln in log.read_text().splitlines() if ln and not ln.startswith("#")]
