"""Tampering with the raw store, at library level (fast enough to try every byte).

An attacker (or a failing disk) with write access to the store directory can change, truncate,
delete, swap and reorder anything. For every such change: retrieve must fail without releasing
any output, and `verify` with the key must fail. `verify --no-key` (verify_ciphertext) must fail
whenever ciphertext or metadata bytes changed and the plaintext manifest was not rewritten to
match; see test_nokey_verify_cannot_detect_consistent_manifest_forgery for what it cannot see.

Format v2 keeps each committed metadata twice: the current `<uuid>.metadata` and the generation
file `<uuid>.data/gen-<n>` it is a copy of. A reader falls back to an intact generation file
when the current metadata is unreadable, so "changed metadata" here means both copies changed
alike; damage to the current file alone must fail both verifies, while retrieve may be served
from the intact generation file (detected_or_served).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from token_helpers import (
    gen_paths,
    meta_path,
    object_paths,
    random_bytes,
    read_manifest,
    record_digest,
    rewrite_manifest,
    write_metadata,
)

import vhsmfs.store as store_mod
import vhsmfs.tokenwriter as writer_mod
from vhsmfs.backend import LocalBackend
from vhsmfs.errors import IntegrityError, TokenNotFoundError, VhsmError, WrongKeyError
from vhsmfs.format import CHUNK_AAD_MAGIC, build_head, parse_bytes
from vhsmfs.keyfile import StaticKeyProvider
from vhsmfs.store import TokenStore
from vhsmfs.tokencrypto import ChunkAuthError, TokenKeys

CS = 512
SIZE = 3 * CS - 100  # three chunks: 512, 512, 412


def store_one(
    ts: TokenStore, tmp: Path, name: str = "doc.bin", seed: int = 1, size: int = SIZE
) -> tuple[uuid.UUID, bytes]:
    data = random_bytes(size, seed)
    src = tmp / "src" / name
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(data)
    return ts.store_file(src), data


def failures(ts: TokenStore, tok: uuid.UUID, out: Path, *, nokey: bool = True) -> list[str]:
    """Run retrieve, verify_full and (optionally) verify_ciphertext; return what did NOT fail.
    `out` must not exist beforehand: a failed retrieve must not create it."""
    missed = []
    assert not out.exists()
    try:
        ts.retrieve(tok, out)
        missed.append("retrieve")
    except VhsmError:
        pass
    if out.exists():
        missed.append(f"retrieve left {sorted(os.listdir(out))} in a new output directory")
        shutil.rmtree(out)
    try:
        ts.verify_full(tok)
        missed.append("verify_full")
    except VhsmError:
        pass
    if nokey:
        try:
            ts.verify_ciphertext(tok)
            missed.append("verify_ciphertext")
        except VhsmError:
            pass
    return missed


def assert_intact(ts: TokenStore, tok: uuid.UUID, data: bytes, out: Path) -> None:
    assert ts.verify_full(tok) is None
    assert ts.verify_ciphertext(tok) is None
    assert ts.retrieve(tok, out).read_bytes() == data
    shutil.rmtree(out)


def detected_or_served(
    ts: TokenStore, tok: uuid.UUID, data: bytes, out: Path, served: list[str] | None = None
) -> list[str]:
    """For damage to the current metadata file alone: format v2 keeps the same bytes in the
    generation file, which may stand in for it (docs/FORMAT.md section 5). Both verifies must
    report the damage all the same; retrieve fails, or gives the original content from the
    intact copy (then its note is appended to `served`). Returns what is wrong."""
    problems = []
    for check in (ts.verify_full, ts.verify_ciphertext):
        try:
            check(tok)
            problems.append(f"{check.__name__} passed")
        except VhsmError:
            pass
    assert not out.exists()
    try:
        got = ts.retrieve(tok, out).read_bytes()
    except VhsmError:
        if out.exists():
            problems.append(f"retrieve left {sorted(os.listdir(out))} in a new output directory")
    else:
        if got != data:
            problems.append("retrieve gave other content")
        note = ts.parse(tok).note
        if note is None or not note.startswith("using generation "):
            problems.append(f"served without a note ({note})")
        if served is not None:
            served.append(str(note))
    if out.exists():
        shutil.rmtree(out)
    return problems


@pytest.fixture
def three(make_store, tmp_path: Path):  # type: ignore[no-untyped-def]
    ts = make_store(chunk_size=CS)
    tok, data = store_one(ts, tmp_path)
    return ts, tok, data, Path(ts.backend.root)


def metadata_copies(root: Path, tok: uuid.UUID) -> list[Path]:
    """The current metadata and the generation file it is a copy of (format v2): an attacker
    changes both, else a reader falls back to the untouched one."""
    (gen,) = gen_paths(root, tok)
    assert gen.read_bytes() == meta_path(root, tok).read_bytes()
    return [meta_path(root, tok), gen]


# -- every single-byte change -------------------------------------------------------------------


def _sweep(
    ts: TokenStore,
    tok: uuid.UUID,
    groups: list[list[Path]],
    out: Path,
    check: Callable[[], list[str]] | None = None,
) -> list[str]:
    """Flip every bit 0 of every byte of each group of files (the files of a group hold the
    same bytes and get the same change); `check` (default: every check fails) after each."""
    undetected = []
    for paths in groups:
        original = paths[0].read_bytes()
        buf = bytearray(original)
        for i in range(len(buf)):
            buf[i] ^= 0x01  # the smallest change: one bit
            for path in paths:
                path.write_bytes(buf)
            missed = check() if check is not None else failures(ts, tok, out)
            if missed:
                undetected.append(f"{paths[0].name}[{i}]: {missed}")
            buf[i] ^= 0x01
        for path in paths:
            path.write_bytes(original)
    return undetected


def test_every_byte_of_metadata_file(three, tmp_path: Path) -> None:
    ts, tok, data, root = three
    assert _sweep(ts, tok, [metadata_copies(root, tok)], tmp_path / "out") == []
    assert_intact(ts, tok, data, tmp_path / "out")


def test_every_byte_of_current_metadata_alone(three, tmp_path: Path) -> None:
    """Only the current metadata changed, its generation file intact: both verifies report
    it; retrieve fails or is served from the generation file, never with other content."""
    ts, tok, data, root = three
    out = tmp_path / "out"
    served: list[str] = []

    def check() -> list[str]:
        return detected_or_served(ts, tok, data, out, served)

    assert _sweep(ts, tok, [[meta_path(root, tok)]], out, check) == []
    assert served  # the copy stood in (a damaged header)
    assert_intact(ts, tok, data, out)


def test_every_byte_of_the_generation_file_alone(three, tmp_path: Path) -> None:
    """Only the generation file changed, the current metadata intact: retrieve reads the
    current metadata and gives the content; both verifies report the damaged copy (every
    stored byte is checked, not only those a read uses)."""
    ts, tok, data, root = three
    out = tmp_path / "out"

    def check() -> list[str]:
        problems = []
        for verify in (ts.verify_full, ts.verify_ciphertext):
            try:
                verify(tok)
            except VhsmError:
                continue
            problems.append(f"{verify.__name__} passed")
        if ts.retrieve(tok, out).read_bytes() != data:
            problems.append("retrieve gave other content")
        shutil.rmtree(out)
        return problems

    (gen,) = gen_paths(root, tok)
    assert _sweep(ts, tok, [[gen]], out, check) == []
    assert_intact(ts, tok, data, out)


def test_every_byte_of_every_object(three, tmp_path: Path) -> None:
    ts, tok, data, root = three
    objs = object_paths(root, tok)
    assert sum(p.stat().st_size for p in objs) == SIZE + 3 * 28
    assert _sweep(ts, tok, [[p] for p in objs], tmp_path / "out") == []
    assert_intact(ts, tok, data, tmp_path / "out")


def test_every_byte_one_record_per_object(make_store, tmp_path: Path) -> None:
    """Same sweep when each chunk lives in an object of its own (object roll-over path)."""
    ts = make_store(chunk_size=CS)
    with (
        mock.patch.object(store_mod, "RUN_TARGET", CS),
        mock.patch.object(writer_mod, "OBJECT_TARGET", 1),
    ):
        tok, data = store_one(ts, tmp_path)
    root = Path(ts.backend.root)
    objs = object_paths(root, tok)
    assert len(objs) == 3
    groups = [metadata_copies(root, tok), *([p] for p in objs)]
    assert _sweep(ts, tok, groups, tmp_path / "out") == []
    assert_intact(ts, tok, data, tmp_path / "out")


@settings(max_examples=150, deadline=None, database=None)
@given(
    which=st.integers(0, 1),
    pos=st.integers(0, 10**6),
    xor=st.integers(1, 255),
    size=st.sampled_from([1, CS - 1, CS, CS + 1, SIZE]),
)
def test_any_byte_value_change(which: int, pos: int, xor: int, size: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ts = TokenStore(
            LocalBackend(tmp / "store"),
            StaticKeyProvider(os.urandom(32)),
            chunk_size=CS,
            parallel=1,
        )
        tok, _ = store_one(ts, tmp, size=size)
        root = tmp / "store"
        paths = [metadata_copies(root, tok), *([p] for p in object_paths(root, tok))][which]
        buf = bytearray(paths[0].read_bytes())
        buf[pos % len(buf)] ^= xor
        for path in paths:
            path.write_bytes(buf)
        assert failures(ts, tok, tmp / "out") == []


# -- deleted, truncated or extended files ------------------------------------------------------


def test_object_deleted(three, tmp_path: Path) -> None:
    ts, tok, _, root = three
    object_paths(root, tok)[0].unlink()
    assert failures(ts, tok, tmp_path / "out") == []


def test_data_directory_deleted(three, tmp_path: Path) -> None:
    ts, tok, _, root = three
    shutil.rmtree(root / f"{tok}.data")
    assert failures(ts, tok, tmp_path / "out") == []


def test_metadata_deleted_means_unknown_token(three, tmp_path: Path) -> None:
    ts, tok, _, root = three
    meta_path(root, tok).unlink()
    with pytest.raises(TokenNotFoundError):
        ts.retrieve(tok, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_object_truncated_at_every_length(three, tmp_path: Path) -> None:
    ts, tok, data, root = three
    obj = object_paths(root, tok)[0]
    original = obj.read_bytes()
    undetected = []
    for n in range(len(original)):
        obj.write_bytes(original[:n])
        missed = failures(ts, tok, tmp_path / "out")
        if missed:
            undetected.append((n, missed))
    obj.write_bytes(original)
    assert undetected == []
    assert_intact(ts, tok, data, tmp_path / "out")


def test_metadata_truncated_or_extended(three, tmp_path: Path) -> None:
    """Both copies (current metadata and generation file) truncated or extended alike: every
    check fails. The current metadata alone: verify fails, retrieve may be served from the
    generation file."""
    ts, tok, data, root = three
    copies = metadata_copies(root, tok)
    original = copies[0].read_bytes()
    out = tmp_path / "out"
    undetected = []
    for variant in [original[:n] for n in range(len(original))] + [
        original + b"\x00",
        original + original[-32:],
    ]:
        for path in copies:
            path.write_bytes(variant)
        missed = failures(ts, tok, out)
        if missed:
            undetected.append((len(variant), "both copies", missed))
        copies[1].write_bytes(original)
        problems = detected_or_served(ts, tok, data, out)
        if problems:
            undetected.append((len(variant), "current metadata alone", problems))
    assert undetected == []
    copies[0].write_bytes(original)
    assert_intact(ts, tok, data, out)


def test_truncation_by_dropping_final_chunk_and_rewriting_manifest(three, tmp_path: Path) -> None:
    """Drop the last record and its manifest entry, recompute the object table, the tables
    digest and the header checksum: the tables digest is authenticated with the metadata, so
    retrieve fails."""
    ts, tok, _, root = three
    entries = read_manifest(root, tok)
    obj = object_paths(root, tok)[0]
    obj.write_bytes(obj.read_bytes()[: entries[-1][1]])
    rewrite_manifest(root, tok, lambda e: e[:-1])
    ts.verify_ciphertext(tok)  # consistent to a key-less check (see the forgery test below)
    assert failures(ts, tok, tmp_path / "out", nokey=False) == []


# -- swapping between tokens --------------------------------------------------------------------


@pytest.fixture
def pair(make_store, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Two tokens of the same shape under the same key."""
    ts = make_store(chunk_size=CS)
    a, da = store_one(ts, tmp_path / "a", seed=1)
    b, db = store_one(ts, tmp_path / "b", seed=2)
    return ts, Path(ts.backend.root), (a, da), (b, db)


def _swap_files(p: Path, q: Path) -> None:
    x, y = p.read_bytes(), q.read_bytes()
    p.write_bytes(y)
    q.write_bytes(x)


def test_objects_swapped_between_tokens(pair, tmp_path: Path) -> None:
    ts, root, (a, _), (b, _) = pair
    _swap_files(object_paths(root, a)[0], object_paths(root, b)[0])
    assert failures(ts, a, tmp_path / "oa") == []
    assert failures(ts, b, tmp_path / "ob") == []


def test_data_directories_swapped_between_tokens(pair, tmp_path: Path) -> None:
    ts, root, (a, _), (b, _) = pair
    (root / f"{a}.data").rename(root / "tmpdir")
    (root / f"{b}.data").rename(root / f"{a}.data")
    (root / "tmpdir").rename(root / f"{b}.data")
    assert failures(ts, a, tmp_path / "oa") == []
    assert failures(ts, b, tmp_path / "ob") == []


@pytest.mark.parametrize("index", [0, 1, 2])
def test_one_record_spliced_from_other_token(pair, tmp_path: Path, index: int) -> None:
    """Record `index` of B copied over record `index` of A (same length, same key, same position):
    the record checksum in A's manifest tells, and so does the AEAD by itself (per-token key,
    token id in the AAD)."""
    ts, root, (a, _), (b, _) = pair
    ea, eb = read_manifest(root, a), read_manifest(root, b)
    _, off_a, len_a, _ = ea[index]
    _, off_b, len_b, _ = eb[index]
    assert len_a == len_b
    oa, ob = object_paths(root, a)[0], object_paths(root, b)[0]
    buf = bytearray(oa.read_bytes())
    buf[off_a : off_a + len_a] = ob.read_bytes()[off_b : off_b + len_b]
    oa.write_bytes(buf)
    # format v2 checks each record against the manifest's XXH3-128 first...
    with pytest.raises(IntegrityError, match=f"chunk {index} checksum mismatch"):
        ts.retrieve(a, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # ...and with that check out of the way, the AEAD alone stops it
    with (
        mock.patch.object(store_mod, "_check_digests", _no_check),
        pytest.raises(IntegrityError, match=f"chunk {index} failed authentication"),
    ):
        ts.retrieve(a, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert failures(ts, a, tmp_path / "out") == []


def _no_check(*args: object) -> None:
    """Stands in for the record checksum check, to show what the AEAD catches by itself."""


def test_record_spliced_and_manifest_forged(pair, tmp_path: Path) -> None:
    """As above, and the attacker also rewrites A's record checksum, object table, tables digest
    and header checksum."""
    ts, root, (a, _), (b, _) = pair
    ea, eb = read_manifest(root, a), read_manifest(root, b)
    oa, ob = object_paths(root, a)[0], object_paths(root, b)[0]
    rec = ob.read_bytes()[eb[1][1] : eb[1][1] + eb[1][2]]
    buf = bytearray(oa.read_bytes())
    buf[ea[1][1] : ea[1][1] + ea[1][2]] = rec
    oa.write_bytes(buf)

    def fix(entries):  # type: ignore[no-untyped-def]
        entries[1] = (*entries[1][:3], record_digest(rec))
        return entries

    rewrite_manifest(root, a, fix)
    with pytest.raises(IntegrityError, match="metadata failed authentication"):
        ts.retrieve(a, tmp_path / "out")
    assert failures(ts, a, tmp_path / "out", nokey=False) == []


def _graft_metadata(root: Path, src, dst) -> None:  # type: ignore[no-untyped-def]
    """Put token src's metadata under dst's name (current metadata and generation file), its
    token id field rewritten to dst's and its header checksum recomputed (what an attacker
    with write access can do)."""
    parsed = parse_bytes(meta_path(root, src).read_bytes(), src)
    parsed.header.token_id = dst
    head = build_head(parsed.header, parsed.meta_nonce, parsed.meta_ciphertext, parsed.object_table)
    for g in gen_paths(root, dst):
        g.unlink()
    write_metadata(root, dst, head + parsed.load_manifest(), parsed.header.generation)


def _swap_first_two_digests(e):  # type: ignore[no-untyped-def]
    """Manifest fix-up: swap the record digests of chunks 0 and 1 (after swapping records)."""
    e[0], e[1] = (*e[0][:3], e[1][3]), (*e[1][:3], e[0][3])
    return e


def test_metadata_swapped_between_tokens(pair, tmp_path: Path) -> None:
    """Current metadata and generation files swapped between A and B: every check fails."""
    ts, root, (a, _), (b, _) = pair
    for p, q in zip(metadata_copies(root, a), metadata_copies(root, b), strict=True):
        _swap_files(p, q)
    assert failures(ts, a, tmp_path / "oa") == []
    assert failures(ts, b, tmp_path / "ob") == []


def test_current_metadata_alone_swapped_between_tokens(pair, tmp_path: Path) -> None:
    """Only the current metadata files swapped: verify fails for both; retrieve fails or is
    served from the token's own generation file, never with the other's content."""
    ts, root, (a, da), (b, db) = pair
    _swap_files(meta_path(root, a), meta_path(root, b))
    assert detected_or_served(ts, a, da, tmp_path / "oa") == []
    assert detected_or_served(ts, b, db, tmp_path / "ob") == []


def test_metadata_copied_with_token_id_patched(pair, tmp_path: Path) -> None:
    """B's metadata placed under A's name with the token id field rewritten to A's and the
    header checksum recomputed: the token id is bound into the key derivation and the
    metadata AAD."""
    ts, root, (a, _), (b, _) = pair
    _graft_metadata(root, b, a)
    with pytest.raises((IntegrityError, WrongKeyError)):
        ts.retrieve(a, tmp_path / "out")
    assert failures(ts, a, tmp_path / "out", nokey=False) == []


def test_whole_token_renamed_never_yields_other_content(pair, tmp_path: Path) -> None:
    """B's metadata and data renamed to A (token id patched too): retrieving A must never
    give B's plaintext."""
    ts, root, (a, _), (b, db) = pair
    shutil.rmtree(root / f"{a}.data")
    (root / f"{b}.data").rename(root / f"{a}.data")
    _graft_metadata(root, b, a)
    meta_path(root, b).unlink()
    assert failures(ts, a, tmp_path / "out", nokey=False) == []
    for dirpath, _, files in os.walk(tmp_path):
        for f in files:
            p = Path(dirpath) / f
            if "store" not in p.parts and "src" not in p.parts:
                assert p.read_bytes() != db


# -- reordering within a token ------------------------------------------------------------------


def _swap_records(root: Path, tok: uuid.UUID, i: int, j: int) -> None:
    e = read_manifest(root, tok)
    assert e[i][2] == e[j][2]
    obj = object_paths(root, tok)[0]
    buf = bytearray(obj.read_bytes())
    ri = bytes(buf[e[i][1] : e[i][1] + e[i][2]])
    rj = bytes(buf[e[j][1] : e[j][1] + e[j][2]])
    buf[e[i][1] : e[i][1] + e[i][2]] = rj
    buf[e[j][1] : e[j][1] + e[j][2]] = ri
    obj.write_bytes(buf)


def test_records_reordered_manifest_untouched(three, tmp_path: Path) -> None:
    """Records 0 and 1 swapped in the object, manifest left alone: retrieve and verify
    --no-key are stopped by the record checksums; with those out of the way, the AEAD (chunk
    index in the AAD) stops retrieve by itself."""
    ts, tok, _, root = three
    _swap_records(root, tok, 0, 1)
    with pytest.raises(IntegrityError, match="chunk 0 checksum mismatch"):
        ts.retrieve(tok, tmp_path / "out")
    with (
        mock.patch.object(store_mod, "_check_digests", _no_check),
        pytest.raises(IntegrityError, match="chunk 0 failed authentication"),
    ):
        ts.retrieve(tok, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert failures(ts, tok, tmp_path / "out") == []


def test_records_reordered_and_manifest_digests_fixed(three, tmp_path: Path) -> None:
    """Records swapped and the manifest's checksums swapped to match, object table, tables
    digest and header checksum recomputed: the tables digest is authenticated with the
    metadata, so that fails."""
    ts, tok, _, root = three
    _swap_records(root, tok, 0, 1)

    rewrite_manifest(root, tok, _swap_first_two_digests)
    with pytest.raises(IntegrityError, match="metadata failed authentication"):
        ts.retrieve(tok, tmp_path / "out")
    assert failures(ts, tok, tmp_path / "out", nokey=False) == []


def test_records_reordered_digests_fixed_header_digest_stale(three, tmp_path: Path) -> None:
    ts, tok, _, root = three
    _swap_records(root, tok, 0, 1)

    rewrite_manifest(root, tok, _swap_first_two_digests, fix_header_digest=False)
    assert failures(ts, tok, tmp_path / "out") == []


@pytest.mark.parametrize("fix_header", [True, False])
def test_manifest_entries_reordered(three, tmp_path: Path, fix_header: bool) -> None:
    """Objects untouched; manifest entries 0 and 1 swapped (each still points at a record whose
    digest matches), so chunks would be read in the wrong order."""
    ts, tok, _, root = three

    def swap(e):  # type: ignore[no-untyped-def]
        e[0], e[1] = e[1], e[0]
        return e

    rewrite_manifest(root, tok, swap, fix_header_digest=fix_header)
    assert failures(ts, tok, tmp_path / "out", nokey=not fix_header) == []


def test_nokey_verify_cannot_detect_consistent_manifest_forgery(three, tmp_path: Path) -> None:
    """What `verify --no-key` cannot detect, by design.

    Without the key only the plaintext tables (per-record and per-object XXH3-128), the tables
    digest in the header and the header checksum can be checked, and an attacker can recompute
    them all. So a *consistent* forgery -- records reordered, spliced or dropped, with the
    manifest entries, the object table, the header's tables digest and the header checksum
    rewritten to match -- passes `--no-key`. It cannot pass the keyed checks: the header (with
    the tables digest) is the AAD of the encrypted metadata, which only the key holder can
    produce. `--no-key` is a scrub for accidental damage (bit rot, truncation, lost files),
    not an authenticity check.
    """
    ts, tok, _, root = three
    _swap_records(root, tok, 0, 1)

    rewrite_manifest(root, tok, _swap_first_two_digests)
    ts.verify_ciphertext(tok)  # passes: the documented limitation
    with pytest.raises(IntegrityError):
        ts.verify_full(tok)
    assert failures(ts, tok, tmp_path / "out", nokey=False) == []


# -- the AEAD binding itself (independent of metadata and digests) -------------------------------


def test_aead_binds_index_final_marker_and_token(master_key: bytes) -> None:
    t1, t2 = uuid.uuid4(), uuid.uuid4()
    salt = os.urandom(32)
    k1 = TokenKeys(master_key, salt, t1)
    plain = random_bytes(3 * CS, 5)
    recs, entries = k1.encrypt_run(plain, 0, CS, 2)
    lens = [n for n, _ in entries]
    assert bytes(k1.decrypt_run(recs, lens, 0, 2)) == plain
    r = [bytes(recs[i * lens[0] : (i + 1) * lens[0]]) for i in range(3)]
    with pytest.raises(ChunkAuthError):  # reordered
        k1.decrypt_run(r[1] + r[0] + r[2], lens, 0, 2)
    with pytest.raises(ChunkAuthError):  # truncated: chunk 1 presented as the final one
        k1.decrypt_run(r[0] + r[1], lens[:2], 0, 1)
    with pytest.raises(ChunkAuthError):  # extended: final chunk presented as non-final
        k1.decrypt_run(recs + recs[: lens[0]], lens + lens[:1], 0, 3)
    with pytest.raises(ChunkAuthError):  # other token, same key and salt
        TokenKeys(master_key, salt, t2).decrypt_run(recs, lens, 0, 2)
    with pytest.raises(ChunkAuthError):  # other salt
        TokenKeys(master_key, os.urandom(32), t1).decrypt_run(recs, lens, 0, 2)
    assert CHUNK_AAD_MAGIC and "TokenKeys(" in repr(k1) and master_key.hex() not in repr(k1)


# -- wrong key ----------------------------------------------------------------------------------


def test_wrong_key(three, make_store, tmp_path: Path) -> None:
    ts, tok, _, root = three
    other = make_store(root, key=os.urandom(32))
    with pytest.raises(WrongKeyError):
        other.retrieve(tok, tmp_path / "out")
    with pytest.raises(WrongKeyError):
        other.verify_full(tok)
    assert not (tmp_path / "out").exists()
    assert other.summary(tok).readable is False
    assert other.summary(tok).name is None
