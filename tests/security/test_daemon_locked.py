"""A daemon that started locked (only a passphrase slot, nobody to type it) against another
user: the policy still decides who hears `status`, and only the service's own user (or root)
may unlock it; a refused unlock is audited and leaves it locked."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from attack import env_for, vhsm
from hostile import KeyService, audit_lines, exchange, exchange_as, frame

PASSPHRASE = "Pw-locked-5e1d"


def _locked_service(shared: Path) -> KeyService:
    data = shared / "data"
    data.mkdir(mode=0o700)
    env = env_for(HSM_DATA_DIR=str(data), HSM_MASTER_PASSPHRASE=PASSPHRASE)
    for args in (
        ["key", "generate-master-key", "--passphrase"],
        ["key", "--no-daemon", "generate", "k"],
    ):
        p = vhsm(*args, cwd=data, env=env)
        assert p.returncode == 0, p.stderr
    pf = shared / "policy.toml"
    pf.write_text("")  # nobody but the owner
    os.chmod(pf, 0o600)
    return KeyService(data, shared / "keysvc.sock", "--policy", str(pf)).start()


def test_other_user_can_neither_see_nor_unlock_a_locked_daemon(
    shared_dir: Path, other_user: pwd.struct_passwd
) -> None:
    d = _locked_service(shared_dir)
    try:
        assert "starting locked" in d.stderr
        uid, gid = other_user.pw_uid, other_user.pw_gid
        st, unlock = exchange_as(
            uid,
            gid,
            d.sock,
            frame({"op": "status"}) + frame({"op": "unlock"}, PASSPHRASE.encode()),
            2,
        )
        assert not st["ok"] and st["error"] == "access_denied" and "pid" not in st
        assert not unlock["ok"] and unlock["error"] == "access_denied"
        [own_status] = exchange(d.sock, frame({"op": "status"}), 1)
        assert own_status["ok"] and own_status["locked"]  # still locked
        [signed] = exchange(d.sock, frame({"op": "sign", "key": "k"}, b"m"), 1)
        assert not signed["ok"] and signed["error"] == "locked"
        [ok] = exchange(d.sock, frame({"op": "unlock"}, PASSPHRASE.encode()), 1)
        assert ok["ok"], ok
        d.owner_ok()
    finally:
        d.stop()
    lines = audit_lines(shared_dir / "data")
    denied = [f for f in lines if f[1] == "AUTH_FAILURE" and f"uid={other_user.pw_uid}" in f[4]]
    assert len(denied) == 1 and "unlock" in denied[0][4]
    assert any(f[1] == "AUTH_SUCCESS" and "unlocked" in f[4] for f in lines)
