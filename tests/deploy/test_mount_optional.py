"""pyfuse3 is optional (the `mount` extra): without it the key service, the token store and
`hsm_enhanced` work, `vhsm mount` says in one line how to get it, and with it the mount says
which pyfuse3 build runs (vhsm's patched one, or PyPI's and what that costs)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from deployutil import REPO

# The real CLI entry points, with every import of pyfuse3 failing as if it were not installed.
_BLOCKED = (
    "import sys; sys.modules['pyfuse3'] = None; "
    "from {mod} import main; sys.argv[0] = '{prog}'; main()"
)


def _cli(work: Path, *args: str, prog: str = "vhsm") -> subprocess.CompletedProcess[str]:
    mod = "cli.main" if prog == "vhsm" else "cli.compat"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HSM_", "VHSM_"))}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-c", _BLOCKED.format(mod=mod, prog=prog), *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _ok(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 0, p.args[3:] if len(p.args) > 3 else p.args
    assert "pyfuse3" not in p.stderr, p.stderr
    return p.stdout


def test_everything_but_the_mount_works_without_pyfuse3(tmp_path: Path) -> None:
    (tmp_path / "doc").write_text("release\n")
    _ok(_cli(tmp_path, "key", "generate-master-key"))
    _ok(_cli(tmp_path, "key", "generate", "release_key"))
    _ok(_cli(tmp_path, "key", "sign", "release_key", "-i", "doc", "-o", "doc.sig"))
    assert (
        "verified"
        in _ok(_cli(tmp_path, "key", "verify", "release_key", "-i", "doc", "-s", "doc.sig")).lower()
    )
    assert _ok(_cli(tmp_path, "-list", prog="hsm_enhanced")).split() == ["release_key"]
    _ok(_cli(tmp_path, "token", "generate-key", "t.key"))
    token = _ok(_cli(tmp_path, "token", "store", "doc", "--key", "t.key", "-q")).strip()
    _ok(_cli(tmp_path, "token", "retrieve", token, "out", "--key", "t.key"))
    assert (tmp_path / "out" / "doc").read_text() == "release\n"
    _ok(_cli(tmp_path, "audit", "verify"))
    assert "mount" in _ok(_cli(tmp_path, "--help"))  # listed, even if it cannot run here


@pytest.mark.parametrize("args", [["mount", "--key", "t.key", "mnt"], ["umount", "mnt"]])
def test_mount_without_pyfuse3_says_how_to_install_it(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "mnt").mkdir()
    p = _cli(tmp_path, *args)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.count("\n") == 1, p.stderr  # one line, no traceback
    assert p.stderr.startswith("Error: the mount needs pyfuse3")
    assert "pip install 'vhsm[mount]'" in p.stderr and "make install" in p.stderr


def test_the_patched_build_is_recognised() -> None:
    from vhsmfs.mount import fusebuild

    # this environment runs the build `make` makes (tests/mount/test_pyfuse3_build.py)
    assert fusebuild.available() and fusebuild.patched()
    patched, line = fusebuild.describe()
    assert patched and line == "pyfuse3 3.5.0 with vhsm's nogil-copies patch"


def test_a_build_without_the_patch_is_named_with_its_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    """As PyPI's build: the sources it installs lack the patch's lines."""
    from vhsmfs.mount import fusebuild

    monkeypatch.setitem(fusebuild.PATCH_MARKERS, "pyfuse3/internal.pxi", "# not in stock pyfuse3")
    patched, line = fusebuild.describe()
    assert not patched
    assert line.startswith("pyfuse3 3.5.0 as published on PyPI, without vhsm's patch")
    assert "slower" in line and "make install" in line
    # and the patch really adds what the markers look for (they must not drift apart)
    patch = (REPO / "contrib" / "pyfuse3" / "nogil-copies.patch").read_text()
    monkeypatch.undo()
    lines = patch.splitlines()
    for marker in fusebuild.PATCH_MARKERS.values():
        assert any(ln.startswith("+") and marker in ln for ln in lines), marker


@pytest.mark.full
def test_clean_venv_pip_install(tmp_path: Path) -> None:
    """A real `pip install .` (no extras) into a fresh venv: no pyfuse3 at all, signing works,
    the mount fails in one line; then `pip install '.[mount]'` brings PyPI's pyfuse3, and the
    mount names it and its cost when it starts."""
    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "pip"), "install", "-q"]
    subprocess.run([*pip, str(REPO)], check=True, timeout=900, capture_output=True)
    vhsm = str(venv / "bin" / "vhsm")
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    (work / "doc").write_text("x")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [vhsm, *args], cwd=work, env=env, capture_output=True, text=True, timeout=120
        )

    probe = [str(venv / "bin" / "python"), "-c", "import pyfuse3"]
    assert subprocess.run(probe, capture_output=True, timeout=60).returncode != 0
    for args in (
        ["key", "generate-master-key"],
        ["key", "generate", "k"],
        ["key", "sign", "k", "-i", "doc", "-o", "doc.sig"],
    ):
        assert run(*args).returncode == 0, args
    (work / "mnt").mkdir()
    subprocess.run([vhsm, "token", "generate-key", "t.key"], cwd=work, env=env, check=True)
    p = run("mount", "--key", "t.key", "mnt")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "vhsm[mount]" in p.stderr
    # with the extra: PyPI's pyfuse3, named at mount start
    subprocess.run([*pip, f"{REPO}[mount]"], check=True, timeout=900, capture_output=True)
    p = run("mount", "--key", "t.key", "--store", "st", "--background", "mnt")
    try:
        assert p.returncode == 0, p.stderr
        assert "as published on PyPI, without vhsm's patch" in p.stderr and "slower" in p.stderr
    finally:
        run("umount", "mnt")
