"""contrib/hardening/harden.sh in a temp root: owners, modes, installed units and config, run
twice (idempotent); users are never created outside the real root."""

from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess
from pathlib import Path

from deployutil import REPO

HARDEN = REPO / "contrib" / "hardening" / "harden.sh"


def _harden(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(HARDEN), *args], capture_output=True, text=True, timeout=60)


def _mode(p: Path) -> tuple[int, str, str]:
    st = os.lstat(p)
    return (
        stat.S_IMODE(st.st_mode),
        pwd.getpwuid(st.st_uid).pw_name,
        grp.getgrgid(st.st_gid).gr_name,
    )


def test_temp_root_gets_owners_modes_units_and_policy(
    tmp_path: Path, other_user: pwd.struct_passwd
) -> None:
    root = tmp_path / "root"
    data = root / "opt" / "hsm"
    data.mkdir(parents=True)
    # files a first manual set-up left with loose modes and root as owner
    for name in ("master.key", "keystore.dat", "hsm_audit.log"):
        (data / name).write_text("x")
        os.chmod(data / name, 0o644)
    os.chmod(data, 0o755)
    user = other_user.pw_name
    group = grp.getgrgid(other_user.pw_gid).gr_name
    for _ in range(2):  # the second run changes nothing and does not fail
        p = _harden("--root", str(root), "--user", user, "--prefix", "/srv/vhsm")
        assert p.returncode == 0, p.stderr
    assert _mode(data) == (0o700, user, group)
    for name in ("master.key", "keystore.dat", "hsm_audit.log", "keysvc-policy.toml"):
        assert _mode(data / name) == (0o600, user, group), name
    assert _mode(root / "run" / "vhsm") == (0o750, user, group)
    assert _mode(root / "etc" / "vhsm" / "mount") == (0o700, "root", "root")
    unit = root / "etc" / "systemd" / "system" / "vhsm-keysvc.service"
    for path in (
        unit,
        root / "etc" / "systemd" / "system" / "vhsm-mount@.service",
        root / "etc" / "logrotate.d" / "hsm-audit",
        root / "etc" / "security" / "limits.d" / "vhsm.conf",
        root / "etc" / "tmpfiles.d" / "vhsm.conf",
    ):
        assert _mode(path) == (0o644, "root", "root"), path
    text = unit.read_text()
    assert f"\nUser={user}\n" in text and f"\nGroup={group}\n" in text
    assert "ExecStart=/srv/vhsm/bin/vhsm keysvc serve --data-dir /opt/hsm" in text
    assert "Alias=hsm-service.service" in text
    assert (
        f"{user} hard memlock unlimited" in (root / "etc/security/limits.d/vhsm.conf").read_text()
    )
    assert f"d /run/vhsm 0750 {user} {group} -" in (root / "etc/tmpfiles.d/vhsm.conf").read_text()
    # the installed policy is the example, which grants nothing
    example = REPO / "contrib" / "keysvc" / "keysvc-policy.example.toml"
    assert (data / "keysvc-policy.toml").read_text() == example.read_text()


def test_existing_policy_is_kept_and_data_dir_option(
    tmp_path: Path, other_user: pwd.struct_passwd
) -> None:
    root = tmp_path / "root"
    data = root / "var" / "lib" / "vhsm"
    data.mkdir(parents=True)
    (data / "keysvc-policy.toml").write_text("# mine\n")
    p = _harden("--root", str(root), "--user", other_user.pw_name, "--data-dir", "/var/lib/vhsm")
    assert p.returncode == 0, p.stderr
    assert (data / "keysvc-policy.toml").read_text() == "# mine\n"
    assert _mode(data / "keysvc-policy.toml")[0] == 0o600
    rot = (root / "etc" / "logrotate.d" / "hsm-audit").read_text()
    assert "/var/lib/vhsm/hsm_audit.log {" in rot and "/opt/hsm" not in rot
    unit = (root / "etc" / "systemd" / "system" / "vhsm-keysvc.service").read_text()
    assert "ReadWritePaths=/var/lib/vhsm" in unit and "/opt/hsm" not in unit


def test_no_user_is_created_in_a_temp_root(tmp_path: Path) -> None:
    p = _harden("--root", str(tmp_path), "--user", "vhsm-no-such-user")
    assert p.returncode == 1
    assert p.stderr.strip() == (
        "harden.sh: user vhsm-no-such-user does not exist; create it first "
        "(users are created only with --root /)"
    )
    assert list(tmp_path.iterdir()) == []


def test_dry_run_on_the_real_root_changes_nothing() -> None:
    before = (
        sorted(os.listdir("/etc/systemd/system")) if os.path.isdir("/etc/systemd/system") else []
    )
    p = _harden("--dry-run", "--user", "vhsm-dry-run-user")
    assert p.returncode == 0, p.stderr
    assert "+ useradd --system --gid vhsm-dry-run-user" in p.stdout
    assert "+ chmod 0700 /opt/hsm" in p.stdout
    assert "+ install -m 0644 -o root" in p.stdout
    after = (
        sorted(os.listdir("/etc/systemd/system")) if os.path.isdir("/etc/systemd/system") else []
    )
    assert before == after
    assert subprocess.run(["getent", "passwd", "vhsm-dry-run-user"], capture_output=True).returncode
