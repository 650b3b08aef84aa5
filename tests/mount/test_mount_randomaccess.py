"""The mount's random-access layer in-process (no FUSE): a seeded model check of writes at any
offset, truncates, commits and reloads, with background write-back forced early; compaction
bounds; orphans of an uncommitted session swept; superseded generations kept for the grace
period (format v2) and the whole-file digest computed on demand."""

from __future__ import annotations

import errno
import os
import random
import subprocess

import pytest

from vhsmfs.backend import LocalBackend
from vhsmfs.errors import IntegrityError
from vhsmfs.keyfile import StaticKeyProvider
from vhsmfs.mount import randomaccess as ra
from vhsmfs.mount.workers import MountWorkers
from vhsmfs.store import TokenStore

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def store(tmp_path) -> TokenStore:
    # grace 0: superseded objects go at once, so the checks below see only live ones
    return TokenStore(
        LocalBackend(tmp_path / "store"),
        StaticKeyProvider(os.urandom(32)),
        chunk_size=4096,
        grace=0,
    )


@pytest.fixture
def workers():
    with MountWorkers() as w:
        yield w


@pytest.fixture
def small_buffers(monkeypatch):
    monkeypatch.setattr(ra, "WRITEBACK_BYTES", 16 * 1024)  # background write-back all the time
    monkeypatch.setattr(ra, "RUN_BYTES", 32 * 1024)
    monkeypatch.setattr(ra, "READAHEAD_BYTES", 16 * 1024)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_model_check(store, small_buffers, seed, tmp_path, workers):
    tf = ra.TokenFile.create(store, "x/y.bin", 0o644, extra={"placed": True}, workers=workers)
    model = bytearray()
    rng = random.Random(seed)
    for step in range(1500):
        r = rng.random()
        if r < 0.5:
            off = rng.randrange(0, len(model) + 20_000)
            data = rng.randbytes(rng.randrange(1, 30_000))
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off : off + len(data)] = data
            assert tf.write(off, data) == len(data)
        elif r < 0.6:
            size = rng.randrange(0, len(model) + 30_000)
            del model[size:]
            model.extend(bytes(size - len(model)))
            tf.truncate(size)
        elif r < 0.9:
            off, n = rng.randrange(0, len(model) + 10), rng.randrange(1, 50_000)
            if rng.random() < 0.5:  # sequential reads, through the event-loop fast path
                off = max(0, min(off, tf._last_read_end))
            got = tf.read_cached(off, n)  # None: needs decryption, done by read()
            if got is None:
                got = tf.read(off, n)
            assert got == bytes(model[off : off + n]), step
        else:
            tf.commit(final=rng.random() < 0.5)
            again = ra.TokenFile.load(store, tf.token, workers=workers)
            assert again.read(0, 1 << 30) == bytes(model), step
            again.close()
            store.verify_full(tf.token)
    tf.commit()
    out = store.retrieve(tf.token, tmp_path / "out")
    assert out.read_bytes() == bytes(model)
    # compaction: every object but the newest is at least half live
    sizes = store.backend.object_sizes(tf.token)
    live: dict[int, int] = {}
    for obj, _off, rlen, _dig in ra.MANIFEST_ENTRY.iter_unpack(tf.manifest):
        live[obj] = live.get(obj, 0) + rlen
    assert set(sizes) == set(live)  # nothing unreferenced left behind
    newest = max(sizes)
    assert all(live[o] * 2 >= sizes[o] for o in sizes if o != newest)


def test_whole_file_digest_on_demand(store, small_buffers, tmp_path, workers):
    """Format v2 records no whole-file SHA-256 (meta.sha256 is None); the store computes one on
    demand (`info --digest`) that a standard tool can check: it is the content's, after
    sequential writes and after a patch in the middle."""
    import hashlib

    tf = ra.TokenFile.create(store, "seq.bin", 0o600, workers=workers)
    data = os.urandom(200_000)
    for off in range(0, len(data), 7_000):
        tf.write(off, data[off : off + 7_000])
    tf.commit()
    assert store.open_token(tf.token).meta.sha256 is None
    assert store.digest(tf.token) == hashlib.sha256(data).hexdigest()
    tf.write(10, b"patched")  # not sequential any more
    tf.commit(final=True)
    patched = data[:10] + b"patched" + data[17:]
    assert store.open_token(tf.token).meta.sha256 is None
    assert store.digest(tf.token) == hashlib.sha256(patched).hexdigest()
    store.verify_full(tf.token)
    out = store.retrieve(tf.token, tmp_path / "out")
    assert hashlib.sha256(out.read_bytes()).hexdigest() == store.digest(tf.token)


@pytest.mark.parametrize("reload", [False, True])
def test_whole_file_digest_across_commits_and_appends(store, small_buffers, reload, workers):
    """The digest is the whole file's after every commit, across appends after commits, by the
    same session or (`reload`) by a new one that loads the committed token."""
    import hashlib

    tf = ra.TokenFile.create(store, "grow.bin", 0o600, workers=workers)
    data = b""
    for step, size in enumerate([3_000, 5_000, 1, 40_000, 0, 70_000, 9_000]):
        piece = os.urandom(size)
        tf.write(len(data), piece)
        data += piece
        if step % 2:
            tf.commit()
            assert store.digest(tf.token) == hashlib.sha256(data).hexdigest()
            if reload:
                tf.close()
                tf = ra.TokenFile.load(store, tf.token, workers=workers)
    tf.commit()
    assert store.digest(tf.token) == hashlib.sha256(data).hexdigest()
    store.verify_full(tf.token)


def test_orphans_of_a_killed_session_are_swept(store, small_buffers, workers):
    tf = ra.TokenFile.create(store, "f.bin", 0o600, workers=workers)
    tf.write(0, os.urandom(100_000))
    tf.commit()
    committed = set(store.backend.object_sizes(tf.token))
    # a session that writes back (new objects) but never commits, as if killed
    tf2 = ra.TokenFile.load(store, tf.token, workers=workers)
    tf2.write(0, os.urandom(100_000))
    tf2._drain()
    assert tf2.writer.building
    # an object being written has no name yet: a writer killed now leaves nothing behind
    assert set(store.backend.object_sizes(tf.token)) == committed
    tf2.writer.seal()  # killed after it sealed two objects, before its commit
    tf2.write(0, os.urandom(100_000))
    tf2._drain()
    tf2.writer.seal()
    orphans = set(store.backend.object_sizes(tf.token)) - committed
    assert len(orphans) == 2
    tf2.writer._end_writing()  # the kernel drops a killed writer's lock
    store.verify_full(tf.token)  # the committed generation is untouched
    tf3 = ra.TokenFile.load(store, tf.token, workers=workers)
    tf3.write(5, b"new")
    tf3.commit()
    leftover = set(store.backend.object_sizes(tf.token))
    refs = {e[0] for e in ra.MANIFEST_ENTRY.iter_unpack(tf3.manifest)}
    assert leftover == refs  # both orphans went, though the new session needed one id only
    assert len(refs - committed) == 1
    store.verify_full(tf.token)


def _rewrite(store: TokenStore, size: int) -> tuple[ra.TokenFile, bytes, bytes]:
    """A file committed, then overwritten whole and committed again: (file, old, new)."""
    tf = ra.TokenFile.create(store, "r.bin", 0o600, workers=workers)
    old, new = os.urandom(size), os.urandom(size)
    tf.write(0, old)
    tf.commit()
    tf.write(0, new)
    tf.commit()
    return tf, old, new


def _gens(store: TokenStore, tok) -> list[int]:  # type: ignore[no-untyped-def]
    return store.backend.generations(tok)


def test_superseded_objects_are_kept_for_the_grace_period(tmp_path):
    """With the default grace period (an hour), a rewrite keeps the superseded generation and
    the objects only it uses, so a backup copy taken meanwhile still holds a complete token:
    if the newest objects are missing, readers fall back to the old version (with a note) and
    gc sets the token back to it. gc past the grace period removes what was superseded."""
    import shutil
    import time

    ts = TokenStore(
        LocalBackend(tmp_path / "store"), StaticKeyProvider(os.urandom(32)), chunk_size=4096
    )
    assert ts.grace == 3600
    tf, old, new = _rewrite(ts, 100_000)
    tok = tf.token
    tf.close()
    assert _gens(ts, tok) == [1, 2]
    sizes = ts.backend.object_sizes(tok)
    live = ts.parse(tok).objects
    gone = set(sizes) - set(live)
    assert gone, "the old version's objects were removed at once"
    assert ts.retrieve(tok, tmp_path / "o1").read_bytes() == new
    assert ts.verify_full(tok) is None

    # a copy of the store taken before the new objects were linked in
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "store", copy)
    for obj in live:
        os.unlink(copy / f"{tok}.data" / f"{obj:08x}")
    cs = TokenStore(LocalBackend(copy), ts.keys, chunk_size=4096)
    assert cs.verify_full(tok).startswith("using generation 1 (")
    assert cs.retrieve(tok, tmp_path / "o2").read_bytes() == old
    report = cs.collect_garbage()
    repaired = f"token {tok}: using generation 1 (object "
    assert any(line.startswith(repaired) for line in report.removed), report
    assert f"removed incomplete generation 2 of token {tok}" in report.removed
    assert cs.verify_full(tok) is None and cs.parse(tok).header.generation == 1

    # the original, past the grace period: the old generation and its objects go
    later = time.time_ns() + 3601 * 1_000_000_000
    report = ts.collect_garbage(now_ns=later)
    assert f"removed generation 1 of token {tok} (superseded)" in report.removed
    assert set(ts.backend.object_sizes(tok)) == set(live)
    assert _gens(ts, tok) == [2]
    assert ts.retrieve(tok, tmp_path / "o3").read_bytes() == new


def test_superseded_objects_go_at_once_with_no_grace(store):
    """grace=0 (the fixture's store): nothing superseded is kept after a commit."""
    tf, _, new = _rewrite(store, 100_000)
    assert _gens(store, tf.token) == [2]
    assert set(store.backend.object_sizes(tf.token)) == set(store.parse(tf.token).objects)
    assert tf.read(0, len(new)) == new


def test_delete_wipes_kept_generations_at_once(tmp_path):
    """`delete` does not wait for the grace period: every generation and object goes."""
    ts = TokenStore(
        LocalBackend(tmp_path / "store"), StaticKeyProvider(os.urandom(32)), chunk_size=4096
    )
    tf, _, _ = _rewrite(ts, 50_000)
    tf.close()
    assert _gens(ts, tf.token) == [1, 2]
    ts.delete(tf.token)
    assert not (tmp_path / "store" / f"{tf.token}.data").exists()
    assert ts.list_tokens() == []


def test_full_disk_during_write_back_loses_nothing(small_buffers, tmp_path, workers):
    """A real tmpfs too small for the file: background runs fail with ENOSPC while the writer
    goes on. The error reaches the writer; once there is room again, the commit publishes
    every byte the file held, and the store verifies."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", str(disk)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        store = TokenStore(
            LocalBackend(disk / "store"), StaticKeyProvider(os.urandom(32)), chunk_size=4096
        )
        tf = ra.TokenFile.create(store, "big.bin", 0o600, workers=workers)
        data = os.urandom(2 << 20)
        errors = []
        for off in range(0, len(data), 20_000):
            try:
                tf.write(off, data[off : off + 20_000])
            except OSError as e:  # raised after the write's bytes were taken (write-back)
                errors.append(e.errno)
        with pytest.raises(OSError) as failed:
            tf.commit()
        errors.append(failed.value.errno)
        assert set(errors) == {errno.ENOSPC}
        assert (
            len(errors) > 1
        )  # background runs failed while the writer went on, not only the commit
        subprocess.run(
            ["mount", "-o", "remount,size=64m", str(disk)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        assert tf.commit()
        tf.close()
        again = ra.TokenFile.load(store, tf.token, workers=workers)
        assert again.read(0, len(data) + 1) == data
        again.close()
        store.verify_full(tf.token)
        out = store.retrieve(tf.token, tmp_path / "out")
        assert out.read_bytes() == data
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, check=False, timeout=30)


def test_partial_writes_to_stored_chunks_are_patched_not_decrypted(
    store, small_buffers, monkeypatch, workers
):
    """Small writes into a committed file are kept as patches (no decryption per write) and are
    merged, in write order, when written back or read."""
    data = bytearray(os.urandom(200_000))
    tf = ra.TokenFile.create(store, "p.bin", 0o600, workers=workers)
    tf.write(0, bytes(data))
    tf.commit()
    tf = ra.TokenFile.load(store, tf.token, workers=workers)
    decrypts = []
    real = tf._decrypt
    monkeypatch.setattr(tf, "_decrypt", lambda a, b: decrypts.append((a, b)) or real(a, b))
    rng = random.Random(7)
    for _ in range(300):
        off, n = rng.randrange(0, len(data) - 700), rng.randrange(1, 700)
        piece = os.urandom(n)
        assert tf.can_write_now(off, n) or tf._busy_runs() or tf._write_back_would_wait(n)
        tf.write(off, piece)
        data[off : off + n] = piece
    assert decrypts == []  # merged on the encryption threads, not decrypted per write
    assert tf.read(0, len(data)) == bytes(data)  # reading merges what is still patched
    tf.commit()
    again = ra.TokenFile.load(store, tf.token, workers=workers)
    assert again.read(0, len(data)) == bytes(data)
    store.verify_full(tf.token)


def test_sequential_reader_finds_windows_decrypted_ahead(store, monkeypatch, workers):
    monkeypatch.setattr(ra, "READAHEAD_BYTES", 16 * 1024)
    data = os.urandom(300_000)
    tf = ra.TokenFile.create(store, "r.bin", 0o600, workers=workers)
    tf.write(0, data)
    tf.commit()
    tf = ra.TokenFile.load(store, tf.token, workers=workers)
    got, cached = bytearray(), 0
    for off in range(0, len(data), 16 * 1024):
        for _, _, fut in list(tf._ahead):
            fut.result()  # no timing in the test: let the windows finish
        piece = tf.read_cached(off, 16 * 1024)
        if piece is None:
            piece = tf.read(off, 16 * 1024)
        else:
            cached += 1
        got += piece
        assert len(tf._ahead) <= ra.READAHEAD_WINDOWS
    assert bytes(got) == data
    # every window after the first was decrypted ahead and answered without decryption
    assert cached == -(-len(data) // (16 * 1024)) - 1


def test_patch_over_a_tampered_chunk_fails_and_keeps_the_patch(store, small_buffers, workers):
    """Merging a patch checks and authenticates the stored chunk first: a flipped byte in its
    record makes the commit fail with IntegrityError (EIO through the mount), releases no
    plaintext, and the patch stays pending rather than being dropped."""
    tf = ra.TokenFile.create(store, "t.bin", 0o600, workers=workers)
    tf.write(0, os.urandom(200_000))
    tf.commit()
    tf = ra.TokenFile.load(store, tf.token, workers=workers)
    obj, off, rlen, _ = tf._entry(3)
    path = store.backend._object_path(tf.token, obj)
    with open(path, "r+b") as f:
        f.seek(off + rlen // 2)
        b = f.read(1)
        f.seek(off + rlen // 2)
        f.write(bytes([b[0] ^ 1]))
    tf.write(3 * 4096 + 10, b"patched")
    assert 3 in tf._patches
    # the record is checked against the manifest's XXH3-128 first...
    with pytest.raises(IntegrityError, match="chunk 3 checksum mismatch"):
        tf.commit()
    assert [d for _, d in tf._patches[3]] == [b"patched"]
    with pytest.raises(IntegrityError):
        tf.read(3 * 4096, 100)
    # ...and authenticated: with the manifest's checksum made to match (as if forged along),
    # the AEAD refuses it all the same
    with open(path, "rb") as f:
        f.seek(off)
        record = f.read(rlen)
    e = tf._entry(3)
    ra.MANIFEST_ENTRY.pack_into(
        tf.manifest, 3 * ra.MANIFEST_ENTRY.size, *e[:3], ra._CHECKSUM(record)
    )
    with pytest.raises(IntegrityError, match="chunk 3 failed authentication"):
        tf.commit()
    assert [d for _, d in tf._patches[3]] == [b"patched"]
    with pytest.raises(IntegrityError, match="chunk 3 failed authentication"):
        tf.read(3 * 4096, 100)
    tf.close()


def test_patch_over_a_missing_object_fails_and_keeps_the_patch(
    store, small_buffers, monkeypatch, workers
):
    """The stored object a patch must be merged with has vanished (a damaged store): starting
    the write-back fails with IntegrityError naming it, and the patch stays pending rather than
    being dropped with the chunks taken for the run."""
    tf = ra.TokenFile.create(store, "m.bin", 0o600, workers=workers)
    tf.write(0, os.urandom(200_000))
    tf.commit()
    tf = ra.TokenFile.load(store, tf.token, workers=workers)
    obj = tf._entry(3)[0]
    os.unlink(store.backend._object_path(tf.token, obj))
    monkeypatch.setattr(ra, "PATCH_BYTES", 1)  # this write starts the write-back of its patch
    with pytest.raises(IntegrityError, match="is missing"):
        tf.write(3 * 4096 + 10, b"patched")
    assert [d for _, d in tf._patches[3]] == [b"patched"]
    tf.close()
