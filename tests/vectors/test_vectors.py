"""Golden token stores (test vectors, docs/FORMAT.md section 14) of the same 1320-byte file:
tests/vectors/v1 made by the code before format version 2, tests/vectors/v2 by version 2, both
with the key bytes 00..1f, chunk size 512 and stored name "vector.txt". They must keep decrypting
forever: with the library, with the CLI, and with an independent reader written from
docs/FORMAT.md alone (vectors_reader.py: no vhsm code), which proves the document describes
the bytes. One byte broken anywhere fails the checks the document says catch it.

The checked-in stores are only ever read: every test works on a copy in tmp_path (gc, retrieve
and verify all may write to a store).
"""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import vectors_reader as spec
import xxhash

from vhsmfs.backend import LocalBackend
from vhsmfs.errors import IntegrityError, VhsmError, WrongKeyError
from vhsmfs.keyfile import StaticKeyProvider
from vhsmfs.store import TokenStore

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
KEY = bytes(range(32))
VECTOR = (HERE / "vector.txt").read_bytes()
TOKENS = {
    "v1": uuid.UUID("73655846-88ed-4729-8c54-c15bccdd23c4"),
    "v2": uuid.UUID("e2a6af0c-1734-46a0-ba1a-b55d5963920f"),
}
# Every checked-in byte, pinned: a vector that changes is no longer the vector.
GOLDEN = {
    "vector.txt": "9a097262aea064f5a48cadeaab9bb300e6e55c11ce59f3aae2b18d01e2f9ef6f",
    "v1/VHSM-STORE": "c79dc8b8e89f1abbdde630f8479270e3be87c8b1f31afe6f522ad610110271a6",
    "v1/73655846-88ed-4729-8c54-c15bccdd23c4.metadata": (
        "9d745fb316cc15fb67c3144cdd0a029004e8bd34bab159e8bfa0d63e6524e074"
    ),
    "v1/73655846-88ed-4729-8c54-c15bccdd23c4.data/00000000": (
        "1887c94d9891176f2c8f194b721a680bd78fc4d87545d8895df3ed0ccafbf6a1"
    ),
    "v2/VHSM-STORE": "c79dc8b8e89f1abbdde630f8479270e3be87c8b1f31afe6f522ad610110271a6",
    "v2/e2a6af0c-1734-46a0-ba1a-b55d5963920f.metadata": (
        "f82bbb536af0a429fdc1a97a348192259551c72ec4c4c99767cba26bdcfa7ad2"
    ),
    "v2/e2a6af0c-1734-46a0-ba1a-b55d5963920f.data/gen-0000000000000001": (
        "f82bbb536af0a429fdc1a97a348192259551c72ec4c4c99767cba26bdcfa7ad2"
    ),
    "v2/e2a6af0c-1734-46a0-ba1a-b55d5963920f.data/00000000": (
        "5989e33e06971e5de7ec4b3557e43fa7f71cb3ced6c4012b440877fadade8502"
    ),
}
VERSIONS = ["v1", "v2"]
Copy = Callable[[str], Path]
Damage = Callable[[Path], None]


def _golden_now() -> dict[str, str]:
    return {
        str(p.relative_to(HERE)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(HERE.rglob("*"))
        if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts
    }


@pytest.fixture
def copy(tmp_path: Path) -> Iterator[Copy]:
    """copy("v1") -> a private copy of that golden store. Afterwards the checked-in files are
    checked to be exactly as they were."""

    def make(version: str) -> Path:
        dst = tmp_path / f"store-{version}"
        shutil.copytree(HERE / version, dst)
        return dst

    yield make
    assert _golden_now() == GOLDEN, "a checked-in vector changed"


def _meta_path(store: Path, version: str) -> Path:
    return store / f"{TOKENS[version]}.metadata"


def _object_path(store: Path, version: str) -> Path:
    return store / f"{TOKENS[version]}.data" / "00000000"


def _lib(store: Path, key: bytes | None = KEY) -> TokenStore:
    return TokenStore(
        LocalBackend(store, create=False), StaticKeyProvider(key) if key is not None else None
    )


_DROPPED_ENV = ("VHSM_STORE", "TOKEN_CHUNK_SIZE", "TOKEN_PARALLEL_CHUNKS", "VHSM_GRACE_SECONDS")


def _cli(work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`vhsm ARGS` as a subprocess running this checkout's code, its audit log in `work`."""
    env = {
        k: v for k, v in os.environ.items() if k not in _DROPPED_ENV and not k.startswith("PYTEST_")
    }
    env["PYTHONPATH"] = str(REPO)
    env["HSM_DATA_DIR"] = str(work)
    env["HSM_AUDIT_LOG"] = str(work / "hsm_audit.log")
    exe = shutil.which("vhsm", path=str(Path(sys.executable).parent))
    argv = [exe] if exe else [sys.executable, "-m", "cli.main"]
    return subprocess.run(
        [*argv, *args], cwd=work, env=env, capture_output=True, text=True, timeout=120
    )


def _key_file(work: Path) -> Path:
    k = work / "vector.key"
    fd = os.open(k, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(KEY)
    return k


# -- the vectors themselves ---------------------------------------------------------------------
def test_the_checked_in_vectors_are_the_golden_bytes() -> None:
    assert _golden_now() == GOLDEN
    assert len(VECTOR) == 1320


def test_format_md_prints_these_vectors() -> None:
    """docs/FORMAT.md's "Test vectors" section is what the independent reader prints from the
    golden stores (regenerate with: python tests/vectors/vectors_reader.py tests/vectors)."""
    doc = (REPO / "docs" / "FORMAT.md").read_text()
    assert spec.describe(HERE, KEY) in doc


def test_the_independent_reader_uses_no_vhsm_code() -> None:
    tree = ast.parse((HERE / "vectors_reader.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {
        "__future__",
        "cryptography",
        "dataclasses",
        "hashlib",
        "hmac",
        "json",
        "pathlib",
        "re",
        "struct",
        "sys",
        "uuid",
        "xxhash",
    }, imported


# -- (a) retrieve with the library and the CLI ------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_the_library_retrieves_the_vector(version: str, copy: Copy, tmp_path: Path) -> None:
    store = copy(version)
    ts = _lib(store)
    assert ts.list_tokens() == [TOKENS[version]]
    out = ts.retrieve(TOKENS[version], tmp_path / "out")
    assert out == tmp_path / "out" / "vector.txt"
    assert out.read_bytes() == VECTOR
    st = out.stat()
    assert st.st_mode & 0o777 == 0o640  # "mode": 416
    assert st.st_mtime_ns == 1_700_000_000_000_000_000


@pytest.mark.parametrize("version", VERSIONS)
def test_the_cli_retrieves_the_vector(version: str, copy: Copy, tmp_path: Path) -> None:
    store = copy(version)
    key = _key_file(tmp_path)
    tok = str(TOKENS[version])
    p = _cli(tmp_path, "token", "retrieve", tok, "out", "--key", str(key), "--store", str(store))
    assert p.returncode == 0, p.stdout + p.stderr
    assert (tmp_path / "out" / "vector.txt").read_bytes() == VECTOR
    assert KEY.hex() not in p.stdout + p.stderr


# -- (b) verify with and without the key ------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_the_library_verifies_the_vector(version: str, copy: Copy) -> None:
    store = copy(version)
    assert _lib(store, None).verify_ciphertext(TOKENS[version]) is None  # no fallback note
    assert _lib(store).verify_full(TOKENS[version]) is None
    assert _lib(store).digest(TOKENS[version]) == hashlib.sha256(VECTOR).hexdigest()


@pytest.mark.parametrize("version", VERSIONS)
def test_the_cli_verifies_the_vector(version: str, copy: Copy, tmp_path: Path) -> None:
    store = copy(version)
    key = _key_file(tmp_path)
    tok = str(TOKENS[version])
    for args in (["--no-key"], ["--key", str(key)]):
        p = _cli(tmp_path, "token", "verify", tok, *args, "--store", str(store))
        assert p.returncode == 0, p.stdout + p.stderr
        assert p.stdout.strip() == f"OK {tok}"
    p = _cli(tmp_path, "token", "info", tok, "--digest", "--key", str(key), "--store", str(store))
    assert p.returncode == 0, p.stdout + p.stderr
    assert hashlib.sha256(VECTOR).hexdigest() in p.stdout


@pytest.mark.parametrize("version", VERSIONS)
def test_gc_on_a_copy_of_the_vector_changes_nothing(version: str, copy: Copy) -> None:
    store = copy(version)
    before = sorted(str(p.relative_to(store)) for p in store.rglob("*"))
    report = _lib(store, None).collect_garbage()
    assert (report.removed, report.ignored, report.refused) == ([], [], [])
    assert sorted(str(p.relative_to(store)) for p in store.rglob("*")) == before


# -- (c) the independent reader: docs/FORMAT.md against the bytes -----------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_the_independent_reader_reads_the_vector(version: str, copy: Copy) -> None:
    store = copy(version)
    tok = TOKENS[version]
    assert spec.tokens(store) == [tok]
    mf, meta, plain = spec.read_token(store, tok, KEY)
    assert plain == VECTOR
    assert mf.version == int(version[1])
    assert (mf.generation, mf.chunk_size, mf.chunk_count, mf.next_object_id) == (1, 512, 3, 1)
    assert mf.key_ref == b""
    assert meta["name"] == "vector.txt" and meta["size"] == 1320 and meta["mode"] == 0o640
    assert meta["v"] == mf.version
    if version == "v1":
        assert meta["sha256"] == hashlib.sha256(VECTOR).hexdigest()
        assert (store / f"{tok}.data").is_dir() and not list(store.glob(f"{tok}.data/gen-*"))
    else:
        assert "sha256" not in meta  # version 2 stores no whole-file digest
        gen = store / f"{tok}.data" / "gen-0000000000000001"
        assert gen.read_bytes() == _meta_path(store, version).read_bytes()
        assert mf.objects == {
            0: (1404, xxhash.xxh3_128_digest(_object_path(store, version).read_bytes()))
        }
    # records back to back in object 0, in chunk order, each checksum that of its bytes
    obj = _object_path(store, version).read_bytes()
    assert [(o, off, n) for o, off, n, _ in mf.manifest] == [
        (0, 0, 540),
        (0, 540, 540),
        (0, 1080, 324),
    ]
    for _, off, n, digest in mf.manifest:
        assert spec.record_checksum(mf.version, obj[off : off + n]) == digest
    assert len(obj) == 540 + 540 + 324


def test_tables_digest_is_sha256_of_manifest_then_object_table(copy: Copy) -> None:
    """The order the document gives, and not the other one."""
    store = copy("v2")
    data = _meta_path(store, "v2").read_bytes()
    mf = spec.parse(data, TOKENS["v2"])
    t_off, t_len = mf.parts["object table"]
    m_off, m_len = mf.parts["manifest"]
    table, manifest = data[t_off : t_off + t_len], data[m_off : m_off + m_len]
    assert hashlib.sha256(manifest + table).digest() == mf.digest == data[126:158]
    assert hashlib.sha256(table + manifest).digest() != mf.digest


def test_every_object_checksum_is_what_xxh128sum_prints(copy: Copy) -> None:
    """A keyless scrubber may use the standard tool (apt xxhash): the object table holds the
    canonical big-endian XXH3-128, as `xxh128sum` prints it."""
    exe = shutil.which("xxh128sum")
    if exe is None:
        pytest.skip("xxh128sum (apt xxhash) is not installed")
    store = copy("v2")
    mf = spec.parse(_meta_path(store, "v2").read_bytes(), TOKENS["v2"])
    p = subprocess.run([exe, str(_object_path(store, "v2"))], capture_output=True, text=True)
    assert p.stdout.split()[0] == mf.objects[0][1].hex()


# -- one byte broken: each check the document names catches it ---------------------------------
def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_metadata(store: Path, version: str, edit: Callable[[bytes], bytes]) -> None:
    """Apply `edit` to the current metadata and, in version 2, to its generation file (a copy
    of the same bytes: damage to the current file alone is survived, see below)."""
    paths = [_meta_path(store, version)]
    if version == "v2":
        paths.append(store / f"{TOKENS[version]}.data" / "gen-0000000000000001")
    for p in paths:
        p.write_bytes(edit(p.read_bytes()))


def _flip_at(offset: int) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        b = bytearray(data)
        b[offset] ^= 0x01
        return bytes(b)

    return edit


def _reseal_v2(data: bytes) -> bytes:
    """Recompute tables_digest and header_checksum as an attacker without the key can."""
    nobj = struct.unpack_from(">I", data, 122)[0]
    count = struct.unpack_from(">Q", data, 110)[0]
    klen = struct.unpack_from(">H", data, 158)[0]
    (meta_len,) = struct.unpack_from(">I", data, 160 + klen)
    e = 160 + klen + 4 + meta_len
    table = data[e + 32 : e + 32 + 28 * nobj]
    manifest = data[e + 32 + 28 * nobj :]
    assert len(manifest) == 32 * count
    b = bytearray(data)
    b[126:158] = hashlib.sha256(manifest + table).digest()
    b[e : e + 32] = hashlib.sha256(bytes(b[:e])).digest()
    return bytes(b)


def _reseal_v1(data: bytes) -> bytes:
    """Recompute manifest_digest and the trailer as an attacker without the key can."""
    count = struct.unpack_from(">Q", data, 102)[0]
    klen = struct.unpack_from(">H", data, 146)[0]
    h = 148 + klen
    b = bytearray(data)
    b[114:146] = hashlib.sha256(data[h : h + 48 * count]).digest()
    b[-32:] = hashlib.sha256(bytes(b[:-32])).digest()
    return bytes(b)


def _retrail_v1(data: bytes) -> bytes:
    """The trailer alone recomputed (the manifest digest left as it was)."""
    return data[:-32] + hashlib.sha256(data[:-32]).digest()


def _forge_record_v2(store: Path) -> None:
    """Change a ciphertext byte of chunk 1 and every keyless checksum that covers it: the
    record's and the object's XXH3-128, tables_digest, header_checksum."""
    obj = _object_path(store, "v2")
    _flip(obj, 600)
    new = obj.read_bytes()

    def edit(data: bytes) -> bytes:
        b = bytearray(data)
        b[408 + 12 : 408 + 28] = xxhash.xxh3_128_digest(new)  # object table entry 0
        b[436 + 32 + 16 : 436 + 64] = xxhash.xxh3_128_digest(new[540:1080])  # manifest entry 1
        return _reseal_v2(bytes(b))

    _edit_metadata(store, "v2", edit)


def _forge_record_v1(store: Path) -> None:
    obj = _object_path(store, "v1")
    _flip(obj, 600)
    new = obj.read_bytes()

    def edit(data: bytes) -> bytes:
        b = bytearray(data)
        b[148 + 48 + 16 : 148 + 96] = hashlib.sha256(new[540:1080]).digest()  # entry 1
        return _reseal_v1(bytes(b))

    _edit_metadata(store, "v1", edit)


def _append(path: Path, data: bytes = b"\x00") -> None:
    with path.open("ab") as f:
        f.write(data)


def _meta(version: str, offset: int) -> Damage:
    """One bit flipped at `offset` of the metadata (and of its generation file)."""
    return lambda store: _edit_metadata(store, version, _flip_at(offset))


def _meta_edit(version: str, edit: Callable[[bytes], bytes]) -> Damage:
    return lambda store: _edit_metadata(store, version, edit)


def _obj(version: str, offset: int) -> Damage:
    """One bit flipped at `offset` of object 00000000."""
    return lambda store: _flip(_object_path(store, version), offset)


def _obj_appended(version: str) -> Damage:
    return lambda store: _append(_object_path(store, version))


def _obj_missing(version: str) -> Damage:
    return lambda store: _object_path(store, version).unlink()


# (name, version, damage, what the independent reader reports). Offsets: docs/FORMAT.md 3.1
# and section 14 (v2: meta_ct 176..375, header_checksum 376, object table 408, manifest 436;
# v1: manifest 148..291, meta_ct 308..583, trailer 584; records at 0, 540 and 1080).
KEYLESS: list[tuple[str, str, Damage, str]] = [
    ("magic", "v2", _meta("v2", 0), "bad magic"),
    ("version", "v2", _meta("v2", 9), "version 3 is not supported"),
    ("generation", "v2", _meta("v2", 97), "header_checksum"),
    ("commit_time", "v2", _meta("v2", 105), "header_checksum"),
    ("key_check", "v2", _meta("v2", 58), "header_checksum"),
    ("tables_digest", "v2", _meta("v2", 130), "header_checksum"),
    ("meta_nonce", "v2", _meta("v2", 170), "header_checksum"),
    ("meta_ct", "v2", _meta("v2", 250), "header_checksum"),
    ("header_checksum", "v2", _meta("v2", 380), "header_checksum"),
    ("object length", "v2", _meta("v2", 415), "tables_digest"),
    ("object checksum", "v2", _meta("v2", 430), "tables_digest"),
    ("record offset", "v2", _meta("v2", 479), "tables_digest"),
    ("record checksum", "v2", _meta("v2", 500), "tables_digest"),
    ("metadata extended", "v2", _meta_edit("v2", lambda d: d + b"\0"), "file size"),
    ("metadata truncated", "v2", _meta_edit("v2", lambda d: d[:-1]), "file size"),
    ("record nonce", "v2", _obj("v2", 540), "object 00000000 checksum"),
    ("record ciphertext", "v2", _obj("v2", 700), "object 00000000 checksum"),
    ("record tag", "v2", _obj("v2", 1403), "object 00000000 checksum"),
    ("object extended", "v2", _obj_appended("v2"), "object 00000000 length"),
    ("object missing", "v2", _obj_missing("v2"), "no complete generation"),
    ("v1 magic", "v1", _meta("v1", 3), "bad magic"),
    ("v1 generation", "v1", _meta("v1", 97), "trailer"),
    ("v1 manifest", "v1", _meta("v1", 200), "trailer"),
    ("v1 meta_ct", "v1", _meta("v1", 400), "trailer"),
    ("v1 trailer", "v1", _meta("v1", 615), "trailer"),
    (
        "v1 manifest, trailer recomputed",
        "v1",
        _meta_edit("v1", lambda d: _retrail_v1(_flip_at(200)(d))),
        "manifest_digest",
    ),
    ("v1 record", "v1", _obj("v1", 700), "chunk 1 checksum"),
    ("v1 object missing", "v1", _obj_missing("v1"), "object 00000000 is missing"),
]


@pytest.mark.parametrize(
    ("version", "damage", "reported"),
    [pytest.param(v, d, r, id=n) for n, v, d, r in KEYLESS],
)
def test_one_broken_byte_fails_the_keyless_checks(
    version: str, damage: Damage, reported: str, copy: Copy
) -> None:
    store = copy(version)
    tok = TOKENS[version]
    damage(store)
    with pytest.raises(spec.FormatError, match=reported):
        spec.scrub(store, tok)
    with pytest.raises(spec.FormatError, match=reported):
        spec.read_token(store, tok, KEY)
    with pytest.raises(VhsmError):
        _lib(store, None).verify_ciphertext(tok)
    with pytest.raises(VhsmError):
        _lib(store).verify_full(tok)
    with pytest.raises(VhsmError):
        _lib(store).retrieve(tok, store.parent / "out")
    assert not (store.parent / "out" / "vector.txt").exists()


# Damage made consistently by someone without the key: every keyless checksum recomputed. The
# keyless checks pass (they find accidents, not attackers); the key finds it.
FORGED: list[tuple[str, str, Damage, str]] = [
    (
        "v2 meta_ct",
        "v2",
        _meta_edit("v2", lambda d: _reseal_v2(_flip_at(250)(d))),
        "metadata authentication failed",
    ),
    ("v2 record", "v2", _forge_record_v2, "metadata authentication failed"),
    ("v2 key_check", "v2", _meta_edit("v2", lambda d: _reseal_v2(_flip_at(60)(d))), "wrong key"),
    (
        "v1 meta_ct",
        "v1",
        _meta_edit("v1", lambda d: _reseal_v1(_flip_at(400)(d))),
        "metadata authentication failed",
    ),
    ("v1 record", "v1", _forge_record_v1, "metadata authentication failed"),
]


@pytest.mark.parametrize(
    ("version", "damage", "reported"),
    [pytest.param(v, d, r, id=n) for n, v, d, r in FORGED],
)
def test_a_consistent_forgery_passes_the_keyless_checks_and_fails_with_the_key(
    version: str, damage: Damage, reported: str, copy: Copy
) -> None:
    store = copy(version)
    tok = TOKENS[version]
    damage(store)
    spec.scrub(store, tok)
    assert _lib(store, None).verify_ciphertext(tok) is None
    with pytest.raises(spec.FormatError, match=reported):
        spec.read_token(store, tok, KEY)
    with pytest.raises(WrongKeyError if reported == "wrong key" else IntegrityError):
        _lib(store).verify_full(tok)


def test_a_record_changed_with_only_its_own_checksums_fixed_fails_the_chunk_tag(copy: Copy) -> None:
    """Without the key's check of tables_digest a reader would only learn it from the chunk's
    GCM tag: a reader that skipped the metadata's authentication still rejects the record."""
    store = copy("v2")
    _forge_record_v2(store)
    mf = spec.scrub(store, TOKENS["v2"])
    keys = spec.derive_keys(KEY, mf.salt, TOKENS["v2"], 2)
    obj = _object_path(store, "v2").read_bytes()
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    record = obj[540:1080]
    with pytest.raises(InvalidTag):
        AESGCM(keys.data_key).decrypt(
            record[:12], record[12:], spec.chunk_aad(2, TOKENS["v2"], 1, False)
        )


def test_v1_cannot_see_bytes_appended_to_an_object(copy: Copy) -> None:
    """The legacy format's known gap (section 13): it records no object lengths, so bytes
    appended to an object pass every check, keyless or not; version 2 finds them (above)."""
    store = copy("v1")
    _append(_object_path(store, "v1"), b"appended")
    spec.scrub(store, TOKENS["v1"])
    assert _lib(store, None).verify_ciphertext(TOKENS["v1"]) is None
    assert _lib(store).verify_full(TOKENS["v1"]) is None


def test_damage_to_the_current_metadata_alone_falls_back_to_its_generation_file(copy: Copy) -> None:
    """The generation file is a copy of the current metadata: a reader uses it (section 5),
    verify still reports the damage, and gc puts the copy back."""
    store = copy("v2")
    tok = TOKENS["v2"]
    _flip(_meta_path(store, "v2"), 250)
    mf, name = spec.newest_complete(store, tok)
    assert name == "gen-0000000000000001"
    assert spec.read_token(store, tok, KEY)[2] == VECTOR
    opened = _lib(store).open_token(tok)
    assert opened.note is not None and opened.note.startswith("using generation 1 (")
    with pytest.raises(IntegrityError, match="metadata checksum mismatch"):
        _lib(store, None).verify_ciphertext(tok)
    with pytest.raises(IntegrityError, match="metadata checksum mismatch"):
        _lib(store).verify_full(tok)
    report = _lib(store, None).collect_garbage()
    assert len(report.removed) == 1
    assert report.removed[0].startswith(f"token {tok}: using generation 1 (metadata checksum")
    assert report.removed[0].endswith("; current metadata rewritten")
    assert (
        _meta_path(store, "v2").read_bytes()
        == (store / f"{tok}.data" / "gen-0000000000000001").read_bytes()
    )
    assert _lib(store, None).verify_ciphertext(tok) is None


def test_the_key_ref_layout_is_what_the_key_service_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Section 11's bytes, made by the independent reader, against keysvc's own code."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from keysvc import keytypes
    from keysvc.tokenkeys import decode_ref, encode_ref

    ex = spec.KEY_REF_EXAMPLE
    ref = spec.wrap_data_key(KEY, ex["wrapping_key"], ex["name"], ex["key_version"], ex["nonce"])
    name, wrapped = decode_ref(ref)
    assert name == ex["name"]
    assert keytypes.decrypt(AESGCM(ex["wrapping_key"]), name, wrapped, wrapped=True) == KEY
    monkeypatch.setattr(keytypes.os, "urandom", lambda n: ex["nonce"][:n])
    made = keytypes.wrap(AESGCM(ex["wrapping_key"]), ex["name"], ex["key_version"], KEY)
    assert encode_ref(ex["name"], made) == ref
    assert len(ref) == 74 + len(ex["name"].encode())
