"""`vhsm ssh-agent`: the ssh-agent protocol (keysvc.sshagent) served on a Unix socket, backed
by the key service daemon.

The agent is an ordinary client of the daemon, running as the user who started it: the daemon
sees that uid through SO_PEERCRED and applies its policy to it, so one agent per user, and each
user gets exactly the keys the policy grants them. Like OpenSSH's agent, this one accepts
connections only from its own uid (and root): anyone who can talk to it acts as its user.

Serving: trio, one task per connection. Daemon requests are made on the event loop too, over a
small pool of daemon connections (at most POOL_SIZE requests in flight), so concurrent clients
are served concurrently, without a thread hop per message and without one daemon connection
per ssh process. Only opening a daemon connection runs in a thread: it is done by the CLI's own
helper (keysvc.client.find_daemon), so the agent finds the daemon exactly as the CLI does.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from keysvc import client, discovery, protocol, sshagent
from keysvc.errors import DaemonError, KeysvcError

POOL_SIZE = 16  # daemon requests in flight; the daemon allows 64 connections per uid
MAX_CONNECTIONS = 256  # agent clients at once; more are closed at once
DAEMON_TIMEOUT = 60.0  # seconds one daemon request may take
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# what a broken daemon connection raises (the request is then retried once, or failed)
_BROKEN = (
    OSError,
    KeysvcError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
)


class DaemonBackend:
    """sshagent.Backend through the key service daemon (async, on the agent's event loop)."""

    def __init__(self, lookup: discovery.Lookup, user: str) -> None:
        self.lookup = lookup  # where the CLI would look for the daemon (keysvc.discovery)
        self.user = user  # the audit user context (.hsm_user), as the CLI sends it
        self._idle: list[trio.SocketStream] = []
        self._slots: trio.Semaphore | None = None  # made inside the event loop

    async def _connect(self) -> trio.SocketStream:
        # the same discovery as the CLI (client.find_daemon); the agent never falls back to
        # in-process work: the daemon is what enforces the policy
        conn, _tried = await trio.to_thread.run_sync(client.find_daemon, self.lookup)
        if conn is None:
            raise DaemonError("the key service is not running")
        return trio.SocketStream(trio.socket.from_stdlib_socket(conn.sock))

    @staticmethod
    async def _roundtrip(stream: trio.SocketStream, frame: bytes) -> tuple[dict[str, Any], bytes]:
        with trio.fail_after(DAEMON_TIMEOUT):
            await stream.send_all(frame)
            buf = bytearray()
            while True:
                frames = protocol.split_frames(buf)
                if frames:  # one request at a time per connection: one reply
                    return protocol.decode(frames[0], reply=True)
                data = await stream.receive_some(65536)
                if not data:
                    raise DaemonError("the key service closed the connection")
                buf += data

    async def _call(
        self, req: dict[str, Any], payload: bytes = b""
    ) -> tuple[dict[str, Any], bytes]:
        req["user"] = self.user
        frame = protocol.encode(req, payload)
        if self._slots is None:
            self._slots = trio.Semaphore(POOL_SIZE)
        async with self._slots:
            stream = self._idle.pop() if self._idle else None
            result = None
            if stream is not None:
                try:
                    result = await self._roundtrip(stream, frame)
                except _BROKEN:
                    # a pooled connection the daemon closed meanwhile (e.g. it restarted): one
                    # more try on a fresh connection
                    await _close(stream)
                    stream = None
                except BaseException:
                    await _close(stream)
                    raise
            if stream is None:
                stream = await self._connect()
                try:
                    result = await self._roundtrip(stream, frame)
                except _BROKEN:
                    await _close(stream)
                    raise DaemonError("key service connection failed") from None
                except BaseException:
                    await _close(stream)
                    raise
            self._idle.append(stream)
        assert result is not None
        reply, out = result
        client.raise_for(reply)
        return reply, out

    async def identities(self) -> list[sshagent.Identity]:
        reply, _ = await self._call({"op": "ssh_identities"})
        return [
            sshagent.Identity(i["key"], int(i["version"]), i["type"], base64.b64decode(i["blob"]))
            for i in reply.get("identities", [])
        ]

    async def sign(self, ident: sshagent.Identity, data: bytes, hash_name: str | None) -> bytes:
        req: dict[str, Any] = {"op": "sign", "key": ident.key, "version": ident.version}
        req["ssh"] = True
        if hash_name is not None:
            req["hash"] = hash_name
        _, sig = await self._call(req, data)
        return sig

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for stream in idle:
            await _close(stream)


async def _close(stream: trio.SocketStream) -> None:
    with trio.CancelScope(shield=True), contextlib.suppress(Exception):
        await stream.aclose()


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
                answer = await self.agent.handle(m)
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

    async def main() -> None:
        try:
            await Server(listener, agent, log).run()
        finally:
            await backend.aclose()

    trio.run(main)


def default_socket_dir() -> Path:
    """A fresh 0700 directory under $TMPDIR or /tmp, like ssh-agent's /tmp/ssh-XXXXXXXXXX."""
    import tempfile

    base = os.environ.get("TMPDIR") or "/tmp"  # noqa: S108 (mkdtemp: private, unpredictable)
    return Path(tempfile.mkdtemp(prefix="ssh-", dir=base))
