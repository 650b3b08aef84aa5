"""Resource limits of the daemon under attack (issue 11, class 3): partial frames from a user
the policy denies, a client that never reads its replies, too many connections, and running
out of file descriptors. The daemon's memory stays bounded, it keeps serving its owner, and
it comes back by itself once the pressure is gone."""

from __future__ import annotations

import json
import pwd
import resource
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hostile import KeyService, as_user, audit_lines, frame, key_service

# Run as the denied user: N connections, each sending the header of a 256 MiB sign request
# and then `mib` MiB of its payload in 64 KiB pieces, round robin. Prints what happened and
# keeps the connections open until stdin closes.
_TRICKLE = r"""
import json, socket, struct, sys
path, n, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
hdr = json.dumps({"op": "sign", "key": "k"}).encode()
head = struct.pack(">IBI", 5 + len(hdr) + 256 * 1024 * 1024, 1, len(hdr)) + hdr
conns, refused = [], []
for i in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    conns.append(s)
def reason(s):
    try:
        s.settimeout(2)
        b = s.recv(65536)
        return json.loads(b[9:9 + struct.unpack_from(">I", b, 5)[0]])["message"] if b else "closed"
    except Exception as e:
        return type(e).__name__
live = []
for s in conns:
    try:
        s.sendall(head)
        live.append(s)
    except OSError:
        refused.append(reason(s))
chunk = b"x" * 65536
for _ in range(mib * 16):
    for s in list(live):
        try:
            s.sendall(chunk)
        except OSError:
            live.remove(s)
            refused.append(reason(s))
print(json.dumps({"live": len(live), "refused": refused}), flush=True)
sys.stdin.read()
"""

# Run as the denied user: pipeline requests with 60 KiB key names and never read a reply, for
# a few seconds. Prints how many bytes the daemon took.
_NO_READ = r"""
import json, socket, struct, sys, time
path = sys.argv[1]
hdr = json.dumps({"op": "sign", "key": "k" * 60000}).encode()
f = struct.pack(">IBI", 5 + len(hdr) + 1, 1, len(hdr)) + hdr + b"m"
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
s.setblocking(False)
sent, view, end = 0, memoryview(f * 64), time.monotonic() + 4
while time.monotonic() < end:
    try:
        n = s.send(view)
        sent += n
        view = view[n:] if n < len(view) else memoryview(f * 64)
    except BlockingIOError:
        time.sleep(0.01)
print(json.dumps({"sent": sent}), flush=True)
sys.stdin.read()
"""


@contextmanager
def _attack(d: KeyService, user: pwd.struct_passwd, code: str, *args: str) -> Iterator[dict]:
    """Run an attack script as `user`; yields what it reported while it still holds its
    connections, after checking the daemon's RSS grew by less than 64 MiB and that the owner
    is served during and after the attack."""
    d.owner_ok()
    before = d.rss_kib()
    p = as_user(user.pw_uid, user.pw_gid, code, str(d.sock), *args)
    assert p.stdin is not None and p.stdout is not None
    try:
        line = p.stdout.readline()
        assert line, p.stderr.read() if p.stderr else ""
        res = json.loads(line)
        grown = (d.rss_kib() - before) // 1024
        assert grown < 64, f"RSS grew by {grown} MiB under the attack ({res})"
        d.owner_ok()
        yield res
    finally:
        p.stdin.close()
        p.wait(30)
    d.owner_ok()


def test_denied_user_cannot_pin_memory_with_partial_frames(
    shared_dir: Path, other_user: pwd.struct_passwd
) -> None:
    with key_service(shared_dir) as d:
        # 80 connections (the per-uid limit is 64), 4 MiB each of a "256 MiB" request
        with _attack(d, other_user, _TRICKLE, "80", "4") as res:
            assert res["live"] <= 64
            limit = [r for r in res["refused"] if f"from uid {other_user.pw_uid}" in r]
            assert limit and "too many connections from uid" in limit[0], res
            d.wait_stderr("too many connections from uid")
        # every request was refused and audited, within the per-uid budget of lines
        denials = [ln for ln in audit_lines(d.data_dir) if ln[1] == "AUTH_FAILURE"]
        assert 1 <= len(denials) <= 21, len(denials)


def test_client_that_never_reads_replies_cannot_pin_memory(
    shared_dir: Path, other_user: pwd.struct_passwd
) -> None:
    with key_service(shared_dir) as d:
        with _attack(d, other_user, _NO_READ) as res:
            assert res["sent"] > 0
        # a refused request's key name is clipped in its audit line
        assert all(len(ln[2]) <= 256 for ln in audit_lines(d.data_dir))


def _connect_many(path: Path, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(path))
        out.append(s)
    return out


def test_connections_fit_under_a_low_open_files_limit(shared_dir: Path) -> None:
    """Started with `ulimit -n 128`: the connection limit is lowered to fit, connections over
    it are refused with a reason, and the daemon serves again once they close."""

    def low_nofile() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    with key_service(shared_dir, preexec_fn=low_nofile) as d:
        conns = _connect_many(d.sock, 150)
        try:
            answers = []
            for s in conns:
                try:
                    s.sendall(frame({"op": "status"}))
                    answers.append(_reply(s))
                except OSError:
                    answers.append(_reply(s))
            ok = [a for a in answers if a and a.get("ok")]
            refused = [a for a in answers if a and not a.get("ok")]
            assert 0 < len(ok) <= 64
            assert (
                refused
                and "too many connections to the key service (limit 64)" in (refused[0]["message"])
            )
            assert d.alive(), d.stderr
        finally:
            for s in conns:
                s.close()
        time.sleep(0.3)
        d.owner_ok()
        d.wait_stderr("connection limit 64 (RLIMIT_NOFILE 128")


def _reply(s: socket.socket) -> dict | None:
    try:
        head = s.recv(4)
        if len(head) < 4:
            return None
        body = b""
        n = struct.unpack(">I", head)[0]
        while len(body) < n:
            body += s.recv(n - len(body))
        return json.loads(body[5 : 5 + struct.unpack_from(">I", body, 1)[0]])
    except OSError:
        return None


def test_accept_waits_out_fd_exhaustion(shared_dir: Path) -> None:
    """The running daemon's open-files limit lowered to just above what it uses: accept()
    fails with EMFILE. The daemon logs it, keeps retrying, and serves once fds are free."""
    with key_service(shared_dir) as d:
        d.owner_ok()
        n = d.open_fds()
        _soft, hard = resource.prlimit(d.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (n + 6, hard))
        conns = _connect_many(d.sock, 40)  # the kernel queues them in the listen backlog
        try:
            d.wait_stderr("accept: EMFILE")
            time.sleep(0.5)
            assert d.alive(), d.stderr
        finally:
            for s in conns:
                s.close()
        d.owner_ok()  # with the same low limit: the closed connections freed their fds
        assert d.stderr.count("accept: EMFILE") == 1  # said once, not every 0.1 s
