"""`make install` (issue 15): an install other users can run, man pages, and systemd units that
`systemd-analyze verify` accepts, checked against a real install in a temp prefix."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from deployutil import REPO, make_install

UNITS = {
    "vhsm-keysvc.service": REPO / "contrib" / "keysvc" / "vhsm-keysvc.service",
    "vhsm-mount@.service": REPO / "contrib" / "mount" / "vhsm-mount@.service",
}


def _as(user: pwd.struct_passwd, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        list(args),
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), "LC_ALL": "C.UTF-8", **env},
        capture_output=True,
        text=True,
        timeout=120,
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
    )


def test_install_is_world_readable_and_built_on_the_system_python(signing_install: Path) -> None:
    prefix = signing_install
    for path in [prefix, *prefix.rglob("*")]:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            continue
        assert st.st_uid == 0, path
        assert not st.st_mode & 0o022, f"{path} is writable by group or others"
        assert st.st_mode & 0o004, f"{path} is not readable by others"
        if stat.S_ISDIR(st.st_mode):
            assert st.st_mode & 0o001, f"{path} cannot be entered by others"
    # the venv's interpreter is the system one, never one under /root (pyenv)
    assert os.path.realpath(prefix / "bin" / "python").startswith("/usr/bin/python3")
    cfg = (prefix / "pyvenv.cfg").read_text()
    assert re.search(r"^home = /usr/bin$", cfg, re.M), cfg
    # non-editable: the package's code is in the venv, not a link back to this checkout
    site = next((prefix / "lib").glob("python3*/site-packages"))
    assert (site / "cli" / "main.py").is_file() and (site / "keysvc" / "daemon.py").is_file()
    assert not list(site.glob("__editable__*")) and not list(site.glob("*.egg-link"))
    # signing only: no FUSE binding was installed
    assert not list(site.glob("pyfuse3*"))
    assert (prefix / "share" / "vhsm" / "LICENSE").read_text().startswith("MIT License")
    links = prefix.parent / "links" / "bin"
    for name in ("vhsm", "hsm_enhanced"):
        assert os.readlink(links / name) == str(prefix / "bin" / name)


def test_another_user_signs_with_the_install(
    signing_install: Path, other_user: pwd.struct_passwd
) -> None:
    bin_ = signing_install.parent / "links" / "bin"  # through the BINDIR links
    work = Path(tempfile.mkdtemp(prefix="vhsm-other-", dir="/tmp"))
    try:
        os.chown(work, other_user.pw_uid, other_user.pw_gid)
        os.chmod(work, 0o700)
        (work / "doc").write_text("release 1.0\n")
        os.chown(work / "doc", other_user.pw_uid, other_user.pw_gid)
        p = _as(other_user, str(bin_ / "vhsm"), "--help", cwd=work)
        assert p.returncode == 0 and "token" in p.stdout and "key" in p.stdout, p.stderr
        p = _as(other_user, str(bin_ / "hsm_enhanced"), "-help", cwd=work)
        assert p.returncode == 0 and "-generate_key_pair" in p.stdout, p.stderr
        for args in (
            ["key", "generate-master-key"],
            ["key", "generate", "release_key"],
            ["key", "sign", "release_key", "-i", "doc", "-o", "doc.sig"],
            ["key", "verify", "release_key", "-i", "doc", "-s", "doc.sig"],
            ["token", "generate-key", "t.key"],
            ["token", "store", "doc", "--key", "t.key"],
        ):
            p = _as(other_user, str(bin_ / "vhsm"), *args, cwd=work)
            assert p.returncode == 0, (args, p.stderr)
        assert len((work / "doc.sig").read_bytes()) == 64
        assert (work / "keystore.dat").stat().st_uid == other_user.pw_uid
        # the signing-only install has no mount: one line saying how to get it
        (work / "mnt").mkdir()
        p = _as(other_user, str(bin_ / "vhsm"), "mount", "--key", "t.key", "mnt", cwd=work)
        assert p.returncode == 1
        assert p.stderr.count("\n") == 1 and "pip install 'vhsm[mount]'" in p.stderr, p.stderr
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _commands(group: str) -> list[str]:
    from cli import main

    main._register()
    import click

    grp = main.vhsm.commands[group]
    assert isinstance(grp, click.Group)
    return sorted(grp.commands)


def _plain(text: str) -> str:
    """man's output without its bold and underline (character, backspace, character)."""
    return re.sub(r".\x08", "", text)


def test_man_pages_installed_and_rendered(signing_install: Path) -> None:
    man1 = signing_install / "share" / "man" / "man1"
    pages = sorted(p.name for p in man1.glob("*.1"))
    for page in ("vhsm.1", "vhsm-key.1", "vhsm-token.1", "vhsm-keysvc.1", "hsm_enhanced.1"):
        assert page in pages
    res = subprocess.run(
        ["man", "-l", "-Tutf8", str(man1 / "vhsm-key.1")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MANWIDTH": "100", "LC_ALL": "C.UTF-8"},
    )
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
    text = _plain(res.stdout)
    assert "VHSM-KEY(1)" in text
    for name in _commands("key"):
        assert f"vhsm key {name}" in text, name
    token = _plain(
        subprocess.run(
            ["man", "-l", "-Tutf8", str(man1 / "vhsm-token.1")],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    )
    assert "vhsm token retrieve" in token and "--recursive" in token
    assert (
        signing_install.parent / "links" / "man1" / "vhsm-key.1"
    ).resolve() == man1 / "vhsm-key.1"


def _units_for(prefix: Path, dest: Path) -> list[Path]:
    """The shipped units with the install path rewritten to the temp prefix; the template is
    instantiated (verify needs an instance)."""
    out = []
    for name, src in UNITS.items():
        text = src.read_text().replace("/opt/vhsm/", f"{prefix}/")
        assert "/opt/vhsm" not in text
        target = dest / name.replace("@.", "@vault.")
        target.write_text(text)
        out.append(target)
    return out


def _verify(units: list[Path], prefix: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=120,
        # Documentation=man:... is checked with man(1): find the installed pages
        env={**os.environ, "MANPATH": str(prefix / "share" / "man")},
    )


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze missing")
def test_units_pass_systemd_analyze_verify(signing_install: Path, tmp_path: Path) -> None:
    units = _units_for(signing_install, tmp_path)
    res = _verify(units, signing_install)
    assert res.returncode == 0 and res.stdout + res.stderr == "", res.stdout + res.stderr
    keysvc = UNITS["vhsm-keysvc.service"].read_text()
    assert re.search(r"^Alias=hsm-service\.service$", keysvc, re.M)
    assert re.search(
        r"^ExecStart=/opt/vhsm/bin/vhsm keysvc serve .*--socket /run/vhsm/keysvc.sock", keysvc, re.M
    )
    for opt in (
        "RuntimeDirectory=vhsm",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_UNIX",
        "SystemCallFilter=@system-service",
        "CapabilityBoundingSet=",
        "MemoryDenyWriteExecute=yes",
        "LockPersonality=yes",
        "LimitMEMLOCK=infinity",
    ):
        assert re.search(rf"^{re.escape(opt)}$", keysvc, re.M), opt
    # the check is real: a misspelt setting is reported
    bad = tmp_path / "bad"
    bad.mkdir()
    broken = _units_for(signing_install, bad)
    broken[0].write_text(broken[0].read_text().replace("ProtectHome=yes", "ProtectHome=maybe"))
    res = _verify(broken, signing_install)
    assert "protect home value" in res.stdout + res.stderr


@pytest.mark.full
def test_full_install_builds_the_patched_pyfuse3(other_user: pwd.struct_passwd) -> None:
    """The default extras (mount, hardware): pyfuse3 built with contrib/pyfuse3's patch, which
    the mount recognises, and the mount command available to another user."""
    top = Path(tempfile.mkdtemp(prefix="vhsm-install-full-", dir="/tmp"))
    os.chmod(top, 0o755)
    try:
        prefix = top / "opt-vhsm"
        make_install(prefix, "BINDIR=", "MANLINKDIR=", timeout=1800)
        res = subprocess.run(
            [
                str(prefix / "bin" / "python"),
                "-c",
                "from vhsmfs.mount import fusebuild; print(fusebuild.describe())",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        )
        assert '(True, "pyfuse3 3.5.0 with vhsm\'s nogil-copies patch")' in res.stdout, res
        p = _as(other_user, str(prefix / "bin" / "vhsm"), "mount", "--help", cwd=top)
        assert p.returncode == 0 and "--background" in p.stdout, p.stderr
        p = _as(other_user, str(prefix / "bin" / "vhsm"), "scan-hardware", "--json", cwd=top)
        assert p.returncode == 0 and "library missing" not in p.stdout, p.stdout
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_install_refuses_an_interpreter_in_a_home_directory(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "install",
            f"PREFIX={tmp_path / 'p'}",
            "EXTRAS=",
            "PY=/root/.pyenv/versions/3.11/bin/python3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0 and "other users cannot run" in res.stderr
    assert not (tmp_path / "p").exists()
