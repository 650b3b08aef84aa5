"""Reports must not say OK when nothing was checked (issue 11, class 5).

`vhsm token verify` with a key that opens no token, or on an empty store, and `vhsm audit
verify` after the log was cut, emptied or deleted (with and without its head), each built with
the real CLI as an attacker with write access to the files would leave them; a logrotate
rotation still verifies, and an operator's acknowledgment (audited) accepts a deliberate reset.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from attack import assert_one_line_error, env_for, vhsm

from keysvc import audit

LOG = "hsm_audit.log"
BREAK = "unacknowledged audit chain break"


def ok(*args: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    p = vhsm(*args, cwd=cwd)
    assert p.returncode == 0, (args, p.stdout, p.stderr)
    assert b"Traceback" not in p.stderr
    return p


def hsm_enhanced(*args: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["hsm_enhanced", *args], cwd=cwd, env=env_for(), capture_output=True, timeout=60
    )


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A key service data dir whose audit log holds a few entries written by the real CLI."""
    d = tmp_path / "data"
    d.mkdir()
    ok("key", "generate-master-key", cwd=d)
    for name in ("k1", "k2", "k3"):
        ok("key", "generate", name, cwd=d)
    assert b"OK: 4 entries" in ok("audit", "verify", cwd=d).stdout
    return d


def write_one(d: Path, name: str = "later") -> None:
    """The next audited operation: a writer that finds the log as the attacker left it."""
    ok("key", "generate", name, cwd=d)


def verify_fails(d: Path, *fragments: str, files: tuple[str, ...] = ()) -> str:
    line = assert_one_line_error(vhsm("audit", "verify", *files, cwd=d), *fragments)
    # the compat entry point runs the same check
    assert hsm_enhanced("-verify_audit", cwd=d).returncode == 1
    return line


# -- token verify ---------------------------------------------------------------------------------


def test_token_verify_with_a_key_that_opens_nothing_fails(tmp_path: Path) -> None:
    ok("token", "generate-key", "a.key", cwd=tmp_path)
    ok("token", "generate-key", "b.key", cwd=tmp_path)
    (tmp_path / "f").write_bytes(b"data")
    for _ in range(2):
        ok("token", "store", "f", "--key", "a.key", cwd=tmp_path)
    p = vhsm("token", "verify", "--key", "b.key", cwd=tmp_path)
    assert_one_line_error(p, "nothing was verified", "2 token(s) are under other keys")
    assert p.stdout.count(b"SKIP ") == 2 and b"OK " not in p.stdout
    # some OK, some SKIP: a real check happened
    ok("token", "store", "f", "--key", "b.key", cwd=tmp_path)
    p = ok("token", "verify", "--key", "b.key", cwd=tmp_path)
    assert p.stdout.count(b"SKIP ") == 2 and p.stdout.count(b"OK ") == 1


def test_token_verify_of_an_empty_store_fails(tmp_path: Path) -> None:
    ok("token", "generate-key", "a.key", cwd=tmp_path)
    (tmp_path / "empty").mkdir()
    for mode in (["--key", "a.key"], ["--no-key"]):
        p = vhsm("token", "verify", *mode, "--store", "empty", cwd=tmp_path)
        assert_one_line_error(p, "holds no tokens: nothing was verified")


# -- audit verify: what an attacker with write access to the log can do -------------------------


def test_cut_tail_then_a_new_line_fails_verify(data: Path) -> None:
    log = data / LOG
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:-2]))  # the last two entries are gone
    write_one(data)  # before: the writer noted "truncated" in a line verify then accepted
    verify_fails(data, BREAK, "log truncated: head records seq 4, log ends at seq 2")


def test_emptied_log_fails_verify_but_a_rotation_verifies(data: Path) -> None:
    log = data / LOG
    # logrotate's way (contrib/keysvc/logrotate-hsm-audit: rename, nocreate): a rotation
    os.rename(log, data / f"{LOG}.1")
    # right after it, nothing is in the live log: the rotated file is verified with it, and
    # the live log alone verifies nothing
    assert b"OK: 4 entries" in ok("audit", "verify", f"{LOG}.1", LOG, cwd=data).stdout
    verify_fails(data, "audit log not found")
    write_one(data, "after-rotation")
    assert b"continues from seq 4" in ok("audit", "verify", cwd=data).stdout
    both = ok("audit", "verify", f"{LOG}.1", LOG, cwd=data).stdout
    assert b"OK: 5 entries" in both
    # emptied in place: nothing beside the log ends where the head says the chain ended
    log.write_bytes(b"")
    write_one(data)  # before: a chain-start line continued from the head, verify said OK
    verify_fails(data, BREAK, "log emptied or removed: head records seq 5")
    # and the rotated file does not hide it: the live file no longer continues it
    verify_fails(data, "does not continue the previous one", files=(f"{LOG}.1", LOG))


def test_logrotate_dateext_and_create_modes_verify(data: Path) -> None:
    log = data / LOG
    os.rename(log, data / f"{LOG}-20261203")  # dateext, delaycompress keeps it plain
    log.touch(mode=0o600)  # `create` instead of `nocreate`
    write_one(data)
    assert b"OK: 1 entries" in ok("audit", "verify", cwd=data).stdout
    assert b"OK: 5 entries" in ok("audit", "verify", f"{LOG}-20261203", LOG, cwd=data).stdout
    # a compressed or planted sibling is no rotation: removed, the log is a break again
    os.unlink(data / f"{LOG}-20261203")
    log.write_bytes(b"")
    write_one(data, "second")
    verify_fails(data, BREAK, "log emptied or removed")


def test_log_and_head_deleted_fails_verify(data: Path) -> None:
    os.unlink(data / LOG)
    os.unlink(data / f".{LOG}.head")
    write_one(data)  # before: a new chain from seq 1, verify said OK
    verify_fails(data, BREAK, "log and head missing while the audit key exists")


def test_head_deleted_fails_verify_before_and_after_a_write(data: Path) -> None:
    log = data / LOG
    log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:-1]))
    os.unlink(data / f".{LOG}.head")  # hides the cut
    verify_fails(data, "head .hsm_audit.log.head is missing")
    write_one(data)
    verify_fails(data, BREAK, "head .hsm_audit.log.head missing: log ends at seq 3")


def test_empty_log_verifies_nothing(data: Path) -> None:
    log = data / LOG
    log.write_bytes(b"")
    os.unlink(data / f".{LOG}.head")
    verify_fails(data, "no entries: nothing was verified")
    log.write_bytes(audit.HEADER.encode())
    verify_fails(data, "no entries: nothing was verified")


def test_planted_fifo_beside_an_emptied_log_is_no_rotation(data: Path) -> None:
    log = data / LOG
    os.mkfifo(data / f"{LOG}.1")  # would hang a writer that opened it to look for the head
    log.write_bytes(b"")
    write_one(data)  # bounded by vhsm()'s timeout
    verify_fails(data, BREAK, "log emptied or removed")


def test_old_style_truncation_line_is_a_break_token_tampering_is_not(data: Path) -> None:
    # a token retrieve that finds tampered data records a SECURITY_VIOLATION: not a chain break
    ok("token", "generate-key", "a.key", cwd=data)
    (data / "f").write_bytes(b"data" * 1000)
    tok = ok("token", "store", "f", "--key", "a.key", "-q", cwd=data).stdout.decode().strip()
    chunk = data / "secure_storage" / f"{tok}.data" / "00000000"  # its only object
    raw = bytearray(chunk.read_bytes())
    raw[-1] ^= 1
    chunk.write_bytes(bytes(raw))
    assert vhsm("token", "retrieve", tok, "out", "--key", "a.key", cwd=data).returncode != 0
    assert list(audit.read_entries(data / LOG))[-1].event == "SECURITY_VIOLATION"
    assert b"OK: 6 entries" in ok("audit", "verify", cwd=data).stdout
    # what writers before this change recorded for a cut tail, chained like any line
    w = audit.AuditWriter(data / LOG)
    w.append(
        [
            audit.AuditRecord(
                "SECURITY_VIOLATION",
                "N/A",
                "vhsm",
                "audit log truncated: head records seq 9, log ends at seq 4",
                False,
            )
        ]
    )
    w.close()
    verify_fails(data, BREAK, "at seq 7", "audit log truncated: head records seq 9")


# -- acknowledging a deliberate reset ----------------------------------------------------------


def test_acknowledge_covers_earlier_breaks_only(data: Path) -> None:
    p = vhsm("audit", "acknowledge", "--reason", "nothing happened", cwd=data)
    assert_one_line_error(p, "nothing to acknowledge")
    os.unlink(data / LOG)  # e.g. the addendum's troubleshooting advice: delete the log
    write_one(data)
    verify_fails(data, BREAK)
    p = ok("audit", "acknowledge", "--reason", "log deleted by ops, ticket 42", cwd=data)
    assert b"1 chain break(s) acknowledged" in p.stdout
    ack = list(audit.read_entries(data / LOG))[-1]
    assert ack.event == "CONFIG_CHANGE" and ack.user == "root"
    assert ack.details == "audit chain break acknowledged: log deleted by ops, ticket 42 [uid=0]"
    assert b"acknowledged" in ok("audit", "verify", cwd=data).stdout
    # a later break is not covered by the earlier acknowledgment
    log = data / LOG
    write_one(data, "after-ack")
    log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:-1]))
    write_one(data, "again")
    verify_fails(data, BREAK, "log truncated")
    # an acknowledgment of a log that was cut but not written since records both at once
    log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:-1]))
    ok("audit", "acknowledge", "--reason", "restored from backup", cwd=data)
    assert b"chain break(s) acknowledged" in ok("audit", "verify", cwd=data).stdout


def test_acknowledge_cannot_hide_an_edited_line(data: Path) -> None:
    log = data / LOG
    log.write_bytes(log.read_bytes().replace(b"|k2|", b"|kX|"))
    p = vhsm("audit", "acknowledge", "--reason", "try", cwd=data)
    assert_one_line_error(p, "still fails verification", "chain value does not match")
    verify_fails(data, "chain value does not match")


def test_a_huge_line_in_the_log_is_read_past_not_held(data: Path) -> None:
    """A log whose last "line" is 512 MiB without a newline (a sparse file: cheap to plant).
    verify, logs and the next writer read lines in pieces of at most 64 KiB, so each refuses
    in one line under a 400 MiB address-space cap, where reading the line whole would not."""
    log = data / LOG
    with open(log, "r+b") as f:
        f.truncate(f.seek(0, os.SEEK_END) + (512 << 20))
    cap = 400 << 20
    p = vhsm("audit", "verify", cwd=data, max_memory=cap)
    assert_one_line_error(p, "malformed line")
    p = vhsm("audit", "logs", "1", cwd=data, max_memory=cap)
    assert p.returncode == 0 and b"Total entries: 4" in p.stdout, p.stderr
    p = vhsm("key", "generate", "after", cwd=data, max_memory=cap)
    assert_one_line_error(p, "longer than any entry")
