"""Helpers shared by the token store tests (imported by the test modules and conftest.py).

Named token_helpers (not helpers/util) so it cannot clash with another area's test helpers on
sys.path; tests/token deliberately has no __init__.py, since a package named `token` would
shadow the standard library module of that name.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vhsmfs.format import (
    FORMAT_V2,
    MANIFEST_ENTRY,
    build_head,
    object_hasher,
    pack_object_table,
    parse_bytes,
    record_checksum,
)

VENV_BIN = Path(sys.executable).parent
TOKEN_RE = re.compile(r"^Token: ([0-9a-f-]{36})\b", re.M)
KEEP_LINE = "Keep this token safe - you'll need it to retrieve your file"

# Root ignores file modes. A subprocess that keeps uid 0 (so it can still run the venv's Python
# under /root) but has CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH removed from its bounding and
# inheritable sets is held to the owner's mode bits like any unprivileged user.
UNPRIVILEGED = [
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
    "--",
]


def vhsm_argv() -> list[str]:
    exe = shutil.which("vhsm", path=str(VENV_BIN))
    if exe:
        return [exe]
    return [sys.executable, "-m", "cli.main"]


def vhsm_in(work: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`vhsm ARGS` run in `work` with text output; never raises on a non-zero exit."""
    return subprocess.run(
        [*vhsm_argv(), *args],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
    )


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VHSM_STORE", "TOKEN_CHUNK_SIZE", "TOKEN_PARALLEL_CHUNKS")
        and not k.startswith("PYTEST_")
    }
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    if extra:
        env.update(extra)
    return env


@dataclass
class Result:
    argv: list[str]
    rc: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    def tokens(self) -> list[str]:
        return TOKEN_RE.findall(self.out)

    def __str__(self) -> str:
        return (
            f"$ {' '.join(self.argv)}\nexit {self.rc}\n--- stdout\n{self.out}--- stderr\n{self.err}"
        )


def key_encodings(key: bytes) -> list[bytes]:
    """The ways a key could leak into output: raw, hex (both cases), base64 (both alphabets)."""
    forms = [
        key,
        key.hex().encode(),
        key.hex().upper().encode(),
        base64.b64encode(key),
        base64.urlsafe_b64encode(key),
        base64.b64encode(key).rstrip(b"="),
    ]
    return forms


def assert_no_key_leak(keys: list[bytes], *blobs: bytes, where: str = "output") -> None:
    for key in keys:
        for form in key_encodings(key):
            for blob in blobs:
                assert form not in blob, f"key material found in {where}"


@dataclass
class Cli:
    """Runs `vhsm` as a subprocess in a private working directory (the audit log and the default
    ./secure_storage go there). Every run is checked for key bytes in its stdout and stderr."""

    cwd: Path
    keys: list[bytes] = field(default_factory=list)
    history: list[Result] = field(default_factory=list)

    @property
    def store_dir(self) -> Path:
        return self.cwd / "secure_storage"

    def known_keys(self, cwd: Path) -> list[bytes]:
        found = list(self.keys)
        for p in list(cwd.glob("auto_generated_key_*.key")) + list(self.cwd.glob("*.key")):
            if not p.is_file():
                continue
            data = p.read_bytes()
            if len(data) == 32:
                found.append(data)
        return found

    def __call__(
        self,
        *args: str | os.PathLike[str],
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 300,
        unprivileged: bool = False,
        stdin: bytes | None = None,
    ) -> Result:
        argv = (UNPRIVILEGED if unprivileged else []) + vhsm_argv() + [os.fspath(a) for a in args]
        where = cwd or self.cwd
        p = subprocess.run(
            argv,
            cwd=where,
            env=clean_env(env),
            input=stdin or b"",
            capture_output=True,
            timeout=timeout,
        )
        res = Result(argv, p.returncode, p.stdout, p.stderr)
        self.history.append(res)
        assert_no_key_leak(
            self.known_keys(where), res.stdout, res.stderr, where=f"the output of {' '.join(argv)}"
        )
        assert b"Traceback" not in res.stderr, str(res)
        return res

    def ok(self, *args: str | os.PathLike[str], **kw) -> Result:  # type: ignore[no-untyped-def]
        res = self(*args, **kw)
        assert res.rc == 0, str(res)
        return res

    def keygen(self, name: str = "k.key") -> Path:
        path = self.cwd / name
        self.ok("token", "generate-key", path)
        self.keys.append(path.read_bytes())
        return path

    def store(self, path: str | os.PathLike[str], key: Path, *extra: str, **kw) -> str:  # type: ignore[no-untyped-def]
        res = self.ok("token", "store", path, "--key", key, *extra, **kw)
        toks = res.tokens()
        assert len(toks) == 1, str(res)
        return toks[0]


def assert_one_line_error(res: Result) -> str:
    """Non-zero exit, exactly one line on stderr starting with `Error: `, no traceback."""
    assert res.rc != 0, str(res)
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line\n{res}"
    assert lines[0].startswith("Error: "), str(res)
    assert "Traceback" not in res.err
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under root (hidden ones too) with a content digest."""
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):  # never open a FIFO or a device: it may block
                out[os.path.relpath(p, root)] = f"special {stat.S_IFMT(st.st_mode):o}"
                continue
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def store_leftovers(store: Path) -> list[str]:
    """Everything in a store (recursively) except its marker and the temp directory .tmp/
    itself (made on a store's first write and kept; anything in it is listed): what a failed
    command left behind."""
    return sorted(k for k in snapshot(store) if k not in ("VHSM-STORE", ".tmp/"))


def store_names(store: Path) -> list[str]:
    """The store directory's entries, sorted, without its temp directory .tmp/ when that is
    empty (made on a store's first write and kept; anything in it is listed as .tmp)."""
    names = sorted(p.name for p in Path(store).iterdir())
    if ".tmp" in names and not any((Path(store) / ".tmp").iterdir()):
        names.remove(".tmp")
    return names


def random_bytes(n: int, seed: int) -> bytes:
    """Deterministic incompressible bytes (fast for large n)."""
    return random.Random(seed).randbytes(n)


def write_random(path: Path, n: int, seed: int = 0) -> bytes:
    data = random_bytes(n, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


# -- raw store manipulation (what an attacker with write access to the store can do) -----------


def meta_path(store: Path, token: str | uuid.UUID) -> Path:
    return Path(store) / f"{token}.metadata"


def object_paths(store: Path, token: str | uuid.UUID) -> list[Path]:
    """The token's objects (8 hex digits), without its generation files."""
    d = Path(store) / f"{token}.data"
    return sorted(p for p in d.iterdir() if re.fullmatch(r"[0-9a-f]{8}", p.name))


def gen_paths(store: Path, token: str | uuid.UUID) -> list[Path]:
    """The token's generation files (format v2), oldest first."""
    d = Path(store) / f"{token}.data"
    return sorted(d.glob("gen-" + "[0-9a-f]" * 16))


def gen_path(store: Path, token: str | uuid.UUID, generation: int) -> Path:
    return Path(store) / f"{token}.data" / f"gen-{generation:016x}"


def read_manifest(store: Path, token: str | uuid.UUID) -> list[tuple[int, int, int, bytes]]:
    """The current metadata's manifest entries: (object, offset, record length, checksum)."""
    parsed = parse_bytes(meta_path(store, token).read_bytes(), uuid.UUID(str(token)))
    return list(parsed.entry.iter_unpack(parsed.load_manifest()))


def write_metadata(store: Path, token: str | uuid.UUID, data: bytes, generation: int) -> None:
    """Put `data` in place of the token's current metadata AND of its generation file of that
    number (format v2 keeps the same bytes in both; an attacker rewrites both, or a reader
    would fall back to the untouched copy)."""
    meta_path(store, token).write_bytes(data)
    gen_path(store, token, generation).write_bytes(data)


def rewrite_manifest(
    store: Path,
    token: str | uuid.UUID,
    mutate: Callable[[list[tuple[int, int, int, bytes]]], list[tuple[int, int, int, bytes]]],
    *,
    fix_header_digest: bool = True,
) -> None:
    """Rewrite the plaintext manifest as an attacker without the key would: change entries,
    always recompute the object table (each object's length and XXH3-128 as it is now on
    disk) and the header checksum, and optionally the tables digest in the header. Written
    to the current metadata and its generation file. The encrypted metadata is left as it was
    (it cannot be forged without the key), so the header, which is its AAD, cannot really
    change: a fixed tables digest fails authentication with the key."""
    tok = uuid.UUID(str(token))
    parsed = parse_bytes(meta_path(store, tok).read_bytes(), tok)
    assert parsed.version == FORMAT_V2
    new = mutate(list(MANIFEST_ENTRY.iter_unpack(parsed.load_manifest())))
    manifest = b"".join(MANIFEST_ENTRY.pack(*e) for e in new)
    objects = {}
    for obj in parsed.objects:
        data = (Path(store) / f"{tok}.data" / f"{obj:08x}").read_bytes()
        h = object_hasher()
        h.update(data)
        objects[obj] = (len(data), h.digest())
    table = pack_object_table(objects)
    header = parsed.header
    header.chunk_count = len(new)
    header.object_count = len(objects)
    if fix_header_digest:
        header.tables_digest = hashlib.sha256(manifest + table).digest()
    head = build_head(header, parsed.meta_nonce, parsed.meta_ciphertext, table)
    write_metadata(store, tok, head + manifest, header.generation)


def record_digest(record: bytes) -> bytes:
    """A record's checksum as a v2 manifest holds it (XXH3-128)."""
    return record_checksum(FORMAT_V2)(record)
