"""`vhsm audit verify/logs/export` on real logs; fail-closed operations; keystore tampering."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
from ksutil import Work


def _populate(work: Work) -> None:
    work.hsm("-generate_key_pair", "k")
    f = work.path / "m"
    f.write_text("m")
    for i in range(4):
        work.hsm("-sign", "k", "-i", str(f), "-o", f"s{i}")


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("edit", ":5: chain value does not match"),
        ("insert", ":5: chain value does not match"),
        ("delete", ":5: sequence 4 where 3 was expected"),
        ("reorder", ":5: sequence 4 where 3 was expected"),
        ("truncate", "tail truncated"),
        ("comment", ":5: comment line inside the log"),
    ],
)
def test_verify_names_first_bad_line(work: Work, case: str, expect: str) -> None:
    _populate(work)
    assert "OK" in work.vhsm("audit", "verify").stdout
    lines = work.log.read_text().splitlines(keepends=True)
    # lines: 0-1 header, 2 master key (seq 1), 3 KEY_CREATED (2), 4.. SIGN (3..6)
    if case == "edit":
        lines[4] = lines[4].replace("SUCCESS", "FAILURE")
    elif case == "insert":
        forged = lines[4].split("|")
        forged[2] = "other_key"
        lines.insert(4, "|".join(forged))
    elif case == "delete":
        del lines[4]
    elif case == "reorder":
        lines[4], lines[5] = lines[5], lines[4]
    elif case == "truncate":
        lines = lines[:-2]
    else:
        lines.insert(4, "# harmless-looking comment\n")
    work.log.write_text("".join(lines))
    p = work.vhsm("audit", "verify", check=False)
    assert p.returncode == 1
    assert p.stderr.startswith("Error: audit log verification FAILED")
    assert expect in p.stderr
    assert p.stderr.count("\n") == 1
    # hsm_enhanced has the same check
    assert work.hsm("-verify_audit", check=False).returncode == 1


def test_export_csv(work: Work) -> None:
    _populate(work)
    work.hsm("-set_user", 'eve "quoted", | piped')
    out = work.vhsm("audit", "export", "--csv").stdout
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == [
        "timestamp",
        "event_type",
        "key_name",
        "user_id",
        "details",
        "success",
        "seq",
        "chain",
    ]
    assert len(rows) - 1 == len(work.audit_lines())
    assert rows[-1][3] == 'eve "quoted", | piped'  # unescaped in the export
    assert [r[6] for r in rows[1:]] == [str(i) for i in range(1, len(rows))]


def test_operation_fails_closed_when_audit_cannot_be_written(work: Work) -> None:
    work.hsm("-generate_key_pair", "k")
    f = work.path / "m"
    f.write_text("m")
    full = work.path / "full.log"
    full.symlink_to("/dev/full")
    env = {**work.env, "HSM_AUDIT_LOG": str(full)}
    # the audit key must exist beside the redirected log for writes to be attempted
    p = work.hsm("-sign", "k", "-i", str(f), "-o", "s.sig", env=env, check=False)
    assert p.returncode == 1
    assert "audit" in p.stderr.lower() and p.stderr.count("\n") == 1
    assert not (work.path / "s.sig").exists()
    # a key created while the audit log is unwritable is not created at all
    p = work.hsm("-generate_key_pair", "k2", env=env, check=False)
    assert p.returncode == 1
    assert work.hsm("-list").stdout.split() == ["k"]


def test_keystore_tampering_detected(work: Work) -> None:
    work.hsm("-generate_key_pair", "alpha")
    work.hsm("-generate_key_pair", "bravo")
    ks = work.path / "keystore.dat"
    original = ks.read_text()
    doc = json.loads(original)
    # rename an entry (its AAD binds the name): authentication fails, nothing is decrypted
    doc["entries"][0]["name"], doc["entries"][1]["name"] = (
        doc["entries"][1]["name"],
        doc["entries"][0]["name"],
    )
    ks.write_text(json.dumps(doc))
    p = work.hsm("-list", check=False)
    assert p.returncode == 1 and "tampered" in p.stderr
    # drop one entry: detected through the sealed manifest
    doc = json.loads(original)
    del doc["entries"][1]
    ks.write_text(json.dumps(doc))
    p = work.hsm("-list", check=False)
    assert p.returncode == 1 and "missing" in p.stderr
    ks.write_text(original)
    assert work.hsm("-list").stdout.split() == ["alpha", "bravo"]
    assert ks.stat().st_mode & 0o777 == 0o600
    # no temp files are left behind by the atomic writes
    assert not [n for n in os.listdir(work.path) if n.endswith(".tmp")]


def test_rotated_logs_verify_as_one_chain(work: Work) -> None:
    _populate(work)
    os.rename(work.log, work.path / "hsm_audit.log.1")  # logrotate with nocreate
    work.hsm("-generate_key_pair", "after")
    p = work.vhsm("audit", "verify", str(work.path / "hsm_audit.log.1"), str(work.log))
    assert "OK" in p.stdout
    assert "OK" in work.vhsm("audit", "verify").stdout
    # a replaced first file (not the predecessor) is rejected
    old = Path(work.path / "hsm_audit.log.1")
    lines = old.read_text().splitlines(keepends=True)
    old.write_text("".join(lines[:-1]))
    p = work.vhsm("audit", "verify", str(old), str(work.log), check=False)
    assert p.returncode == 1 and "does not continue" in p.stderr
