"""The shipped example policy starts the daemon as shipped, and its commented rules are valid
once the accounts they name exist; the key service runs under the unit's
MemoryDenyWriteExecute=yes (the kernel's PR_SET_MDWE)."""

from __future__ import annotations

import ctypes
import os
import pwd
import subprocess
import sys
from pathlib import Path

from deployutil import REPO
from ksutil import Daemon, Work

from keysvc.policy import Policy

EXAMPLE = REPO / "contrib" / "keysvc" / "keysvc-policy.example.toml"


def _work(tmp_path: Path) -> Work:
    d = tmp_path / "w"
    d.mkdir()
    w = Work(d)
    w.hsm("-generate_master_key")
    w.hsm("-generate_key_pair", "release_key")
    (d / "doc").write_text("release\n")
    return w


def test_daemon_starts_with_the_example_policy_as_shipped(tmp_path: Path) -> None:
    work = _work(tmp_path)
    d = Daemon(work, "--policy", str(EXAMPLE)).start()
    try:
        env = {**work.env, "HSM_SOCKET": str(d.sock)}
        assert "running" in work.vhsm("keysvc", "status", env=env).stdout
        work.vhsm("key", "sign", "release_key", "-i", "doc", "-o", "doc.sig", env=env)
        assert len((work.path / "doc.sig").read_bytes()) == 64
    finally:
        assert d.stop() == 0, d.stderr
    assert "unknown" not in d.stderr
    # as shipped it grants nobody but the daemon's own user anything
    policy = Policy.load(EXAMPLE, owner_uid=os.getuid())
    assert policy.rules == []


def _uncommented(user: str, group: str) -> str:
    """The example with its rules uncommented and its account names replaced by real ones."""
    out = []
    for line in EXAMPLE.read_text().splitlines():
        if line.startswith("#[[allow]]") or line.startswith(("#users", "#groups", "#keys", "#op")):
            line = line[1:]
        out.append(line)
    text = "\n".join(out) + "\n"
    return (
        text.replace('"ci-runner"', f'"{user}"')
        .replace('"vhsm-store"', f'"{user}"')
        .replace('"hsm-admins"', f'"{group}"')
    )


def test_commented_rules_are_valid_once_the_accounts_exist(
    tmp_path: Path, other_user: pwd.struct_passwd
) -> None:
    import grp

    group = grp.getgrgid(other_user.pw_gid).gr_name
    path = tmp_path / "policy.toml"
    path.write_text(_uncommented(other_user.pw_name, group))
    policy = Policy.load(path, owner_uid=0)
    assert len(policy.rules) == 4
    uid, gid = other_user.pw_uid, other_user.pw_gid
    assert policy.allows(uid, gid, "release_key", "sign")
    assert policy.allows(uid, gid, "token-kek", "unwrap")
    assert policy.allows(uid, gid, "anything", "rotate")  # through the group rule
    assert policy.allows_named(uid, gid, "audit_logs")  # named: "*" does not grant it
    # and an account that does not exist still stops the load: fail closed on a typo
    path.write_text(_uncommented("no-such-user-vhsm", group))
    try:
        Policy.load(path, owner_uid=0)
    except Exception as e:
        assert "no-such-user-vhsm" in str(e)
    else:
        raise AssertionError("a policy naming an unknown user was accepted")


_MDWE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
# PR_SET_MDWE (65), PR_MDWE_REFUSE_EXEC_GAIN (1): what MemoryDenyWriteExecute=yes sets
if libc.prctl(65, 1, 0, 0, 0) != 0:
    sys.exit("PR_SET_MDWE: " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[1], sys.argv[1:])
"""


def _mdwe_supported() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(66, 0, 0, 0, 0) >= 0  # PR_GET_MDWE


def test_daemon_signs_under_memory_deny_write_execute(tmp_path: Path) -> None:
    import pytest

    if not _mdwe_supported():
        pytest.skip("kernel without PR_SET_MDWE (6.3+)")
    work = _work(tmp_path)
    d = Daemon(work, prefix=[sys.executable, "-c", _MDWE]).start()
    try:
        assert d.proc is not None
        env = {**work.env, "HSM_SOCKET": str(d.sock)}
        work.vhsm("key", "generate", "p256", "--type", "ecdsa-p256", env=env)
        work.vhsm("key", "generate", "kek", "--type", "aes-256-gcm", env=env)
        work.vhsm("key", "sign", "release_key", "-i", "doc", "-o", "doc.sig", env=env)
        work.vhsm("key", "sign", "p256", "-i", "doc", "-o", "p.sig", env=env)
        work.vhsm("key", "encrypt", "kek", "-i", "doc", "-o", "doc.enc", env=env)
        assert d.proc.poll() is None
    finally:
        assert d.stop() == 0, d.stderr
    assert len((work.path / "doc.sig").read_bytes()) == 64
    # the wrapper really denies W+X memory to what it execs
    wx = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"
    p = subprocess.run(
        [sys.executable, "-c", _MDWE, sys.executable, "-c", wx],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode != 0 and "PermissionError" in p.stderr, p.stderr
