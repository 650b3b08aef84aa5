"""A daemon whose only protector slot is a FIDO2 security key starts locked (nobody is there to
touch it under systemd), and `vhsm keysvc unlock --fido2` makes the daemon ask the key itself.

Real parts: the daemon runs inside the PC/SC test namespace (pcsc_fixture.py: pcscd + vpcd)
with the software CTAP2 card (virtual_ctap_card.py) in its reader; the CLI runs outside and
reaches the daemon through its socket, as a user's shell would."""

from __future__ import annotations

import os
from pathlib import Path

from ksutil import VHSM, Daemon, Work
from pcsc_fixture import NsPcsc

from keysvc import audit


def _one_error(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    return lines[0]


def _events(d: Path) -> list[tuple[str, bool, str]]:
    log = d / "hsm_audit.log"
    assert audit.verify([log]).ok
    return [(e.event, e.success, e.details) for e in audit.read_entries(log)]


def test_fido2_only_daemon_starts_locked_and_unlocks_with_the_key(
    tmp_path: Path, ns: NsPcsc
) -> None:
    secret = os.urandom(32)
    card = ns.start_card(secret)
    d = tmp_path / "w"
    d.mkdir()
    w = Work(d)
    w.hsm("-generate_master_key")
    add = ns.run(
        [VHSM, "key", "--data-dir", str(d), "protector", "add", "fido2-hmac-secret",
         "--label", "desk key", "--remove-raw"],
        env=w.env,
    )  # fmt: skip
    assert add.returncode == 0, add.stderr
    gen = ns.run([VHSM, "key", "--data-dir", str(d), "--no-daemon", "generate", "k"], env=w.env)
    assert gen.returncode == 0, gen.stderr  # in-process, a person at the CLI: the key is asked
    assert not (d / "master.key").exists()

    daemon = Daemon(w, prefix=ns.enter(wd=d), env={**ns._env(), **w.env}).start()
    try:
        assert "starting locked" in daemon.stderr and "FIDO2" in daemon.stderr
        assert "LOCKED" in w.vhsm("keysvc", "status").stdout
        msg = d / "m.txt"
        msg.write_bytes(b"release 1.0")
        p = w.vhsm("key", "sign", "k", "-i", str(msg), "-o", str(d / "m.sig"), check=False)
        assert p.returncode != 0 and "locked" in _one_error(p.stderr)

        # no key in the reader: refused, audited, still locked
        card.stop()
        p = w.vhsm("keysvc", "unlock", "--fido2", check=False)
        assert p.returncode != 0 and "no FIDO2 authenticator found" in _one_error(p.stderr)
        # another person's key: it does not hold the credential
        other = ns.start_card(os.urandom(32))
        p = w.vhsm("keysvc", "unlock", "--fido2", check=False)
        assert p.returncode != 0 and "does not hold the credential" in _one_error(p.stderr)
        other.stop()
        # a passphrase cannot open a FIDO2 slot
        env = {**w.env, "HSM_MASTER_PASSPHRASE": "guess"}
        p = w.vhsm("keysvc", "unlock", env=env, check=False)
        assert p.returncode != 0
        assert "LOCKED" in w.vhsm("keysvc", "status").stdout

        ns.start_card(secret)  # the enrolled key comes back
        assert "unlocked" in w.vhsm("keysvc", "unlock", "--fido2").stdout
        w.vhsm("key", "sign", "k", "-i", str(msg), "-o", str(d / "m.sig"))
        w.vhsm("key", "verify", "k", "-i", str(msg), "-s", str(d / "m.sig"))
    finally:
        daemon.stop()
    events = _events(d)
    failures = [det for ev, ok, det in events if ev == "AUTH_FAILURE"]
    assert len(failures) >= 2, events
    assert any("no FIDO2 authenticator found" in f for f in failures)
    assert any("does not hold the credential" in f for f in failures)
    assert any(ev == "AUTH_SUCCESS" and "unlocked" in det for ev, ok, det in events)
    assert any(ev == "SIGN_OPERATION" and ok for ev, ok, det in events)
