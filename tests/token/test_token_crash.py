"""Crash safety (kill -9 of `vhsm token store` at random moments) and concurrency (8 stores at
once into one store), on a tmpfs so that a large file is quick to write."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from token_helpers import Cli, clean_env, store_names, vhsm_argv, write_random

BIG = 96 << 20  # above the 64 MiB object target: the store writes two objects
SEED = 20261127


def _unnamed_output_size(pid: int, outdir: Path) -> int:
    """Size of the unnamed (O_TMPFILE) file process `pid` writes in `outdir`, 0 if none yet."""
    fds = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fds.iterdir())
    except OSError:
        return 0
    for fd in entries:
        try:
            target = os.readlink(fd)
            if target.startswith(f"{outdir}/#") and target.endswith("(deleted)"):
                return os.stat(fd).st_size
        except OSError:
            continue
    return 0


def _listed(cli: Cli, key: Path) -> dict[str, dict]:
    rows = json.loads(cli.ok("token", "list", "--key", key, "--json").out)
    return {r["token"]: r for r in rows}


def _data_bytes(store: Path) -> int:
    total = 0
    for d in store.glob("*.data"):
        for f in d.iterdir():
            try:
                total += f.stat().st_size
            except FileNotFoundError:
                pass
    return total


def _wait_for(pred, limit: float = 60.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.001)
    return False


@pytest.mark.slow
def test_kill_9_during_store_leaves_no_half_token(cli: Cli, tmpfs) -> None:  # type: ignore[no-untyped-def]
    fast = tmpfs("fast", "1500m")
    cli.cwd = fast  # input, store and audit log all on the tmpfs
    key = cli.keygen()
    data = write_random(fast / "big.bin", BIG, seed=1)
    want = hashlib.sha256(data).hexdigest()
    del data
    store = fast / "secure_storage"
    argv = [*vhsm_argv(), "token", "store", "big.bin", "--key", str(key), "--quiet"]

    # One complete store first; it also tells how long a store takes on this machine, so the
    # time-triggered kills below fall inside a store, not after it.
    t0 = time.monotonic()
    first = cli.store("big.bin", key)
    duration = time.monotonic() - t0

    rng = random.Random(SEED)
    kills = 0
    digests: dict[str, str] = {}
    for i in range(10):
        before_data = _data_bytes(store)
        p = subprocess.Popen(
            argv, cwd=fast, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        if i % 2 == 0:
            # progress-triggered: kill once a random fraction of the ciphertext is on disk
            target = before_data + int(BIG * rng.uniform(0.02, 0.9))
            _wait_for(lambda t=target, p=p: _data_bytes(store) >= t or p.poll() is not None)
        else:
            # time-triggered: anywhere in start-up, encryption, fsync or the metadata commit
            time.sleep(rng.uniform(0, duration))
        p.send_signal(signal.SIGKILL)
        p.communicate()
        kills += p.returncode == -signal.SIGKILL

        # after every kill: whatever is listed is a complete, readable token of the right file
        # (format v2 stores no whole-file digest: `info --digest` decrypts to compute it, once
        # per token, as tokens the CLI stored never change)
        for tok, row in _listed(cli, key).items():
            assert row.get("readable") is True, row
            assert row["size"] == BIG, row
            assert tok == first or row["name"] == "big.bin"
            if tok not in digests:
                info = cli.ok("token", "info", tok, "--key", key, "--digest", "--json").out
                digests[tok] = json.loads(info)["sha256"]
            assert digests[tok] == want, row

    listed = _listed(cli, key)
    assert first in listed
    res = cli.ok("token", "verify", "--key", key)
    assert res.out.count("OK ") == len(listed)
    cli.ok("token", "verify", "--no-key")

    # kill -9 during a retrieve: the plaintext is written to an unnamed O_TMPFILE inode, so the
    # file never appears under its name and nothing at all is left behind
    out = fast / "killed_out"
    for frac in (0.1, 0.5, 0.9):
        p = subprocess.Popen(
            [*vhsm_argv(), "token", "retrieve", first, str(out), "--key", str(key)],
            cwd=fast,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

        def part_size(p=p, frac=frac) -> bool:  # type: ignore[no-untyped-def]
            if p.poll() is not None:
                return True
            return _unnamed_output_size(p.pid, out) >= frac * BIG

        _wait_for(part_size)
        p.send_signal(signal.SIGKILL)
        p.communicate()
        assert p.returncode == -signal.SIGKILL  # killed mid-write, not after it finished
        assert not (out / "big.bin").exists()
        assert list(out.iterdir()) == []  # not even a temp file
    cli.ok("token", "retrieve", first, str(out), "--key", key)
    assert (out / "big.bin").stat().st_size == BIG

    # kill -9 during a delete: hidden at once, finished by gc
    victim = first
    p = subprocess.Popen(
        [*vhsm_argv(), "token", "delete", victim],
        cwd=fast,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _wait_for(lambda: not (store / f"{victim}.metadata").exists() or p.poll() is not None)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert victim not in _listed(cli, key)

    # a plain gc keeps a hidden token's data for the grace period (it cannot tell a killed
    # `delete` from the mount's deferred deletes, kept for backups); without one it finishes
    # the delete
    res = cli.ok("token", "gc")
    assert kills >= 1
    # the progress-triggered kills (at 2-90% of the ciphertext) always leave data behind
    assert "removed data of unfinished store" in res.out, res.out
    if (store / f".{victim}.deleting").exists():  # killed before it had wiped everything
        assert victim not in _listed(cli, key)
        res = cli.ok("token", "gc", "--grace", "0")
        assert f"finished deleting token {victim}" in res.out, res.out
    listed = _listed(cli, key)
    assert victim not in listed
    expected = {"VHSM-STORE"} | {f"{t}.metadata" for t in listed} | {f"{t}.data" for t in listed}
    assert set(store_names(store)) == expected  # and .tmp/ (if there) is empty
    for t in listed:
        assert set(os.listdir(store / f"{t}.data")) == {
            "00000000",
            "00000001",
            "gen-0000000000000001",
        }
    if listed:
        cli.ok("token", "verify", "--key", key)
    else:  # every killed store was cut short: a verify that checks nothing is not a success
        res = cli("token", "verify", "--key", key)
        assert res.rc == 1 and "holds no tokens: nothing was verified" in res.err, str(res)
    assert cli.ok("token", "gc").out == ""  # idempotent

    if listed:
        tok = sorted(listed)[0]
        dest = Path(cli.ok("token", "retrieve", tok, "out", "--key", key).out.strip())
        h = hashlib.sha256()
        with open(fast / dest, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        assert h.hexdigest() == want


def test_eight_concurrent_stores(cli: Cli, tmpfs) -> None:  # type: ignore[no-untyped-def]
    fast = tmpfs("fast", "512m")
    cli.cwd = fast
    key = cli.keygen()
    files = {}
    for i in range(8):
        size = [0, 1, 8191, 8192, 3 << 20, (3 << 20) + 1, 5 << 20, 4 << 20][i]
        files[f"f{i}.bin"] = write_random(fast / f"f{i}.bin", size, seed=100 + i)
    procs = [
        subprocess.Popen(
            [*vhsm_argv(), "token", "store", name, "--key", str(key)],
            cwd=fast,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name in files
    ]
    tokens = {}
    store = fast / "secure_storage"
    try:
        # a concurrent gc must not reap stores in progress (it runs once they have begun to
        # write: before the store exists, gc only says there is none)
        assert _wait_for(
            lambda: any(store.glob("*.data")) or all(p.poll() is not None for p in procs)
        )
        for _ in range(2):
            cli.ok("token", "gc")
        for name, p in zip(files, procs, strict=True):
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err.decode()
            toks = [ln.split()[1] for ln in out.decode().splitlines() if ln.startswith("Token:")]
            assert len(toks) == 1
            tokens[toks[0]] = name
    finally:
        for p in procs:  # never leave a writer behind on the tmpfs about to be unmounted
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert len(tokens) == 8
    listed = _listed(cli, key)
    assert set(listed) == set(tokens)
    cli.ok("token", "verify", "--key", key)
    for tok, name in tokens.items():
        cli.ok("token", "retrieve", tok, "out", "--key", key)
        assert (fast / "out" / name).read_bytes() == files[name]
    assert sorted(os.listdir(fast / "out")) == sorted(files)
    assert set(store_names(store)) == {"VHSM-STORE"} | {f"{t}.metadata" for t in tokens} | {
        f"{t}.data" for t in tokens
    }
    # the audit log recorded every store
    log = (fast / "hsm_audit.log").read_text()
    for tok in tokens:
        assert f"token {tok} stored" in log
