"""`vhsm token ...`: the token store commands (same words and output lines as the original
`./token/token`, see shared/reference/compat.md). Parsing and printing only."""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from cli.completion import complete_token_ids
from cli.display import say
from cli.errors import run_guarded
from cli.keyopts import ANY_KEY, key_option, provider, store_option
from cli.progress import progress_bar
from cli.tokenaudit import audit_token_event, audited
from keysvc.errors import KeysvcError
from vhsmfs.backend import LocalBackend
from vhsmfs.errors import InputError, IntegrityError, VhsmError, WrongKeyError
from vhsmfs.keyfile import (
    KEY_LEN,
    KeyProvider,
    StaticKeyProvider,
    generate_key_file,
)
from vhsmfs.store import TokenStore, parse_token


def _open_store(store_dir: str, key_file: str | None, key_service: str | None = None) -> TokenStore:
    return TokenStore(LocalBackend(store_dir, create=False), provider(key_file, key_service))


@click.group()
def token() -> None:
    """Encrypted file vault: store files as tokens, retrieve them with the key."""


@token.command("generate-key")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def generate_key(file: str, force: bool) -> None:
    """Write a new random 32-byte key to FILE (mode 0600)."""
    with run_guarded():
        generate_key_file(file, force=force)
        say(f"Key saved to: {file}")


@token.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(readable=False))
@key_option
@store_option
@click.option("-r", "--recursive", is_flag=True, help="Store every file under a directory.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the token(s).")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar on stderr (default: only when stderr is a terminal).",
)
def store(
    paths: tuple[str, ...],
    key_file: str | None,
    key_service: str | None,
    store_dir: str,
    recursive: bool,
    quiet: bool,
    progress: bool | None,
) -> None:
    """Encrypt files into the store; prints one `Token: <uuid>` line per file."""
    with run_guarded():
        files = list(_expand_inputs(paths, recursive))
        generated: bytes | None = None
        if key_service == ANY_KEY:
            raise VhsmError("store --key-service needs the name of an AES key")
        keys: KeyProvider
        if key_file or key_service:
            keys = provider(key_file, key_service)  # type: ignore[assignment]
        else:
            generated = os.urandom(KEY_LEN)
            keys = StaticKeyProvider(generated)
        ts = TokenStore(LocalBackend(store_dir), keys)
        for path, name, follow in files:
            size = os.stat(path, follow_symlinks=follow).st_size
            with progress_bar(size, name, progress) as advance:
                tok = ts.store_file(path, name=name, progress=advance, follow_symlinks=follow)
            with audited(lambda tok=tok: ts.delete(tok)):
                audit_token_event("ENCRYPTION", tok, "stored", name)
            if generated is not None:
                _save_generated_key(ts, tok, generated, quiet)
            if quiet:
                say(str(tok))
            elif recursive:
                say(f"Token: {tok} {name}")
            else:
                say(f"Token: {tok}")
        if not quiet:
            say("Keep this token safe - you'll need it to retrieve your file")


def _save_generated_key(ts: TokenStore, tok: uuid.UUID, key: bytes, quiet: bool) -> None:
    name = f"auto_generated_key_{tok}.key"
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        ts.delete(tok)  # a token nobody can decrypt is worse than no token
        raise VhsmError(f"cannot save generated key {name}: {e.strerror}") from None
    if not quiet:
        say(f"Key saved to: {name}")


def _expand_inputs(paths: tuple[str, ...], recursive: bool) -> Iterator[tuple[str, str, bool]]:
    """(path, recorded name, follow a symlink there) triples. A directory's files keep their
    path relative to the directory's parent, so retrieving into OUTDIR recreates
    OUTDIR/<dir>/<...>. A link the user named is followed (their choice); a file found in a
    tree is opened without following: if it became a link since the walk saw it (someone else
    swapping it under a root `store -r`), it is refused rather than followed."""
    for p in paths:
        if os.path.isdir(p):
            if not recursive:
                raise InputError(f"{p} is a directory (use --recursive to store a tree)")
            top = Path(p).resolve()
            base = top.parent
            found = False
            for root, dirs, names in os.walk(top, onerror=_walk_error):
                dirs.sort()
                for n in sorted(names):
                    full = Path(root) / n
                    if full.is_symlink() or not full.is_file():
                        say(f"warning: skipping {full} (not a regular file)", err=True)
                        continue
                    if not os.access(full, os.R_OK):
                        raise InputError(f"cannot read {full}: permission denied")
                    found = True
                    yield str(full), full.relative_to(base).as_posix(), False
            if not found:
                raise InputError(f"{p} holds no regular files")
        elif os.path.lexists(p):
            if not os.access(p, os.R_OK):
                raise InputError(f"cannot read {p}: permission denied")
            yield p, os.path.basename(p), True
        else:
            raise InputError(f"{p}: no such file")


def _walk_error(e: OSError) -> None:
    # A subtree we cannot read must fail the command, not be left out silently.
    raise InputError(f"cannot read {e.filename}: {e.strerror}")


@token.command()
@click.argument("token_id", metavar="TOKEN", shell_complete=complete_token_ids)
@click.argument("outdir", type=click.Path())
@key_option
@store_option
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--progress/--no-progress", default=None)
def retrieve(
    token_id: str,
    outdir: str,
    key_file: str | None,
    key_service: str | None,
    store_dir: str,
    force: bool,
    progress: bool | None,
) -> None:
    """Decrypt TOKEN into OUTDIR/<original name>; prints the path written."""
    with run_guarded():
        tok = parse_token(token_id)
        ts = _open_store(store_dir, key_file, key_service)
        if ts.keys is None:
            raise VhsmError("retrieve needs the key: --key FILE or --key-service")
        try:
            opened = ts.open_token(tok)
            if opened.note:  # the newest generation is incomplete (a copy taken mid-commit)
                say(f"warning: token {tok}: {opened.note}", err=True)
            with progress_bar(opened.meta.size, str(tok), progress) as advance:
                # audited after every check passed, before the file gets its name: if the
                # line cannot be written, nothing is released (fail closed)
                dest = ts.retrieve(
                    opened,
                    outdir,
                    force=force,
                    progress=advance,
                    before_publish=lambda d: audit_token_event(
                        "DECRYPTION", tok, "retrieved", d.name
                    ),
                )
        except WrongKeyError:
            audit_token_event("AUTH_FAILURE", tok, "wrong key", None, success=False)
            raise
        except IntegrityError as e:
            audit_token_event("SECURITY_VIOLATION", tok, str(e), None, success=False)
            raise
        say(str(dest))


@token.command("list")
@key_option
@store_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(key_file: str | None, key_service: str | None, store_dir: str, as_json: bool) -> None:
    """List tokens (with --key: also names and sizes of tokens under that key)."""
    with run_guarded():
        ts = _open_store(store_dir, key_file, key_service)
        rows = []
        failed = 0
        for tok in ts.list_tokens():
            try:
                rows.append(ts.summary(tok).as_dict())
            except (VhsmError, KeysvcError) as e:  # reported in its row; the others go on
                rows.append({"token": str(tok), "error": str(e)})
                failed += 1
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            _fail_if_unreadable(failed)
            return
        if not rows:
            say("No tokens.", err=True)
            return
        say(f"{'TOKEN':36}  {'SIZE':>12}  {'CHUNKS':>7}  {'MODIFIED':19}  NAME")
        for r in rows:
            if "error" in r:
                say(f"{r['token']:36}  {'?':>12}  {'?':>7}  {'':19}  ({r['error']})")
                continue
            size = str(r["size"]) if r["size"] is not None else "?"
            name = r["name"] if r["readable"] else "(encrypted: other key or no --key)"
            if r.get("kind") == "dir":
                name, size = f"{name}/", "-"  # a directory created through the mount
            say(
                f"{r['token']:36}  {size:>12}  {r['chunk_count']:>7}  "
                f"{_fmt_ns(r['mtime_ns'])}  {name}"
            )
        _fail_if_unreadable(failed)


def _fail_if_unreadable(failed: int) -> None:
    """list shows every token it can; one it cannot read (damaged, or an unsafe store entry)
    is shown in its row, and the command then fails."""
    if failed:
        raise VhsmError(f"{failed} token(s) could not be read (see their rows)")


@token.command()
@click.argument("token_id", metavar="TOKEN", shell_complete=complete_token_ids)
@key_option
@store_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--digest",
    is_flag=True,
    help="Also compute the file's SHA-256 (as sha256sum prints it) by decrypting it; needs "
    "the key.",
)
def info(
    token_id: str,
    key_file: str | None,
    key_service: str | None,
    store_dir: str,
    as_json: bool,
    digest: bool,
) -> None:
    """Show what is known about TOKEN (names and sizes need its key)."""
    with run_guarded():
        tok = parse_token(token_id)
        ts = _open_store(store_dir, key_file, key_service)
        if digest and ts.keys is None:
            raise VhsmError("info --digest needs the key: --key FILE or --key-service")
        s = ts.summary(tok)
        if ts.keys is not None and not s.readable:
            raise WrongKeyError(f"wrong key for token {tok}")
        if digest:
            s.sha256 = ts.digest(tok)
        d = s.as_dict()
        if as_json:
            click.echo(json.dumps(d, indent=2))
            return
        labels: list[tuple[str, Any]] = [
            ("Token", d["token"]),
            ("Name", d["name"]),
            ("Kind", d["kind"]),
            ("Size", d["size"]),
            ("SHA-256", d["sha256"]),
            ("Chunk size", d["chunk_size"]),
            ("Chunks", d["chunk_count"]),
            ("Stored bytes", d["stored_bytes"]),
            ("Generation", d["generation"]),
            ("Created", _fmt_s(d["created"])),
            ("Modified", _fmt_ns(d["mtime_ns"])),
            ("Mode", f"{d['mode']:04o}" if d["mode"] is not None else None),
            ("Note", d["note"]),
        ]
        for label, value in labels:
            if value is not None:
                say(f"{label + ':':14}{value}")
        if not s.readable:
            say("(name, size and checksum are encrypted: give --key to see them)")
        elif s.sha256 is None:
            say("(SHA-256 of the content: give --digest to compute it)")


@token.command()
@click.argument("token_ids", nargs=-1, metavar="[TOKEN]...", shell_complete=complete_token_ids)
@key_option
@store_option
@click.option(
    "--no-key", is_flag=True, help="Check ciphertext checksums only (for backups; no key needed)."
)
def verify(
    token_ids: tuple[str, ...],
    key_file: str | None,
    key_service: str | None,
    store_dir: str,
    no_key: bool,
) -> None:
    """Check tokens (all when none named). Exit 1 if any fails, or if nothing was checked
    (an empty store; every token under another key)."""
    with run_guarded():
        has_key = bool(key_file or key_service)
        if not no_key and not has_key:
            raise VhsmError("verify needs --key FILE (or --no-key to check checksums only)")
        if no_key and has_key:
            raise VhsmError("--no-key and --key exclude each other")
        ts = _open_store(store_dir, key_file, key_service)
        explicit = bool(token_ids)
        toks = [parse_token(t) for t in token_ids] if explicit else ts.list_tokens()
        if not toks:
            # a scrub of an empty store (or an empty backup restore) proves nothing: say so
            raise VhsmError(f"store {store_dir} holds no tokens: nothing was verified")
        failed = skipped = 0
        for tok in toks:
            try:
                if no_key:
                    note = ts.verify_ciphertext(tok)
                else:
                    try:
                        note = ts.verify_full(tok)
                    except WrongKeyError:
                        if explicit:
                            raise
                        ts.verify_ciphertext(tok)  # not ours: still scrub its ciphertext
                        say(f"SKIP {tok} (other key; ciphertext checksums OK)")
                        skipped += 1
                        continue
                # an older generation is complete where the newest is not: a copy taken
                # mid-commit; `gc` sets the token back to it
                say(f"OK {tok}" + (f" ({note}; run `vhsm token gc`)" if note else ""))
            except (VhsmError, KeysvcError) as e:
                failed += 1
                reason = str(e).removeprefix(f"token {tok}: ")
                say(f"FAILED {tok}: {reason}")
        ok = len(toks) - failed - skipped
        say(f"{ok} ok, {failed} failed, {skipped} skipped", err=True)
        if failed:
            sys.exit(1)
        if not ok:  # every token SKIPped: the key given opens none of them
            raise VhsmError(
                f"nothing was verified with this key: all {skipped} token(s) are under "
                "other keys (their ciphertext checksums are OK)"
            )


@token.command()
@click.argument(
    "token_ids", nargs=-1, required=True, metavar="TOKEN...", shell_complete=complete_token_ids
)
@store_option
def delete(token_ids: tuple[str, ...], store_dir: str) -> None:
    """Securely delete tokens: wipe (overwrite, fsync, unlink) chunks, then metadata."""
    with run_guarded():
        ts = _open_store(store_dir, None)
        for t in token_ids:
            tok = parse_token(t)
            ts.delete(tok)
            audit_token_event("KEY_DELETED", tok, "token deleted", None)
            say(f"Deleted: {tok}")


@token.command()
@store_option
@click.option(
    "--grace",
    type=click.IntRange(0, 10 * 365 * 86400),
    default=None,
    metavar="SECONDS",
    help="Keep generations and objects superseded less than this long ago, for backups taken "
    "meanwhile (default: VHSM_GRACE_SECONDS, else 3600).",
)
def gc(store_dir: str, grace: int | None) -> None:
    """Finish interrupted deletes, remove data of interrupted stores and writes, set tokens
    of a backup copy back to their newest complete generation, and remove superseded
    generations past the grace period."""
    with run_guarded():
        ts = TokenStore(LocalBackend(store_dir, create=False), None, grace=grace)
        report = ts.collect_garbage()
        for line in report.removed:
            say(line)
        for line in report.ignored:
            say(f"ignored {line}")
        say(f"{len(report.removed)} item(s) cleaned", err=True)
        # Unsafe entries were left alone; the others were cleaned all the same.
        *before, last = report.refused or [""]
        for line in before:
            say(f"refused: {line}", err=True)
        if len(report.refused) == 1:
            raise VhsmError(last)
        if report.refused:
            raise VhsmError(f"{len(report.refused)} store entries refused (listed above); {last}")


def _fmt_ns(ns: int | None) -> str:
    return _fmt_s(ns / 1e9 if ns else None)


def _fmt_s(s: float | None) -> str:
    if not s:
        return "-"
    return datetime.fromtimestamp(s, UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")
