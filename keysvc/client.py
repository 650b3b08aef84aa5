"""Talking to the key service: through the daemon when it runs, in-process when it does not.

`execute()` is what the CLI calls. Both paths run `Service.execute` and `Service.commit`, so
results and audit lines are the same. Which sockets are tried, in which order, and which data
dir is used comes from keysvc.discovery (one lookup for every command). The first socket that
accepts a connection is used; a missing socket or a refused connection (stale socket) means
"not there", and when none answers the operation runs in-process. A socket we may not open is
an error, never a silent fallback. When nothing answers and there is no master key either, the
error says where it looked, and suggests a new master key only when no keystore is in sight.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path
from typing import Any

from keysvc import audit, discovery, masterkey, paths, protocol, safefs, sockpath
from keysvc.errors import (
    ERRORS_BY_CODE,
    DaemonError,
    KeysvcError,
    NoAuditLogError,
    NoMasterKeyError,
    WrongMasterKeyError,
)
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


Tried = list[tuple[discovery.Candidate, str]]  # each socket tried, and what was there


def _found_there(path: Path) -> str:
    try:
        st = os.lstat(path)
    except OSError:
        return "no socket"
    if stat.S_ISSOCK(st.st_mode):
        return "not answering"
    return f"{safefs.kind(st.st_mode)}, not a socket"


def find_daemon(lookup: discovery.Lookup) -> tuple[DaemonClient | None, Tried]:
    """A connection to the first candidate socket that answers, and what the ones before it
    held. None when none answers."""
    tried: Tried = []
    for c in lookup.sockets:
        try:
            return DaemonClient(c.path), tried
        except (FileNotFoundError, NotADirectoryError, ConnectionRefusedError):
            tried.append((c, _found_there(c.path)))
        except PermissionError:
            raise DaemonError(
                f"permission denied on the key service socket {c.path} ({c.origin})"
            ) from None
        except OSError as e:
            raise DaemonError(
                f"cannot connect to the key service at {c.path} ({c.origin}): {e.strerror}"
            ) from None
    return None, tried


def where_looked(lookup: discovery.Lookup, tried: Tried) -> str:
    """`looked at P (origin: what was there), ...`: one line for an error message."""
    seen = [f"{c.path} ({c.origin}: {state})" for c, state in tried]
    return "looked at " + ", ".join([*seen, *lookup.skipped])


def connect(
    data_dir: str | os.PathLike[str] | None = None,
    sock: str | os.PathLike[str] | None = None,
    *,
    lookup: discovery.Lookup | None = None,
) -> DaemonClient | None:
    """A connection to the running daemon, or None when none is running."""
    return find_daemon(lookup or discovery.resolve(data_dir, sock))[0]


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
        self.lookup = discovery.resolve(data_dir, socket_path)
        self.data_dir = self.lookup.data_dir
        self.audit_log = paths.audit_log_path(audit_log, self.data_dir)
        # a log named by the caller is read from there, not asked of the daemon (its own log)
        self.explicit_audit_log = bool(audit_log or os.environ.get("HSM_AUDIT_LOG"))
        self.master_key_hex = master_key_hex
        self.use_daemon = use_daemon
        self.user = audit.current_user(self.data_dir)
        self.tried: Tried = []

    def _explicit_master_key(self) -> bytes | None:
        """A master key the caller gave explicitly (argv or env); None when not given."""
        if self.master_key_hex:
            return masterkey.parse_hex(self.master_key_hex)
        env = os.environ.get("HSM_MASTER_KEY")
        return masterkey.parse_hex(env) if env else None

    def call_daemon(
        self, header: dict[str, Any], payload: bytes = b""
    ) -> tuple[dict[str, Any], bytes] | None:
        """The daemon's reply (raised if it is an error), or None when no daemon answers."""
        if not self.use_daemon:
            return None
        client, self.tried = find_daemon(self.lookup)
        if client is None:
            return None
        req = dict(header)
        req["user"] = self.user
        explicit = self._explicit_master_key()
        if explicit is not None:
            req["mk_check"] = masterkey.check_value(explicit)
        with client:
            try:
                reply, out = client.call(req, payload)
            except OSError as e:
                raise DaemonError(f"key service connection failed: {e}") from None
        raise_for(reply)
        return reply, out

    def execute(self, header: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
        """Run one operation; raise the KeysvcError it failed with."""
        # the same check the service makes, before choosing a path: a value the daemon would
        # refuse as a malformed frame (NaN) gets the same message as in-process
        protocol.check_request(header)
        self._explicit_master_key()  # a malformed one fails before anything is sent
        got = self.call_daemon(header, payload)
        if got is not None:
            return got
        return self._in_process(header, payload)

    def audit_entries(self, days: float | None) -> list[audit.AuditEntry]:
        """Audit entries of the last `days` days (None: all): the daemon's log when one
        answers (its reader need not be able to open the data dir), else the log read here."""
        if days is not None and days > protocol.MAX_INT:
            days = None  # longer ago than the epoch: every entry (and a number JSON carries)
        if not self.explicit_audit_log:
            got = self.call_daemon({"op": "audit_logs", "days": days})
            if got is not None:
                return audit.entries_from_json(got[1])
        try:
            return audit.entries_since(self.audit_log, days)
        except NoAuditLogError as e:
            if not self.tried:
                raise
            # most likely the wrong data dir: say where the daemon was looked for, too
            raise NoAuditLogError(
                f"{e}; no key service answered ({where_looked(self.lookup, self.tried)})"
            ) from None

    def audit_verify(self) -> audit.VerifyResult:
        """`audit verify` of the live log: by the daemon when one answers, else here."""
        if not self.explicit_audit_log:
            got = self.call_daemon({"op": "audit_verify"})
            if got is not None:
                r = got[0]
                return audit.VerifyResult(
                    bool(r.get("verified")),
                    int(r.get("entries", 0)),
                    int(r.get("last_seq", 0)),
                    str(r.get("message", "")),
                )
        return audit.verify([self.audit_log])

    def no_master_key(self, base: str) -> str:
        """The one line for "nothing answered and there is no master key": where it looked,
        and a new master key suggested only when no keystore is in sight (a second keystore
        beside a real one is how keys get lost)."""
        lk = self.lookup
        if not self.use_daemon:
            return base
        msg = (
            f"no key service answered and there is no master key for {lk.data_dir} "
            f"({where_looked(lk, self.tried)})"
        )
        cfg = lk.config
        stale = [c.path for c, state in self.tried if state == "not answering"]
        if stale:
            hint = (
                f"the socket {stale[0]} exists but nobody answers: start the key service "
                "(vhsm keysvc serve, or systemctl start vhsm-keysvc)"
            )
        elif (
            cfg.data_dir is not None
            and os.path.abspath(cfg.data_dir) != os.path.abspath(lk.data_dir)
            and discovery.has_keystore(cfg.data_dir)
        ):
            hint = (
                f"a keystore is in {cfg.data_dir} (config {cfg.path}): start its key service "
                f"or pass --data-dir {cfg.data_dir}"
            )
        elif os.path.lexists(lk.data_dir / paths.KEYSTORE_NAME):
            hint = (
                f"{lk.data_dir / paths.KEYSTORE_NAME} exists: give its master key "
                "(HSM_MASTER_KEY) or start its key service"
            )
        else:
            hint = (
                "pass -master_key or set HSM_MASTER_KEY, or start a new keystore there: "
                "vhsm key generate-master-key"
            )
        return f"{msg}; {hint}"

    def _in_process(self, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        writer = audit.writer_for(self.audit_log)
        caller = Caller(os.getuid(), os.getgid(), os.getpid(), self.user)
        try:
            mk, _source = masterkey.resolve(
                self.master_key_hex, self.data_dir, audit_log=self.audit_log, user=self.user
            )
        except NoMasterKeyError as e:
            raise NoMasterKeyError(self.no_master_key(str(e))) from None
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
