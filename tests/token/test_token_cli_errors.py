"""Bad input through the CLI. Each case: exit non-zero, exactly one `Error: ...` line on stderr,
no output file, no temp file, no output directory created, nothing half-written in the store.

Cases that depend on file modes run the CLI through `setpriv` with CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH dropped (see token_helpers.UNPRIVILEGED), since root ignores modes; the
`unprivileged_ok` fixture checks first that this really takes effect.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from token_helpers import (
    Cli,
    assert_one_line_error,
    gen_paths,
    meta_path,
    object_paths,
    read_manifest,
    snapshot,
    store_leftovers,
    write_random,
)

AUDIT_PREFIXES = ("hsm_audit.log", ".hsm_audit.log")


def work_snapshot(cli: Cli) -> dict[str, str]:
    """Everything in the working directory except the audit log, which is meant to grow."""
    return {k: v for k, v in snapshot(cli.cwd).items() if not k.startswith(AUDIT_PREFIXES)}


@pytest.fixture
def stored(cli: Cli):  # type: ignore[no-untyped-def]
    key = cli.keygen()
    data = write_random(cli.cwd / "doc.bin", 20_000, seed=11)
    tok = cli.store("doc.bin", key, env={"TOKEN_CHUNK_SIZE": "4096"})
    return cli, key, tok, data


def expect_clean_failure(cli: Cli, *args, **kw) -> str:  # type: ignore[no-untyped-def]
    """Run a command that must fail and change nothing but the audit log."""
    before = work_snapshot(cli)
    res = cli(*args, **kw)
    line = assert_one_line_error(res)
    assert res.out == "" or "Token:" not in res.out, str(res)
    assert work_snapshot(cli) == before, f"left something behind: {res}"
    return line


# -- keys ---------------------------------------------------------------------------------------


def test_wrong_key(stored) -> None:  # type: ignore[no-untyped-def]
    cli, _, tok, _ = stored
    other = cli.keygen("other.key")
    line = expect_clean_failure(cli, "token", "retrieve", tok, "out", "--key", other)
    assert "key" in line.lower()
    expect_clean_failure(cli, "token", "info", tok, "--key", other)
    res = cli("token", "verify", tok, "--key", other)
    assert res.rc != 0 and "OK" not in res.out


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_key_file_of_wrong_size(stored, size: int) -> None:  # type: ignore[no-untyped-def]
    cli, _, tok, _ = stored
    bad = cli.cwd / f"bad{size}.key"
    bad.write_bytes(os.urandom(size))
    bad.chmod(0o600)
    line = expect_clean_failure(cli, "token", "retrieve", tok, "out", "--key", bad)
    assert "32" in line
    expect_clean_failure(cli, "token", "store", "doc.bin", "--key", bad)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_file_accessible_by_others_refused(stored, mode: int) -> None:  # type: ignore[no-untyped-def]
    cli, key, tok, _ = stored
    key.chmod(mode)
    expect_clean_failure(cli, "token", "retrieve", tok, "out", "--key", key)
    expect_clean_failure(cli, "token", "store", "doc.bin", "--key", key)
    expect_clean_failure(cli, "token", "verify", "--key", key)
    key.chmod(0o600)
    cli.ok("token", "retrieve", tok, "out", "--key", key)


def test_missing_key_file_and_symlinked_key(stored) -> None:  # type: ignore[no-untyped-def]
    cli, key, tok, _ = stored
    expect_clean_failure(cli, "token", "retrieve", tok, "out", "--key", "nope.key")
    expect_clean_failure(cli, "token", "store", "doc.bin", "--key", "nope.key")
    (cli.cwd / "link.key").symlink_to(key)
    expect_clean_failure(cli, "token", "retrieve", tok, "out", "--key", "link.key")


# -- tokens -------------------------------------------------------------------------------------

MALFORMED = [
    "not-a-token",
    "",
    "1234",
    "../../etc/passwd",
    "x" * 36,
    "4297e228871048bfb9b72981f77570d5",  # a UUID, but not in the canonical form
    "4297e228-8710-4bf4-b9b7-2981f77570d5x",
    "{4297e228-8710-4bf4-b9b7-2981f77570d5}",
]


@pytest.mark.parametrize("bad", MALFORMED)
def test_malformed_token(stored, bad: str) -> None:  # type: ignore[no-untyped-def]
    cli, key, _, _ = stored
    expect_clean_failure(cli, "token", "retrieve", bad, "out", "--key", key)
    expect_clean_failure(cli, "token", "info", bad)
    expect_clean_failure(cli, "token", "delete", bad)


def test_malformed_token_other_commands(stored) -> None:  # type: ignore[no-untyped-def]
    cli, key, _, _ = stored
    res = cli("token", "verify", "not-a-token", "--key", key)
    assert res.rc != 0 and "Error:" in res.err


def test_unknown_token(stored) -> None:  # type: ignore[no-untyped-def]
    cli, key, _, _ = stored
    unknown = str(uuid.uuid4())
    line = expect_clean_failure(cli, "token", "retrieve", unknown, "out", "--key", key)
    assert unknown in line
    expect_clean_failure(cli, "token", "info", unknown, "--key", key)
    expect_clean_failure(cli, "token", "delete", unknown)
    res = cli("token", "verify", unknown, "--key", key)
    assert res.rc != 0 and f"OK {unknown}" not in res.out


# -- input files --------------------------------------------------------------------------------


def test_missing_input_file(stored) -> None:  # type: ignore[no-untyped-def]
    cli, key, _, _ = stored
    line = expect_clean_failure(cli, "token", "store", "missing.txt", "--key", key)
    assert "missing.txt" in line
    # fails at once: the existing file named first is not stored either
    expect_clean_failure(cli, "token", "store", "doc.bin", "missing.txt", "--key", key)


def test_missing_input_file_fresh_store_not_created(cli: Cli) -> None:
    key = cli.keygen()
    expect_clean_failure(cli, "token", "store", "missing.txt", "--key", key)
    assert not cli.store_dir.exists()
    # and without --key no auto-generated key is left behind
    expect_clean_failure(cli, "token", "store", "missing.txt")
    assert list(cli.cwd.glob("auto_generated_key_*")) == []


def test_unreadable_input_file(stored, unprivileged_ok) -> None:  # type: ignore[no-untyped-def]
    cli, key, _, _ = stored
    (cli.cwd / "secret.txt").write_bytes(b"top secret")
    (cli.cwd / "secret.txt").chmod(0)
    line = expect_clean_failure(
        cli, "token", "store", "secret.txt", "--key", key, unprivileged=True
    )
    assert "secret.txt" in line
    # the same process can store a readable file (the failure was the mode, not setpriv)
    cli.ok("token", "store", "doc.bin", "--key", key, unprivileged=True)


def test_recursive_tree_with_unreadable_file_stores_nothing(cli: Cli, unprivileged_ok) -> None:  # type: ignore[no-untyped-def]
    """A tree where one file cannot be read: fail before storing anything, rather than store
    part of the tree and then fail."""
    key = cli.keygen()
    write_random(cli.cwd / "tree/a.txt", 10, 1)
    write_random(cli.cwd / "tree/b.txt", 10, 2)
    write_random(cli.cwd / "tree/c.txt", 10, 3)
    (cli.cwd / "tree/b.txt").chmod(0)
    expect_clean_failure(cli, "token", "store", "tree", "-r", "--key", key, unprivileged=True)
    assert not cli.store_dir.exists() or snapshot(cli.store_dir).keys() <= {"VHSM-STORE"}


def test_recursive_tree_with_unreadable_subdirectory_fails(cli: Cli, unprivileged_ok) -> None:  # type: ignore[no-untyped-def]
    """A subdirectory that cannot be listed must not be skipped silently: the user would
    believe the whole tree was stored."""
    key = cli.keygen()
    write_random(cli.cwd / "tree/a.txt", 10, 1)
    write_random(cli.cwd / "tree/locked/inner.txt", 10, 2)
    (cli.cwd / "tree/locked").chmod(0)
    try:
        expect_clean_failure(cli, "token", "store", "tree", "-r", "--key", key, unprivileged=True)
    finally:
        (cli.cwd / "tree/locked").chmod(0o700)
    assert not cli.store_dir.exists() or snapshot(cli.store_dir).keys() <= {"VHSM-STORE"}


def test_input_is_not_a_regular_file(stored) -> None:  # type: ignore[no-untyped-def]
    cli, key, _, _ = stored
    (cli.cwd / "adir").mkdir()
    expect_clean_failure(cli, "token", "store", "adir", "--key", key)
    expect_clean_failure(cli, "token", "store", "/dev/null", "--key", key)


def test_input_or_key_is_a_fifo_fails_at_once(stored) -> None:  # type: ignore[no-untyped-def]
    """A FIFO given as input or as key file is refused, not opened and waited on forever."""
    cli, key, _, _ = stored
    os.mkfifo(cli.cwd / "pipe")
    expect_clean_failure(cli, "token", "store", "pipe", "--key", key, timeout=15)
    os.mkfifo(cli.cwd / "keypipe", 0o600)
    expect_clean_failure(cli, "token", "store", "doc.bin", "--key", "keypipe", timeout=15)


# -- output -------------------------------------------------------------------------------------


def test_output_directory_not_writable(stored, unprivileged_ok) -> None:  # type: ignore[no-untyped-def]
    cli, key, tok, _ = stored
    out = cli.cwd / "ro"
    out.mkdir()
    out.chmod(0o500)
    expect_clean_failure(cli, "token", "retrieve", tok, "ro", "--key", key, unprivileged=True)
    assert os.listdir(out) == []
    # OUTDIR missing and its parent not writable: not created
    expect_clean_failure(cli, "token", "retrieve", tok, "ro/sub", "--key", key, unprivileged=True)
    assert not (out / "sub").exists()
    out.chmod(0o700)
    cli.ok("token", "retrieve", tok, "ro", "--key", key, unprivileged=True)


def test_output_file_exists(stored) -> None:  # type: ignore[no-untyped-def]
    cli, key, tok, data = stored
    out = cli.cwd / "out"
    out.mkdir()
    (out / "doc.bin").write_bytes(b"precious")
    line = expect_clean_failure(cli, "token", "retrieve", tok, "out", "--key", key)
    assert "exists" in line
    assert (out / "doc.bin").read_bytes() == b"precious"
    cli.ok("token", "retrieve", tok, "out", "--key", key, "--force")
    assert (out / "doc.bin").read_bytes() == data
    assert os.listdir(out) == ["doc.bin"]


def test_output_path_is_a_directory(stored) -> None:  # type: ignore[no-untyped-def]
    cli, key, tok, _ = stored
    (cli.cwd / "out/doc.bin").mkdir(parents=True)
    expect_clean_failure(cli, "token", "retrieve", tok, "out", "--key", key)
    expect_clean_failure(cli, "token", "retrieve", tok, "out", "--key", key, "--force")


def test_outdir_is_a_file(stored) -> None:  # type: ignore[no-untyped-def]
    cli, key, tok, _ = stored
    (cli.cwd / "afile").write_bytes(b"x")
    expect_clean_failure(cli, "token", "retrieve", tok, "afile", "--key", key)


# -- disk full ----------------------------------------------------------------------------------


def test_disk_full_during_store(cli: Cli, tmpfs) -> None:  # type: ignore[no-untyped-def]
    key = cli.keygen()
    write_random(cli.cwd / "big.bin", 4 << 20, seed=5)
    small = tmpfs("small", "2m")
    line = expect_clean_failure(cli, "token", "store", "big.bin", "--key", key, "--store", small)
    assert "space" in line.lower()
    assert store_leftovers(small) == []
    assert_one_line_error(cli("token", "store", "big.bin", "--store", small))  # auto key
    assert list(cli.cwd.glob("auto_generated_key_*")) == []
    assert store_leftovers(small) == []
    # the store still works for what fits
    write_random(cli.cwd / "s.bin", 100_000, seed=6)
    tok = cli.store("s.bin", key, "--store", small)
    cli.ok("token", "verify", "--key", key, "--store", small)
    cli.ok("token", "retrieve", tok, "o", "--key", key, "--store", small)


def test_disk_full_during_retrieve(stored, tmpfs) -> None:  # type: ignore[no-untyped-def]
    cli, key, _, _ = stored
    write_random(cli.cwd / "big.bin", 4 << 20, seed=7)
    tok = cli.store("big.bin", key)
    small = tmpfs("small", "2m")
    line = expect_clean_failure(cli, "token", "retrieve", tok, small / "new" / "dir", "--key", key)
    assert "space" in line.lower()
    assert os.listdir(small) == []
    expect_clean_failure(cli, "token", "retrieve", tok, small, "--key", key)
    assert os.listdir(small) == []


# -- tampering (a CLI sample; every byte is covered at library level) ---------------------------


def _flip(path: Path, pos: int) -> bytes:
    original = path.read_bytes()
    buf = bytearray(original)
    buf[pos % len(buf)] ^= 0x01
    path.write_bytes(buf)
    return original


def _assert_detected(cli: Cli, key: Path, tok: str) -> None:
    expect_clean_failure(cli, "token", "retrieve", tok, "out", "--key", key)
    for mode in (["--key", str(key)], ["--no-key"]):
        res = cli("token", "verify", tok, *mode)
        assert res.rc == 1 and f"FAILED {tok}" in res.out and f"OK {tok}" not in res.out, str(res)


def metadata_copies(store: Path, tok: str) -> list[Path]:
    """The current metadata and its generation file (format v2: the same bytes)."""
    (gen,) = gen_paths(store, tok)
    return [meta_path(store, tok), gen]


def test_tampered_bytes_cli_sample(stored) -> None:  # type: ignore[no-untyped-def]
    """The same change to both copies of the metadata (an attacker's), or to an object."""
    cli, key, tok, data = stored
    groups = [metadata_copies(cli.store_dir, tok)] + [[p] for p in object_paths(cli.store_dir, tok)]
    for paths in groups:
        size = paths[0].stat().st_size
        for pos in (0, 9, size // 3, size // 2, size - 33, size - 1):
            originals = [_flip(path, pos) for path in paths]
            _assert_detected(cli, key, tok)
            for path, original in zip(paths, originals, strict=True):
                path.write_bytes(original)
    cli.ok("token", "retrieve", tok, "out", "--key", key)
    assert (cli.cwd / "out/doc.bin").read_bytes() == data


def test_damaged_current_metadata_served_from_generation_file_cli(stored) -> None:  # type: ignore[no-untyped-def]
    """The current metadata alone damaged (its header): verify reports the damage; retrieve
    is served from the intact generation file of the same generation, with a warning; gc puts
    the current metadata back, after which verify passes."""
    cli, key, tok, data = stored
    meta, gen = metadata_copies(cli.store_dir, tok)
    _flip(meta, 30)  # in the salt: the header checksum no longer matches
    for mode in (["--key", str(key)], ["--no-key"]):
        res = cli("token", "verify", tok, *mode)
        assert res.rc == 1 and f"FAILED {tok}" in res.out, str(res)
        assert "checksum mismatch" in res.out, str(res)
    res = cli.ok("token", "retrieve", tok, "out", "--key", key)
    assert "using generation 1 (" in res.err, str(res)
    assert (cli.cwd / "out/doc.bin").read_bytes() == data
    res = cli.ok("token", "gc", "--store", cli.store_dir)
    assert f"token {tok}: using generation 1 (" in res.out, str(res)
    assert "current metadata rewritten" in res.out, str(res)
    assert meta.read_bytes() == gen.read_bytes()
    res = cli.ok("token", "verify", tok, "--no-key")
    assert res.out == f"OK {tok}\n", str(res)
    cli.ok("token", "verify", tok, "--key", key)


def test_object_deleted_or_truncated_cli(stored) -> None:  # type: ignore[no-untyped-def]
    cli, key, tok, _ = stored
    obj = object_paths(cli.store_dir, tok)[0]
    original = obj.read_bytes()
    obj.write_bytes(original[:-1])
    _assert_detected(cli, key, tok)
    obj.write_bytes(original[: len(original) // 2])
    _assert_detected(cli, key, tok)
    obj.unlink()
    _assert_detected(cli, key, tok)


def test_swaps_between_tokens_cli(stored) -> None:  # type: ignore[no-untyped-def]
    cli, key, ta, _ = stored
    write_random(cli.cwd / "other.bin", 20_000, seed=12)
    tb = cli.store("other.bin", key, env={"TOKEN_CHUNK_SIZE": "4096"})
    oa, ob = object_paths(cli.store_dir, ta)[0], object_paths(cli.store_dir, tb)[0]
    a, b = oa.read_bytes(), ob.read_bytes()
    oa.write_bytes(b)
    ob.write_bytes(a)
    _assert_detected(cli, key, ta)
    _assert_detected(cli, key, tb)
    oa.write_bytes(a)
    ob.write_bytes(b)
    # the metadata, both copies (current and generation file)
    pairs = zip(metadata_copies(cli.store_dir, ta), metadata_copies(cli.store_dir, tb), strict=True)
    for ma, mb in pairs:
        a, b = ma.read_bytes(), mb.read_bytes()
        ma.write_bytes(b)
        mb.write_bytes(a)
    _assert_detected(cli, key, ta)
    _assert_detected(cli, key, tb)


def test_chunks_reordered_cli(stored) -> None:  # type: ignore[no-untyped-def]
    cli, key, tok, _ = stored
    e = read_manifest(cli.store_dir, tok)
    obj = object_paths(cli.store_dir, tok)[0]
    buf = bytearray(obj.read_bytes())
    r0, r1 = bytes(buf[e[0][1] : e[0][1] + e[0][2]]), bytes(buf[e[1][1] : e[1][1] + e[1][2]])
    buf[e[0][1] : e[0][1] + e[0][2]] = r1
    buf[e[1][1] : e[1][1] + e[1][2]] = r0
    obj.write_bytes(buf)
    _assert_detected(cli, key, tok)


# -- the audit log cannot be written: fail closed, undo, leave nothing ---------------------------


def test_audit_log_unwritable_store_fails_closed(stored, unprivileged_ok) -> None:  # type: ignore[no-untyped-def]
    cli, key, tok, _ = stored
    (cli.cwd / "hsm_audit.log").chmod(0o400)
    before = snapshot(cli.store_dir)
    res = cli("token", "store", "doc.bin", "--key", key, unprivileged=True)
    assert "audit" in assert_one_line_error(res)
    assert snapshot(cli.store_dir) == before  # the token was undone


def test_audit_log_unwritable_retrieve_leaves_nothing(stored, unprivileged_ok) -> None:  # type: ignore[no-untyped-def]
    """The plaintext is removed again when the DECRYPTION line cannot be written; the output
    directory that retrieve created must go too (cli/token_cmds.py retrieve: the undo passed to
    audited() only unlinks the file)."""
    cli, key, tok, _ = stored
    (cli.cwd / "hsm_audit.log").chmod(0o400)
    res = cli("token", "retrieve", tok, "out/sub", "--key", key, unprivileged=True)
    assert "audit" in assert_one_line_error(res)
    assert not (cli.cwd / "out/sub/doc.bin").exists()
    assert not (cli.cwd / "out").exists()
