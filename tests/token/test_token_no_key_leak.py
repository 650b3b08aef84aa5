"""Key bytes are never printed or logged: not raw, not hex, not base64, on any path (success or
error), in stdout, stderr, the audit log or any file the commands write.

Every Cli run already checks its own output against the keys it knows (token_helpers.Cli);
this test drives every command, collects everything written and checks it all once more,
including key files of the wrong size that the Cli check would not recognise.
"""

from __future__ import annotations

import os
from pathlib import Path

from token_helpers import Cli, assert_no_key_leak, object_paths, write_random

from vhsmfs.keyfile import StaticKeyProvider
from vhsmfs.tokencrypto import TokenKeys


def test_no_command_prints_or_logs_key_bytes(cli: Cli) -> None:
    key = cli.keygen("k.key")
    other = cli.keygen("other.key")
    long_key = cli.cwd / "long.key"
    long_key.write_bytes(os.urandom(33))
    long_key.chmod(0o600)
    loose = cli.cwd / "loose.key"
    loose.write_bytes(os.urandom(32))
    loose.chmod(0o644)
    write_random(cli.cwd / "a.txt", 30_000, 1)
    write_random(cli.cwd / "tree/b.txt", 10, 2)

    t1 = cli.store("a.txt", key)
    auto = cli.ok("token", "store", "a.txt").tokens()[0]
    cli.ok("token", "store", "a.txt", "--key", key, "-q")
    cli.ok("token", "store", "tree", "-r", "--key", key)
    cli.ok("token", "retrieve", t1, "out", "--key", key)
    cli.ok("token", "retrieve", auto, "out2", "--key", f"auto_generated_key_{auto}.key")
    for args in (
        ["list"],
        ["list", "--key", str(key)],
        ["list", "--key", str(key), "--json"],
        ["info", t1],
        ["info", t1, "--key", str(key), "--json"],
        ["verify", "--key", str(key)],
        ["verify", "--no-key"],
        ["gc"],
    ):
        cli.ok("token", *args)
    # error paths
    cli("token", "retrieve", t1, "bad", "--key", other)
    cli("token", "retrieve", t1, "bad", "--key", long_key)
    cli("token", "store", "a.txt", "--key", long_key)
    cli("token", "store", "a.txt", "--key", loose)
    cli("token", "info", t1, "--key", other)
    cli("token", "verify", t1, "--key", other)
    cli("token", "generate-key", key)
    cli("token", "store", "a.txt", "--key", key, env={"TOKEN_CHUNK_SIZE": "x"})
    obj = object_paths(cli.store_dir, t1)[0]
    buf = bytearray(obj.read_bytes())
    buf[100] ^= 1
    obj.write_bytes(buf)
    cli("token", "retrieve", t1, "bad", "--key", key)
    cli("token", "verify", "--key", key)
    cli.ok("token", "delete", t1)
    cli.ok("token", "--help")

    keys = cli.known_keys(cli.cwd)
    assert len(keys) >= 4
    long_bytes = long_key.read_bytes()
    keys += [long_bytes, long_bytes[:32], loose.read_bytes()]
    assert len(cli.history) > 25
    for res in cli.history:
        assert_no_key_leak(keys, res.stdout, res.stderr, where=" ".join(res.argv))
    written = []
    for dirpath, _, files in os.walk(cli.cwd):
        for f in files:
            p = Path(dirpath) / f
            if p.suffix == ".key":
                continue  # the key files themselves (and the audit log's own HMAC key)
            written.append(p)
            assert_no_key_leak(keys, p.read_bytes(), where=str(p))
    assert (cli.cwd / "hsm_audit.log") in written


def test_library_objects_do_not_show_keys() -> None:
    import uuid

    key = os.urandom(32)
    for obj in (StaticKeyProvider(key), TokenKeys(key, os.urandom(32), uuid.uuid4())):
        text = (repr(obj) + str(obj)).encode()
        assert_no_key_leak([key], text, where=type(obj).__name__)


def test_leak_check_catches_every_encoding() -> None:
    import base64

    import pytest

    key = os.urandom(32)
    for blob in (
        b"x" + key,
        key.hex().encode(),
        key.hex().upper().encode(),
        base64.b64encode(key),
        base64.urlsafe_b64encode(key),
    ):
        with pytest.raises(AssertionError):
            assert_no_key_leak([key], b"log: " + blob + b"\n")
