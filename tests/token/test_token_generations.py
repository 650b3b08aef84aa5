"""Format v2 generations in-process: readers and gc fall back to the newest complete generation
(what a backup copy taken mid-commit holds), the grace period keeps superseded generations and
objects, and every stored byte is covered by a keyless check (appended bytes, bytes between
records, a genuine older record swapped in)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from vhsmfs.backend import LocalBackend
from vhsmfs.errors import IntegrityError, TokenNotFoundError
from vhsmfs.format import MANIFEST_ENTRY
from vhsmfs.keyfile import StaticKeyProvider
from vhsmfs.mount import randomaccess as ra
from vhsmfs.mount.workers import MountWorkers
from vhsmfs.store import TokenStore

KEY = bytes(range(32))
HOUR_NS = 3600 * 10**9


def _store(root: Path, grace: int = 3600) -> TokenStore:
    return TokenStore(LocalBackend(root), StaticKeyProvider(KEY), chunk_size=4096, grace=grace)


def _rewrite(store: TokenStore, tok: uuid.UUID, offset: int, data: bytes) -> None:
    """One more generation through the mount's writer: a write, then the commit."""
    with MountWorkers() as workers:
        tf = ra.TokenFile.load(store, tok, workers=workers)
        tf.write(offset, data)
        assert tf.commit()
        tf.close()


def _two_generations(
    tmp_path: Path, *, whole: bool = True
) -> tuple[TokenStore, uuid.UUID, bytes, bytes]:
    """A stored token (generation 1, object 0) rewritten through the mount's writer
    (generation 2, object 1): wholly (object 0 is then superseded), or only bytes 100..199
    (object 0 still holds chunks 1.., and the old record of chunk 0 is a gap in it)."""
    store = _store(tmp_path / "store")
    old = os.urandom(50_000)
    src = tmp_path / "f.bin"
    src.write_bytes(old)
    tok = store.store_file(src)
    new = os.urandom(50_000) if whole else old[:100] + b"N" * 100 + old[200:]
    if whole:
        _rewrite(store, tok, 0, new)
    else:
        _rewrite(store, tok, 100, b"N" * 100)
    return store, tok, old, new


def _data(store: TokenStore, tok: uuid.UUID) -> Path:
    return Path(store.backend.describe()) / f"{tok}.data"


def _retrieved(store: TokenStore, tok: uuid.UUID, out: Path) -> bytes:
    shutil.rmtree(out, ignore_errors=True)
    return store.retrieve(tok, out).read_bytes()


def test_a_rewrite_keeps_the_superseded_generation_and_objects(tmp_path: Path) -> None:
    store, tok, _, new = _two_generations(tmp_path)
    names = sorted(p.name for p in _data(store, tok).iterdir())
    assert names == ["00000000", "00000001", "gen-0000000000000001", "gen-0000000000000002"]
    assert _retrieved(store, tok, tmp_path / "out") == new
    assert store.collect_garbage().removed == []  # within the grace period: nothing goes


def test_gc_prunes_what_was_superseded_longer_than_the_grace_period(tmp_path: Path) -> None:
    store, tok, _, new = _two_generations(tmp_path)
    report = store.collect_garbage(now_ns=_now_ns() + 2 * HOUR_NS)
    assert sorted(report.removed) == [
        f"removed generation 1 of token {tok} (superseded)",
        f"removed object 00000000 of token {tok} (superseded)",
    ]
    assert sorted(p.name for p in _data(store, tok).iterdir()) == [
        "00000001",
        "gen-0000000000000002",
    ]
    assert _retrieved(store, tok, tmp_path / "out") == new
    store.verify_full(tok)


def test_grace_zero_prunes_at_the_commit(tmp_path: Path) -> None:
    store = _store(tmp_path / "store", grace=0)
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(20_000))
    tok = store.store_file(src)
    _rewrite(store, tok, 0, os.urandom(20_000))
    assert sorted(p.name for p in _data(store, tok).iterdir()) == [
        "00000001",
        "gen-0000000000000002",
    ]


def test_a_copy_missing_the_new_objects_falls_back_and_gc_sets_it_back(tmp_path: Path) -> None:
    """What a backup tool produces when it listed the data directory before a commit and
    copied the current metadata after it: the new generation's object is missing."""
    store, tok, old, _ = _two_generations(tmp_path)
    (_data(store, tok) / "00000001").unlink()
    (_data(store, tok) / "gen-0000000000000002").unlink()
    assert _retrieved(store, tok, tmp_path / "out") == old
    note = store.verify_full(tok)
    assert note is not None and "using generation 1" in note and "00000001 is missing" in note
    assert store.verify_ciphertext(tok) == note
    report = store.collect_garbage()
    assert any(
        line.startswith(f"token {tok}: using generation 1 (")
        and line.endswith("00000001 is missing); current metadata rewritten")
        for line in report.removed
    )
    assert store.verify_full(tok) is None  # the current metadata is generation 1 again
    assert store.parse(tok).header.generation == 1
    assert _retrieved(store, tok, tmp_path / "out") == old


def test_current_metadata_older_than_the_data_directory(tmp_path: Path) -> None:
    """The other order: the current metadata copied before the commit, the data directory
    after it (and the old generation pruned meanwhile): the newer complete generation wins."""
    store, tok, old, new = _two_generations(tmp_path)
    meta = Path(store.backend.describe()) / f"{tok}.metadata"
    meta.write_bytes((_data(store, tok) / "gen-0000000000000001").read_bytes())
    (_data(store, tok) / "gen-0000000000000001").unlink()
    (_data(store, tok) / "00000000").unlink()
    assert _retrieved(store, tok, tmp_path / "out") == new
    store.collect_garbage()
    assert store.verify_full(tok) is None
    assert store.parse(tok).header.generation == 2


def test_a_token_with_no_complete_generation_is_removed_by_gc(tmp_path: Path) -> None:
    """A copy taken while a token was first stored (metadata copied, objects not yet)."""
    store = _store(tmp_path / "store")
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(10_000))
    tok = store.store_file(src)
    keep = store.store_file(src)
    (_data(store, tok) / "00000000").unlink()
    with pytest.raises(IntegrityError, match="00000000 is missing"):
        store.verify_ciphertext(tok)
    report = store.collect_garbage()
    assert any(
        line.startswith(f"removed token {tok}: no complete generation") for line in report.removed
    )
    assert store.list_tokens() == [keep]
    with pytest.raises(TokenNotFoundError):
        store.parse(tok)


def test_a_damaged_object_is_not_a_reason_to_fall_back(tmp_path: Path) -> None:
    """Only a missing object makes a generation incomplete. An object of the wrong length is
    damage: reported, never silently replaced by an older version."""
    store, tok, _, _ = _two_generations(tmp_path)
    with open(_data(store, tok) / "00000001", "ab") as f:
        f.write(b"appended")
    with pytest.raises(IntegrityError, match="00000001 is .* bytes, its metadata says"):
        store.retrieve(tok, tmp_path / "out")
    with pytest.raises(IntegrityError, match="truncated or extended"):
        store.verify_ciphertext(tok)
    report = store.collect_garbage()
    assert report.removed == [] and any(str(tok) in line for line in report.ignored)


def test_keyless_verify_covers_bytes_between_records(tmp_path: Path) -> None:
    """Bytes no record covers (a gap the mount left) are still in the object's checksum."""
    store, tok, old, _ = _two_generations(tmp_path, whole=False)
    obj = _data(store, tok) / "00000000"  # superseded chunk 0's old record lies here unused
    parsed = store.parse(tok)
    used = {(o, off, n) for o, off, n, _ in MANIFEST_ENTRY.iter_unpack(parsed.load_manifest())}
    assert not any(o == 0 and off == 0 for o, off, _ in used)  # chunk 0 was rewritten
    raw = bytearray(obj.read_bytes())
    raw[5] ^= 1  # inside the old record of chunk 0, which nothing refers to now
    obj.chmod(0o600)
    obj.write_bytes(bytes(raw))
    assert _retrieved(store, tok, tmp_path / "out")  # no record in use was touched
    with pytest.raises(IntegrityError, match="object 00000000 checksum mismatch"):
        store.verify_ciphertext(tok)


def test_an_older_genuine_record_swapped_in_is_caught(tmp_path: Path) -> None:
    """Chunk 0's record of generation 1 (a genuine record under the token's key, kept for the
    grace period) copied over chunk 0's current record: AES-GCM accepts it (same token, index
    and final flag), the manifest's checksum does not."""
    store, tok, _, _ = _two_generations(tmp_path, whole=False)
    manifest = store.parse(tok).load_manifest()
    cur_obj, cur_off, cur_len, _ = MANIFEST_ENTRY.unpack_from(manifest, 0)
    assert cur_obj == 1
    old_record = (_data(store, tok) / "00000000").read_bytes()[:cur_len]
    target = _data(store, tok) / f"{cur_obj:08x}"
    raw = bytearray(target.read_bytes())
    raw[cur_off : cur_off + cur_len] = old_record
    target.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="chunk 0 checksum mismatch"):
        store.retrieve(tok, tmp_path / "out")
    assert not (tmp_path / "out" / "f.bin").exists()


def test_a_v1_token_rewritten_by_the_mount_becomes_v2_and_keeps_its_v1_generation(
    tmp_path: Path,
) -> None:
    vectors = Path(__file__).resolve().parent.parent / "vectors"
    root = tmp_path / "store"
    shutil.copytree(vectors / "v1", root)
    store = _store(root)
    (tok,) = store.list_tokens()
    plain = (vectors / "vector.txt").read_bytes()
    assert store.parse(tok).version == 1
    _rewrite(store, tok, 0, b"V2")
    parsed = store.parse(tok)
    assert parsed.version == 2 and parsed.header.generation == 2
    assert _retrieved(store, tok, tmp_path / "out") == b"V2" + plain[2:]
    store.verify_full(tok)
    # the v1 metadata is kept as generation 1, with its object, for the grace period
    names = sorted(p.name for p in _data(store, tok).iterdir())
    assert "gen-0000000000000001" in names and "00000000" in names
    # the upgrade wrote every chunk to object 1, the write then chunk 0 to object 2
    assert sorted(store.collect_garbage(now_ns=_now_ns() + 2 * HOUR_NS).removed) == [
        f"removed generation 1 of token {tok} (superseded)",
        f"removed object 00000000 of token {tok} (superseded)",
    ]
    assert sorted(p.name for p in _data(store, tok).iterdir()) == [
        "00000001",
        "00000002",
        "gen-0000000000000002",
    ]


def _now_ns() -> int:
    import time

    return time.time_ns()


def _object_table_offset(raw: bytes) -> int:
    """Where the object table starts in a v2 metadata file (docs/FORMAT.md)."""
    import struct

    kref_len = struct.unpack_from(">H", raw, 158)[0]
    h = 160 + kref_len
    (meta_len,) = struct.unpack_from(">I", raw, h)
    return h + 4 + meta_len + 32


def test_a_damaged_object_table_is_damage_not_an_incomplete_generation(tmp_path: Path) -> None:
    """One bit flipped in an object id of the current metadata's object table makes an object
    look missing (object 1 -> object 0, which the rewrite superseded and grace 0 removed). The
    tables digest shows it is damage, so the generation file of the same number stands in,
    and gc repairs the current metadata instead of removing the token."""
    store = _store(tmp_path / "store", grace=0)
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(30_000))
    tok = store.store_file(src)
    new = os.urandom(30_000)
    _rewrite(store, tok, 0, new)
    assert sorted(p.name for p in _data(store, tok).iterdir()) == [
        "00000001",
        "gen-0000000000000002",
    ]
    meta = Path(store.backend.describe()) / f"{tok}.metadata"
    raw = bytearray(meta.read_bytes())
    raw[_object_table_offset(bytes(raw)) + 3] ^= 1  # object 1 -> object 0
    meta.write_bytes(bytes(raw))
    assert _retrieved(store, tok, tmp_path / "out") == new
    with pytest.raises(IntegrityError, match="chunk manifest does not match its digest"):
        store.verify_ciphertext(tok)  # damage is reported, even though a copy stands in
    report = store.collect_garbage()
    assert any(line.startswith(f"token {tok}: using generation 2") for line in report.removed)
    assert store.list_tokens() == [tok]
    assert store.verify_ciphertext(tok) is None  # repaired from the generation file
    store.verify_full(tok)


def test_damage_to_a_kept_generation_file_is_reported(tmp_path: Path) -> None:
    store, tok, _, new = _two_generations(tmp_path)
    gen1 = _data(store, tok) / "gen-0000000000000001"
    raw = bytearray(gen1.read_bytes())
    raw[-1] ^= 1  # in its manifest
    gen1.write_bytes(bytes(raw))
    assert _retrieved(store, tok, tmp_path / "out") == new  # the current one is intact
    with pytest.raises(IntegrityError, match="generation file 1: chunk manifest"):
        store.verify_ciphertext(tok)
    with pytest.raises(IntegrityError, match="generation file 1"):
        store.verify_full(tok)


def test_gc_removes_stale_staged_files_of_a_dead_writer(tmp_path: Path) -> None:
    """Where O_TMPFILE is missing, objects and generation files are staged in .tmp/ under
    names that carry the writer's pid; gc removes those of dead writers."""
    store = _store(tmp_path / "store")
    src = tmp_path / "f.bin"
    src.write_bytes(b"x")
    tok = store.store_file(src)
    tmp = Path(store.backend.describe()) / ".tmp"
    dead = 2**22 + 12345  # above pid_max: no such process
    names = [f"{tok}.gen-0000000000000002.{dead}.0123abcd", f"{tok}.00000001.{dead}.89abcdef"]
    for n in names:
        (tmp / n).write_bytes(b"partial")
    report = store.collect_garbage()
    assert sorted(report.removed) == sorted(f"removed stale temp file .tmp/{n}" for n in names)
    assert list(tmp.iterdir()) == []


@pytest.mark.parametrize("planted", ["a larger file", "another v1 file of the same size"])
def test_a_v1_token_replaced_before_its_upgrade_is_refused(tmp_path: Path, planted: str) -> None:
    """The mount keeps a v1 token's metadata as its previous generation when it upgrades it;
    what it copies must be the file it parsed at load (bounded by that parse), not one
    planted meanwhile: the upgrade then fails and nothing is written."""
    vectors = Path(__file__).resolve().parent.parent / "vectors"
    root = tmp_path / "store"
    shutil.copytree(vectors / "v1", root)
    store = _store(root)
    (tok,) = store.list_tokens()
    meta = root / f"{tok}.metadata"
    original = meta.read_bytes()
    with MountWorkers() as workers:
        tf = ra.TokenFile.load(store, tok, workers=workers)
        if planted == "a larger file":
            meta.write_bytes(original + bytes(1 << 20))
        else:
            import hashlib

            changed = bytearray(original[:-32])
            changed[30] ^= 1  # the salt: a different header, same size, a valid trailer
            meta.write_bytes(bytes(changed) + hashlib.sha256(changed).digest())
        with pytest.raises(IntegrityError, match="changed since it was read"):
            tf.write(0, b"V2")
        tf.close()
    assert sorted(p.name for p in _data(store, tok).iterdir()) == ["00000000"]
