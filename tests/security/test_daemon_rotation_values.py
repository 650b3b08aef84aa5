"""`vhsm key policy NAME --max-age-days nan` (issue 11, class 7): non-finite and out-of-range
rotation values are refused with one line, in-process and through the daemon alike, and
nothing is written."""

from __future__ import annotations

from pathlib import Path

from attack import assert_one_line_error, env_for, snapshot, vhsm
from hostile import KeyService, make_store

BAD = ["nan", "inf", "-inf", "-1", "36501", "1e308"]


def _policy(data: Path, *args: str, daemon_sock: Path | None = None) -> object:
    extra = {"HSM_SOCKET": str(daemon_sock)} if daemon_sock else {}
    pre = [] if daemon_sock else ["--no-daemon"]
    env = env_for(HSM_DATA_DIR=str(data), **extra)
    return vhsm("key", *pre, *args, cwd=data, env=env)


def test_bad_max_age_days_refused_the_same_way_on_both_paths(shared_dir: Path) -> None:
    data = shared_dir / "data"
    make_store(data)
    before = snapshot(data / "keystore.dat")
    local = {}
    for value in BAD:  # in-process (no daemon yet: it would hold the keystore)
        p = _policy(data, "policy", "k", "--max-age-days", value)
        local[value] = assert_one_line_error(p, "max_age_days", "0 to 36500")
    assert_one_line_error(_policy(data, "generate", "k2", "--max-age-days", "nan"), "max_age_days")
    d = KeyService(data, shared_dir / "keysvc.sock").start()
    try:
        for value in BAD:
            p = _policy(data, "policy", "k", "--max-age-days", value, daemon_sock=d.sock)
            assert assert_one_line_error(p) == local[value]  # both paths agree
        p = _policy(data, "generate", "k2", "--max-age-days", "inf", daemon_sock=d.sock)
        assert_one_line_error(p, "max_age_days")
        p = _policy(data, "info", "k", daemon_sock=d.sock)
        assert p.returncode == 0 and b"max age 90 days" in p.stdout, p.stdout
        assert snapshot(data / "keystore.dat") == before
        # the edges of the range are still accepted
        for value in ("36500", "0.5", "0"):
            p = _policy(data, "policy", "k", "--max-age-days", value, daemon_sock=d.sock)
            assert p.returncode == 0, p.stderr
    finally:
        d.stop()
