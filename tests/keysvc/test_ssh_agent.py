"""`vhsm ssh-agent` with the real tools: ssh-add, ssh-keygen -Y sign/verify, ssh into a real
sshd, git commit -S / verify-commit, a second Unix user under the daemon's policy, hostile
frames, rotation and lifecycle. The agent is the real CLI in a subprocess, backed by the real
daemon (ksutil)."""

from __future__ import annotations

import os
import pwd
import signal
import socket
import stat
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ksutil import VHSM, Daemon, Work
from test_daemon import _interpreter_for_others, _sighup_until

from keysvc import sshagent, sshwire

TIMEOUT = 30


# --- helpers ---------------------------------------------------------------------------------


class Agent:
    """`vhsm ssh-agent -D` in a subprocess, stopped by pid (SIGTERM, then SIGKILL)."""

    def __init__(self, work: Work, daemon: Daemon, sock: Path | None, **popen: object) -> None:
        args = [VHSM, "ssh-agent", "-D", "--socket", str(daemon.sock)]
        if sock is not None:
            args += ["-a", str(sock)]
        self.proc = subprocess.Popen(
            args,
            cwd=work.path,
            env=popen.pop("env", work.env),  # type: ignore[arg-type]
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            **popen,  # type: ignore[arg-type]
        )
        assert self.proc.stdout is not None
        lines = [self.proc.stdout.readline() for _ in range(3)]
        if not lines[0].startswith("SSH_AUTH_SOCK="):
            self.stop()
            raise AssertionError(f"agent did not start: {lines} {self.proc.stderr}")
        self.lines = lines
        self.sock = Path(lines[0].split(";")[0].split("=", 1)[1])
        assert lines[1] == f"SSH_AGENT_PID={self.proc.pid}; export SSH_AGENT_PID;\n"
        assert lines[2] == f"echo Agent pid {self.proc.pid};\n"

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return {**base, "SSH_AUTH_SOCK": str(self.sock)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for a in started:
        a.stop()


@pytest.fixture
def keys(work: Work, daemon: Daemon) -> Daemon:
    """One key of each asymmetric type marked --ssh, and one that is not."""
    work.vhsm("key", "generate", "ed", "--ssh")
    work.vhsm("key", "generate", "ec", "--type", "ecdsa-p256", "--ssh")
    work.vhsm("key", "generate", "rs", "--type", "rsa-3072", "--ssh")
    work.vhsm("key", "generate", "plain")
    return daemon


def start_agent(
    work: Work,
    daemon: Daemon,
    agents: list[Agent],
    *,
    default_dir: bool = False,
    sock: Path | None = None,
    **kw: object,
) -> Agent:
    """An agent on `sock` (default <tmp>/agent.sock), or (default_dir) without -a: a fresh
    private dir in $TMPDIR."""
    a = Agent(work, daemon, None if default_dir else sock or work.path.parent / "agent.sock", **kw)
    agents.append(a)
    return a


def listed(work: Work, agent: Agent) -> dict[str, str]:
    """comment -> `alg base64` of `ssh-add -L`."""
    p = work.run("ssh-add", "-L", env=agent.env(work.env), check=False)
    if p.returncode == 1 and "no identities" in p.stdout + p.stderr:
        return {}
    assert p.returncode == 0, p.stderr
    out = {}
    for line in p.stdout.splitlines():
        alg, b64, comment = line.split()
        out[comment] = f"{alg} {b64}"
    return out


def raw(sock: Path, *msgs: bytes, shut: bool = False) -> list[bytes]:
    """Send framed messages, read one answer each (b'' when the agent closed)."""
    out = []
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(TIMEOUT)
        s.connect(str(sock))
        for m in msgs:
            s.sendall(m)
            if shut:
                s.shutdown(socket.SHUT_WR)
            out.append(_read_answer(s))
    return out


def _read_answer(s: socket.socket) -> bytes:
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
        chunk = s.recv(65536)
        if not chunk:
            return buf
        buf += chunk
    return buf[4:]


def msg(kind: int, body: bytes = b"") -> bytes:
    return sshagent.frame(bytes([kind]) + body)


def sign_req(blob: bytes, data: bytes, flags: int = 0) -> bytes:
    body = sshwire.string(blob) + sshwire.string(data) + sshwire.uint32(flags)
    return msg(sshagent.SSH_AGENTC_SIGN_REQUEST, body)


def blob_of(line: str) -> bytes:
    import base64

    return base64.b64decode(line.split()[1])


FAIL = bytes([sshagent.SSH_AGENT_FAILURE])


def sshsig_roundtrip(work: Work, agent: Agent, publine: str, tag: str) -> None:
    """ssh-keygen -Y sign through the agent, then -Y verify with the public key alone."""
    d = work.path.parent / f"sig-{tag}"
    d.mkdir()
    (d / "key.pub").write_text(publine + "\n")
    (d / "msg").write_bytes(b"signed through vhsm ssh-agent " + tag.encode())
    env = agent.env(work.env)
    work.run(
        "ssh-keygen", "-Y", "sign", "-f", str(d / "key.pub"), "-n", "file", str(d / "msg"), env=env
    )
    (d / "allowed").write_text(f"signer {publine}\n")
    p = subprocess.run(
        [
            "ssh-keygen",
            "-Y",
            "verify",
            "-f",
            str(d / "allowed"),
            "-I",
            "signer",
            "-n",
            "file",
            "-s",
            str(d / "msg.sig"),
        ],
        stdin=open(d / "msg", "rb"),  # noqa: SIM115
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert p.returncode == 0 and "Good" in p.stdout, p.stdout + p.stderr


# --- listing and signing -----------------------------------------------------------------------


def test_lists_marked_keys_and_signs_sshsig_for_each_type(
    work: Work, keys: Daemon, agents: list[Agent]
) -> None:
    agent = start_agent(work, keys, agents)
    ids = listed(work, agent)
    assert sorted(ids) == ["vhsm:ec:v1", "vhsm:ed:v1", "vhsm:rs:v1"]  # not "plain"
    assert ids["vhsm:ed:v1"].startswith("ssh-ed25519 ")
    assert ids["vhsm:ec:v1"].startswith("ecdsa-sha2-nistp256 ")
    assert ids["vhsm:rs:v1"].startswith("ssh-rsa ")
    # the same public keys as the PEM export
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    pem = work.vhsm("key", "export-public", "ed").stdout.encode()
    assert sshwire.public_line(load_pem_public_key(pem)) == ids["vhsm:ed:v1"]
    for comment, line in ids.items():
        sshsig_roundtrip(work, agent, line, comment.split(":")[1])
    # ssh-keygen signs RSA with rsa-sha2-512; every signature went through the daemon
    lines = [e for e in work.events("SIGN_OPERATION") if e[5] == "SUCCESS"]
    assert {e[2] for e in lines} == {"ed", "ec", "rs"}
    assert all("through ssh-agent" in e[4] for e in lines)
    # marking: info shows it, policy changes it (audited), symmetric keys refuse it
    assert "SSH: no" in work.vhsm("key", "info", "plain").stdout
    work.vhsm("key", "policy", "plain", "--ssh")
    assert "vhsm:plain:v1" in listed(work, agent)
    work.vhsm("key", "policy", "ed", "--no-ssh")
    assert "SSH: no" in work.vhsm("key", "info", "ed").stdout
    assert "vhsm:ed:v1" not in listed(work, agent)
    # the agent's cached blob no longer signs: the daemon checks the mark
    assert raw(agent.sock, sign_req(blob_of(ids["vhsm:ed:v1"]), b"x")) == [FAIL]
    modified = [e for e in work.events("KEY_MODIFIED") if "SSH" in e[4]]
    assert [e[2] for e in modified] == ["plain", "ed"]
    work.vhsm("key", "generate", "sym", "--type", "aes-256-gcm")
    p = work.vhsm("key", "policy", "sym", "--ssh", check=False)
    assert p.returncode == 1 and "only asymmetric" in p.stderr
    p = work.vhsm("key", "generate", "sym2", "--type", "hmac-sha256", "--ssh", check=False)
    assert p.returncode == 1 and "only asymmetric" in p.stderr


def test_rsa_flags_and_sha1_refusal(work: Work, keys: Daemon, agents: list[Agent]) -> None:
    agent = start_agent(work, keys, agents)
    rsa_blob = blob_of(listed(work, agent)["vhsm:rs:v1"])
    key = sshwire.load_public_blob(rsa_blob)
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    for flags, alg, h in (
        (sshagent.SSH_AGENT_RSA_SHA2_256, "rsa-sha2-256", hashes.SHA256()),
        (sshagent.SSH_AGENT_RSA_SHA2_512, "rsa-sha2-512", hashes.SHA512()),
        (6, "rsa-sha2-256", hashes.SHA256()),
    ):
        [ans] = raw(agent.sock, sign_req(rsa_blob, b"data", flags))
        assert ans[0] == sshagent.SSH_AGENT_SIGN_RESPONSE
        r = sshwire.Reader(ans[1:])
        got_alg, sig = sshwire.parse_signature_blob(r.string())
        assert got_alg == alg
        key.verify(sig, b"data", padding.PKCS1v15(), h)
    # ssh-rsa (SHA-1): refused
    assert raw(agent.sock, sign_req(rsa_blob, b"data", 0)) == [FAIL]


# --- ssh into a real sshd ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A real sshd on a free loopback port; root logs in with the keys in `authorized_keys`."""
    d = tmp_path / "sshd"
    d.mkdir()
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "hostkey")],
        check=True,
        timeout=TIMEOUT,
    )
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    auth = d / "authorized_keys"
    auth.write_text("")
    port = _free_port()
    conf = d / "sshd_config"
    conf.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'hostkey'}\n"
        f"PidFile {d / 'sshd.pid'}\nAuthorizedKeysFile {auth}\nUsePAM no\nStrictModes no\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\nLogLevel VERBOSE\n"
    )
    log = open(d / "sshd.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-e", "-f", str(conf)], stderr=log, stdin=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, (d / "sshd.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "sshd did not start"
                time.sleep(0.05)
        yield port, auth
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def _ssh(work: Work, agent: Agent, port: int) -> subprocess.CompletedProcess[str]:
    kh = work.path.parent / "known_hosts"
    return work.run(
        "ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", f"IdentityAgent={agent.sock}",
        "-o", f"UserKnownHostsFile={kh}", "-o", "StrictHostKeyChecking=accept-new",
        "-o", "ConnectTimeout=10", "-p", str(port), "root@127.0.0.1", "echo vhsm-ok",
        check=False,
    )  # fmt: skip


def test_ssh_login_through_agent_until_suspended(
    work: Work, keys: Daemon, agents: list[Agent], sshd: tuple[int, Path]
) -> None:
    port, auth = sshd
    agent = start_agent(work, keys, agents)
    ids = listed(work, agent)
    auth.write_text(ids["vhsm:ec:v1"] + "\n")
    p = _ssh(work, agent, port)
    assert p.returncode == 0 and p.stdout.strip() == "vhsm-ok", p.stderr
    work.vhsm("key", "set-state", "ec", "SUSPENDED")
    assert "vhsm:ec:v1" not in listed(work, agent)
    p = _ssh(work, agent, port)
    assert p.returncode != 0 and "vhsm-ok" not in p.stdout
    # the agent still knows the blob; the daemon refuses, and audits the refusal
    assert raw(agent.sock, sign_req(blob_of(ids["vhsm:ec:v1"]), b"x")) == [FAIL]
    last = work.events("SIGN_OPERATION")[-1]
    assert last[2] == "ec" and last[5] == "FAILURE" and "SUSPENDED" in last[4]
    work.vhsm("key", "set-state", "ec", "ACTIVE")
    assert _ssh(work, agent, port).returncode == 0


# --- git ----------------------------------------------------------------------------------------


def test_git_commit_signed_and_verified(work: Work, keys: Daemon, agents: list[Agent]) -> None:
    agent = start_agent(work, keys, agents)
    pub = listed(work, agent)["vhsm:ed:v1"]
    repo = work.path.parent / "repo"
    repo.mkdir()
    env = {**agent.env(work.env), "HOME": str(work.path.parent), "GIT_CONFIG_NOSYSTEM": "1"}

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return work.run("git", *args, env=env, cwd=repo)

    git("init", "-q")
    git("config", "user.name", "Release Bot")
    git("config", "user.email", "release@example.com")
    git("config", "gpg.format", "ssh")
    git("config", "user.signingkey", pub)
    (work.path.parent / "allowed_signers").write_text(f"release@example.com {pub}\n")
    git("config", "gpg.ssh.allowedSignersFile", str(work.path.parent / "allowed_signers"))
    (repo / "f").write_text("hello\n")
    git("add", "f")
    git("commit", "-q", "-S", "-m", "signed by the key service")
    p = git("verify-commit", "-v", "HEAD")
    assert 'Good "git" signature for release@example.com' in p.stderr
    assert "-----BEGIN SSH SIGNATURE-----" in git("cat-file", "commit", "HEAD").stdout
    # a commit signed by another key does not verify against that allowed_signers file
    # git takes a literal key when it starts with "ssh-" (ed25519, rsa); "key::" for any type;
    # export-public's OpenSSH line is the one ssh-add -L shows (same comment)
    ec_line = work.vhsm("key", "export-public", "ec", "--format", "openssh").stdout.strip()
    assert ec_line == listed(work, agent)["vhsm:ec:v1"] + " vhsm:ec:v1"
    git("config", "user.signingkey", "key::" + ec_line)
    (repo / "f").write_text("again\n")
    git("commit", "-q", "-a", "-S", "-m", "other key")
    p = work.run("git", "verify-commit", "HEAD", env=env, cwd=repo, check=False)
    assert p.returncode != 0


# --- a second Unix user --------------------------------------------------------------------------


def test_second_user_agent_gets_only_what_policy_grants(
    work: Work,
    daemon_factory: type[Daemon],
    shared_dir: Path,
    other_user: pwd.struct_passwd,
    agents: list[Agent],
) -> None:
    os.chmod(shared_dir, 0o777)
    policy = work.path / "keysvc-policy.toml"
    policy.write_text("")  # only the owner
    work.hsm("-generate_key_pair", "team_key")
    work.vhsm("key", "--no-daemon", "policy", "team_key", "--ssh")
    dsock = shared_dir / "keysvc.sock"
    d = daemon_factory(work, "--socket-mode", "0666", "--policy", str(policy), sock=dsock).start()
    exe, pythonpath = _interpreter_for_others(shared_dir)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(shared_dir), "PYTHONPATH": pythonpath}
    other = {"user": other_user.pw_uid, "group": other_user.pw_gid, "extra_groups": []}
    mine = start_agent(work, d, agents, sock=shared_dir / "root-agent.sock")
    team_pub = listed(work, mine)["vhsm:team_key:v1"]
    # the other user's own agent, started through the real CLI entry point
    theirs = Agent.__new__(Agent)
    asock = shared_dir / "their-agent.sock"
    theirs_proc = subprocess.Popen(
        [exe, "-c", "from cli.main import main; main()", "ssh-agent", "-D", "-a", str(asock),
         "--socket", str(dsock)],
        cwd=shared_dir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True, **other,  # type: ignore[arg-type]
    )  # fmt: skip
    theirs.proc, theirs.sock = theirs_proc, asock
    agents.append(theirs)
    assert theirs_proc.stdout is not None
    assert theirs_proc.stdout.readline().startswith("SSH_AUTH_SOCK=")
    assert os.stat(asock).st_uid == other_user.pw_uid

    def as_other(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args), cwd=shared_dir, env=kw.pop("env", {**env, "SSH_AUTH_SOCK": str(asock)}),
            capture_output=True, text=True, timeout=TIMEOUT, **other, **kw,  # type: ignore[arg-type]
        )  # fmt: skip

    p = as_other("ssh-add", "-L")
    assert p.returncode == 1 and "no identities" in p.stdout + p.stderr
    denial = work.events("AUTH_FAILURE")[-1]
    assert f"[uid={other_user.pw_uid}]" in denial[4] and "ssh_identities" in denial[4]
    # a sign request for the owner's key: the agent cannot offer it
    (shared_dir / "team.pub").write_text(team_pub + "\n")
    (shared_dir / "doc").write_text("doc")
    p = as_other("ssh-keygen", "-Y", "sign", "-f", "team.pub", "-n", "file", "doc")
    assert p.returncode != 0 and not (shared_dir / "doc.sig").exists()
    # nor may it use the owner's agent, even through a socket opened to everyone: an agent
    # serves only its own uid (and root), as OpenSSH's does
    os.chmod(mine.sock, 0o666)
    p = as_other("ssh-add", "-L", env={**env, "SSH_AUTH_SOCK": str(mine.sock)})
    assert p.returncode != 0 and "team_key" not in p.stdout
    # grant sign on team_* to that user: its agent lists and signs
    policy.write_text(
        f'[[allow]]\nusers = ["{other_user.pw_name}"]\nkeys = ["team_*"]\noperations = ["sign"]\n'
    )
    _sighup_until(d, "policy reloaded")
    assert as_other("ssh-add", "-L").stdout.split()[:2] == team_pub.split()
    p = as_other("ssh-keygen", "-Y", "sign", "-f", "team.pub", "-n", "file", "doc")
    assert p.returncode == 0, p.stderr
    signed = work.events("SIGN_OPERATION")[-1]
    assert signed[2] == "team_key" and f"[uid={other_user.pw_uid}]" in signed[4]


# --- hostile clients ------------------------------------------------------------------------------


def test_hostile_frames_and_socket_modes(
    work: Work, keys: Daemon, agents: list[Agent], tmp_path: Path
) -> None:
    env = {**work.env, "TMPDIR": str(tmp_path)}
    agent = start_agent(work, keys, agents, default_dir=True, env=env)
    assert agent.sock.parent.parent == tmp_path and agent.sock.name.startswith("agent.")
    assert stat.S_IMODE(os.stat(agent.sock.parent).st_mode) == 0o700
    st = os.stat(agent.sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()
    ids = raw(agent.sock, msg(sshagent.SSH_AGENTC_REQUEST_IDENTITIES))[0]
    assert ids[0] == sshagent.SSH_AGENT_IDENTITIES_ANSWER
    hostile = [
        msg(99),  # unknown type
        sshagent.frame(b""),  # no type at all
        msg(sshagent.SSH_AGENTC_ADD_IDENTITY, sshwire.string(b"ssh-ed25519") + b"\0" * 100),
        msg(sshagent.SSH_AGENTC_ADD_ID_CONSTRAINED, b"junk"),
        msg(sshagent.SSH_AGENTC_REMOVE_IDENTITY, sshwire.string(b"x")),
        msg(sshagent.SSH_AGENTC_REMOVE_ALL_IDENTITIES),
        msg(sshagent.SSH_AGENTC_ADD_SMARTCARD_KEY, sshwire.string(b"/usr/lib/x.so")),
        msg(sshagent.SSH_AGENTC_LOCK, sshwire.string(b"pw")),
        msg(sshagent.SSH_AGENTC_UNLOCK, sshwire.string(b"pw")),
        msg(sshagent.SSH_AGENTC_EXTENSION, sshwire.string(b"query")),
        msg(sshagent.SSH_AGENTC_EXTENSION, sshwire.string(b"session-bind@openssh.com")),
        msg(sshagent.SSH_AGENTC_SIGN_REQUEST, b"\xff\xff\xff\xff"),  # garbage sign requests
        msg(sshagent.SSH_AGENTC_SIGN_REQUEST, sshwire.string(b"x")),
        sign_req(b"not a key blob", b"data"),
        sign_req(sshwire.string(b"ssh-ed25519") + sshwire.string(b"\0" * 32), b"data"),
        sign_req(ids[9:40], b"data") + b"",  # a piece of a real answer
        msg(sshagent.SSH_AGENTC_REQUEST_IDENTITIES, b"trailing"),
    ]
    # all on one connection, which keeps answering
    answers = raw(agent.sock, *hostile, msg(sshagent.SSH_AGENTC_REQUEST_IDENTITIES))
    assert answers[:-1] == [FAIL] * len(hostile)
    assert answers[-1] == ids
    # an oversized length: failure, then the connection is closed
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(TIMEOUT)
        s.connect(str(agent.sock))
        s.sendall(struct.pack(">I", sshagent.MAX_FRAME + 1) + b"\x0b")
        assert _read_answer(s) == FAIL
        assert s.recv(10) == b""
    # a truncated frame, then EOF: closed without an answer
    assert raw(agent.sock, struct.pack(">I", 100) + b"\x0d" * 10, shut=True) == [b""]
    # a client that connects and vanishes mid-frame
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(agent.sock))
    s.sendall(struct.pack(">I", 1000) + b"\x0d")
    s.close()
    # the agent still answers, and nothing reached the daemon's audit as a signature
    assert raw(agent.sock, msg(sshagent.SSH_AGENTC_REQUEST_IDENTITIES)) == [ids]
    assert agent.proc.poll() is None
    assert work.events("SIGN_OPERATION") == []


def test_background_agent_and_kill(work: Work, keys: Daemon, tmp_path: Path) -> None:
    env = {**work.env, "TMPDIR": str(tmp_path), "SHELL": "/bin/sh"}
    # no --socket: the agent finds the daemon as the CLI does (here: the data dir in the cwd)
    assert keys.sock == work.path / ".vhsm-keysvc.sock"
    p = work.run(VHSM, "ssh-agent", env=env)
    assert "not running" not in p.stderr
    lines = p.stdout.splitlines()
    sock = Path(lines[0].split(";")[0].split("=", 1)[1])
    pid = int(lines[1].split(";")[0].split("=", 1)[1])
    try:
        assert lines[2] == f"echo Agent pid {pid};"
        assert stat.S_ISSOCK(os.stat(sock).st_mode)
        # the forked agent serves after its parent has exited
        out = work.run("ssh-add", "-L", env={**env, "SSH_AUTH_SOCK": str(sock)}).stdout
        assert "vhsm:ed:v1" in out
        csh = work.run(VHSM, "ssh-agent", "-k", "-c", env={**env, "SSH_AGENT_PID": str(pid)})
        assert csh.stdout.splitlines() == [
            "unsetenv SSH_AUTH_SOCK;",
            "unsetenv SSH_AGENT_PID;",
            f"echo Agent pid {pid} killed;",
        ]
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not sock.exists() and not sock.parent.exists()  # removed on exit
    finally:
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)
    # -k refuses a pid that is not an agent
    k = work.run(
        VHSM, "ssh-agent", "-k", env={**env, "SSH_AGENT_PID": str(os.getpid())}, check=False
    )
    assert k.returncode == 1 and "not an ssh-agent" in k.stderr
    # binding never replaces a non-socket
    f = tmp_path / "file"
    f.write_text("keep")
    b = work.run(VHSM, "ssh-agent", "-D", "-a", str(f), env=env, check=False)
    assert b.returncode == 1 and "not a socket" in b.stderr and f.read_text() == "keep"


# --- rotation ------------------------------------------------------------------------------------


def test_rotation_adds_identity_until_retired(
    work: Work, keys: Daemon, agents: list[Agent]
) -> None:
    agent = start_agent(work, keys, agents)
    v1 = listed(work, agent)["vhsm:ed:v1"]
    work.vhsm("key", "rotate", "ed")
    ids = listed(work, agent)
    assert ids["vhsm:ed:v1"] == v1 and ids["vhsm:ed:v2"] != v1
    # current first: ssh tries it before the old one
    p = work.run("ssh-add", "-L", env=agent.env(work.env))
    comments = [line.split()[2] for line in p.stdout.splitlines()]
    assert comments.index("vhsm:ed:v2") < comments.index("vhsm:ed:v1")
    sshsig_roundtrip(work, agent, ids["vhsm:ed:v2"], "v2")
    sshsig_roundtrip(work, agent, v1, "v1")  # old servers keep working until retirement
    signs = [e[4] for e in work.events("SIGN_OPERATION")]
    assert "with v2 through" in signs[-2] and "with v1 through" in signs[-1]
    work.vhsm("key", "retire", "ed", "--min-version", "2")
    assert "vhsm:ed:v1" not in listed(work, agent)
    assert raw(agent.sock, sign_req(blob_of(v1), b"x")) == [FAIL]
    # a daemon restart: the agent's pooled connections are dead, its next request reconnects
    keys.stop()
    keys.start()
    assert "vhsm:ed:v2" in listed(work, agent)


# --- the protocol module alone (no sockets) -------------------------------------------------------


class _FakeBackend:
    def __init__(self, ids: list[sshagent.Identity]) -> None:
        self.ids = ids
        self.signed: list[tuple[str, int, str | None]] = []

    async def identities(self) -> list[sshagent.Identity]:
        return self.ids

    async def sign(self, ident: sshagent.Identity, data: bytes, hash_name: str | None) -> bytes:
        self.signed.append((ident.key, ident.version, hash_name))
        return b"\x01" * 64


def test_protocol_module_without_sockets() -> None:
    import trio

    buf = bytearray(msg(11) + msg(13, b"ab") + b"\x00\x00")
    assert sshagent.split(buf) == [b"\x0b", b"\x0dab"] and buf == b"\x00\x00"
    with pytest.raises(sshagent.FrameTooLarge):
        sshagent.split(bytearray(struct.pack(">I", sshagent.MAX_FRAME + 1)))
    assert sshagent.signature_choice("rsa-3072", 0) is None  # ssh-rsa (SHA-1)
    assert sshagent.signature_choice("rsa-3072", 4) == ("rsa-sha2-512", "sha512")
    assert sshagent.signature_choice("ed25519", 4) == ("ssh-ed25519", None)
    blob = sshwire.string(b"ssh-ed25519") + sshwire.string(b"k" * 32)
    fake = _FakeBackend([sshagent.Identity("k", 3, "ed25519", blob)])
    agent = sshagent.Agent(fake)

    def handle(m: bytes) -> bytes:
        return trio.run(agent.handle, m)

    answer = handle(b"\x0b")
    r = sshwire.Reader(answer[5:])
    assert answer[4] == 12 and r.uint32() == 1 and r.string() == blob and r.text() == "vhsm:k:v3"
    signed = handle(sign_req(blob, b"data", 0)[4:])
    assert signed[4] == sshagent.SSH_AGENT_SIGN_RESPONSE and fake.signed == [("k", 3, None)]
    for bad in (b"", b"\x11junk", b"\x0d\xff", b"\x1b" + sshwire.string(b"query"), b"\xff"):
        assert handle(bad) == sshagent.FAILURE

    # a backend that fails in an unexpected way: a failure answer, not an exception
    async def boom() -> list[sshagent.Identity]:
        raise KeyError("boom")

    fake.identities = boom  # type: ignore[method-assign]
    assert handle(b"\x0b") == sshagent.FAILURE


def test_keystore_from_before_the_ssh_mark_loads_unmarked(tmp_path: Path) -> None:
    import json

    from keysvc import keystore, keytypes

    mk = os.urandom(32)
    ks = keystore.Keystore(tmp_path / "keystore.dat", mk)
    rec = keystore.KeyRecord("old", keytypes.ED25519, "ACTIVE", 1.0, 1.0)
    rec.versions[1] = keystore.KeyVersion(1, 1.0, keytypes.generate(keytypes.ED25519))
    ks.keys["old"] = rec
    doc = json.loads(ks.serialize())
    k_meta, aad = ks._k_meta, keystore._META_AAD
    meta = json.loads(
        k_meta.decrypt(bytes.fromhex(doc["meta"]["nonce"]), bytes.fromhex(doc["meta"]["ct"]), aad)
    )
    for m in meta["keys"]:
        del m["ssh"]  # what an older vhsm wrote
    nonce = os.urandom(12)
    ct = k_meta.encrypt(nonce, json.dumps(meta).encode(), aad)
    doc["meta"] = {"nonce": nonce.hex(), "ct": ct.hex()}
    (tmp_path / "keystore.dat").write_text(json.dumps(doc))
    again = keystore.open_keystore(tmp_path, mk)
    try:
        assert again.keys["old"].ssh is False
    finally:
        again.close()


def test_concurrent_clients(work: Work, keys: Daemon, agents: list[Agent]) -> None:
    import threading

    agent = start_agent(work, keys, agents)
    blob = blob_of(listed(work, agent)["vhsm:ed:v1"])
    key = sshwire.load_public_blob(blob)
    results: list[bool] = []

    def client(i: int) -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(TIMEOUT)
            s.connect(str(agent.sock))
            for j in range(25):
                data = b"client %d message %d" % (i, j)
                s.sendall(sign_req(blob, data))
                ans = _read_answer(s)
                alg, sig = sshwire.parse_signature_blob(sshwire.Reader(ans[1:]).string())
                key.verify(sig, data)  # raises if wrong
                results.append(ans[0] == sshagent.SSH_AGENT_SIGN_RESPONSE)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [True] * 200
    assert len([e for e in work.events("SIGN_OPERATION") if e[5] == "SUCCESS"]) == 200
