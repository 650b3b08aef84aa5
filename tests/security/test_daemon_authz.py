"""Authorization against the real daemon (issue 11, class 4): access follows current group
membership, a uid the policy gives nothing is not even answered `status`, and the policy file
itself cannot be swapped for something that hangs, stops or fools the daemon."""

from __future__ import annotations

import os
import pwd
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from attack import assert_one_line_error, env_for, vhsm
from hostile import (
    KeyService,
    audit_lines,
    exchange,
    exchange_as,
    frame,
    key_service,
    make_store,
)


@pytest.fixture
def group_member(other_user: pwd.struct_passwd) -> Iterator[tuple[pwd.struct_passwd, str]]:
    """A fresh group with the second user in it (removed afterwards, whatever happened)."""
    name = f"vhsmg{uuid.uuid4().hex[:8]}"
    subprocess.run(["groupadd", name], check=True, capture_output=True, timeout=60)
    try:
        subprocess.run(
            ["gpasswd", "-a", other_user.pw_name, name],
            check=True,
            capture_output=True,
            timeout=60,
        )
        yield other_user, name
    finally:
        subprocess.run(["groupdel", "-f", name], capture_output=True, timeout=60)


def _sign_as(user: pwd.struct_passwd, d: KeyService, work: Path) -> subprocess.CompletedProcess:
    """The real CLI, run by `user`, signing through the daemon."""
    return vhsm(
        "key",
        "sign",
        "k",
        "-i",
        "doc",
        "-o",
        "doc.sig",
        cwd=work,
        env=env_for(home=work, HSM_SOCKET=str(d.sock)),
        user=user.pw_uid,
        group=user.pw_gid,
    )


def _workdir(shared: Path) -> Path:
    work = shared / "work"
    work.mkdir()
    os.chmod(work, 0o777)
    (work / "doc").write_text("release")
    os.chmod(work / "doc", 0o644)
    return work


def _revoke(user: str, group: str) -> None:
    subprocess.run(["gpasswd", "-d", user, group], check=True, capture_output=True, timeout=60)


def _group_policy(group: str) -> str:
    return f'[[allow]]\ngroups = ["{group}"]\nkeys = ["k"]\noperations = ["sign"]\n'


def test_group_removal_revokes_access_within_the_ttl(
    shared_dir: Path, group_member: tuple[pwd.struct_passwd, str]
) -> None:
    user, group = group_member
    work = _workdir(shared_dir)
    with key_service(shared_dir, "--group-cache-seconds", "1", policy=_group_policy(group)) as d:
        p = _sign_as(user, d, work)
        assert p.returncode == 0, p.stderr
        assert len((work / "doc.sig").read_bytes()) == 64
        _revoke(user.pw_name, group)
        time.sleep(1.5)  # past the TTL; no SIGHUP
        (work / "doc.sig").unlink()
        p = _sign_as(user, d, work)
        assert_one_line_error(p, "access denied", f"uid {user.pw_uid}")
        assert not (work / "doc.sig").exists()


def test_sighup_forgets_group_memberships(
    shared_dir: Path, group_member: tuple[pwd.struct_passwd, str]
) -> None:
    user, group = group_member
    work = _workdir(shared_dir)
    with key_service(shared_dir, policy=_group_policy(group)) as d:  # default TTL
        assert _sign_as(user, d, work).returncode == 0
        _revoke(user.pw_name, group)
        d.sighup("access policy reloaded")
        p = _sign_as(user, d, work)
        assert_one_line_error(p, "access denied")


def test_status_and_list_refused_to_a_uid_the_policy_gives_nothing(
    shared_dir: Path, other_user: pwd.struct_passwd
) -> None:
    work = _workdir(shared_dir)
    with key_service(shared_dir, policy="") as d:
        env = env_for(home=work, HSM_SOCKET=str(d.sock))
        uid, gid = other_user.pw_uid, other_user.pw_gid
        p = vhsm("keysvc", "status", cwd=work, env=env, user=uid, group=gid)
        assert_one_line_error(p, f"access denied: uid {uid} may not status")
        assert b"pid" not in p.stdout
        p = vhsm("key", "list", cwd=work, env=env, user=uid, group=gid)
        assert_one_line_error(p, "access denied")
        # audited like any other denial
        denials = [ln[4] for ln in audit_lines(d.data_dir) if ln[1] == "AUTH_FAILURE"]
        assert any("access denied: status" in x and f"[uid={uid}]" in x for x in denials)
        # a user the policy does give something gets status
        (d.data_dir.parent / "policy.toml").write_text(
            f'[[allow]]\nusers = [{uid}]\nkeys = ["k"]\noperations = ["verify"]\n'
        )
        d.sighup("access policy reloaded")
        p = vhsm("keysvc", "status", cwd=work, env=env, user=uid, group=gid)
        assert p.returncode == 0 and b"running" in p.stdout, p.stderr


def _serve(data: Path, sock: Path, policy: Path) -> subprocess.CompletedProcess[bytes]:
    return vhsm(
        "keysvc",
        "serve",
        "--no-harden",
        "--data-dir",
        str(data),
        "--socket",
        str(sock),
        "--policy",
        str(policy),
        cwd=data,
        timeout=30,
    )


def test_policy_file_that_is_not_a_plain_private_file_is_refused(
    shared_dir: Path, other_user: pwd.struct_passwd
) -> None:
    data = shared_dir / "data"
    make_store(data)
    sock = shared_dir / "keysvc.sock"
    real = shared_dir / "real.toml"
    real.write_text(f'[[allow]]\nusers = [{other_user.pw_uid}]\noperations = ["*"]\n')
    os.chmod(real, 0o600)
    link = shared_dir / "link.toml"
    link.symlink_to(real)
    fifo = shared_dir / "fifo.toml"
    os.mkfifo(fifo, 0o600)
    foreign = shared_dir / "foreign.toml"
    foreign.write_text(real.read_text())
    os.chmod(foreign, 0o600)
    os.chown(foreign, other_user.pw_uid, other_user.pw_gid)
    for path, why in (
        (link, "symbolic link"),
        (fifo, "not a regular file"),
        (foreign, f"owned by uid {other_user.pw_uid}"),
    ):
        p = _serve(data, sock, path)
        assert_one_line_error(p, str(path), why)
        assert not sock.exists()


def test_policy_reload_of_a_hostile_file_keeps_the_daemon_and_old_policy(
    shared_dir: Path, other_user: pwd.struct_passwd
) -> None:
    with key_service(shared_dir, policy="") as d:
        pf = d.data_dir.parent / "policy.toml"
        for text in ("allow = 5\n", "[[allow]]\nusers = [true]\n", '[[allow]]\nkeys = "k"\n'):
            pf.write_text(text)
            d.sighup("policy reload failed, keeping the old one")
            assert d.alive(), d.stderr
            d.owner_ok()
        pf.write_bytes(b"\xff\xfe[[allow]]\n")
        d.sighup("not UTF-8")
        pf.unlink()
        os.mkfifo(pf, 0o600)  # would block the event loop forever if opened for reading
        d.sighup("not a regular file")
        d.owner_ok()
        # the old policy (nobody but the owner) still holds
        denied = exchange_as(
            other_user.pw_uid, other_user.pw_gid, d.sock, frame({"op": "sign", "key": "k"}), 1
        )
        assert denied[0]["error"] == "access_denied"
        assert exchange(d.sock, frame({"op": "status"}), 1)[0]["ok"]
