"""Script-friendly output of `vhsm` commands (issue 14 part 6, cli/output.py): --json parses
everywhere, -q leaves only the result, and `-o` never replaces an existing file without
--force nor writes through a planted symlink even with it; `hsm_enhanced` still overwrites."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from ksutil import Work


def _json(work: Work, *args: str, rc: int = 0) -> object:
    p = work.vhsm(*args, check=False)
    assert p.returncode == rc, (args, p.stderr)
    lines = p.stdout.splitlines()
    assert len(lines) == 1, (args, p.stdout)  # one document, nothing else on stdout
    return json.loads(lines[0])


def test_every_json_output_parses(work: Work) -> None:
    (work.path / "doc").write_bytes(b"doc")
    assert _json(work, "key", "generate", "k", "--json") == {
        "key": "k",
        "type": "ed25519",
        "state": "ACTIVE",
        "version": 1,
    }
    assert _json(work, "key", "generate", "a", "--type", "aes", "--json")["version"] == 1  # type: ignore[index]
    assert _json(work, "key", "list", "--json") == {"keys": ["a", "k"]}
    assert _json(work, "key", "rotate", "k", "--json") == {"key": "k", "version": 2}
    info = _json(work, "key", "info", "k", "--json")
    assert [v["version"] for v in info["versions"]] == [1, 2]  # type: ignore[index]
    pol = _json(work, "key", "policy", "k", "--max-uses", "9", "--json")
    assert pol == {"key": "k", "max_age_days": 90.0, "max_uses": 9, "auto": False}
    assert _json(work, "key", "policy", "k", "--json") == pol  # shown, not set again
    enc = _json(work, "key", "encrypt", "a", "-i", "doc", "-o", "ct", "--json")
    assert enc == {"key": "a", "version": 1, "bytes": len((work.path / "ct").read_bytes()),
                   "output": "ct"}  # fmt: skip
    dec = _json(work, "key", "decrypt", "a", "-i", "ct", "--json")
    assert set(dec) == {"key", "version", "bytes", "plaintext"}  # type: ignore[arg-type]
    assert "wrapped" in _json(work, "key", "wrap", "a", "-i", "doc", "--json")  # type: ignore[operator]
    assert _json(work, "key", "retire", "k", "--min-version", "2", "--json") == {
        "key": "k",
        "min_version": 2,
    }
    assert _json(work, "key", "set-state", "k", "SUSPENDED", "--json") == {
        "key": "k",
        "state": "SUSPENDED",
    }
    logs = _json(work, "audit", "logs", "1", "--json")
    assert logs["total"] == len(logs["entries"]) > 5  # type: ignore[index]
    assert {"timestamp", "event", "key", "user", "details", "success", "seq"} == set(
        logs["entries"][0]  # type: ignore[index]
    )
    assert _json(work, "audit", "verify", "--json")["ok"] is True  # type: ignore[index]
    assert _json(work, "user", "show", "--json") == {"user": work.run("id", "-un").stdout.strip()}
    assert _json(work, "keysvc", "status", "--json", rc=3) == {"running": False}
    assert _json(work, "key", "protector", "list", "--json") == []
    assert _json(work, "passkey", "list", "--json") == []
    assert _json(work, "key", "generate-master-key", "--force", "--json")["master_key_file"]  # type: ignore[index]


def test_quiet_leaves_only_the_result(work: Work) -> None:
    p = work.vhsm("key", "generate", "k", "-q")
    assert (p.stdout, p.stderr) == ("", "")
    p = work.vhsm("key", "rotate", "k", "-q")
    assert (p.stdout, p.stderr) == ("2\n", "")
    p = work.vhsm("key", "retire", "k", "--min-version", "2", "-q")
    assert (p.stdout, p.stderr) == ("", "")
    p = work.vhsm("key", "set-state", "k", "DEPRECATED", "-q")
    assert (p.stdout, p.stderr) == ("", "")
    work.vhsm("key", "generate", "a", "--type", "aes")
    p = work.vhsm("key", "datakey", "a", "-o", "dk", "-w", "dk.w", "-q")
    assert (p.stdout, p.stderr) == ("", "")
    (work.path / "doc").write_bytes(b"x")
    p = work.vhsm("key", "encrypt", "a", "-i", "doc", "-o", "ct", "-q")
    assert (p.stdout, p.stderr) == ("", "")
    assert work.vhsm("key", "encrypt", "a", "-i", "doc", "-o", "ct2").stdout  # not quiet: says so


# every `vhsm` command with -o, and what it needs before
OUTPUTS = {
    "sign": ("key", "sign", "k", "-i", "doc", "-o"),
    "export-public": ("key", "export-public", "k", "-o"),
    "encrypt": ("key", "encrypt", "a", "-i", "doc", "-o"),
    "decrypt": ("key", "decrypt", "a", "-i", "ct", "-o"),
    "wrap": ("key", "wrap", "a", "-i", "dek", "-o"),
    "unwrap": ("key", "unwrap", "a", "-i", "wk", "-o"),
    "rewrap": ("key", "rewrap", "a", "-i", "wk", "-o"),
    "datakey-plain": ("key", "datakey", "a", "-w", "fresh.w", "-o"),
    "datakey-wrapped": ("key", "datakey", "a", "--wrapped-only", "-w"),
    "audit-export": ("audit", "export", "--csv", "-o"),
}


@pytest.fixture
def keys(work: Work) -> Work:
    (work.path / "doc").write_bytes(b"doc")
    (work.path / "dek").write_bytes(b"d" * 32)
    work.vhsm("key", "generate", "k")
    work.vhsm("key", "generate", "a", "--type", "aes")
    work.vhsm("key", "encrypt", "a", "-i", "doc", "-o", "ct")
    work.vhsm("key", "wrap", "a", "-i", "dek", "-o", "wk")
    return work


def test_existing_output_refused_without_force(keys: Work) -> None:
    work = keys
    out = work.path / "out"
    for name, cmd in OUTPUTS.items():
        out.write_bytes(b"keep me")
        os.chmod(out, 0o600)
        p = work.vhsm(*cmd, "out", check=False)
        assert p.returncode == 1, (name, p.stderr)
        assert p.stderr == "Error: output out already exists (use --force to replace it)\n"
        assert out.read_bytes() == b"keep me", name
        assert not (work.path / "fresh.w").exists(), name  # datakey: nothing written at all
        assert not [n for n in os.listdir(work.path) if n.endswith(".tmp")]
        work.vhsm(*cmd, "out", "--force")
        assert out.read_bytes() != b"keep me", name
        (work.path / "fresh.w").unlink(missing_ok=True)


def test_planted_symlink_never_written_through_even_with_force(keys: Work, tmp_path: Path) -> None:
    work = keys
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"precious")
    link = work.path / "out"
    link.symlink_to(victim)
    for name, cmd in OUTPUTS.items():
        for force in ((), ("--force",)):
            p = work.vhsm(*cmd, "out", *force, check=False)
            assert p.returncode == 1, (name, force, p.stderr)
            assert len(p.stderr.splitlines()) == 1 and "symbolic link" in p.stderr, p.stderr
            assert victim.read_bytes() == b"precious"
            assert link.is_symlink() and os.readlink(link) == str(victim)
            assert not (work.path / "fresh.w").exists(), name


def test_hsm_enhanced_still_overwrites(keys: Work) -> None:
    """compat: users' scripts re-run `hsm_enhanced -sign ... -o SIG`; it replaces the file."""
    work = keys
    for cmd in (("-sign", "k", "-i", "doc"), ("-encrypt", "a", "-i", "doc")):
        out = work.path / "again"
        out.write_bytes(b"old")
        work.hsm(*cmd, "-o", "again")
        assert out.read_bytes() != b"old"
    assert len((work.path / "again").read_bytes()) > 3
    work.hsm("-sign", "k", "-i", "doc", "-o", "sig")
    work.hsm("-sign", "k", "-i", "doc", "-o", "sig")
    assert len((work.path / "sig").read_bytes()) == 64
