"""The addendum's example scripts, unchanged except `./hsm_enhanced` -> `hsm_enhanced`, run by
bash against the real CLI (in-process and through the daemon)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from ksutil import Daemon, Work, openssl_verify_ed25519

BATCH_SIGN = r"""#!/bin/bash
# batch_sign.sh - Sign multiple files efficiently

MASTER_KEY=$(cat master_key.hex)

find ./documents -name "*.pdf" | while read file; do
    hsm_enhanced -master_key "$MASTER_KEY" \
        -sign document_key \
        -i "$file" \
        -o "${file}.sig"
done
"""

KEY_CACHING = r"""
# Export master key once
export HSM_MASTER_KEY=$(cat master.key | xxd -p | tr -d '\n')

# Use for multiple operations (same session)
hsm_enhanced -master_key "$HSM_MASTER_KEY" -generate_key_pair key1
hsm_enhanced -master_key "$HSM_MASTER_KEY" -generate_key_pair key2
hsm_enhanced -master_key "$HSM_MASTER_KEY" -generate_key_pair key3

# Clear when done
unset HSM_MASTER_KEY
"""

# (one long line of the original is split across two adjacent literals; the text is unchanged)
MONITORING = (
    r"""#!/bin/bash
# monitoring.sh - HSM monitoring

# Check key rotation schedule
hsm_enhanced -list | while read key; do
    if hsm_enhanced -key_info "$key" | grep -q "WARNING.*rotation"; then
        echo "ALERT: Key $key needs rotation" | mail -s "HSM Alert" admin@example.com
    fi
done

# Monitor failed authentications
FAILURES=$(grep "AUTH_FAILURE" hsm_audit.log | wc -l)
if [ "$FAILURES" -gt 5 ]; then
    echo "ALERT: $FAILURES failed authentications" | """
    r"""mail -s "HSM Security Alert" security@example.com
fi

# Check disk space for encrypted files
USAGE=$(df -h /opt/hsm/secure_storage | awk 'NR==2 {print $5}' | sed 's/%//')
if [ "$USAGE" -gt 80 ]; then
    echo "ALERT: HSM storage at ${USAGE}%" | mail -s "HSM Storage Alert" ops@example.com
fi

# Verify audit log integrity
if ! grep -q "$(date +%Y-%m-%d)" hsm_audit.log; then
    echo "WARNING: No audit entries today" | mail -s "HSM Audit Warning" security@example.com
fi
"""
)

# FAKE: no mail can be delivered in CI, so `mail` is a stand-in that records what it was given.
FAKE_MAIL = """#!/bin/sh
# FAKE mail(1) for tests: appends subject, recipient and body to $MAIL_SPOOL
{ echo "SUBJECT: $2 TO: $3"; cat; } >> "$MAIL_SPOOL"
"""


@pytest.fixture(params=["in-process", "daemon"])
def mode(request: pytest.FixtureRequest, work: Work, daemon_factory: type[Daemon]) -> str:
    if request.param == "daemon":
        daemon_factory(work).start()
    return request.param


def _script(work: Work, name: str, text: str) -> Path:
    p = work.path / name
    p.write_text(text)
    p.chmod(0o755)
    return p


def test_batch_sign(work: Work, mode: str) -> None:
    (work.path / "master_key.hex").write_text(work.master_hex + "\n")  # type: ignore[attr-defined]
    work.hsm("-generate_key_pair", "document_key")
    docs = work.path / "documents"
    (docs / "sub dir").mkdir(parents=True)
    files = [docs / "a.pdf", docs / "sub dir" / "b c.pdf", docs / "big.pdf"]
    for i, f in enumerate(files):
        f.write_bytes(os.urandom(100 + i * 200_000))
    (docs / "notes.txt").write_text("not signed")
    _script(work, "batch_sign.sh", BATCH_SIGN)
    p = work.run("bash", "batch_sign.sh")
    assert "Error" not in p.stderr
    pub = work.path / "pub.pem"
    pub.write_text(work.hsm("-export_public_key", "document_key").stdout)
    for f in files:
        sig = Path(f"{f}.sig")
        assert len(sig.read_bytes()) == 64
        ok = openssl_verify_ed25519(work, pub, Path(f), sig)
        assert ok.returncode == 0, ok.stderr
    assert not (docs / "notes.txt.sig").exists()
    assert len(work.events("SIGN_OPERATION")) == 3


def test_key_caching(work: Work, mode: str) -> None:
    _script(work, "cache.sh", KEY_CACHING)
    p = work.run("bash", "cache.sh")
    assert p.stderr.count("Error") == 0
    assert work.hsm("-list").stdout.split() == ["key1", "key2", "key3"]
    assert [e[2] for e in work.events("KEY_CREATED")] == ["key1", "key2", "key3"]
    assert work.master_hex not in work.log.read_text()  # type: ignore[attr-defined]


def test_monitoring(work: Work, mode: str, tmp_path: Path) -> None:
    fakebin = tmp_path / "fakebin"
    fakebin.mkdir()
    mail = fakebin / "mail"
    mail.write_text(FAKE_MAIL)
    mail.chmod(mail.stat().st_mode | stat.S_IEXEC)
    spool = tmp_path / "spool"
    env = {**work.env, "PATH": f"{fakebin}:{work.env['PATH']}", "MAIL_SPOOL": str(spool)}
    work.hsm("-generate_key_pair", "fresh_key")
    work.hsm("-generate_key_pair", "old_key")
    work.vhsm("key", "policy", "old_key", "--max-age-days", "0.00000001")
    _script(work, "monitoring.sh", MONITORING)
    work.run("bash", "monitoring.sh", env=env, check=False)
    alerts = spool.read_text() if spool.exists() else ""
    assert "ALERT: Key old_key needs rotation" in alerts
    assert "fresh_key" not in alerts
    assert "failed authentications" not in alerts
    assert "No audit entries today" not in alerts
    # six wrong master keys -> the AUTH_FAILURE alert fires
    for _ in range(6):
        work.hsm("-master_key", "22" * 32, "-list", check=False)
    spool.unlink()
    work.run("bash", "monitoring.sh", env=env, check=False)
    alerts = spool.read_text()
    assert "ALERT: 6 failed authentications" in alerts
