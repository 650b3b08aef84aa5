"""The CLI finds the daemon (keysvc/discovery.py, docs/KEYSVC.md "Finding the daemon"):
through each step of the lookup order, from a directory that holds no keystore (so only the
daemon can answer: in-process the command would fail for want of a master key), with the
precedence rules, the "where it looked" error, hostile config files, and `audit` commands
served by the daemon. Real daemon, CLI as a subprocess."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from ksutil import HSM, VHSM, Daemon, Work, clean_env

from keysvc import discovery
from keysvc.errors import AccessDenied
from keysvc.policy import Policy
from keysvc.service import Caller, Service


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The CLI's environment: no user config and no runtime dir unless a test adds one (the
    machine's own must not decide these tests)."""
    e = clean_env()
    e.pop("XDG_RUNTIME_DIR", None)
    e["XDG_CONFIG_HOME"] = str(tmp_path / "xdg-config")
    return e


@pytest.fixture
def away(tmp_path: Path) -> Path:
    """Another directory, with no keystore: where the user happens to be."""
    d = tmp_path / "away"
    d.mkdir()
    return d


@pytest.fixture
def keyed(work: Work) -> Work:
    work.hsm("-generate_key_pair", "served_key")
    return work


def _lines(p: subprocess.CompletedProcess[str]) -> list[str]:
    return p.stderr.strip().splitlines()


def _user_config(env: dict[str, str], text: str) -> Path:
    cfg = Path(env["XDG_CONFIG_HOME"]) / "vhsm" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(text)
    cfg.chmod(0o644)
    return cfg


def _list(work: Work, away: Path, env: dict[str, str], *args: str) -> list[str]:
    p = work.vhsm("key", *args, "list", cwd=away, env=env, check=False)
    assert p.returncode == 0, p.stderr
    return p.stdout.split()


def test_found_through_socket_option_and_env(
    keyed: Work, daemon_factory: type[Daemon], away: Path, env: dict[str, str], tmp_path: Path
) -> None:
    sock = tmp_path / "s" / "k.sock"
    sock.parent.mkdir()
    daemon_factory(keyed, sock=sock).start()
    assert _list(keyed, away, env, "--socket", str(sock)) == ["served_key"]
    assert _list(keyed, away, {**env, "HSM_SOCKET": str(sock)}) == ["served_key"]
    # nothing else finds it from there: the command fails, and says where it looked
    p = keyed.vhsm("key", "list", cwd=away, env=env, check=False)
    assert p.returncode == 1 and len(_lines(p)) == 1
    assert str(away / ".vhsm-keysvc.sock") in p.stderr and "/run/vhsm/keysvc.sock" in p.stderr


def test_found_through_user_config_socket_and_data_dir(
    keyed: Work, daemon_factory: type[Daemon], away: Path, env: dict[str, str], tmp_path: Path
) -> None:
    sock = tmp_path / "s" / "k.sock"
    sock.parent.mkdir()
    d = daemon_factory(keyed, sock=sock).start()
    _user_config(env, f'socket = "{sock}"\n')
    assert _list(keyed, away, env) == ["served_key"]
    assert "running" in keyed.vhsm("keysvc", "status", cwd=away, env=env).stdout
    d.stop()
    # data_dir alone: the daemon on that data dir's own socket
    daemon_factory(keyed).start()
    _user_config(env, f'data_dir = "{keyed.path}"\n')
    assert _list(keyed, away, env) == ["served_key"]
    out = keyed.vhsm("keysvc", "status", cwd=away, env=env).stdout
    assert f"keystore: {keyed.path / 'keystore.dat'}" in out


def _ns_run(
    binds: dict[str, Path], argv: list[str], **kw: object
) -> subprocess.CompletedProcess[str]:
    """Run argv with each source directory mounted on its system path (/etc/vhsm, /run/vhsm)
    in a private mount namespace: the real paths the CLI reads, without other users of this
    machine (parallel test runs) ever seeing what is mounted there."""
    created = [t for t in binds if not os.path.exists(t)]
    for t in created:
        os.mkdir(t, 0o755)  # an empty mount point: nothing for anyone else
    try:
        mounts = " && ".join(f'mount --bind "{src}" "{t}"' for t, src in binds.items())
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"']
            + ["sh", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            **kw,  # type: ignore[call-overload]
        )
    finally:
        for t in created:
            with contextlib.suppress(OSError):
                os.rmdir(t)


def test_found_through_system_config(
    keyed: Work, daemon_factory: type[Daemon], away: Path, env: dict[str, str], tmp_path: Path
) -> None:
    sock = tmp_path / "s" / "k.sock"
    sock.parent.mkdir()
    daemon_factory(keyed, sock=sock).start()
    etc = tmp_path / "etc-vhsm"
    etc.mkdir(mode=0o755)
    (etc / "config.toml").write_text(f'socket = "{sock}"\n')
    p = _ns_run({"/etc/vhsm": etc}, [VHSM, "key", "list"], cwd=away, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["served_key"]
    # the user's config comes first, and only the first file that exists is read
    _user_config(env, f'data_dir = "{away}"\n')
    p = _ns_run({"/etc/vhsm": etc}, [VHSM, "key", "list"], cwd=away, env=env)
    assert p.returncode == 1 and str(sock) not in p.stderr


def test_found_through_run_vhsm(
    keyed: Work, daemon_factory: type[Daemon], away: Path, env: dict[str, str], tmp_path: Path
) -> None:
    """/run/vhsm/keysvc.sock, where the systemd unit puts it; and an explicit data dir skips
    it (that daemon serves another keystore)."""
    run = tmp_path / "run-vhsm"
    run.mkdir()
    daemon_factory(keyed, sock=run / "keysvc.sock").start()
    p = _ns_run({"/run/vhsm": run}, [VHSM, "key", "list"], cwd=away, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["served_key"]
    p = _ns_run({"/run/vhsm": run}, [VHSM, "key", "--data-dir", str(away), "list"], env=env)
    assert p.returncode == 1 and "/run/vhsm" not in p.stderr, p.stderr


def test_found_through_runtime_dir_then_data_dir_socket(
    keyed: Work, daemon_factory: type[Daemon], away: Path, env: dict[str, str], tmp_path: Path
) -> None:
    rt = tmp_path / "rt"
    (rt / "vhsm").mkdir(parents=True, mode=0o700)
    rt.chmod(0o700)
    d = daemon_factory(keyed, sock=rt / "vhsm" / "keysvc.sock").start()
    assert _list(keyed, away, {**env, "XDG_RUNTIME_DIR": str(rt)}) == ["served_key"]
    # a runtime dir that is not the caller's alone is not trusted
    rt.chmod(0o777)
    p = keyed.vhsm("key", "list", cwd=away, env={**env, "XDG_RUNTIME_DIR": str(rt)}, check=False)
    assert p.returncode == 1 and "not yours alone" in p.stderr
    rt.chmod(0o700)
    # nor one below another user's directory (they could rename it and put theirs there)
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    (theirs / "rt").symlink_to(rt)  # resolved: the real directory is checked, and it is fine
    via = {**env, "XDG_RUNTIME_DIR": str(theirs / "rt")}
    assert keyed.vhsm("key", "list", cwd=away, env=via).stdout.split() == ["served_key"]
    os.chown(theirs, 65534, 65534)
    (theirs / "rt").unlink()
    rt.rename(theirs / "rt")
    p = keyed.vhsm("key", "list", cwd=away, env=via, check=False)
    assert p.returncode == 1 and "not yours alone" in p.stderr
    (theirs / "rt").rename(rt)
    d.stop()
    # the data dir's socket, with the data dir named explicitly
    daemon_factory(keyed).start()
    assert _list(keyed, away, {**env, "HSM_DATA_DIR": str(keyed.path)}) == ["served_key"]


def test_explicit_or_local_data_dir_beats_system_wide_sockets(
    keyed: Work, daemon_factory: type[Daemon], tmp_path: Path, env: dict[str, str]
) -> None:
    rt = tmp_path / "rt"
    (rt / "vhsm").mkdir(parents=True, mode=0o700)
    rt.chmod(0o700)
    daemon_factory(keyed, sock=rt / "vhsm" / "keysvc.sock").start()
    env = {**env, "XDG_RUNTIME_DIR": str(rt)}
    local = Work(tmp_path / "local", env)
    local.path.mkdir()
    local.hsm("-generate_master_key")
    local.hsm("-generate_key_pair", "local_key")
    # a keystore in cwd: served in-process, not by the session's daemon
    assert local.vhsm("key", "list").stdout.split() == ["local_key"]
    # an explicit data dir from elsewhere: the same
    out = keyed.vhsm("key", "--data-dir", str(local.path), "list", env=env, cwd=tmp_path).stdout
    assert out.split() == ["local_key"]
    # and without either, the daemon
    assert keyed.vhsm("key", "list", env=env, cwd=tmp_path).stdout.split() == ["served_key"]


def test_serve_binds_the_config_socket_and_the_cli_follows(
    keyed: Work, away: Path, env: dict[str, str], tmp_path: Path
) -> None:
    sock = tmp_path / "s" / "k.sock"
    sock.parent.mkdir()
    _user_config(env, f'socket = "{sock}"\ndata_dir = "{keyed.path}"\n')
    proc = subprocess.Popen(
        [VHSM, "keysvc", "serve"],
        cwd=away,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "daemon did not bind the config socket"
            time.sleep(0.05)
        assert not (keyed.path / ".vhsm-keysvc.sock").exists()
        assert not (away / ".vhsm-keysvc.sock").exists()
        # the config's socket belongs to its data_dir: an explicit data dir that is the same
        # directory still reaches the daemon (status answers only through a daemon)
        p = keyed.vhsm("keysvc", "status", "--data-dir", str(keyed.path), env=env, cwd=away)
        assert "running" in p.stdout and str(keyed.path / "keystore.dat") in p.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_nothing_answers_error_says_where_and_never_invites_a_second_keystore(
    keyed: Work, away: Path, env: dict[str, str], tmp_path: Path
) -> None:
    # nothing anywhere: the error lists every place and may suggest a new master key
    p = keyed.hsm("-list", cwd=away, env=env, check=False)
    assert p.returncode == 1 and len(_lines(p)) == 1, p.stderr
    for where in ("/run/vhsm/keysvc.sock", str(away / ".vhsm-keysvc.sock")):
        assert where in p.stderr
    assert "generate-master-key" in p.stderr
    # a config names a data dir with a keystore whose daemon is down: no such suggestion
    _user_config(env, f'data_dir = "{keyed.path}"\n')
    (keyed.path / "master.key").rename(keyed.path / "master.key.offline")
    p = keyed.vhsm("key", "list", cwd=away, env=env, check=False)
    assert p.returncode == 1 and len(_lines(p)) == 1, p.stderr
    assert "generate-master-key" not in p.stderr
    assert str(keyed.path / ".vhsm-keysvc.sock") in p.stderr and "keystore.dat" in p.stderr
    # a socket file that does not answer (a daemon that died): no such suggestion either
    _user_config(env, f'socket = "{tmp_path / "dead.sock"}"\n')
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "dead.sock"))  # bound, never listening: connect is refused
    p = keyed.vhsm("key", "list", cwd=away, env=env, check=False)
    assert p.returncode == 1 and len(_lines(p)) == 1, p.stderr
    assert "generate-master-key" not in p.stderr
    assert f"{tmp_path / 'dead.sock'} exists but nobody answers" in p.stderr
    # and generate-master-key from there goes to that data dir: refused, no second keystore
    (keyed.path / "master.key.offline").rename(keyed.path / "master.key")
    _user_config(env, f'data_dir = "{keyed.path}"\n')
    p = keyed.vhsm("key", "generate-master-key", cwd=away, env=env, check=False)
    assert p.returncode == 1 and "already exists" in p.stderr
    assert not (away / "master.key").exists()


HOSTILE = {
    "garbage": (b"socket = [unclosed\n", "not valid TOML"),
    "wrong type": (b"socket = 42\n", "socket must be an absolute path"),
    "relative": (b'data_dir = "keys"\n', "data_dir must be an absolute path"),
    "unknown key": (b'sockett = "/x"\n', "unknown key 'sockett'"),
    "huge": (b"# " + b"x" * (64 * 1024) + b"\n", "larger than"),
    "not utf-8": (b'socket = "/\xff"\n', "not UTF-8"),
}


@pytest.mark.parametrize(
    "case", [*HOSTILE, "symlink", "world-writable", "foreign owner", "foreign directory"]
)
def test_hostile_config_is_one_line_error(
    case: str, away: Path, env: dict[str, str], tmp_path: Path
) -> None:
    cfg = _user_config(env, "")
    if case in HOSTILE:
        cfg.write_bytes(HOSTILE[case][0])
        expect = HOSTILE[case][1]
    elif case == "symlink":
        real = tmp_path / "real.toml"
        real.write_text(f'socket = "{tmp_path / "x.sock"}"\n')
        cfg.unlink()
        cfg.symlink_to(real)
        expect = "symbolic link"
    elif case == "world-writable":
        cfg.chmod(0o666)
        expect = "writable by group or others"
    elif case == "foreign owner":
        os.chown(cfg, 65534, 65534)  # nobody: root never takes another user's config
        expect = "uid 65534"
    else:
        os.chown(cfg.parent, 65534, 65534)  # the file is root's, but nobody could swap it
        expect = "its directory belongs to uid 65534"
    w = Work(away, env)
    # every entry point reads it the same way (one case runs them all: they cost time)
    runs = [[VHSM, "key", "list"]]
    if case == "garbage":
        runs += [[HSM, "-list"], [VHSM, "keysvc", "status"], [VHSM, "audit", "logs"]]
    for argv in runs:
        p = w.run(*argv, check=False)
        assert p.returncode not in (0, 3), (argv, p.stdout)
        assert len(_lines(p)) == 1, p.stderr
        assert expect in p.stderr and str(cfg) in p.stderr, p.stderr


def test_audit_commands_go_through_the_daemon(
    keyed: Work, daemon_factory: type[Daemon], away: Path, env: dict[str, str], tmp_path: Path
) -> None:
    sock = tmp_path / "s" / "k.sock"
    sock.parent.mkdir()
    daemon_factory(keyed, sock=sock).start()
    env = {**env, "HSM_SOCKET": str(sock)}
    # `away` has no log and no head: read in-process this would be an error
    p = keyed.vhsm("audit", "logs", cwd=away, env=env)
    n = len(keyed.audit_lines())
    assert f"Total entries: {n}" in p.stdout and "served_key" in p.stdout
    p = keyed.hsm("-audit_logs", "7", cwd=away, env=env)
    assert p.stdout.splitlines()[-1] == f"Total entries: {n}"
    assert keyed.vhsm("audit", "verify", cwd=away, env=env).stdout.startswith("OK: ")
    assert keyed.hsm("-verify_audit", cwd=away, env=env).stdout.startswith("OK: ")
    csv_rows = keyed.vhsm("audit", "export", "--csv", cwd=away, env=env).stdout.splitlines()
    assert len(csv_rows) == n + 1
    # logrotate moved the log away (the head stays): 0 entries, not an error
    keyed.log.rename(keyed.path / "hsm_audit.log.1")
    p = keyed.vhsm("audit", "logs", cwd=away, env=env)
    assert p.stdout.splitlines()[-1] == "Total entries: 0"


def test_audit_logs_without_log_or_head(keyed: Work, away: Path, env: dict[str, str]) -> None:
    p = keyed.vhsm("audit", "--data-dir", str(away), "logs", cwd=away, env=env, check=False)
    assert p.returncode == 1 and len(_lines(p)) == 1 and "no audit log" in p.stderr
    assert str(away / ".vhsm-keysvc.sock") in p.stderr  # and where it looked for the daemon
    p = keyed.hsm("-audit_logs", "-data_dir", str(away), cwd=away, env=env, check=False)
    assert p.returncode == 1 and "no audit log" in p.stderr and "Total entries" not in p.stdout
    keyed.log.rename(keyed.path / "hsm_audit.log.1")  # head without log: rotated away
    p = keyed.vhsm("audit", "--no-daemon", "logs", env=env)
    assert p.stdout.splitlines()[-1] == "Total entries: 0"


def test_audit_ops_need_a_rule_naming_them(tmp_path: Path) -> None:
    """A rule with operations ["*"] grants key operations, not the whole audit log."""
    pol = tmp_path / "p.toml"
    pol.write_text(
        '[[allow]]\nusers = [4242]\noperations = ["*"]\n'
        '[[allow]]\nusers = [4343]\noperations = ["audit_logs"]\n'
    )
    pol.chmod(0o644)
    ks = SimpleNamespace(uses_through=0, keys={}, check="")
    svc = Service(ks, SimpleNamespace(path=tmp_path / "log"), policy=Policy.load(pol, 0))  # type: ignore[arg-type]

    def admit(uid: int, op: str) -> object:
        return svc.admit({"op": op}, Caller(uid, uid, 1, "u"))

    assert isinstance(admit(4242, "audit_logs"), AccessDenied)
    assert isinstance(admit(4242, "audit_verify"), AccessDenied)
    assert admit(4242, "list") is None
    assert admit(4343, "audit_logs") is None
    assert isinstance(admit(4343, "audit_verify"), AccessDenied)
    assert admit(0, "audit_verify") is None  # the owner


def test_lookup_order_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The candidate list itself, for the record (the tests above prove each step live)."""
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o700)
    cfgdir = tmp_path / "cfg"
    (cfgdir / "vhsm").mkdir(parents=True)
    (cfgdir / "vhsm" / "config.toml").write_text('socket = "/c/s.sock"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(cfgdir))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(rt))
    for k in ("HSM_SOCKET", "HSM_DATA_DIR"):
        monkeypatch.delenv(k, raising=False)
    lk = discovery.resolve()
    assert [str(c.path) for c in lk.sockets] == [
        "/c/s.sock",
        str(rt / "vhsm" / "keysvc.sock"),
        "/run/vhsm/keysvc.sock",
        str(tmp_path / ".vhsm-keysvc.sock"),
    ]
    assert lk.serve_socket() == Path("/c/s.sock")
    monkeypatch.setenv("HSM_DATA_DIR", str(tmp_path / "d"))
    assert [c.path for c in discovery.resolve().sockets] == [tmp_path / "d" / ".vhsm-keysvc.sock"]
