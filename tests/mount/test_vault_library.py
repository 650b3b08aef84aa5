"""The mount's namespace (Vault) driven as a library, without FUSE, as S3QL tests its layers:
every test ends by flushing the vault and checking every token in the store with and without
the key, and by loading a fresh Vault over the same store to see the same tree. Both writers
of the format (the CLI's store and the mount) go through vhsmfs.tokenwriter; these tests and
tests/token cover the two."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhsmfs.backend import LocalBackend
from vhsmfs.keyfile import StaticKeyProvider
from vhsmfs.mount.vault import ROOT_INO, DirNode, FileNode, Vault
from vhsmfs.store import TokenStore

KEY = os.urandom(32)


def _tree(v: Vault) -> dict[str, bytes | None]:
    """path -> content (None for a directory) of the tree the vault shows (not /<uuid>)."""
    out: dict[str, bytes | None] = {}

    def walk(d: DirNode, prefix: str) -> None:
        for name, (_, node) in sorted(d.entries.items()):
            if d is v.root and node is not None and getattr(node, "kind", "") == "tokendir":
                continue
            path = f"{prefix}{name}"
            if isinstance(node, DirNode):
                out[path] = None
                walk(node, path + "/")
            else:
                assert isinstance(node, FileNode)
                h = v.open(node.ino, truncate=False)
                out[path] = bytes(v.read(h, 0, 1 << 30))
                v.release(h)

    walk(v.root, "")
    return out


@pytest.fixture
def store(tmp_path: Path) -> TokenStore:
    return TokenStore(LocalBackend(tmp_path / "store"), StaticKeyProvider(KEY), chunk_size=4096)


@pytest.fixture
def vault(store: TokenStore) -> Iterator[Vault]:
    v = Vault(store)
    v.load()
    yield v
    # after every test: publish, then every token must verify, and a fresh vault sees the same
    v.flush_all()
    seen = _tree(v)
    tokens = store.list_tokens()
    for tok in tokens:
        store.verify_ciphertext(tok)
        store.verify_full(tok)
    v.close()
    again = Vault(store)
    again.load()
    assert _tree(again) == seen
    again.flush_all()
    again.close()


def _write_file(v: Vault, parent: int, name: str, data: bytes) -> FileNode:
    node = v.create(parent, name, 0o644, v.uid, v.gid)
    assert v.write(node, 0, data) == len(data)
    v.flush(node)
    v.release(node)
    return node


def test_files_and_directories_become_tokens(vault: Vault, store: TokenStore) -> None:
    d = vault.mkdir(ROOT_INO, "docs", 0o755, vault.uid, vault.gid)
    _write_file(vault, d.ino, "a.txt", b"alpha" * 1000)
    _write_file(vault, ROOT_INO, "b.bin", os.urandom(100_000))
    assert _tree(vault)["docs/a.txt"] == b"alpha" * 1000
    vault.flush_pending()  # the directory's marker is published within about a second
    assert len(store.list_tokens()) == 3  # two files and the directory's marker


def test_rewrites_in_place_appends_and_truncates(vault: Vault, store: TokenStore) -> None:
    data = bytearray(os.urandom(70_000))
    node = _write_file(vault, ROOT_INO, "f", bytes(data))
    for off, piece in ((5, b"x" * 10), (40_000, os.urandom(9_000)), (70_000, b"tail")):
        h = vault.open(node.ino, truncate=False)
        vault.write(h, off, piece)
        data[off : off + len(piece)] = piece
        vault.flush(h)
        vault.release(h)
    vault.setattr(node.ino, size=30_000)
    del data[30_000:]
    assert _tree(vault)["f"] == bytes(data)
    (tok,) = store.list_tokens()
    assert store.parse(tok).header.generation >= 4


def test_rename_over_and_unlink(vault: Vault, store: TokenStore) -> None:
    _write_file(vault, ROOT_INO, "old", b"old content")
    _write_file(vault, ROOT_INO, "tmp", b"new content")
    vault.rename(ROOT_INO, "tmp", ROOT_INO, "old")  # an editor's save
    a = _write_file(vault, ROOT_INO, "gone", b"bye")
    vault.unlink(ROOT_INO, "gone")
    vault.wait_deletions()
    assert _tree(vault) == {"old": b"new content"}
    assert a.token not in store.list_tokens()
    assert len(store.list_tokens()) == 1


def test_unlink_hides_the_token_and_the_wipe_waits_for_the_grace_period(
    vault: Vault, store: TokenStore
) -> None:
    """A backup started after unlink returned must not bring the file back: the token is
    hidden within milliseconds, even while requests keep the mount busy (wipes wait for a quiet
    moment, hides do not). One taken meanwhile must find it whole or not at all, so its data
    stays (hidden) for the grace period, and gc wipes it after that."""
    node = _write_file(vault, ROOT_INO, "secret", b"s" * 5000)
    root = Path(store.backend.describe())
    vault.last_request = time.monotonic()  # the unlink is a request (fs.py sets this)
    vault.unlink(ROOT_INO, "secret")
    deadline = time.monotonic() + 2.0
    while node.token in store.list_tokens() and time.monotonic() < deadline:
        vault.last_request = time.monotonic()  # a busy mount: no quiet moment for wipes
        time.sleep(0.001)
    assert node.token not in store.list_tokens()
    assert (root / f"{node.token}.data").exists()  # hidden, not wiped
    vault.wait_deletions()
    tomb = root / f".{node.token}.deleting"
    assert tomb.exists() and (root / f"{node.token}.data").exists()
    assert store.collect_garbage().removed == []  # within the grace period
    store.grace = 0
    assert store.collect_garbage().removed == [f"finished deleting token {node.token}"]
    assert not tomb.exists() and not (root / f"{node.token}.data").exists()


def test_chmod_is_a_new_generation(vault: Vault, store: TokenStore) -> None:
    from vhsmfs.mount.vault import AttrChange

    node = _write_file(vault, ROOT_INO, "m", b"mode")
    vault.setattr(node.ino, change=AttrChange(mode=0o600))
    vault.flush_pending()
    (tok,) = store.list_tokens()
    t = store.open_token(tok)
    assert stat.S_IMODE(t.meta.mode) == 0o600 and t.header.generation == 2
