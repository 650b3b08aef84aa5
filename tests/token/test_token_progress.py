"""The progress bar: on stderr when stderr is a terminal, never on a pipe, never on stdout."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

VHSM = [sys.executable, "-m", "cli.main"]
BIG = 8 << 20  # above the size at which a bar is shown


def _store_with_stderr_on_pty(work: Path, *args: str) -> tuple[int, str, bytes]:
    """Run `vhsm token store` with stderr on a pseudo-terminal and stdout on a pipe."""
    master, slave = pty.openpty()
    # A terminal has a size; with 0 columns tqdm draws an empty bar.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    try:
        p = subprocess.Popen(
            [*VHSM, "token", "store", *args],
            cwd=work,
            stdout=subprocess.PIPE,
            stderr=slave,
            stdin=subprocess.DEVNULL,
        )
        os.close(slave)
        seen = bytearray()
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            seen += data
        out = p.stdout.read().decode()  # type: ignore[union-attr]
        p.stdout.close()  # type: ignore[union-attr]
        return p.wait(timeout=60), out, bytes(seen)
    finally:
        os.close(master)


def _setup(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    subprocess.run(
        [*VHSM, "token", "generate-key", "k.key"], cwd=work, check=True, capture_output=True
    )
    (work / "big.bin").write_bytes(os.urandom(BIG))
    return work


def test_bar_on_terminal_and_stdout_stays_clean(tmp_path: Path) -> None:
    work = _setup(tmp_path)
    rc, out, err = _store_with_stderr_on_pty(work, "big.bin", "--key", "k.key")
    assert rc == 0
    assert "%" in err.decode(errors="replace")  # tqdm's percentage
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("Token: ")  # nothing of the bar on stdout


def test_no_bar_when_stderr_is_a_pipe(tmp_path: Path) -> None:
    work = _setup(tmp_path)
    r = subprocess.run(
        [*VHSM, "token", "store", "big.bin", "--key", "k.key"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0
    assert r.stderr == ""


def test_no_progress_flag_silences_terminal(tmp_path: Path) -> None:
    work = _setup(tmp_path)
    rc, _out, err = _store_with_stderr_on_pty(work, "big.bin", "--key", "k.key", "--no-progress")
    assert rc == 0
    assert b"%" not in err
