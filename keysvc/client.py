"""Talking to the key service: through the daemon when it runs, in-process when it does not.

`execute()` is what the CLI calls. Both paths run `Service.execute` and `Service.commit`, so
results and audit lines are the same. The daemon is used when its socket accepts a connection;
a missing socket or a refused connection (stale socket) means "not running" and the operation
runs in-process. A socket we may not open is an error, never a silent fallback.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any

from keysvc import audit, masterkey, paths, protocol, sockpath
from keysvc.errors import ERRORS_BY_CODE, DaemonError, KeysvcError, WrongMasterKeyError
from keysvc.keystore import open_keystore
from keysvc.service import Caller, Service, replay_uses

# below glibc's mmap threshold: recv(n) allocates n bytes first, and 1 MiB would cost an
# mmap/munmap pair (and page faults) on every call
_RECV_SIZE = 65536


def raise_for(header: dict[str, Any]) -> None:
    if not header.get("ok"):
        cls = ERRORS_BY_CODE.get(str(header.get("error")), KeysvcError)
        raise cls(str(header.get("message", "key service error")))


class DaemonClient:
    """A blocking connection to the daemon (one request at a time, or pipelined)."""

    def __init__(self, path: Path, timeout: float | None = 60.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            with sockpath.usable(path) as p:
                self.sock.connect(p)
        except BaseException:
            self.sock.close()
            raise
        self._buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        self.sock.sendall(protocol.encode(header, payload))

    def recv(self) -> tuple[dict[str, Any], bytes]:
        while True:
            frames = protocol.split_frames(self._buf)
            if frames:
                if len(frames) > 1:  # pipelined replies: keep the rest for the next recv
                    rest = b"".join(len(f).to_bytes(4, "big") + f for f in frames[1:])
                    self._buf[:0] = rest
                return protocol.decode(frames[0], reply=True)
            chunk = self.sock.recv(_RECV_SIZE)
            if not chunk:
                raise DaemonError("the key service closed the connection")
            self._buf += chunk

    def call(self, header: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
        try:
            self.send(header, payload)
        except (BrokenPipeError, ConnectionResetError):
            # the daemon closed the connection before reading the request (e.g. too many
            # connections from this uid): it sent the reason first, so read that
            try:
                return self.recv()
            except OSError:
                raise DaemonError("the key service closed the connection") from None
        return self.recv()


def connect(
    data_dir: str | os.PathLike[str] | None = None, sock: str | os.PathLike[str] | None = None
) -> DaemonClient | None:
    """A connection to the running daemon, or None when none is running."""
    path = paths.socket_path(sock, data_dir)
    try:
        return DaemonClient(path)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    except PermissionError:
        raise DaemonError(f"permission denied on the key service socket {path}") from None
    except OSError as e:
        raise DaemonError(f"cannot connect to the key service at {path}: {e.strerror}") from None


class Context:
    """What one CLI invocation knows: where things are and who is asking."""

    def __init__(
        self,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        audit_log: str | os.PathLike[str] | None = None,
        socket_path: str | os.PathLike[str] | None = None,
        master_key_hex: str | None = None,
        use_daemon: bool = True,
    ) -> None:
        self.data_dir = paths.data_dir(data_dir)
        self.audit_log = paths.audit_log_path(audit_log, self.data_dir)
        self.socket_path = socket_path
        self.master_key_hex = master_key_hex
        self.use_daemon = use_daemon
        self.user = audit.current_user(self.data_dir)

    def _explicit_master_key(self) -> bytes | None:
        """A master key the caller gave explicitly (argv or env); None when not given."""
        if self.master_key_hex:
            return masterkey.parse_hex(self.master_key_hex)
        env = os.environ.get("HSM_MASTER_KEY")
        return masterkey.parse_hex(env) if env else None

    def execute(self, header: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
        """Run one operation; raise the KeysvcError it failed with."""
        # the same check the service makes, before choosing a path: a value the daemon would
        # refuse as a malformed frame (NaN) gets the same message as in-process
        protocol.check_request(header)
        explicit = self._explicit_master_key()
        client = connect(self.data_dir, self.socket_path) if self.use_daemon else None
        if client is not None:
            req = dict(header)
            req["user"] = self.user
            if explicit is not None:
                req["mk_check"] = masterkey.check_value(explicit)
            with client:
                try:
                    reply, out = client.call(req, payload)
                except OSError as e:
                    raise DaemonError(f"key service connection failed: {e}") from None
            raise_for(reply)
            return reply, out
        return self._in_process(header, payload)

    def _in_process(self, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        writer = audit.writer_for(self.audit_log)
        caller = Caller(os.getuid(), os.getgid(), os.getpid(), self.user)
        mk, _source = masterkey.resolve(
            self.master_key_hex, self.data_dir, audit_log=self.audit_log, user=self.user
        )
        try:
            ks = open_keystore(self.data_dir, mk)
        except WrongMasterKeyError:
            # audited before the error reaches the user (fail-closed: an audit failure wins)
            writer.append(
                [
                    audit.AuditRecord(
                        "AUTH_FAILURE",
                        header.get("key") or "N/A",
                        self.user,
                        "wrong master key",
                        False,
                        caller.uid,
                    )
                ]
            )
            raise
        try:
            svc = Service(ks, writer, flush_interval=0.0)
            replay_uses(svc)  # uses a killed daemon acknowledged after its last save
            [(reply, out)] = svc.run_batch([(header, payload, caller)])
        finally:
            ks.close()
        raise_for(reply)
        return reply, out


def daemon_running(
    data_dir: str | os.PathLike[str] | None = None, sock: str | os.PathLike[str] | None = None
) -> bool:
    c = None
    with contextlib.suppress(KeysvcError):
        c = connect(data_dir, sock)
    if c is None:
        return False
    c.close()
    return True
