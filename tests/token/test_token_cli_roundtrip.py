"""`vhsm token ...` as a subprocess, on real files: the happy paths of every command."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from token_helpers import (
    KEEP_LINE,
    VENV_BIN,
    Cli,
    assert_one_line_error,
    clean_env,
    gen_paths,
    object_paths,
    random_bytes,
    snapshot,
    store_names,
    write_random,
)

# -- generate-key -------------------------------------------------------------------------------


def test_generate_key_mode_size_and_no_overwrite(cli: Cli) -> None:
    k = cli.cwd / "a.key"
    cli.ok("token", "generate-key", k)
    assert k.stat().st_size == 32
    assert stat.S_IMODE(k.stat().st_mode) == 0o600
    first = k.read_bytes()
    cli.keys.append(first)
    assert first != bytes(32)

    res = cli("token", "generate-key", k)
    assert_one_line_error(res)
    assert k.read_bytes() == first

    cli.ok("token", "generate-key", k, "--force")
    second = k.read_bytes()
    cli.keys.append(second)
    assert len(second) == 32 and second != first
    assert stat.S_IMODE(k.stat().st_mode) == 0o600
    assert sorted(p.name for p in cli.cwd.iterdir() if p.name.startswith(".a.key")) == []

    other = cli.keygen("b.key")
    assert other.read_bytes() != second


# -- store / retrieve ---------------------------------------------------------------------------


def test_store_retrieve_byte_identical(cli: Cli) -> None:
    key = cli.keygen()
    data = write_random(cli.cwd / "report.pdf", 100_000, seed=3)
    res = cli.ok("token", "store", "report.pdf", "--key", key)
    lines = res.out.splitlines()
    toks = res.tokens()
    assert len(toks) == 1 and uuid.UUID(toks[0]).version == 4
    assert [ln for ln in lines if ln.startswith("Token:")] == [f"Token: {toks[0]}"]
    assert KEEP_LINE in lines
    # the addendum's pipeline: the second whitespace field of the Token line
    assert next(ln for ln in lines if "Token:" in ln).split()[1] == toks[0]
    assert b"report" not in (cli.store_dir / f"{toks[0]}.metadata").read_bytes()

    res = cli.ok("token", "retrieve", toks[0], "out/docs", "--key", key)
    dest = cli.cwd / "out" / "docs" / "report.pdf"
    assert dest.read_bytes() == data
    assert res.out.strip() == str(Path("out/docs/report.pdf"))
    assert sorted(os.listdir(dest.parent)) == ["report.pdf"]


def test_store_quiet_prints_only_the_token(cli: Cli) -> None:
    key = cli.keygen()
    write_random(cli.cwd / "a.txt", 10, seed=1)
    res = cli.ok("token", "store", "a.txt", "--key", key, "--quiet")
    tok = res.out.strip()
    assert res.out == tok + "\n"
    uuid.UUID(tok)
    assert res.err == ""
    assert cli.ok("token", "retrieve", tok, "o", "--key", key).rc == 0
    assert (cli.cwd / "o/a.txt").read_bytes() == (cli.cwd / "a.txt").read_bytes()


def test_store_without_key_generates_one(cli: Cli) -> None:
    data = write_random(cli.cwd / "secret.txt", 5000, seed=2)
    res = cli.ok("token", "store", "secret.txt")
    tok = res.tokens()[0]
    name = f"auto_generated_key_{tok}.key"
    assert f"Key saved to: {name}" in res.out.splitlines()
    kf = cli.cwd / name
    assert kf.stat().st_size == 32 and stat.S_IMODE(kf.stat().st_mode) == 0o600
    cli.ok("token", "retrieve", tok, "back", "--key", name)
    assert (cli.cwd / "back/secret.txt").read_bytes() == data


def test_store_several_files_one_invocation(cli: Cli) -> None:
    key = cli.keygen()
    a = write_random(cli.cwd / "a.bin", 9000, 1)
    b = write_random(cli.cwd / "b.bin", 0, 2)
    res = cli.ok("token", "store", "a.bin", "b.bin", "--key", key)
    ta, tb = res.tokens()
    cli.ok("token", "retrieve", ta, "o", "--key", key)
    cli.ok("token", "retrieve", tb, "o", "--key", key)
    assert (cli.cwd / "o/a.bin").read_bytes() == a
    assert (cli.cwd / "o/b.bin").read_bytes() == b == b""


def test_recursive_tree_restored_under_outdir(cli: Cli) -> None:
    key = cli.keygen()
    tree = {
        "docs/readme.txt": 100,
        "docs/empty": 0,
        "docs/sub/deeper/data.bin": 50_000,
        "docs/sub/with space.txt": 8192,
        "docs/.hidden": 3,
    }
    for i, (rel, n) in enumerate(tree.items()):
        write_random(cli.cwd / "src" / rel, n, seed=i)
    res = cli.ok("token", "store", "src/docs", "-r", "--key", key)
    toks = res.tokens()
    assert len(toks) == len(tree)
    for tok in toks:
        cli.ok("token", "retrieve", tok, "restored", "--key", key)
    got = snapshot(cli.cwd / "restored")
    want = {k: v for k, v in snapshot(cli.cwd / "src").items()}
    assert got == want

    # without --recursive a directory is refused, storing nothing
    before = snapshot(cli.store_dir)
    assert_one_line_error(cli("token", "store", "src/docs", "--key", key))
    assert snapshot(cli.store_dir) == before


# -- chunk size / parallelism from the environment ----------------------------------------------


@pytest.mark.parametrize("cs", [512, 1000, 65536])
def test_env_chunk_size_recorded_and_round_trips(cli: Cli, cs: int) -> None:
    key = cli.keygen()
    sizes = [0, 1, cs - 1, cs, cs + 1, 5 * cs + 3]
    env = {"TOKEN_CHUNK_SIZE": str(cs), "TOKEN_PARALLEL_CHUNKS": "3"}
    files = {f"f{i}": write_random(cli.cwd / f"f{i}", n, seed=n) for i, n in enumerate(sizes)}
    res = cli.ok("token", "store", *files, "--key", key, env=env)
    toks = res.tokens()
    assert len(toks) == len(sizes)
    rows = {r["token"]: r for r in json.loads(cli.ok("token", "list", "--key", key, "--json").out)}
    for tok, n in zip(toks, sizes, strict=True):
        assert rows[tok]["chunk_size"] == cs
        assert rows[tok]["chunk_count"] == -(-n // cs)
        assert rows[tok]["size"] == n
        # retrieval does not depend on the environment: the chunk size is in the token
        dest = Path(cli.ok("token", "retrieve", tok, "out", "--key", key).out.strip())
        assert (cli.cwd / dest).read_bytes() == files[rows[tok]["name"]]
    assert sorted(os.listdir(cli.cwd / "out")) == sorted(files)


def test_bad_chunk_size_env_refused(cli: Cli) -> None:
    key = cli.keygen()
    write_random(cli.cwd / "f", 10, 0)
    for bad in ["abc", "0", "100", str(1 << 30)]:
        res = cli("token", "store", "f", "--key", key, env={"TOKEN_CHUNK_SIZE": bad})
        assert_one_line_error(res)
    assert not cli.store_dir.exists() or [p.name for p in cli.store_dir.iterdir()] == ["VHSM-STORE"]


@settings(max_examples=6, deadline=None, database=None)
@given(cs=st.sampled_from([512, 4096, 8192]), k=st.integers(0, 3), d=st.integers(-1, 1))
def test_cli_roundtrip_property(
    tmp_path_factory: pytest.TempPathFactory, cs: int, k: int, d: int
) -> None:
    size = max(0, k * cs + d)
    cli = Cli(tmp_path_factory.mktemp("prop"))
    key = cli.keygen()
    data = write_random(cli.cwd / "x.bin", size, seed=size)
    tok = cli.store("x.bin", key, env={"TOKEN_CHUNK_SIZE": str(cs)})
    cli.ok("token", "retrieve", tok, "o", "--key", key)
    assert (cli.cwd / "o/x.bin").read_bytes() == data


# -- list / info --------------------------------------------------------------------------------


def test_list_and_info(cli: Cli) -> None:
    key = cli.keygen()
    other = cli.keygen("other.key")
    a = write_random(cli.cwd / "alpha.txt", 20_000, 1)
    write_random(cli.cwd / "beta.txt", 7, 2)
    ta = cli.store("alpha.txt", key)
    tb = cli.store("beta.txt", other)

    rows = json.loads(cli.ok("token", "list", "--json").out)
    assert sorted(r["token"] for r in rows) == sorted([ta, tb])
    for r in rows:  # without a key names and sizes stay encrypted
        assert r["readable"] is False and r["name"] is None and r["size"] is None

    rows = {r["token"]: r for r in json.loads(cli.ok("token", "list", "--key", key, "--json").out)}
    assert rows[ta]["readable"] is True and rows[ta]["name"] == "alpha.txt"
    assert rows[ta]["size"] == 20_000
    assert rows[ta]["sha256"] is None  # format v2 stores none: `info --digest` computes it
    assert rows[tb]["readable"] is False and rows[tb]["name"] is None

    table = cli.ok("token", "list", "--key", key).out
    assert ta in table and tb in table and "alpha.txt" in table and "beta.txt" not in table

    info = json.loads(cli.ok("token", "info", ta, "--key", key, "--json").out)
    assert info["token"] == ta and info["name"] == "alpha.txt" and info["size"] == 20_000
    assert info["chunk_size"] == 8192 and info["chunk_count"] == 3
    assert info["sha256"] is None
    assert info["stored_bytes"] == 20_000 + 3 * 28
    digest = json.loads(cli.ok("token", "info", ta, "--key", key, "--json", "--digest").out)
    assert digest["sha256"] == hashlib.sha256(a).hexdigest()
    assert {k: v for k, v in digest.items() if k != "sha256"} == {
        k: v for k, v in info.items() if k != "sha256"
    }
    human = cli.ok("token", "info", ta, "--key", key).out
    assert "alpha.txt" in human and ta in human and "--digest" in human
    human = cli.ok("token", "info", ta, "--key", key, "--digest").out
    assert f"SHA-256:      {hashlib.sha256(a).hexdigest()}\n" in human
    assert "digest" in assert_one_line_error(cli("token", "info", ta, "--digest"))  # needs a key
    keyless = json.loads(cli.ok("token", "info", ta, "--json").out)
    assert keyless["name"] is None and keyless["chunk_count"] == 3
    assert "alpha" not in cli.ok("token", "info", ta).out
    assert_one_line_error(cli("token", "info", ta, "--key", other))


def test_list_missing_and_empty_store(cli: Cli) -> None:
    assert_one_line_error(cli("token", "list", "--json"))  # no store there: said so
    assert not cli.store_dir.exists()  # and not created by a read-only command
    key = cli.keygen()
    write_random(cli.cwd / "f", 1, 0)
    cli.ok("token", "delete", cli.store("f", key))
    assert json.loads(cli.ok("token", "list", "--json").out) == []


def test_store_env_and_option_select_store(cli: Cli) -> None:
    key = cli.keygen()
    write_random(cli.cwd / "f", 100, 0)
    t1 = cli.store("f", key, "--store", "s1")
    t2 = cli.store("f", key, env={"VHSM_STORE": str(cli.cwd / "s2")})
    assert (cli.cwd / "s1" / f"{t1}.metadata").is_file()
    assert (cli.cwd / "s2" / f"{t2}.metadata").is_file()
    assert not cli.store_dir.exists()
    rows = json.loads(cli.ok("token", "list", "--json", env={"VHSM_STORE": "s2"}).out)
    assert [r["token"] for r in rows] == [t2]


# -- verify -------------------------------------------------------------------------------------


def test_verify_with_and_without_key(cli: Cli) -> None:
    key = cli.keygen()
    other = cli.keygen("o.key")
    write_random(cli.cwd / "a", 30_000, 1)
    write_random(cli.cwd / "b", 30_000, 2)
    ta, tb = cli.store("a", key), cli.store("b", key)
    tc = cli.store("a", other)

    res = cli.ok("token", "verify", "--key", key)
    assert f"OK {ta}" in res.out and f"OK {tb}" in res.out
    assert f"SKIP {tc}" in res.out  # another key's token: its ciphertext is still scrubbed
    res = cli.ok("token", "verify", "--no-key")
    assert all(f"OK {t}" in res.out for t in (ta, tb, tc))
    cli.ok("token", "verify", ta, "--key", key)
    assert_one_line_error(cli("token", "verify", ta))  # neither --key nor --no-key
    assert cli("token", "verify", tc, "--key", key).rc != 0  # named token, wrong key

    # flip one ciphertext byte of b: both modes must notice, a stays OK
    obj = object_paths(cli.store_dir, tb)[0]
    buf = bytearray(obj.read_bytes())
    buf[len(buf) // 2] ^= 0x40
    obj.write_bytes(buf)
    for mode in (["--key", str(key)], ["--no-key"]):
        res = cli("token", "verify", *mode)
        assert res.rc == 1, str(res)
        assert f"FAILED {tb}" in res.out and f"OK {ta}" in res.out
        res = cli("token", "verify", tb, *mode)
        assert res.rc == 1 and f"FAILED {tb}" in res.out


# -- delete -------------------------------------------------------------------------------------


def test_delete(cli: Cli) -> None:
    key = cli.keygen()
    a = write_random(cli.cwd / "a", 50_000, 1)
    write_random(cli.cwd / "b", 50_000, 2)
    ta, tb = cli.store("a", key), cli.store("b", key)
    res = cli.ok("token", "delete", tb)
    assert tb in res.out
    assert store_names(cli.store_dir) == sorted(["VHSM-STORE", f"{ta}.metadata", f"{ta}.data"])
    rows = json.loads(cli.ok("token", "list", "--json").out)
    assert [r["token"] for r in rows] == [ta]
    assert_one_line_error(cli("token", "retrieve", tb, "o", "--key", key))
    assert not (cli.cwd / "o").exists()
    assert_one_line_error(cli("token", "delete", tb))
    cli.ok("token", "retrieve", ta, "o", "--key", key)
    assert (cli.cwd / "o/a").read_bytes() == a
    cli.ok("token", "delete", ta)
    assert store_names(cli.store_dir) == ["VHSM-STORE"]
    assert cli.ok("token", "gc").out == ""


def test_delete_damaged_token(cli: Cli) -> None:
    """A token whose metadata is garbage (the current file and its generation file) can still
    be deleted (no key, no parsing)."""
    key = cli.keygen()
    write_random(cli.cwd / "a", 20_000, 1)
    tok = cli.store("a", key)
    (cli.store_dir / f"{tok}.metadata").write_bytes(b"garbage")
    (gen,) = gen_paths(cli.store_dir, tok)
    gen.write_bytes(b"garbage")
    assert cli("token", "verify", "--no-key").rc == 1
    cli.ok("token", "delete", tok)
    assert store_names(cli.store_dir) == ["VHSM-STORE"]


# -- the addendum's script, unchanged except ./token/token -> vhsm token ------------------------

ADDENDUM_SCRIPT = """#!/bin/bash
# Secure document management workflow

# Initialize
vhsm token generate-key doc_master.key

# Store documents
TOKEN1=$(vhsm token store contract.pdf --key doc_master.key | grep "Token:" | awk '{print $2}')
TOKEN2=$(vhsm token store financial_report.xlsx --key doc_master.key | grep "Token:" | awk '{print $2}')

# Save tokens securely
echo "$TOKEN1" > .contract_token
echo "$TOKEN2" > .report_token
chmod 600 .contract_token .report_token

# Later retrieval
vhsm token retrieve $(cat .contract_token) retrieved_docs/ --key doc_master.key
"""  # noqa: E501


def test_addendum_secure_document_management_script(cli: Cli) -> None:
    assert (VENV_BIN / "vhsm").exists(), "the console script vhsm must be in the venv"
    contract = write_random(cli.cwd / "contract.pdf", 123_456, 1)
    write_random(cli.cwd / "financial_report.xlsx", 9_999, 2)
    script = cli.cwd / "workflow.sh"
    script.write_text(ADDENDUM_SCRIPT)
    script.chmod(0o700)
    p = subprocess.run(
        [str(script)], cwd=cli.cwd, env=clean_env(), capture_output=True, timeout=120
    )
    assert p.returncode == 0, p.stderr.decode()
    key = (cli.cwd / "doc_master.key").read_bytes()
    cli.keys.append(key)
    assert key.hex().encode() not in p.stdout + p.stderr and key not in p.stdout + p.stderr
    t1 = (cli.cwd / ".contract_token").read_text().strip()
    t2 = (cli.cwd / ".report_token").read_text().strip()
    assert uuid.UUID(t1) and uuid.UUID(t2) and t1 != t2
    assert (cli.cwd / "retrieved_docs/contract.pdf").read_bytes() == contract
    assert os.listdir(cli.cwd / "retrieved_docs") == ["contract.pdf"]
    cli.ok("token", "retrieve", t2, "r2", "--key", "doc_master.key")
    assert (cli.cwd / "r2/financial_report.xlsx").read_bytes() == (
        cli.cwd / "financial_report.xlsx"
    ).read_bytes()


def test_random_bytes_helper_is_deterministic() -> None:
    assert random_bytes(100, 1) == random_bytes(100, 1) != random_bytes(100, 2)
