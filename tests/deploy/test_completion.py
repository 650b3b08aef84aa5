"""Shell completion (cli/completion.py) through click's real protocol, as bash runs it:
key names from a running daemon, token ids from the store; nothing (and no output on stderr,
no prompt, no wait) when there is nothing to ask."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from deployutil import REPO
from ksutil import Daemon, Work


def _complete(
    words: str, cwd: Path, **env: str
) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    """`vhsm` asked to complete `words` (the last word is the one being completed)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HSM_", "VHSM_"))}
    cword = len(words.split()) if words.endswith(" ") else len(words.split()) - 1
    p = subprocess.run(
        [sys.executable, "-c", "import sys; sys.argv[0]='vhsm'; from cli.main import main; main()"],
        cwd=cwd,
        env={
            **base,
            "PYTHONPATH": str(REPO),
            "_VHSM_COMPLETE": "bash_complete",
            "COMP_WORDS": words,
            "COMP_CWORD": str(cword),
            **env,
        },
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.returncode == 0 and p.stderr == "", p.stderr
    values = [ln.split(",", 1)[1] for ln in p.stdout.splitlines() if ln.startswith("plain,")]
    return values, p


def _work(tmp_path: Path) -> Work:
    d = tmp_path / "w"
    d.mkdir()
    w = Work(d)
    w.hsm("-generate_master_key")
    for name in ("release_key", "release_old", "backup_key"):
        w.hsm("-generate_key_pair", name)
    return w


def test_key_names_come_from_the_running_daemon(tmp_path: Path) -> None:
    work = _work(tmp_path)
    d = Daemon(work).start()
    try:
        sock = str(d.sock)
        names, _ = _complete("vhsm key sign ", work.path, HSM_SOCKET=sock)
        assert sorted(names) == ["backup_key", "release_key", "release_old"]
        names, _ = _complete("vhsm key verify rel", work.path, HSM_SOCKET=sock)
        assert sorted(names) == ["release_key", "release_old"]
        # --socket given on the line is used
        names, _ = _complete(f"vhsm key --socket {sock} info b", tmp_path)
        assert names == ["backup_key"]
        # a new key's name is not completed from existing ones
        names, _ = _complete("vhsm key generate ", work.path, HSM_SOCKET=sock)
        assert names == []
    finally:
        d.stop()
    # no daemon: nothing, and the keystore is not opened in-process (no audit line)
    before = work.audit_lines()
    names, _ = _complete("vhsm key sign ", work.path)
    assert names == [] and work.audit_lines() == before


def test_a_daemon_that_never_answers_does_not_hang_completion(tmp_path: Path) -> None:
    sock = tmp_path / "silent.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(sock))
    srv.listen(4)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])  # accepted, never answered
            except TimeoutError:
                pass

    t = threading.Thread(target=accept)
    t.start()
    try:
        start = time.monotonic()
        names, _ = _complete("vhsm key sign ", tmp_path, HSM_SOCKET=str(sock))
        assert names == []
        assert time.monotonic() - start < 10  # the 0.5 s timeout, plus Python's start-up
    finally:
        stop.set()
        t.join()
        for c in conns:
            c.close()
        srv.close()


def test_token_ids_come_from_the_store(tmp_path: Path) -> None:
    work = Work(tmp_path)
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.txt").write_text("b")
    work.vhsm("token", "generate-key", "t.key")
    ids = [
        work.vhsm("token", "store", f, "--key", "t.key", "-q").stdout.strip()
        for f in ("a.txt", "b.txt")
    ]
    other = tmp_path / "other"
    (tmp_path / "c.txt").write_text("c")
    third = work.vhsm(
        "token", "store", "c.txt", "--key", "t.key", "-q", "--store", str(other)
    ).stdout.strip()
    got, _ = _complete("vhsm token retrieve ", tmp_path)
    assert sorted(got) == sorted(ids)
    got, _ = _complete(f"vhsm token info {ids[0][:6]}", tmp_path)
    assert got == [ids[0]]
    got, _ = _complete(f"vhsm token retrieve --store {other} ", tmp_path)
    assert got == [third]
    got, _ = _complete("vhsm token delete ", tmp_path, VHSM_STORE=str(other))
    assert got == [third]
    # a token already on the line is not offered again
    got, _ = _complete(f"vhsm token verify {ids[0]} ", tmp_path)
    assert got == [ids[1]]
    # no store: nothing, and none is created by pressing <TAB>
    got, _ = _complete("vhsm token retrieve ", tmp_path, VHSM_STORE=str(tmp_path / "none"))
    assert got == [] and not (tmp_path / "none").exists()


def test_bash_zsh_fish_scripts_are_generated(tmp_path: Path) -> None:
    for shell in ("bash", "zsh", "fish"):
        p = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; sys.argv[0]='vhsm'; from cli.main import main; main()",
            ],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO), "_VHSM_COMPLETE": f"{shell}_source"},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert p.returncode == 0 and "_VHSM_COMPLETE" in p.stdout, (shell, p.stderr)
