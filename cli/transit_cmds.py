"""`vhsm key datakey` and `vhsm key rewrap`: Vault-transit style data keys (docs/KEYSVC.md
"Data keys and rewrap").

Parsing and printing only: the key service generates, wraps and re-encrypts; a plaintext data
key is printed only where the user asked for it (-o, stdout, or `plaintext` in --json), and
rewrap never sees one.
"""

from __future__ import annotations

import base64
import contextlib
import os
import sys
from typing import Any

import click

from cli import output
from cli.errors import fail, guarded
from cli.key_cmds import read_input
from keysvc.client import Context
from keysvc.protocol import MAX_DATA_KEY, MIN_GENERATED_DATA_KEY


def _ctx(c: click.Context) -> Context:
    return c.find_object(Context)  # type: ignore[return-value]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@click.command("datakey")
@click.argument("name")
@click.option(
    "--bytes",
    "size",
    type=click.IntRange(MIN_GENERATED_DATA_KEY, MAX_DATA_KEY),
    default=32,
    show_default=True,
    help="Length of the data key.",
)
@click.option("-o", "--out", "outfile", help="Plaintext data key file (mode 0600; '-' = stdout).")
@click.option("-w", "--wrapped-out", "wrapped_out", help="Wrapped data key file ('-' = stdout).")
@click.option("--wrapped-only", is_flag=True, help="Only the wrapped key: no plaintext leaves.")
@output.options("json", "quiet", "force")
@click.pass_context
@guarded
def datakey(
    c: click.Context,
    name: str,
    size: int,
    outfile: str | None,
    wrapped_out: str | None,
    wrapped_only: bool,
) -> None:
    """A new random data key from the key service, wrapped under the newest version of the
    AES key NAME (unwrap it later with `vhsm key unwrap`).

    Without --json: the wrapped key goes to -w FILE and the plaintext to -o FILE (or stdout);
    with --wrapped-only only the wrapped key is made, to -w FILE or stdout. With --json: one
    object; the keys not written to files are in it as base64."""
    as_json = output.settings().json
    if wrapped_only and outfile:
        fail("--wrapped-only makes no plaintext: drop -o", 2)
    if outfile == "-" and wrapped_out == "-":
        fail("-o and -w cannot both be stdout", 2)
    plain_to_stdout = not wrapped_only and not as_json and not output.to_file(outfile)
    if not as_json and not wrapped_only and not wrapped_out:
        fail("the wrapped key needs a place: -w FILE (or --json, or --wrapped-only)", 2)
    if plain_to_stdout and sys.stdout.isatty():
        fail("refusing to print a binary data key to a terminal: use -o FILE or --json")
    output.check_new(outfile)
    output.check_new(wrapped_out)
    reply, blob = _ctx(c).execute(
        {"op": "datakey", "key": name, "bytes": size, "wrapped_only": wrapped_only or None}
    )
    n = int(reply["wrapped_len"])
    wrapped, plain = blob[:n], blob[n:]
    res: dict[str, Any] = {"key": name, "version": reply["version"], "bytes": reply["bytes"]}
    # files first: a refused -o/-w fails before anything is printed
    if output.to_file(wrapped_out):
        output.write_output(wrapped_out, wrapped)
        res["wrapped_file"] = wrapped_out
    if plain and output.to_file(outfile):
        try:
            output.write_output(outfile, plain, secret=True)
        except BaseException:
            if "wrapped_file" in res:  # a wrapped key without its plaintext file: useless
                with contextlib.suppress(OSError):
                    os.unlink(wrapped_out)  # type: ignore[arg-type]
            raise
        res["plaintext_file"] = outfile
    if as_json:
        if "wrapped_file" not in res:
            res["wrapped"] = _b64(wrapped)
        if plain and "plaintext_file" not in res:
            res["plaintext"] = _b64(plain)
        output.emit_json(res)
        return
    if "wrapped_file" not in res:  # --wrapped-only without -w, or -w -
        output.write_output(None, wrapped)
    if plain and "plaintext_file" not in res:
        output.write_output(None, plain)
    where = f" -> {wrapped_out}" if output.to_file(wrapped_out) else ""
    output.note(
        f"Data key: {reply['bytes']} bytes, wrapped with {name} version {reply['version']}{where}",
        err=True,
    )


@click.command("rewrap")
@click.argument("name")
@click.option(
    "-i", "--in", "infile", required=True, help="Wrapped key or ciphertext ('-' = stdin)."
)
@click.option("-o", "--out", "outfile", help="The re-encrypted blob (default: stdout).")
@click.option("--aad", help="Associated data of a ciphertext (kept for the new one).")
@output.options("json", "quiet", "force")
@click.pass_context
@guarded
def rewrap(c: click.Context, name: str, infile: str, outfile: str | None, aad: str | None) -> None:
    """Re-encrypt a wrapped key (from wrap/datakey) or a ciphertext (from encrypt) under the
    newest version of NAME, inside the key service: the plaintext is never sent to you."""
    output.check_new(outfile)
    data = read_input(infile)
    reply, blob = _ctx(c).execute({"op": "rewrap", "key": name, "aad": aad}, data)
    res = {
        "key": name,
        "version": reply["version"],
        "old_version": reply["old_version"],
        "kind": reply["kind"],
    }
    if output.settings().json:
        if output.to_file(outfile):
            output.write_output(outfile, blob)
            res["output"] = outfile
        else:
            res["blob"] = _b64(blob)
        output.emit_json(res)
        return
    output.write_output(outfile, blob)
    if output.to_file(outfile):
        output.note(
            f"rewrap: {reply['kind']} version {reply['old_version']} -> {reply['version']}, "
            f"written to {outfile}"
        )


def register(key: click.Group) -> None:
    key.add_command(datakey)
    key.add_command(rewrap)
