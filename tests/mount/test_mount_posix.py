"""The mount's layout, its coherence with the CLI and the POSIX behaviour tools rely on."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
import uuid

import pytest

from vhsmfs.errors import TokenNotFoundError
from vhsmfs.store import TokenStore

pytestmark = pytest.mark.timeout(180)


def wait_until(cond, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def tokens_named(ts: TokenStore) -> dict[str, uuid.UUID]:
    out = {}
    for tok in ts.list_tokens():
        try:
            meta = ts.open_token(tok).meta
        except TokenNotFoundError:  # deleted (in the background) while we looked
            continue
        if meta.extra.get("kind") != "dir":
            out[meta.name] = tok
    return out


def test_cli_token_shows_up_under_its_uuid(run_cli, tmp_path, key_file, store_dir, mounter):
    src = tmp_path / "report.txt"
    src.write_bytes(b"stored before mounting\n")
    res = run_cli("token", "store", str(src), "--key", str(key_file), "--store", str(store_dir))
    before = res.stdout.split("Token: ")[1].split()[0]
    m = mounter()
    assert (m.mnt / before / "report.txt").read_bytes() == b"stored before mounting\n"
    # stored by the CLI while mounted: visible by lookup and by listing
    src2 = tmp_path / "later.bin"
    src2.write_bytes(os.urandom(100_000))
    res = run_cli("token", "store", str(src2), "--key", str(key_file), "--store", str(store_dir))
    later = res.stdout.split("Token: ")[1].split()[0]
    assert (m.mnt / later / "later.bin").read_bytes() == src2.read_bytes()
    assert later in os.listdir(m.mnt)
    # CLI tokens are not placed in the tree, only under their UUID
    assert "report.txt" not in os.listdir(m.mnt)


def test_file_written_through_mount_retrieves_identical(
    run_cli, tmp_path, key_file, store_dir, vault, token_store
):
    data = os.urandom(3 * 1024 * 1024 + 123)
    (vault.mnt / "docs").mkdir()
    with open(vault.mnt / "docs" / "blob.bin", "wb") as f:
        f.write(data)
    toks = tokens_named(token_store)
    assert "docs/blob.bin" in toks
    tok = toks["docs/blob.bin"]
    # the same inode is reachable through its token directory
    assert (vault.mnt / str(tok) / "blob.bin").read_bytes() == data
    out = tmp_path / "out"
    run_cli(
        "token", "retrieve", str(tok), str(out), "--key", str(key_file), "--store", str(store_dir)
    )
    assert (out / "docs" / "blob.bin").read_bytes() == data
    token_store.verify_full(tok)
    assert token_store.digest(tok) == hashlib.sha256(data).hexdigest()


def test_deletes_are_seen_both_ways(run_cli, tmp_path, key_file, store_dir, vault, token_store):
    (vault.mnt / "gone-by-cli.txt").write_bytes(b"a")
    (vault.mnt / "gone-by-mount.txt").write_bytes(b"b")
    toks = tokens_named(token_store)
    run_cli("token", "delete", str(toks["gone-by-cli.txt"]), "--store", str(store_dir))
    listing = os.listdir(vault.mnt)  # listing the top level rescans the store
    assert str(toks["gone-by-cli.txt"]) not in listing
    assert not (vault.mnt / "gone-by-cli.txt").exists()
    os.unlink(vault.mnt / "gone-by-mount.txt")
    assert wait_until(lambda: toks["gone-by-mount.txt"] not in token_store.list_tokens())
    assert not (vault.mnt / str(toks["gone-by-mount.txt"])).exists()


def test_unlink_is_deferred_while_open(vault, token_store, store_dir):
    """While the unlinked file is open its token stays (data kept); at the last close it is
    hidden (a tombstone), its data left for gc after the grace period."""
    p = vault.mnt / "open.bin"
    p.write_bytes(b"x" * 50_000)
    tok = tokens_named(token_store)["open.bin"]
    with open(p, "rb") as f:
        os.unlink(p)
        assert not p.exists()
        assert tok in token_store.list_tokens()  # data kept while open
        assert f.read() == b"x" * 50_000
    # release(2) reaches the mount asynchronously after close(2) returns
    assert wait_until(lambda: tok not in token_store.list_tokens())
    assert (store_dir / f".{tok}.deleting").is_file()  # the default grace period: an hour
    assert not (store_dir / f"{tok}.metadata").exists()


def test_random_offsets_sparse_and_truncate(vault, token_store):
    p = vault.mnt / "sparse.bin"
    with open(p, "wb") as f:
        f.write(b"head")
        f.seek(100_000)
        f.write(b"tail")
    data = p.read_bytes()
    assert len(data) == 100_004 and data[:4] == b"head" and data[-4:] == b"tail"
    assert data[4:100_000] == bytes(99_996)
    with open(p, "r+b") as f:
        f.seek(50_000)
        f.write(b"middle")
        f.truncate(50_003)
    assert p.read_bytes() == b"head" + bytes(49_996) + b"mid"
    os.truncate(p, 60_000)
    assert p.read_bytes() == b"head" + bytes(49_996) + b"mid" + bytes(9_997)
    tok = tokens_named(token_store)["sparse.bin"]
    token_store.verify_full(tok)


def test_rename_over_existing_and_directories(vault, token_store):
    m = vault.mnt
    (m / "a").mkdir()
    (m / "a" / "f.txt").write_bytes(b"new")
    (m / "old.txt").write_bytes(b"old")
    os.rename(m / "a" / "f.txt", m / "old.txt")
    assert (m / "old.txt").read_bytes() == b"new"
    assert not (m / "a" / "f.txt").exists()
    # the replaced file's token is wiped in the background
    assert wait_until(lambda: list(tokens_named(token_store)) == ["old.txt"])
    (m / "a" / "b").mkdir()
    (m / "a" / "b" / "deep.txt").write_bytes(b"deep")
    os.rename(m / "a", m / "z")
    assert (m / "z" / "b" / "deep.txt").read_bytes() == b"deep"
    assert "z/b/deep.txt" in tokens_named(token_store)
    with pytest.raises(OSError) as e:
        os.rmdir(m / "z")
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as e:
        os.rename(m / "z", m / "z" / "b" / "inside")
    assert e.value.errno == errno.EINVAL
    os.unlink(m / "z" / "b" / "deep.txt")
    os.rmdir(m / "z" / "b")
    assert sorted(os.listdir(m / "z")) == []


def test_token_dirs_are_managed(vault, token_store):
    m = vault.mnt
    (m / "x.txt").write_bytes(b"x")
    tok = str(tokens_named(token_store)["x.txt"])
    with pytest.raises(OSError) as e:
        (m / tok / "other.txt").write_bytes(b"no")
    assert e.value.errno == errno.EPERM
    with pytest.raises(OSError) as e:
        os.mkdir(m / str(uuid.uuid4()))
    assert e.value.errno == errno.EPERM
    # renaming inside its own token directory renames the file where it is placed
    os.rename(m / tok / "x.txt", m / tok / "y.txt")
    assert (m / "y.txt").read_bytes() == b"x"
    assert "y.txt" in tokens_named(token_store)
    # unlinking through the token directory removes it everywhere
    os.unlink(m / tok / "y.txt")
    assert tok not in os.listdir(m)
    # the kernel drops the file's other name asynchronously (it may be cached for a moment)
    assert wait_until(lambda: not (m / "y.txt").exists())


def test_chmod_utimens_fsync_statfs_xattr(vault, token_store):
    p = vault.mnt / "meta.txt"
    with open(p, "wb") as f:
        f.write(b"meta")
        os.fsync(f.fileno())
    os.chmod(p, 0o640)
    os.utime(p, ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
    st = os.stat(p)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_mtime_ns == 1_500_000_000_987_654_321
    tok = tokens_named(token_store)["meta.txt"]

    def published() -> bool:  # metadata-only changes of a closed file: within about a second
        meta = token_store.open_token(tok).meta
        return meta.mode == 0o640 and meta.mtime_ns == 1_500_000_000_987_654_321

    assert wait_until(published)
    sv = os.statvfs(vault.mnt)
    assert sv.f_bsize > 0 and sv.f_blocks > 0 and sv.f_namemax == 255
    for call in (
        lambda: os.setxattr(p, "user.k", b"v"),
        lambda: os.getxattr(p, "user.k"),
        lambda: os.listxattr(p),
        lambda: os.removexattr(p, "user.k"),
    ):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.ENOTSUP
    with pytest.raises(OSError) as e:
        os.symlink("meta.txt", vault.mnt / "link")
    assert e.value.errno == errno.EPERM


def test_readdir_stays_correct_while_directory_changes(vault):
    d = vault.mnt / "many"
    d.mkdir()
    for i in range(400):
        (d / f"f{i:04d}").write_bytes(b"")
    seen: list[str] = []
    removed, added = set(), set()
    with os.scandir(d) as it:
        for n, entry in enumerate(it):
            seen.append(entry.name)
            if n == 50:
                for i in range(300, 400, 2):  # drop some not listed yet
                    os.unlink(d / f"f{i:04d}")
                    removed.add(f"f{i:04d}")
                for i in range(100):
                    (d / f"new{i:03d}").write_bytes(b"")
                    added.add(f"new{i:03d}")
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    stable = {f"f{i:04d}" for i in range(400)} - removed
    assert stable <= set(seen), "an entry present throughout was skipped"
    assert set(seen) <= stable | removed | added
