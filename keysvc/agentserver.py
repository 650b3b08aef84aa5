"""`vhsm ssh-agent`: the ssh-agent protocol (keysvc.sshagent) served on a Unix socket, backed
by the key service daemon.

The agent is an ordinary client of the daemon, running as the user who started it: the daemon
sees that uid through SO_PEERCRED and applies its policy to it, so one agent per user, and each
user gets exactly the keys the policy grants them. Like OpenSSH's agent, this one accepts
connections only from its own uid (and root): anyone who can talk to it acts as its user.

Serving: trio, one task per connection. Each message is handled in a worker thread
(trio.to_thread, at most POOL_SIZE at once) that uses a blocking DaemonClient taken from a small
pool of daemon connections, so the event loop never blocks and concurrent clients are served
concurrently without one daemon connection per ssh process.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import struct
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from keysvc import client, sshagent
from keysvc.errors import DaemonError

POOL_SIZE = 16  # concurrent daemon calls; the daemon allows 64 connections per uid
MAX_CONNECTIONS = 256  # agent clients at once; more are closed at once
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class DaemonBackend:
    """sshagent.Backend through the key service daemon (blocking; thread-safe)."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None,
        socket_path: str | os.PathLike[str] | None,
        user: str,
    ) -> None:
        self.data_dir = data_dir
        self.socket_path = socket_path
        self.user = user  # the audit user context (.hsm_user), as the CLI sends it
        self._idle: list[client.DaemonClient] = []
        self._lock = threading.Lock()

    def _call(self, req: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
        req["user"] = self.user
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is not None:
            try:
                reply, out = conn.call(req, payload)
            except (OSError, DaemonError):
                # a pooled connection the daemon closed meanwhile (e.g. it restarted): one
                # more try on a fresh connection
                conn.close()
                conn = None
        if conn is None:
            conn = self._connect()
            try:
                reply, out = conn.call(req, payload)
            except (OSError, DaemonError):
                conn.close()
                raise DaemonError("key service connection failed") from None
        with self._lock:
            if len(self._idle) < POOL_SIZE:
                self._idle.append(conn)
                conn = None
        if conn is not None:
            conn.close()
        client.raise_for(reply)
        return reply, out

    def _connect(self) -> client.DaemonClient:
        # the same discovery as the CLI (paths.socket_path via client.connect); the agent
        # never falls back to in-process work: the daemon is what enforces the policy
        conn = client.connect(self.data_dir, self.socket_path)
        if conn is None:
            raise DaemonError("the key service is not running")
        return conn

    def identities(self) -> list[sshagent.Identity]:
        reply, _ = self._call({"op": "ssh_identities"})
        return [
            sshagent.Identity(i["key"], int(i["version"]), i["type"], base64.b64decode(i["blob"]))
            for i in reply.get("identities", [])
        ]

    def sign(self, ident: sshagent.Identity, data: bytes, hash_name: str | None) -> bytes:
        req = {"op": "sign", "key": ident.key, "version": ident.version, "ssh": True}
        if hash_name is not None:
            req["hash"] = hash_name
        _, sig = self._call(req, data)
        return sig

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()


def peer_uid(sock: socket.socket) -> int:
    _pid, uid, _gid = _CRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    )
    return uid


class Server:
    def __init__(
        self,
        listener: socket.socket,
        agent: sshagent.Agent,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.listener = listener
        self.agent = agent
        self.log = log or (lambda _m: None)
        self.limiter = trio.CapacityLimiter(POOL_SIZE)
        self.connections = 0
        self.allowed_uids = {os.geteuid(), 0}

    async def _connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                uid = peer_uid(stream.socket)  # type: ignore[arg-type]
            except OSError:
                return
            if uid not in self.allowed_uids:
                self.log(f"refused a connection from uid {uid}")
                return
            if self.connections >= MAX_CONNECTIONS:
                self.log("too many connections")
                return
            self.connections += 1
            try:
                await self._serve(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away
            except Exception as e:  # one connection must not end the agent
                self.log(f"connection failed: {type(e).__name__}")
            finally:
                self.connections -= 1

    async def _serve(self, stream: trio.SocketStream) -> None:
        buf = bytearray()
        while True:
            try:
                msgs = sshagent.split(buf)
            except sshagent.FrameTooLarge as e:
                # the rest of the stream cannot be framed: answer, then close (as OpenSSH)
                self.log(str(e))
                await stream.send_all(sshagent.FAILURE)
                return
            if not msgs:
                data = await stream.receive_some(65536)
                if not data:
                    return  # EOF, possibly inside a truncated frame: nothing to answer
                buf += data
                continue
            for m in msgs:
                answer = await trio.to_thread.run_sync(self.agent.handle, m, limiter=self.limiter)
                await stream.send_all(answer)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        tsock = trio.socket.from_stdlib_socket(self.listener)
        listener = trio.SocketListener(tsock)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.serve_listeners, self._connection, [listener])
                task_status.started()
                async for sig in sigs:
                    self.log(f"stopping on signal {sig}")
                    nursery.cancel_scope.cancel()
                    break


def serve(
    listener: socket.socket,
    backend: DaemonBackend,
    *,
    debug: bool = False,
) -> None:
    """Serve until SIGTERM/SIGINT/SIGHUP. `listener` is bound and listening."""

    def log(msg: str) -> None:
        if debug:
            with contextlib.suppress(OSError):
                print(f"vhsm ssh-agent: {msg}", file=sys.stderr, flush=True)

    agent = sshagent.Agent(backend, log)
    try:
        trio.run(Server(listener, agent, log).run)
    finally:
        backend.close()


def default_socket_dir() -> Path:
    """A fresh 0700 directory under $TMPDIR or /tmp, like ssh-agent's /tmp/ssh-XXXXXXXXXX."""
    import tempfile

    base = os.environ.get("TMPDIR") or "/tmp"  # noqa: S108 (mkdtemp: private, unpredictable)
    return Path(tempfile.mkdtemp(prefix="ssh-", dir=base))
