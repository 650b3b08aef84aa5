"""`vhsm keysvc serve`: the key service daemon (trio, Unix socket).

Three threads. The trio event loop accepts connections, handles signals and timers, and
finishes replies too big for a socket buffer (writer tasks). The hot path is two threads:

* the worker (started once with trio.to_thread.run_sync) waits on an epoll set holding every
  client socket, reads every request that is ready, and decodes and executes them in order as
  one batch (crypto; Ed25519 signing releases the GIL);
* the committer takes every batch executed meanwhile, appends all their audit lines with one
  write + one fdatasync (group commit) and sends the replies with non-blocking writes.

So batch n+1 executes while batch n is on disk and being answered, and requests that arrive
meanwhile form the next batch. Batches are committed in the order they executed. A batch that
must save keystore.dat (it changed keys or lifecycle) and the periodic chores wait until the
committer is idle and then run in the worker, so keystore.dat is only ever saved with every
executed use already in the log.

Why the worker reads the sockets itself: when the event loop read them and queued the frames,
every request cost a hand-over between two threads competing for the GIL, which measured as
about a quarter of the daemon's CPU time per signature. The event loop still owns everything
that is not per request, and a pipe in the epoll set lets it wake the worker (stop, chores).

Durability: a reply leaves the daemon only after its audit line (and, for operations that change
keys or lifecycle, the new keystore.dat) is on disk. A kill -9 can lose only requests that were
never answered; their audit lines may or may not be present (never the reverse).

Locked start: when every protector slot that could unlock the master key needs a person (a
passphrase, a FIDO2 touch) and nobody gave the secret (no HSM_MASTER_PASSPHRASE, no terminal,
as under systemd), the daemon starts without its keystore and answers only `status` and
`unlock`; every other request gets one line, "the key service is locked". `vhsm keysvc unlock`
sends the secret over the socket; only the service's own user (or root) may, and a refused
unlock is audited AUTH_FAILURE, a successful one AUTH_SUCCESS.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import queue
import resource
import select
import signal
import socket as pysocket
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from keysvc import audit, masterkey, paths, protectorslots, protocol, sockpath
from keysvc.errors import (
    AccessDenied,
    DaemonError,
    InvalidInputError,
    KeysvcError,
    LockedError,
    NeedsPersonError,
)
from keysvc.hardening import harden
from keysvc.keystore import Keystore, open_keystore
from keysvc.policy import DEFAULT_GROUP_TTL, Policy
from keysvc.service import Caller, Pending, Service, auto_rotate_batch, error_reply, replay_uses

_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# below glibc's mmap threshold: recv(n) allocates n bytes first, and 1 MiB would cost an
# mmap/munmap pair (and page faults) on every call
_RECV_SIZE = 65536


@dataclass
class DaemonConfig:
    data_dir: Path
    socket: Path
    audit_log: Path
    policy: Path | None = None
    socket_mode: int = 0o660
    rotation_check_interval: float = 60.0
    flush_interval: float = 2.0  # seconds between saves of usage counters (see docs)
    harden: bool = True
    # Connections open at once, and from one uid other than the owner (see docs, "Limits").
    # The total is lowered to fit under RLIMIT_NOFILE at start.
    max_connections: int = 1024
    max_connections_per_uid: int = 64
    group_cache_ttl: float = DEFAULT_GROUP_TTL  # seconds a group membership lookup is trusted


class _Conn:
    """One client connection. Replies are written directly by the thread that commits them
    (a non-blocking send, which for small replies always completes); what does not fit is
    finished by a writer task on the event loop. `lock` orders the two writers and keeps a
    thread from sending on a socket the loop has closed."""

    __slots__ = ("sock", "fd", "cred", "out", "queued", "writing", "paused", "closed", "lock")

    def __init__(self, sock: pysocket.socket, cred: tuple[int, int, int]) -> None:
        self.sock = sock
        self.fd = sock.fileno()  # kept: fileno() is -1 once closed
        self.cred = cred
        self.out = bytearray()
        self.queued = 0  # replies queued in `out` since it was last empty
        self.writing = False
        self.paused = False  # not read from until its replies drain (see _start_writer)
        self.closed = False
        self.lock = threading.Lock()

    def send(self, data: bytes) -> bool:
        """Send or queue (any thread); True when the event loop must act (_start_writer):
        start a writer task, or stop reading from a client whose replies pile up."""
        with self.lock:
            if self.closed:
                return False
            if self.out:
                self.out += data
                self.queued += 1
                return not self.writing or self.over_limit()
            try:
                n = self.sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError:
                return False  # the reader will see the error and close
            if n == len(data):
                return False
            self.out += data[n:]
            self.queued = 1
            return True

    def over_limit(self) -> bool:
        """Too many unsent replies: by size (large replies are fine, as long as the client
        reads them), or by number (a flood of small ones from a client that reads nothing)."""
        return not self.paused and (len(self.out) > _OUT_LIMIT or self.queued > _OUT_REPLIES)


@dataclass(slots=True)
class _Executed:
    """A batch the worker executed, on its way to the committer."""

    batch: list[tuple[bytes, _Conn]]
    ids: list[Any]  # request ids, echoed in the replies
    slots: list[int | bytes]  # per frame: index into the replies, or an encoded error reply
    pending: Pending | None


@dataclass(slots=True)
class _Goodbyes:
    """Connections that broke the framing: an error reply each, then the close."""

    items: list[tuple[_Conn, bytes]]


_FLUSH = object()  # end of what the committer took from its queue
# Stop reading from a client whose unsent replies exceed these (it does not read them), until
# they drain. The size allows pipelined large requests (a client may send several before it
# reads); the count bounds a flood of small error replies (a few hundred bytes each).
_OUT_LIMIT = 64 * 1024 * 1024
_OUT_REPLIES = 256
# File descriptors kept free for the daemon itself (audit log and sidecars, keystore temp
# files, trio, epoll, pipes): the connection limit is lowered to fit under RLIMIT_NOFILE.
_FD_RESERVE = 64
# accept() errors that mean "out of resources for now" (as trio's serve_listeners): wait, retry
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_RETRY = 0.1
_STOP = object()  # queue marker: finish and leave the worker loop
_CHORES = object()  # queue marker: auto-rotation check and saving use counters


class Daemon:
    def __init__(self, cfg: DaemonConfig) -> None:
        self.cfg = cfg
        os.umask(0o077)
        self.started = time.time()
        mk: bytes | None = None
        try:
            mk, self.mk_source = masterkey.resolve(
                None,
                cfg.data_dir,
                audit_log=cfg.audit_log,
                user="vhsm-keysvc",
                opener=protectorslots.unattended_opener(),
            )
        except NeedsPersonError as e:
            # only protectors that need a person (passphrase, FIDO2 touch): serve locked until
            # `vhsm keysvc unlock` brings the secret; every other request is refused meanwhile
            self.mk_source = "locked"
            self._log(f"starting locked ({e}): run vhsm keysvc unlock")
        self.writer = audit.AuditWriter(cfg.audit_log)
        self.owner = os.geteuid()
        self.me = Caller(self.owner, os.getegid(), os.getpid(), "vhsm-keysvc")
        self.service: Service | None = None
        if mk is None:
            self.policy = self._load_policy()
        else:
            ks = self._open_keystore(mk, "wrong master key at daemon start")
            del mk
            self.policy = self._load_policy()
            self._start_service(ks)
        # messages for the worker (stop, chores), with a pipe in its epoll set to wake it
        self._control: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # executed batches waiting for the committer; bounded, so that execution cannot run
        # ahead of the disk by more than a few batches
        self._commits: queue.Queue[Any] = queue.Queue(maxsize=8)
        self._commit_failure: BaseException | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._token: trio.lowlevel.TrioToken | None = None
        self._worker_exited = threading.Event()
        self._worker_done = trio.Event()
        self._next_rotation = 0.0
        self._callers: dict[tuple[Any, ...], Caller] = {}
        self._conns: dict[int, tuple[_Conn, protocol.FrameReader]] = {}
        self._conns_lock = threading.Lock()  # opens (event loop) and closes (either thread)
        self._per_uid: dict[int, int] = {}  # open connections per uid (under _conns_lock)
        self.max_connections = _fit_connections(cfg.max_connections, self._log)
        self._refusal_logged = 0.0
        self._epoll = select.epoll()
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._nursery: trio.Nursery | None = None
        self._loop_thread = 0
        self.crash: BaseException | None = None  # what stopped the daemon, if not a signal
        self._socket_ident = (0, 0)  # (dev, ino) of the socket file bound (sockpath.remove)

    def _open_keystore(self, mk: bytes, failure: str) -> Keystore:
        try:
            return open_keystore(self.cfg.data_dir, mk, lock_wait=0.0)
        except KeysvcError as e:
            if e.code == "wrong_master_key":
                self.writer.append(
                    [
                        audit.AuditRecord(
                            "AUTH_FAILURE", "N/A", "vhsm-keysvc", failure, False, self.owner
                        )
                    ]
                )
            raise

    def _start_service(self, ks: Keystore) -> None:
        service = Service(ks, self.writer, policy=self.policy, flush_interval=float("inf"))
        recovered = replay_uses(service)
        if recovered:
            # a previous daemon died between two saves of its counters: the log has the uses
            service.flush()
            self._log(f"recovered {recovered} use(s) from the audit log")
        self.service = service

    # -- locked: only `status` and `unlock` (keysvc/daemon.py's module doc, "Locked start")

    def _locked_reply(
        self, cred: tuple[int, int, int], header: dict[str, Any], payload: bytes | None
    ) -> tuple[dict[str, Any], bytes]:
        op = header.get("op")
        _pid, uid, gid = cred
        try:
            if op == "status":
                # as unlocked: a uid the policy gives nothing learns nothing, not even this
                if not self.policy.grants_any(uid, gid):
                    raise AccessDenied(f"access denied: uid {uid} may not status")
                return {
                    "ok": True,
                    "locked": True,
                    "pid": os.getpid(),
                    "uptime": time.time() - self.started,
                }, b""
            if op != "unlock":
                raise LockedError("the key service is locked: run vhsm keysvc unlock")
            return self._unlock(uid, payload, header.get("kind") or protectorslots.PASSPHRASE)
        except KeysvcError as e:
            return error_reply(e)

    def _unlock(self, uid: int, payload: bytes | None, kind: str) -> tuple[dict[str, Any], bytes]:
        """Unlock through the slots of `kind` with the secret the client sent (a passphrase, or
        a FIDO2 PIN, empty when the key has none: the daemon talks to the security key itself
        and waits for its touch); only the service's own user (or root) may, as only they
        could have started it unlocked."""
        who = audit.unix_user(uid)
        if uid not in (self.owner, 0):
            self.writer.append(
                [
                    audit.AuditRecord(
                        "AUTH_FAILURE",
                        "N/A",
                        who,
                        "key service unlock: not the service's user",
                        False,
                        uid,
                    )
                ]
            )
            raise AccessDenied("only the key service's own user (or root) may unlock it")
        if payload is None:  # refused when its header arrived: cannot happen for these uids
            raise InvalidInputError("unlock needs the secret as its payload")
        try:
            secret = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInputError("the unlock secret is not UTF-8") from None
        if kind not in (protectorslots.PASSPHRASE, protectorslots.FIDO2):
            raise InvalidInputError(
                f"unlock takes {protectorslots.PASSPHRASE} or {protectorslots.FIDO2} slots"
            )
        opener = protectorslots.kind_opener(kind, secret)
        mk = protectorslots.unlock_data_dir(
            self.cfg.data_dir, opener, audit_log=self.cfg.audit_log, user=who
        )
        ks = self._open_keystore(mk, "wrong master key at unlock")
        del mk
        self._start_service(ks)
        self.mk_source = "unlock"
        self.writer.append(
            [audit.AuditRecord("AUTH_SUCCESS", "N/A", who, "key service unlocked", True, uid)]
        )
        self._log(f"unlocked by uid {uid}")
        return {"ok": True, "unlocked": True}, b""

    def _execute_locked(self, batch: list[tuple[protocol.Item, _Conn]]) -> _Executed:
        slots: list[int | bytes] = []
        for item, conn in batch:
            if type(item) is bytes:
                try:
                    header, payload = protocol.decode(item)
                except KeysvcError as e:
                    slots.append(protocol.encode(*error_reply(e)))
                    continue
                reply, out = self._locked_reply(conn.cred, header, payload)
            elif type(item) is dict:  # refused when its header arrived
                reply, out = self._locked_reply(conn.cred, item, None)
            else:
                slots.append(protocol.encode(*error_reply(item)))  # type: ignore[arg-type]
                continue
            rid = header.get("id") if type(item) is bytes else item.get("id")
            if rid is not None:
                reply["id"] = rid
            slots.append(protocol.encode(reply, out))
        return _Executed(batch, [], slots, None)

    def _policy_path(self) -> Path | None:
        if self.cfg.policy is not None:
            return self.cfg.policy
        p = self.cfg.data_dir / paths.POLICY_NAME
        # lexists: a symlink there is refused when loading, not taken as "no policy"
        return p if os.path.lexists(p) else None

    def _load_policy(self) -> Policy:
        return Policy.load(self._policy_path(), self.owner, group_ttl=self.cfg.group_cache_ttl)

    # -- a batch: executed by the worker, committed and answered by the committer

    def _caller(self, cred: tuple[int, int, int], user: object, mk_check: object) -> Caller:
        """Callers are cached per (peer credentials, claimed user, master-key check)."""
        user = user if isinstance(user, str) else None  # only hashable, meaningful values
        mk_check = mk_check if isinstance(mk_check, str) else None
        key = (cred, user, mk_check)
        c = self._callers.get(key)
        if c is None:
            pid, uid, gid = cred
            try:
                name = audit.validate_user(user) if isinstance(user, str) else audit.unix_user(uid)
            except KeysvcError:
                name = audit.unix_user(uid)
            c = Caller(uid, gid, pid, name, mk_check if isinstance(mk_check, str) else None)
            if len(self._callers) > 4096:
                self._callers.clear()
            self._callers[key] = c
        return c

    def _admit(self, cred: tuple[int, int, int], header: dict[str, Any]) -> bool:
        """May this request's payload be buffered? (asked by the connection's FrameReader)"""
        if self.service is None:  # locked: only an unlock by the owner brings a payload
            return header.get("op") == "unlock" and cred[1] in (self.owner, 0)
        caller = self._caller(cred, header.get("user"), header.get("mk_check"))
        return self.service.admit(header, caller) is None

    def _execute(self, batch: list[tuple[protocol.Item, _Conn]]) -> _Executed:
        if self.service is None:
            return self._execute_locked(batch)
        items: list[tuple[dict[str, Any], bytes | None, Caller]] = []
        slots: list[int | bytes] = []
        for item, conn in batch:
            payload: bytes | None
            if type(item) is bytes:
                try:
                    header, payload = protocol.decode(item)
                except KeysvcError as e:
                    slots.append(protocol.encode(*error_reply(e)))
                    continue
            elif type(item) is dict:  # refused when its header arrived; payload discarded
                header, payload = item, None
            else:  # a header that was not valid
                slots.append(protocol.encode(*error_reply(item)))  # type: ignore[arg-type]
                continue
            caller = self._caller(conn.cred, header.get("user"), header.get("mk_check"))
            items.append((header, payload, caller))
            slots.append(len(items) - 1)
        # every header came through protocol.parse_header, which checked its fields
        pending = self.service.execute(items, checked=True) if items else None
        return _Executed(batch, [h.get("id") for h, _, _ in items], slots, pending)

    def _finish(self, run: list[_Executed]) -> None:
        """Commit executed batches with one audit append (one write, one fdatasync), then
        send their replies."""
        pendings = [ex.pending for ex in run if ex.pending is not None]
        if len(pendings) == 1:
            replies = self.service.commit(pendings[0])
        elif pendings:
            replies = self.service.commit(
                Pending(
                    [r for p in pendings for r in p.records],
                    [r for p in pendings for r in p.replies],
                    structural=False,  # structural batches are committed alone
                    need_save=False,
                )
            )
        else:
            replies = []
        base = 0
        for ex in run:
            for (_, conn), slot in zip(ex.batch, ex.slots, strict=True):
                if isinstance(slot, bytes):
                    frame = slot
                else:
                    header, payload = replies[base + slot]
                    rid = ex.ids[slot]
                    if rid is not None:
                        header["id"] = rid
                    try:
                        frame = protocol.encode(header, payload)
                    except KeysvcError as e:  # e.g. a NaN stored by an older version
                        frame = protocol.encode(*error_reply(e))
                if conn.send(frame):
                    self._to_loop(self._start_writer, conn)
            if ex.pending is not None:
                base += len(ex.pending.replies)

    # -- the worker threads

    def _worker_loop(self) -> None:
        """The worker, for the daemon's whole life: wait on the epoll set of client sockets,
        read every ready request, execute them as one batch and hand it to the committer
        (started here). Requests that arrive meanwhile wait in their socket buffers and make
        the next batch."""
        ep = self._epoll
        wake = self._wake_r
        committer = threading.Thread(target=self._commit_loop, name="vhsm-keysvc-commit")
        committer.start()
        try:
            while True:
                events = ep.poll()
                batch: list[tuple[protocol.Item, _Conn]] = []
                goodbyes: list[tuple[_Conn, bytes]] = []
                stop = chores = False
                for fd, _ev in events:
                    if fd != wake:
                        self._read(fd, batch, goodbyes)
                        continue
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake, 4096)
                    while True:
                        try:
                            it = self._control.get_nowait()
                        except queue.Empty:
                            break
                        if it is _STOP:
                            stop = True
                        elif it is _CHORES:
                            chores = True
                if self._commit_failure is not None:
                    raise self._commit_failure
                if batch:
                    ex = self._execute(batch)
                    if ex.pending is not None and ex.pending.need_save:
                        self._drain()  # keystore.dat is saved with every executed use logged
                        self._finish([ex])
                    else:
                        self._commits.put(ex)
                if goodbyes:
                    self._commits.put(_Goodbyes(goodbyes))
                if chores:
                    self._drain()
                    self._chores()
                if stop:
                    self._drain()
                    return
        finally:
            self._commits.put(None)
            committer.join()
            self._worker_exited.set()

    def _commit_loop(self) -> None:
        """The committer thread: group commit of everything executed while the previous
        commit was on disk. A threading.Event in the queue is set once every batch before
        it is committed and answered (see _drain); None ends the thread."""
        q = self._commits
        while True:
            items = [q.get()]
            while True:
                try:
                    items.append(q.get_nowait())
                except queue.Empty:
                    break
            run: list[_Executed] = []
            for it in [*items, _FLUSH]:
                if isinstance(it, _Executed):
                    run.append(it)
                    continue
                if run:
                    try:
                        self._finish(run)
                    except BaseException as e:
                        # a bug, not a failed commit (those become error replies): the worker
                        # raises it, and the daemon stops rather than serve on
                        self._commit_failure = e
                        self._wake_worker()
                    run = []
                if it is None:
                    return
                if isinstance(it, threading.Event):
                    it.set()
                elif isinstance(it, _Goodbyes):
                    for conn, frame in it.items:
                        conn.send(frame)
                        self._close(conn)

    def _drain(self) -> None:
        """Wait until every batch handed to the committer is committed and answered."""
        done = threading.Event()
        self._commits.put(done)
        done.wait()

    def _tell_worker(self, item: object) -> None:
        self._control.put(item)
        self._wake_worker()

    def _wake_worker(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def _read(
        self,
        fd: int,
        batch: list[tuple[protocol.Item, _Conn]],
        goodbyes: list[tuple[_Conn, bytes]],
    ) -> None:
        """Read what one client sent; whole requests (and refusals decided on a header) go
        into the batch, a connection that broke the framing into goodbyes (an error reply,
        then the close)."""
        entry = self._conns.get(fd)
        if entry is None:
            return
        conn, reader = entry
        try:
            data = conn.sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        if (
            not reader.buf
            and not reader.skip
            and len(data) >= 4
            and int.from_bytes(data[:4], "big") == len(data) - 4
        ):
            batch.append((data[4:], conn))  # the common case: exactly one whole request
            return
        for item in reader.feed(data):
            batch.append((item, conn))
        if reader.broken is not None:
            # read nothing more from it; the error and the close go through the committer,
            # after the replies to the requests it sent before
            with contextlib.suppress(OSError, ValueError):
                self._epoll.modify(conn.fd, 0)
            goodbyes.append((conn, protocol.encode(*error_reply(reader.broken))))

    def _chores(self) -> None:
        if self.service is None:
            return
        if time.monotonic() >= self._next_rotation:
            self._next_rotation = time.monotonic() + self.cfg.rotation_check_interval
            auto_rotate_batch(self.service, self.me)
        summaries = self.service.denial_summaries()
        if summaries:
            self.service.commit(Pending(summaries, [], structural=False, need_save=False))
        with contextlib.suppress(KeysvcError):
            self.service.flush()

    def _to_loop(self, fn: Any, *args: Any) -> None:
        if self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(fn, *args)

    # -- trio tasks

    async def _worker_host(self) -> None:
        try:
            await trio.to_thread.run_sync(self._worker_loop, abandon_on_cancel=True)
        except trio.Cancelled:
            # shutting down for another reason: let the worker finish its batch first
            self._tell_worker(_STOP)
            self._worker_exited.wait(30)
            raise
        finally:
            self._worker_done.set()

    async def _ticker(self) -> None:
        """Ask the worker for its chores regularly (serialized with the batches that way)."""
        while True:
            await trio.sleep(min(self.cfg.flush_interval, self.cfg.rotation_check_interval))
            self._tell_worker(_CHORES)

    # Connections: the event loop accepts them and puts them in the worker's epoll set; the
    # worker reads them. epoll_ctl is thread-safe.

    def _open(self, sock: pysocket.socket) -> None:
        try:
            cred = _CRED.unpack(
                sock.getsockopt(pysocket.SOL_SOCKET, pysocket.SO_PEERCRED, _CRED.size)
            )
        except OSError:
            sock.close()
            return
        uid = cred[1]
        sock.setblocking(False)
        conn = _Conn(sock, cred)
        with self._conns_lock:
            refusal = self._over_limit(uid)
            if refusal is None:
                try:
                    self._epoll.register(conn.fd, select.EPOLLIN | select.EPOLLRDHUP)
                except OSError as e:  # ENOMEM/ENOSPC (max_user_watches): like a full table
                    refusal = f"the key service cannot take more connections ({e.strerror})"
            if refusal is None:
                reader = protocol.FrameReader(functools.partial(self._admit, cred))
                self._conns[conn.fd] = (conn, reader)
                self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
                return
        self._refuse_connection(sock, uid, refusal)

    def _over_limit(self, uid: int) -> str | None:
        """Why a new connection from uid is refused (None: it is not); under _conns_lock."""
        if len(self._conns) >= self.max_connections:
            return f"too many connections to the key service (limit {self.max_connections})"
        n = self._per_uid.get(uid, 0)
        if uid != self.owner and n >= self.cfg.max_connections_per_uid:
            return f"too many connections from uid {uid} (limit {self.cfg.max_connections_per_uid})"
        return None

    def _refuse_connection(self, sock: pysocket.socket, uid: int, reason: str) -> None:
        """Tell the client why (its first recv reads it), then close. What it already sent is
        read and dropped first: closing a Unix socket with unread data resets it, and the
        client would lose the reason."""
        with contextlib.suppress(OSError):
            sock.send(protocol.encode(*error_reply(DaemonError(reason))))
            for _ in range(4):
                if not sock.recv(_RECV_SIZE):
                    break
        sock.close()
        now = time.monotonic()
        if now - self._refusal_logged >= 10:  # one line per 10 s at most, whatever the flood
            self._refusal_logged = now
            self._log(f"connection from uid {uid} refused: {reason}")

    def _close(self, conn: _Conn) -> None:
        """Close a connection; from either thread, any number of times."""
        with self._conns_lock:
            entry = self._conns.get(conn.fd)
            if entry is not None and entry[0] is conn:
                del self._conns[conn.fd]
                uid = conn.cred[1]
                left = self._per_uid.get(uid, 1) - 1
                if left > 0:
                    self._per_uid[uid] = left
                else:
                    self._per_uid.pop(uid, None)
                # before close(): once closed, the fd number may belong to a new client
                with contextlib.suppress(OSError, ValueError):
                    self._epoll.unregister(conn.fd)
        with conn.lock:
            conn.closed = True
            if conn.writing:
                # its writer task closes it; only the event loop's thread may wake that task
                if threading.get_ident() == self._loop_thread:
                    self._wake_writer(conn)
                else:
                    self._to_loop(self._wake_writer, conn)
            elif conn.sock.fileno() != -1:
                conn.sock.close()

    @staticmethod
    def _wake_writer(conn: _Conn) -> None:
        if conn.sock.fileno() != -1:
            trio.lowlevel.notify_closing(conn.sock)

    def _start_writer(self, conn: _Conn) -> None:
        """A reply did not fit the socket buffer: finish it in a writer task, and stop reading
        from a client that lets replies pile up."""
        with conn.lock:
            if conn.closed or not conn.out:
                return
            if conn.over_limit():
                # under the lock: the writer resumes reading under it when the replies drain
                conn.paused = True
                with contextlib.suppress(OSError, ValueError):
                    self._epoll.modify(conn.fd, 0)
            if conn.writing:
                return
            conn.writing = True
        assert self._nursery is not None
        self._nursery.start_soon(self._writer, conn)

    async def _writer(self, conn: _Conn) -> None:
        try:
            while True:
                with conn.lock:
                    if conn.closed:
                        break
                    if not conn.out:
                        conn.writing = False
                        conn.queued = 0
                        if conn.paused:
                            conn.paused = False
                            with contextlib.suppress(OSError, ValueError):
                                self._epoll.modify(conn.fd, select.EPOLLIN | select.EPOLLRDHUP)
                        return
                    try:
                        n = conn.sock.send(conn.out)
                        del conn.out[:n]
                        continue
                    except BlockingIOError:
                        pass
                await trio.lowlevel.wait_writable(conn.sock)
        except (OSError, trio.ClosedResourceError):
            pass
        # the connection is gone (or failed): close it here, where nobody else writes
        with conn.lock:
            conn.writing = False
            conn.closed = True
        self._close(conn)

    async def _accept(self, listener: pysocket.socket) -> None:
        """Accept connections. Out of file descriptors or memory (EMFILE, ENFILE, ENOMEM,
        ENOBUFS) is a state to wait out, as trio's serve_listeners does: retry every 0.1 s
        (the clients wait in the listen backlog), and say so at most once per 10 s."""
        logged = -10.0
        while True:
            await trio.lowlevel.wait_readable(listener)
            while True:
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno in _ACCEPT_CAPACITY_ERRNOS:
                        if time.monotonic() - logged >= 10:
                            logged = time.monotonic()
                            self._log(
                                f"accept: {errno.errorcode[e.errno]} ({e.strerror}); "
                                f"retrying every {_ACCEPT_RETRY} s"
                            )
                        await trio.sleep(_ACCEPT_RETRY)
                        continue
                    if e.errno in (errno.ECONNABORTED, errno.EINTR, errno.EPROTO):
                        continue  # that client gave up: nothing to do
                    raise
                self._open(sock)

    async def _signals(self, cancel: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for sig in sigs:
                if sig == signal.SIGHUP:  # reload the access policy
                    try:
                        # a new Policy also forgets every cached group membership
                        self.policy = self._load_policy()
                        if self.service is not None:
                            self.service.policy = self.policy
                        self._log("access policy reloaded")
                    except KeysvcError as e:
                        self._log(f"policy reload failed, keeping the old one: {e}")
                    continue
                self._log(f"signal {signal.Signals(sig).name}: shutting down")
                self._tell_worker(_STOP)  # the batch in progress is finished and answered
                await self._worker_done.wait()
                cancel.cancel()
                return

    def _log(self, msg: str) -> None:
        print(f"vhsm keysvc: {msg}", file=sys.stderr, flush=True)

    def _bind(self) -> pysocket.socket:
        # listen() comes once the daemon is ready (see run)
        s, self._socket_ident = sockpath.bind(self.cfg.socket, self.cfg.socket_mode)
        return s

    async def run(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._loop_thread = threading.get_ident()
        listener = self._bind()
        listener.setblocking(False)
        self.writer.append(
            [
                audit.AuditRecord(
                    "CONFIG_CHANGE",
                    "N/A",
                    "vhsm-keysvc",
                    f"key service started (pid {os.getpid()})",
                    True,
                    self.owner,
                )
            ]
        )
        # Connections are refused until now: a client that got in finds the start in the log.
        listener.listen(512)
        self._log(f"listening on {self.cfg.socket} (pid {os.getpid()})")
        crash: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals, nursery.cancel_scope)
                nursery.start_soon(self._worker_host)
                nursery.start_soon(self._ticker)
                self._nursery = nursery
                nursery.start_soon(self._accept, listener)
        except BaseException as e:
            crash = self.crash = e  # a normal stop cancels the nursery, which raises nothing
            raise
        finally:
            trio.lowlevel.notify_closing(listener)
            listener.close()
            for conn, _ in list(self._conns.values()):
                self._close(conn)
            self._epoll.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            sockpath.remove(self.cfg.socket, self._socket_ident)
            self._shutdown(crash)

    def _shutdown(self, crash: BaseException | None = None) -> None:
        """Log the stop. After a crash nothing is saved (the in-memory keystore may hold a
        change that was never committed; use counters come back from the audit log at the
        next start) and the stop is logged as a crash, never as the normal one."""
        self._token = None
        pid = os.getpid()
        if crash is not None:
            what = crash_summary(crash)
            self._log(f"key service crashed: {what}")
            record = audit.AuditRecord(
                "CONFIG_CHANGE",
                "N/A",
                "vhsm-keysvc",
                f"key service crashed: {type(_leaf(crash)).__name__} (pid {pid})",
                False,
                self.owner,
            )
        else:
            record = audit.AuditRecord(
                "CONFIG_CHANGE",
                "N/A",
                "vhsm-keysvc",
                f"key service stopped (pid {pid})",
                True,
                self.owner,
            )
        try:
            if crash is None and self.service is not None:
                self.service.flush()
            self.writer.append([record])
        except KeysvcError as e:
            self._log(f"shutdown: {e}")
        finally:
            if self.service is not None:
                self.service.ks.close()
            self.writer.close()


def _leaf(e: BaseException) -> BaseException:
    """The exception itself, out of the exception groups trio wraps it in."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


def crash_summary(e: BaseException) -> str:
    """The exception's type and where it was raised, without its message (which could quote
    data the daemon handled) and without locals: fit for stderr and the journal."""
    leaf = _leaf(e)
    frames = traceback.extract_tb(leaf.__traceback__)[-4:]
    where = " <- ".join(
        f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} {f.name}"
        for f in reversed(frames)
    )
    return f"{type(leaf).__name__}" + (f" at {where}" if where else "")


def _fit_connections(wanted: int, log: Any) -> int:
    """The connection limit, lowered to leave _FD_RESERVE descriptors under RLIMIT_NOFILE."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    fit = max(1, soft - _FD_RESERVE)
    if fit < wanted:
        log(f"connection limit {fit} (RLIMIT_NOFILE {soft} leaves no room for {wanted})")
        return fit
    return wanted


def serve(cfg: DaemonConfig) -> None:
    if cfg.harden:
        for w in harden():
            print(f"vhsm keysvc: warning: {w}", file=sys.stderr)
    d = Daemon(cfg)
    try:
        trio.run(d.run)
    except Exception:
        if d.crash is None:
            raise  # a start-up error (socket in use, ...): the CLI prints it as it is
        # logged as a crash by Daemon._shutdown; the CLI prints one line and exits non-zero
        raise DaemonError(f"key service crashed: {type(_leaf(d.crash)).__name__}") from None
