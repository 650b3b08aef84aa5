"""Terminal and log injection (issue 11, class 6).

File names, key names and user names holding ESC/OSC/CSI sequences, CR/LF, C1 controls, bidi
overrides and NUL go through the real CLI; no raw control byte may reach stdout or stderr of
the human-oriented outputs (cli/display.py escapes them as \\xHH / \\uHHHH), nor the audit log
file (percent-escaped); JSON and CSV stay exact.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from attack import assert_one_line_error, env_for, vhsm

from vhsmfs.backend import LocalBackend
from vhsmfs.keyfile import StaticKeyProvider, load_key_file
from vhsmfs.store import TokenStore

NASTY = {
    "osc": "osc\x1b]0;pwned\x07title",
    "csi": "csi\x1b[2J\x1b[31mred",
    "cr": "cr\rforged",
    "lf": "lf\nOK 00000000-0000-0000-0000-000000000000",
    "c1": "c1\u009b31mred",
    "bidi": "bidi\u202etxt.exe\u2066x\u2069",
}
# the raw bytes none of the outputs may carry (UTF-8 for the C1 and bidi characters)
RAW = [b"\x1b", b"\x07", b"\r", b"\x00", b"\xc2\x9b", b"\xe2\x80\xae", b"\xe2\x81\xa6"]


def assert_inert(p: subprocess.CompletedProcess[bytes]) -> str:
    """No raw control byte in stdout/stderr, and no line forged by an embedded LF."""
    for stream in (p.stdout, p.stderr):
        for raw in RAW:
            assert raw not in stream, (raw, stream)
        assert not any(ln.startswith(b"OK 00000000") for ln in stream.splitlines()), stream
    assert b"Traceback" not in p.stderr
    return (p.stdout + p.stderr).decode()


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    p = vhsm(*args, cwd=cwd)
    assert p.returncode == 0, (args, p.stdout, p.stderr)
    return p


def hsm_enhanced(*args: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["hsm_enhanced", *args], cwd=cwd, env=env_for(), capture_output=True, timeout=60
    )


def test_token_commands_escape_stored_names(tmp_path: Path) -> None:
    run("token", "generate-key", "k.key", cwd=tmp_path)
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in NASTY.values():
        (tree / name).write_bytes(name.encode())
    text = assert_inert(run("token", "store", "-r", "tree", "--key", "k.key", cwd=tmp_path))
    assert "tree/osc\\x1b]0;pwned\\x07title" in text and "lf\\x0aOK 0000" in text
    toks = {
        name: run("token", "store", str(tree / name), "--key", "k.key", "-q", cwd=tmp_path)
        .stdout.decode()
        .strip()
        for name in NASTY.values()
    }
    listed = assert_inert(run("token", "list", "--key", "k.key", cwd=tmp_path))
    assert "bidi\\u202etxt.exe\\u2066x\\u2069" in listed and "c1\\x9b31mred" in listed
    for name, tok in toks.items():
        assert_inert(run("token", "info", tok, "--key", "k.key", cwd=tmp_path))
        out = assert_inert(run("token", "retrieve", tok, "out", "--key", "k.key", cwd=tmp_path))
        assert (tmp_path / "out" / name).read_bytes() == name.encode()  # the file is exact
        assert out.strip().startswith("out/") and "\n" not in out.strip()
        # the error names the existing file: still one line, escaped
        p = vhsm("token", "retrieve", tok, "out", "--key", "k.key", cwd=tmp_path)
        assert_inert(p)
        assert_one_line_error(p, "already exists")
    # JSON is data: exact names, quoted by the encoder
    p = run("token", "list", "--key", "k.key", "--json", cwd=tmp_path)
    assert_inert(p)
    names = {r["name"] for r in json.loads(p.stdout)}
    assert set(NASTY.values()) <= names


def test_nul_in_a_stored_name_is_escaped(tmp_path: Path) -> None:
    run("token", "generate-key", "k.key", cwd=tmp_path)
    src = tmp_path / "plain"
    src.write_bytes(b"x")
    # a name no file system allows, stored through the library (the store records any name)
    store = TokenStore(
        LocalBackend(tmp_path / "secure_storage"),
        StaticKeyProvider(load_key_file(tmp_path / "k.key")),
    )
    tok = str(store.store_file(src, name="nul\x00\x1b[8mhidden"))
    listed = assert_inert(run("token", "list", "--key", "k.key", cwd=tmp_path))
    assert "nul\\x00\\x1b[8mhidden" in listed
    info = assert_inert(run("token", "info", tok, "--key", "k.key", cwd=tmp_path))
    assert "nul\\x00" in info


def test_audit_and_key_outputs_escape_key_and_user_names(tmp_path: Path) -> None:
    run("key", "generate-master-key", cwd=tmp_path)
    (tmp_path / "msg").write_bytes(b"m")
    user = "mallory\u202eeciffo\u0085x"  # the user-name check lets C1 and bidi through
    assert_inert(run("user", "set", user, cwd=tmp_path))
    assert "mallory\\u202eeciffo\\x85x" in assert_inert(run("user", "show", cwd=tmp_path))
    for name in (NASTY["osc"], NASTY["lf"]):
        # unknown key: an error naming it (one line), and an audited failure carrying it
        p = vhsm("key", "sign", name, "-i", "msg", "-o", "sig", cwd=tmp_path)
        assert_inert(p)
        assert_one_line_error(p)
        assert_inert(vhsm("key", "info", name, cwd=tmp_path))
    log = (tmp_path / "hsm_audit.log").read_bytes()
    for raw in RAW:
        assert raw not in log, raw  # percent-escaped in the file
    assert b"osc%1B]0;pwned%07title" in log and b"lf%0AOK 0000" in log
    for p in (run("audit", "logs", cwd=tmp_path), hsm_enhanced("-audit_logs", cwd=tmp_path)):
        assert p.returncode == 0
        text = assert_inert(p)
        assert "osc\\x1b]0;pwned\\x07title" in text and "mallory\\u202eeciffo" in text
    # CSV is data: the fields come back exact
    exported = run("audit", "export", "--csv", cwd=tmp_path).stdout.decode()
    rows = list(csv.reader(io.StringIO(exported)))
    assert NASTY["osc"] in {r[2] for r in rows} and user in {r[3] for r in rows}
    assert b"OK:" in run("audit", "verify", cwd=tmp_path).stdout


def test_error_lines_stay_one_line(tmp_path: Path) -> None:
    # a message quoting a name with LF and ESC: one escaped Error line, both syntaxes
    p = vhsm("token", "info", "x\ny\x1b[2J", cwd=tmp_path)
    assert_inert(p)
    assert_one_line_error(p)
    p = hsm_enhanced("-bogus\n\x1b]0;t\x07", cwd=tmp_path)
    assert_inert(p)
    assert p.returncode == 2 and p.stderr.startswith(b"Error: unknown option")
    os.mkdir(tmp_path / "store")
    p = vhsm("token", "store", "missing\x1b[1m", "--store", "store", cwd=tmp_path)
    assert_inert(p)
    assert_one_line_error(p, "missing\\x1b[1m")


def test_key_names_and_user_names_the_log_cannot_hold_are_refused(tmp_path: Path) -> None:
    """A key name ending in a newline was accepted (`$` in the name pattern matches before a
    final newline); a user name with undecodable argv bytes (a lone surrogate in Python) made
    `user set` crash with a UnicodeEncodeError traceback. Both are one-line errors now."""
    run("key", "generate-master-key", cwd=tmp_path)
    p = vhsm("key", "generate", "abc\n", cwd=tmp_path)
    assert_one_line_error(p, "key name")
    assert b"abc" not in run("key", "list", cwd=tmp_path).stdout
    p = subprocess.run(
        [sys.executable, "-m", "cli.main", "user", "set", b"a\xffb"],
        cwd=tmp_path,
        env=env_for(),
        capture_output=True,
        timeout=60,
    )
    assert_one_line_error(p, "user name")
