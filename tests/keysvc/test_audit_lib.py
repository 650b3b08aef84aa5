"""The audit log library: chain, tamper detection, fail-closed writes, concurrent writers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from keysvc import audit
from keysvc.errors import AuditError


def _write_events(log: Path, n: int) -> None:
    for i in range(n):
        audit.audit_event("SIGN_OPERATION", f"k{i % 3}", f"event {i}", True, log_path=log)


def test_line_format_and_chain(tmp_path: Path) -> None:
    log = tmp_path / "hsm_audit.log"
    audit.audit_event(
        "KEY_CREATED", "my_key", "Key pair generated", True, user="alice@example.com", log_path=log
    )
    audit.audit_event("AUTH_FAILURE", "", "bad|key\nforged|line", False, user="eve|x", log_path=log)
    lines = log.read_text().splitlines()
    assert lines[0] == "# Virtual HSM Audit Log"
    assert lines[1] == "# Format: timestamp|event_type|key_name|user_id|details|success|seq|chain"
    f = lines[2].split("|")
    assert f[1:4] == ["KEY_CREATED", "my_key", "alice@example.com"]
    assert f[5:7] == ["SUCCESS", "1"] and len(f[7]) == 64
    # separators and newlines inside fields are escaped: still exactly 8 fields, 4 lines
    assert len(lines) == 4
    g = lines[3].split("|")
    assert len(g) == 8 and g[2] == "N/A" and g[3] == "eve%7Cx" and g[5] == "FAILURE"
    assert audit.verify([log]).ok
    assert (os.stat(log).st_mode & 0o777) == 0o600
    assert (os.stat(tmp_path / ".hsm_audit.log.key").st_mode & 0o777) == 0o600


@pytest.mark.parametrize("case", ["edit", "delete", "reorder", "insert", "truncate"])
def test_tampering_names_first_bad_line(tmp_path: Path, case: str) -> None:
    log = tmp_path / "hsm_audit.log"
    _write_events(log, 10)
    lines = log.read_text().splitlines(keepends=True)
    # lines[0:2] header; entry seq k is at index k+1 (file line k+2)
    if case == "edit":
        lines[5] = lines[5].replace("event 3", "event X")
        want = ":6: chain value does not match"
    elif case == "delete":
        del lines[5]
        want = ":6: sequence 5 where 4 was expected"
    elif case == "reorder":
        lines[5], lines[6] = lines[6], lines[5]
        want = ":6: sequence 5 where 4 was expected"
    elif case == "insert":
        forged = lines[5].split("|")
        forged[4] = "forged"
        lines.insert(5, "|".join(forged))
        want = ":6: chain value does not match"
    else:
        lines = lines[:-3]
        want = "log ends at seq 7 but the head records seq 10 (tail truncated)"
    log.write_text("".join(lines))
    res = audit.verify([log])
    assert not res.ok
    assert want in res.message


def test_fail_closed_when_log_cannot_be_written(tmp_path: Path) -> None:
    """A full file system (a small tmpfs filled up; a log symlinked to /dev/full is refused
    since the log is never opened through a link): the write fails, the line is not kept."""
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(d)], check=True
    )
    try:
        log = d / "hsm_audit.log"
        audit.audit_event("ENCRYPTION", "tok", "first", True, log_path=log)
        before = log.read_bytes()
        fd = os.open(d / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        with pytest.raises(OSError):
            while True:
                os.write(fd, bytes(4096))
        os.close(fd)
        big = audit.AuditRecord("ENCRYPTION", "tok", "u", "x" * 2000, True)
        with pytest.raises(AuditError) as ei:  # more than the log's last page still holds
            audit.writer_for(log).append([big] * 4)
        assert "\n" not in str(ei.value) and "No space" in str(ei.value)
        assert log.read_bytes() == before
        audit.writer_for(log).close()
    finally:
        subprocess.run(["umount", "-l", str(d)], check=True)


def test_concurrent_processes_never_break_chain(tmp_path: Path) -> None:
    log = tmp_path / "hsm_audit.log"
    code = (
        "import sys; from keysvc import audit\n"
        "for i in range(150):\n"
        "    audit.audit_event('ENCRYPTION', 't', f'p{i}', True, log_path=sys.argv[2])\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(p), str(log)]) for p in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    res = audit.verify([log])
    assert res.ok, res.message
    assert res.entries == 600
    assert sum(1 for _ in audit.read_entries(log)) == 600


def test_torn_tail_is_cut_and_recorded(tmp_path: Path) -> None:
    log = tmp_path / "hsm_audit.log"
    _write_events(log, 3)
    with open(log, "a") as f:
        f.write("2026-01-01 00:00:00|SIGN_OPERATION|k|u|half")  # a crash mid-write
    assert not audit.verify([log]).ok
    audit.writer_for(log).close()
    audit._writers.clear()
    audit.audit_event("KEY_ACCESSED", "k", "after crash", True, log_path=log)
    res = audit.verify([log])
    assert res.ok, res.message
    events = [e.event for e in audit.read_entries(log)]
    assert events[-2:] == ["SECURITY_VIOLATION", "KEY_ACCESSED"]


def test_rotation_continues_chain(tmp_path: Path) -> None:
    log = tmp_path / "hsm_audit.log"
    _write_events(log, 4)
    os.rename(log, tmp_path / "hsm_audit.log.1")  # what logrotate does (nocreate)
    _write_events(log, 2)
    assert log.read_text().splitlines()[2].startswith("# Chain-Start: seq=4 ")
    alone = audit.verify([log])
    assert alone.ok and "continues from seq 4" in alone.message
    both = audit.verify([tmp_path / "hsm_audit.log.1", log])
    assert both.ok and both.entries == 6, both.message


def test_logrotate_create_mode_continues_chain(tmp_path: Path) -> None:
    """logrotate `create`: the log is renamed and an empty file is put in its place."""
    log = tmp_path / "hsm_audit.log"
    _write_events(log, 3)
    os.rename(log, tmp_path / "hsm_audit.log.1")
    log.touch(mode=0o600)
    _write_events(log, 2)
    text = log.read_text().splitlines()
    assert text[0] == "# Virtual HSM Audit Log" and text[2].startswith("# Chain-Start: seq=3 ")
    both = audit.verify([tmp_path / "hsm_audit.log.1", log])
    assert both.ok and both.entries == 5, both.message
    # a forged chain-start (no audit key) is rejected
    forged = text[2].rsplit("mac=", 1)[0] + "mac=" + "0" * 64
    log.write_text("\n".join([*text[:2], forged, *text[3:]]) + "\n")
    res = audit.verify([log])
    assert not res.ok and "forged chain-start" in res.message
