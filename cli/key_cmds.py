"""`vhsm key ...`, `vhsm audit ...`, `vhsm user ...`, `vhsm keysvc ...`, `vhsm scan-hardware`.

Click parsing and printing only: every operation is a `keysvc` call. The plain `do_*` functions
are shared with the `hsm_enhanced` compat entry point (cli/compat.py) so both print the same.
"""

from __future__ import annotations

import base64
import csv
import getpass
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from cli import output, sign_formats
from cli.completion import complete_key_names
from cli.display import say
from cli.errors import fail, guarded
from cli.protector_cmds import protector
from keysvc import audit, discovery, masterkey, paths, protectorslots, userfiles
from keysvc.client import Context, find_daemon, raise_for, where_looked
from keysvc.errors import InvalidInputError, KeysvcError, VerificationFailed

F = TypeVar("F", bound=Callable[..., Any])
ARGV_WARNING = (
    "Warning: a master key on the command line is visible to other users (ps, /proc); "
    "prefer HSM_MASTER_KEY or the master.key file"
)


def read_input(path: str) -> bytes:
    """`-i FILE` ('-' = stdin): bounded by the daemon protocol's limit (keysvc.userfiles)."""
    return userfiles.read_input(path)


def write_output(path: str | None, data: bytes, *, secret: bool = False) -> None:
    """`-o FILE` by the rule of keysvc.userfiles (devices and FIFOs written through, regular
    files replaced atomically, anything else refused; in `vhsm` commands an existing file only
    with --force, cli/output.py); stdout when none or '-'."""
    output.write_output(path, data, secret=secret)


def fmt_time(t: float | None) -> str:
    return "Never" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


# --- operations shared by both command syntaxes ----------------------------------------------


def do_generate_master_key(
    data_dir: str | None, *, passphrase: str | None, force: bool, show_hex: bool
) -> None:
    key, path = masterkey.generate(data_dir, passphrase=passphrase, force=force)
    ctx = Context(data_dir=data_dir, use_daemon=False)
    audit.writer_for(ctx.audit_log).append(
        [
            audit.AuditRecord(
                "CONFIG_CHANGE",
                "N/A",
                ctx.user,
                f"Master key generated ({path.name})",
                True,
                os.getuid(),
            )
        ]
    )
    if output.settings().json:
        res = {"master_key_file": str(path)}
        if show_hex:
            res["hex"] = key.hex()
        output.emit_json(res)
        return
    output.note(f"Master key saved to {path} (mode 0600)", err=True)
    if show_hex:
        # compat.md: one stdout line containing "hex" whose last field is the key
        say(f"Generated master key (hex): {key.hex()}")


def do_generate(ctx: Context, name: str, key_type: str | None = None, **opts: Any) -> None:
    req: dict[str, Any] = {"op": "generate", "key": name, "type": key_type}
    req.update({k: v for k, v in opts.items() if v is not None})
    reply, _ = ctx.execute(req)
    if output.settings().json:
        output.emit_json(
            {"key": name, "type": reply["type"], "state": reply["state"], "version": 1}
        )
        return
    output.note(f"Key {name} generated ({reply['type']}, {reply['state']}, version 1)")


def do_list(ctx: Context) -> None:
    reply, _ = ctx.execute({"op": "list"})
    if output.settings().json:
        output.emit_json({"keys": reply["keys"]})
        return
    for n in reply["keys"]:
        say(n)


INFO_FIELDS = (
    "name",
    "type",
    "state",
    "created",
    "last_used",
    "last_rotated",
    "days_since_rotation",
    "version",
    "min_version",
    "usable_versions",
    "use_count",
    "uses_since_rotation",
    "exportable",
    "policy",
    "rotation_due",
)


def info_json(i: dict[str, Any]) -> dict[str, Any]:
    """`key info --json`: the documented fields (docs/KEYSVC.md), `versions` as objects."""
    out = {f: i.get(f) for f in INFO_FIELDS}
    out["versions"] = i.get("version_details") or [{"version": v} for v in i["versions"]]
    return out


def do_info(ctx: Context, name: str) -> None:
    reply, _ = ctx.execute({"op": "info", "key": name})
    i = reply["info"]
    if output.settings().json:
        output.emit_json(info_json(i))
        return
    p = i["policy"]
    lines = [
        f"=== Key Information: {name} ===",
        f"Type: {i['type']}",
        f"State: {i['state']}",
        f"Created: {fmt_time(i['created'])}",
        f"Last Used: {fmt_time(i['last_used'])}",
        f"Last Rotated: {fmt_time(i['last_rotated'])}",
        f"Days Since Rotation: {i['days_since_rotation']:.1f}",
        f"Rotation Version: {i['version']}",
        f"Minimum Version: {i['min_version']}",
        f"Usable Versions: {', '.join(str(v) for v in i['usable_versions']) or 'none'}",
        f"Use Count: {i['use_count']}",
        f"Exportable: {'yes' if i['exportable'] else 'no'}",
        f"SSH: {'yes' if i.get('ssh') else 'no'}",
        "Rotation Policy: max age "
        + (f"{p['max_age_days']:g} days" if p["max_age_days"] else "unlimited")
        + ", max uses "
        + (str(p["max_uses"]) if p["max_uses"] else "unlimited")
        + (", automatic" if p["auto"] else ", manual"),
    ]
    if i["rotation_due"]:
        lines.append(f"WARNING: key rotation due ({i['rotation_due']})")
    for line in lines:
        say(line)


def do_sign(
    ctx: Context,
    name: str,
    infile: str,
    outfile: str | None,
    fmt: str = "raw",
    *,
    namespace: str | None = None,
    trusted_comment: str | None = None,
    as_json: bool = False,
) -> None:
    signed = sign_formats.sign(
        ctx, name, infile, fmt, namespace=namespace, trusted_comment=trusted_comment
    )
    if as_json:  # the signature is in the JSON: stdout gets nothing else
        if outfile and outfile != "-":
            write_output(outfile, signed.data)
        click.echo(json.dumps(sign_formats.signature_json(name, fmt, signed)))  # data: exact
        return
    write_output(outfile, signed.data)
    if outfile and outfile != "-":
        say(
            f"Signature written to {outfile} ({len(signed.data)} bytes, "
            f"key version {signed.version})"
        )


def do_verify(
    ctx: Context,
    name: str,
    infile: str,
    sigfile: str,
    fmt: str | None = None,
    *,
    namespace: str | None = None,
) -> None:
    try:
        res = sign_formats.verify(ctx, name, infile, sigfile, fmt, namespace=namespace)
    except VerificationFailed as e:
        say(f"Signature verification FAILED: {e}", err=True)
        sys.exit(1)
    say(f"Signature verified successfully (key {name}, version {res.version})")
    if res.note:
        say(res.note)


def do_export_public(
    ctx: Context,
    name: str,
    outfile: str | None,
    version: int | None = None,
    fmt: str = "pem",
    *,
    principal: str | None = None,
    namespaces: tuple[str, ...] = (),
) -> None:
    out = sign_formats.export_public(
        ctx, name, fmt, version, principal=principal, namespaces=namespaces
    )
    write_output(outfile, out)


def do_rotate(ctx: Context, name: str) -> None:
    reply, _ = ctx.execute({"op": "rotate", "key": name})
    s = output.settings()
    if s.json:
        output.emit_json({"key": name, "version": reply["version"]})
    elif s.quiet:
        say(reply["version"])  # the result alone: v=$(vhsm key rotate -q k)
    else:
        say(f"Key rotated successfully: {name}")
        say(f"New version: {reply['version']}")


def do_cipher(
    ctx: Context, op: str, name: str, infile: str, outfile: str | None, aad: str | None
) -> None:
    output.check_new(outfile)  # before the key service is asked (and audits a use)
    data = read_input(infile)
    reply, out = ctx.execute({"op": op, "key": name, "aad": aad}, data)
    if output.settings().json:
        res: dict[str, Any] = {"key": name, "version": reply["version"], "bytes": len(out)}
        if output.to_file(outfile):
            write_output(outfile, out, secret=op in ("decrypt", "unwrap"))
            res["output"] = outfile
        else:  # the data itself, as Vault transit answers: base64 in the object
            res[CIPHER_JSON_FIELD[op]] = base64.b64encode(out).decode()
        output.emit_json(res)
        return
    write_output(outfile, out, secret=op in ("decrypt", "unwrap"))
    if outfile and outfile != "-":
        output.note(f"{op}: {len(out)} bytes written to {outfile} (key version {reply['version']})")


# --json without -o: the field holding the output (base64)
CIPHER_JSON_FIELD = {
    "encrypt": "ciphertext",
    "decrypt": "plaintext",
    "wrap": "wrapped",
    "unwrap": "plaintext",
}


def do_set_state(ctx: Context, name: str, state: str, confirm_destroy: bool = False) -> None:
    reply, _ = ctx.execute(
        {"op": "set_state", "key": name, "state": state, "confirm_destroy": confirm_destroy}
    )
    if output.settings().json:
        output.emit_json({"key": name, "state": reply["state"]})
        return
    output.note(f"Key {name} is now {reply['state']}")


def do_set_user(ctx: Context, user: str) -> None:
    user = audit.validate_user(user)
    audit.persist_user(user, ctx.data_dir)
    audit.writer_for(ctx.audit_log).append(
        [
            audit.AuditRecord(
                "CONFIG_CHANGE", "N/A", user, f"User context set to {user}", True, os.getuid()
            )
        ]
    )
    say(f"User context set to: {user}")


def check_days(days: float) -> float:
    """A number of days back from now: NaN and infinity have no date."""
    if not math.isfinite(days) or days < 0:
        raise InvalidInputError(f"DAYS must be a non-negative number, got {days:g}")
    return days


def _entries_since(ctx: Context, days: float) -> list[audit.AuditEntry]:
    # through the daemon when one answers (keysvc.client.Context.audit_entries)
    return ctx.audit_entries(check_days(days))


def entry_json(e: audit.AuditEntry) -> dict[str, Any]:
    """One audit entry for `--json` (fields unescaped, as in the CSV export)."""
    return {
        "timestamp": e.timestamp,
        "event": e.event,
        "key": e.key,
        "user": e.user,
        "details": e.details,
        "success": e.success,
        "seq": e.seq,
    }


def do_audit_logs(ctx: Context, days: float) -> None:
    entries = _entries_since(ctx, days)
    if output.settings().json:
        output.emit_json(
            {"days": days, "total": len(entries), "entries": [entry_json(e) for e in entries]}
        )
        return
    say(f"=== Audit Log (last {days:g} days) ===")
    for e in entries:
        say(
            f"{e.timestamp} | {e.event} | {e.key} | {e.user} | {e.details} | "
            f"{'SUCCESS' if e.success else 'FAILURE'}"
        )
    say(f"Total entries: {len(entries)}")


def do_scan_hardware(as_json: bool = False) -> None:
    """Ask every hardware stack; a table for people, or the report as JSON. Exit 0 whatever
    is (not) present: a missing or failing stack is part of the answer, not an error."""
    from keysvc import hardware

    rep = hardware.report()
    if as_json:
        click.echo(json.dumps(rep, indent=2, sort_keys=False))
        return
    for line in hardware.render(rep):
        say(line)


# --- click: vhsm key ... ----------------------------------------------------------------------


def _ctx(c: click.Context) -> Context:
    return c.find_object(Context)  # type: ignore[return-value]


def _common(fn: F) -> F:
    for opt in reversed(
        [
            click.option(
                "--data-dir",
                envvar="HSM_DATA_DIR",
                type=click.Path(file_okay=False),
                help="Where keystore.dat, master.key live (default: cwd).",
            ),
            click.option(
                "--audit-log",
                envvar="HSM_AUDIT_LOG",
                type=click.Path(dir_okay=False),
                help="Audit log path (default: <data dir>/hsm_audit.log).",
            ),
            click.option(
                "--socket",
                "socket_path",
                envvar="HSM_SOCKET",
                type=click.Path(dir_okay=False),
                help="Daemon socket path.",
            ),
            click.option(
                "--no-daemon", is_flag=True, help="Work in-process even if the daemon runs."
            ),
            click.option(
                "--master-key",
                "master_key_hex",
                metavar="HEX",
                help="Master key as 64 hex (visible in ps: prefer HSM_MASTER_KEY).",
            ),
        ]
    ):
        fn = opt(fn)
    return fn


def _make_ctx(
    c: click.Context,
    data_dir: str | None,
    audit_log: str | None,
    socket_path: str | None,
    no_daemon: bool,
    master_key_hex: str | None,
) -> None:
    if master_key_hex:
        say(ARGV_WARNING, err=True)
    try:
        c.obj = Context(
            data_dir=data_dir,
            audit_log=audit_log,
            socket_path=socket_path,
            master_key_hex=master_key_hex,
            use_daemon=not no_daemon,
        )
    except KeysvcError as e:
        fail(e)


@click.group("key")
@_common
@click.pass_context
def key(c: click.Context, **kw: Any) -> None:
    """Keys: generate, sign, verify, encrypt, rotate, lifecycle."""
    _make_ctx(c, **kw)


@key.command("generate-master-key")
@click.option(
    "--passphrase",
    "use_pass",
    is_flag=True,
    help="Protect it with a passphrase (Argon2id) from HSM_MASTER_PASSPHRASE or a prompt.",
)
@click.option(
    "--force", is_flag=True, help="Replace an existing master key (keys under it are lost)."
)
@click.option("--show-hex", is_flag=True, help="Also print the key as hex (for a secret manager).")
@output.options("json", "quiet")
@click.pass_context
@guarded
def generate_master_key(c: click.Context, use_pass: bool, force: bool, show_hex: bool) -> None:
    """Create a random 32-byte master key (master.key, 0600)."""
    pw = None
    if use_pass:
        pw = os.environ.get("HSM_MASTER_PASSPHRASE") or click.prompt(
            "Passphrase", hide_input=True, confirmation_prompt=True
        )
    do_generate_master_key(str(_ctx(c).data_dir), passphrase=pw, force=force, show_hex=show_hex)


@key.command("generate")
@click.argument("name")
@click.option(
    "--type",
    "key_type",
    default="ed25519",
    show_default=True,
    help="ed25519 | ecdsa-p256 | rsa-3072 | aes-256-gcm | hmac-sha256",
)
@click.option("--exportable", is_flag=True, help="Mark the key exportable (recorded in metadata).")
@click.option("--pre-active", is_flag=True, help="Create it PRE_ACTIVE (activate later).")
@click.option("--max-age-days", type=float, help="Rotation policy: max age (default 90).")
@click.option("--max-uses", type=int, help="Rotation policy: max uses per version (0 = unlimited).")
@click.option("--auto-rotate/--manual-rotate", default=None, help="Let the daemon rotate it.")
@click.option("--ssh", is_flag=True, help="Offer it through `vhsm ssh-agent` (asymmetric only).")
@click.pass_context
@guarded
def generate(
    c: click.Context,
    name: str,
    key_type: str,
    exportable: bool,
    pre_active: bool,
    max_age_days: float | None,
    max_uses: int | None,
    auto_rotate: bool | None,
    ssh: bool,
) -> None:
    """Generate a key (Ed25519 by default)."""
    do_generate(
        _ctx(c),
        name,
        key_type,
        exportable=exportable or None,
        pre_active=pre_active or None,
        max_age_days=max_age_days,
        max_uses=max_uses,
        auto_rotate=auto_rotate,
        ssh=ssh or None,
    )


@key.command("list")
@output.options("json")
@click.pass_context
@guarded
def list_keys(c: click.Context) -> None:
    """Key names, one per line."""
    do_list(_ctx(c))


@key.command("info")
@click.argument("name", shell_complete=complete_key_names)
@output.options("json")
@click.pass_context
@guarded
def info(c: click.Context, name: str) -> None:
    """Metadata, state, versions, and a WARNING line when rotation is due."""
    do_info(_ctx(c), name)


@key.command("sign")
@click.argument("name", shell_complete=complete_key_names)
@click.option("-i", "--in", "infile", required=True, help="File to sign ('-' = stdin).")
@click.option("-o", "--out", "outfile", help="Signature file (default: stdout).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(sign_formats.SIGN_FORMATS),
    default="raw",
    show_default=True,
    help="raw bytes, an SSH signature (ssh-keygen -Y verify), minisign or signify.",
)
@click.option(
    "--namespace",
    help=f"sshsig: what the signature is for (default {sign_formats.DEFAULT_NAMESPACE!r}).",
)
@click.option("--trusted-comment", help="minisign: the signed comment (default: time, file, key).")
@click.option("--json", "as_json", is_flag=True, help="Print key, version, format and signature.")
@click.pass_context
@guarded
def sign(
    c: click.Context,
    name: str,
    infile: str,
    outfile: str | None,
    fmt: str,
    namespace: str | None,
    trusted_comment: str | None,
    as_json: bool,
) -> None:
    """Sign a file (raw: Ed25519 64 bytes; ECDSA DER; RSA PKCS#1 v1.5; HMAC 32 bytes)."""
    do_sign(
        _ctx(c),
        name,
        infile,
        outfile,
        fmt,
        namespace=namespace,
        trusted_comment=trusted_comment,
        as_json=as_json,
    )


@key.command("verify")
@click.argument("name", shell_complete=complete_key_names)
@click.option("-i", "--in", "infile", required=True)
@click.option("-s", "--sig", "sigfile", required=True)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(sign_formats.SIGN_FORMATS),
    help="Signature format (default: recognized from the signature file).",
)
@click.option(
    "--namespace",
    help=f"sshsig: the namespace expected (default {sign_formats.DEFAULT_NAMESPACE!r}).",
)
@click.pass_context
@guarded
def verify(
    c: click.Context,
    name: str,
    infile: str,
    sigfile: str,
    fmt: str | None,
    namespace: str | None,
) -> None:
    """Verify a signature against every usable version; exit 1 if it does not verify."""
    do_verify(_ctx(c), name, infile, sigfile, fmt, namespace=namespace)


@key.command("export-public")
@click.argument("name", shell_complete=complete_key_names)
@click.option("-o", "--out", "outfile")
@click.option("--version", "version", type=int, help="Key version (default: current).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(sign_formats.EXPORT_FORMATS),
    default="pem",
    show_default=True,
    help="allowed-signers: one line per usable version unless --version.",
)
@click.option("--principal", help="allowed-signers: who signs (default: the key name).")
@click.option(
    "--namespace",
    "namespaces",
    multiple=True,
    help="allowed-signers: trust the key only for this namespace (repeatable; default: any).",
)
@click.pass_context
@guarded
def export_public(
    c: click.Context,
    name: str,
    outfile: str | None,
    version: int | None,
    fmt: str,
    principal: str | None,
    namespaces: tuple[str, ...],
) -> None:
    """Public key as PEM (BEGIN PUBLIC KEY), OpenSSH, minisign, signify or allowed_signers."""
    do_export_public(
        _ctx(c), name, outfile, version, fmt, principal=principal, namespaces=namespaces
    )


def _cipher_cmd(op: str, doc: str) -> None:
    @key.command(op, help=doc)
    @click.argument("name", shell_complete=complete_key_names)
    @click.option("-i", "--in", "infile", required=True)
    @click.option("-o", "--out", "outfile")
    @click.option("--aad", help="Associated data (must match on decrypt).")
    @output.options("json", "quiet", "force")
    @click.pass_context
    @guarded
    def cmd(c: click.Context, name: str, infile: str, outfile: str | None, aad: str | None) -> None:
        do_cipher(_ctx(c), op, name, infile, outfile, aad)


_cipher_cmd("encrypt", "AES-256-GCM encrypt a file (output carries the key version).")
_cipher_cmd("decrypt", "Decrypt with whichever usable version encrypted it.")
_cipher_cmd("wrap", "Wrap a data key (1-1024 bytes) under an AES key.")
_cipher_cmd("unwrap", "Unwrap a wrapped data key.")


@key.command("rotate")
@click.argument("name", shell_complete=complete_key_names)
@output.options("json", "quiet")
@click.pass_context
@guarded
def rotate(c: click.Context, name: str) -> None:
    """Add a new version; older versions still verify/decrypt until retired."""
    do_rotate(_ctx(c), name)


@key.command("retire")
@click.argument("name", shell_complete=complete_key_names)
@click.option("--min-version", type=int, required=True)
@output.options("json", "quiet")
@click.pass_context
@guarded
def retire(c: click.Context, name: str, min_version: int) -> None:
    """Retire (and wipe) every version below MIN_VERSION."""
    reply, _ = _ctx(c).execute({"op": "retire", "key": name, "min_version": min_version})
    if output.settings().json:
        output.emit_json({"key": name, "min_version": reply["min_version"]})
        return
    output.note(f"Key {name}: versions below {reply['min_version']} retired")


@key.command("set-state")
@click.argument("name", shell_complete=complete_key_names)
@click.argument(
    "state",
    type=click.Choice(
        ["ACTIVE", "DEPRECATED", "SUSPENDED", "COMPROMISED", "DESTROYED"], case_sensitive=False
    ),
)
@click.option("--confirm-destroy", is_flag=True, help="Required to move a key to DESTROYED.")
@output.options("json", "quiet")
@click.pass_context
@guarded
def set_state(c: click.Context, name: str, state: str, confirm_destroy: bool) -> None:
    """Lifecycle transition (only the NIST SP 800-57 ones are allowed)."""
    do_set_state(_ctx(c), name, state, confirm_destroy)


@key.command("destroy")
@click.argument("name", shell_complete=complete_key_names)
@click.option("--confirm-destroy", is_flag=True, help="Required: wipes all key material.")
@output.options("json", "quiet")
@click.pass_context
@guarded
def destroy(c: click.Context, name: str, confirm_destroy: bool) -> None:
    """Wipe the key material (metadata is kept); the key must be deactivated first."""
    do_set_state(_ctx(c), name, "DESTROYED", confirm_destroy)


@key.command("policy")
@click.argument("name", shell_complete=complete_key_names)
@click.option("--max-age-days", type=float)
@click.option("--max-uses", type=int)
@click.option("--auto-rotate/--manual-rotate", default=None)
@click.option("--ssh/--no-ssh", default=None, help="Offer it through `vhsm ssh-agent` or not.")
@click.pass_context
@guarded
def policy(
    c: click.Context,
    name: str,
    max_age_days: float | None,
    max_uses: int | None,
    auto_rotate: bool | None,
    ssh: bool | None,
) -> None:
    """Set the key's rotation policy and whether the ssh-agent offers it (show them when no
    setting is given)."""
    if max_age_days is None and max_uses is None and auto_rotate is None and ssh is None:
        # nothing to set: read it (no KEY_MODIFIED line, no keystore write)
        info = _ctx(c).execute({"op": "info", "key": name})[0]["info"]
        p, marked = info["policy"], bool(info.get("ssh"))
    else:
        reply, _ = _ctx(c).execute(
            {
                "op": "set_policy",
                "key": name,
                "max_age_days": max_age_days,
                "max_uses": max_uses,
                "auto_rotate": auto_rotate,
                "ssh": ssh,
            }
        )
        p, marked = reply["policy"], bool(reply["ssh"])
    if output.settings().json:
        output.emit_json({"key": name, **p})  # (the SSH mark: `key info --json`)
        return
    say(
        f"Key {name}: max age {p['max_age_days']:g} days, max uses {p['max_uses']}, "
        f"{'automatic' if p['auto'] else 'manual'} rotation, SSH {'yes' if marked else 'no'}"
    )


key.add_command(protector)


# --- vhsm audit ... ---------------------------------------------------------------------------


@click.group("audit")
@_common
@click.pass_context
def audit_group(c: click.Context, **kw: Any) -> None:
    """The tamper-evident audit log."""
    _make_ctx(c, **kw)


@audit_group.command("verify")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False))
@output.options("json")
@click.pass_context
@guarded
def audit_verify(c: click.Context, files: tuple[str, ...]) -> None:
    """Check the chain; name the first bad line. FILES: rotated logs oldest first."""
    # files named here are read here; the live log is checked by the daemon when one answers
    res = audit.verify(list(files)) if files else _ctx(c).audit_verify()
    if output.settings().json:  # exit status as without --json: 1 when it fails
        output.emit_json(
            {"ok": res.ok, "entries": res.entries, "last_seq": res.last_seq, "message": res.message}
        )
        sys.exit(0 if res.ok else 1)
    if not res.ok:
        fail(f"audit log verification FAILED: {res.message}")
    say(res.message)


@audit_group.command("acknowledge")
@click.option(
    "--reason", required=True, help="Why the chain was reset (recorded with your user and uid)."
)
@click.pass_context
@guarded
def audit_acknowledge(c: click.Context, reason: str) -> None:
    """Accept the chain breaks recorded so far (a deliberate reset or restore)."""
    ctx = _ctx(c)
    try:
        before = audit.verify([ctx.audit_log])
    except KeysvcError:
        pass  # e.g. the log is gone: the writer records that break, then the acknowledgment
    else:
        if before.ok:
            fail(f"nothing to acknowledge: {before.message}")
    seq = audit.acknowledge_breaks(reason, user=ctx.user, log_path=ctx.audit_log)
    after = audit.verify([ctx.audit_log])
    if not after.ok:
        fail(
            f"acknowledged at seq {seq}, but the log still fails verification: {after.message} "
            "(an edited or inserted line cannot be acknowledged: keep that file as evidence, "
            "move it aside, and acknowledge the restart)"
        )
    say(f"Acknowledged at seq {seq}: {after.message}")


@audit_group.command("logs")
@click.argument("days", type=float, default=7)
@output.options("json")
@click.pass_context
@guarded
def audit_logs(c: click.Context, days: float) -> None:
    """Entries of the last DAYS days (default 7) and `Total entries: N`."""
    do_audit_logs(_ctx(c), days)


@audit_group.command("export")
@click.option("--csv", "as_csv", is_flag=True, required=True, help="CSV with a header row.")
@click.option("--days", type=float, help="Only the last DAYS days.")
@click.option("-o", "--out", "outfile", help="Output file (default: stdout).")
@output.options("force")
@click.pass_context
@guarded
def audit_export(c: click.Context, as_csv: bool, days: float | None, outfile: str | None) -> None:
    """Export entries (fields unescaped) as CSV."""
    ctx = _ctx(c)
    entries = ctx.audit_entries(None if days is None else check_days(days))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        ["timestamp", "event_type", "key_name", "user_id", "details", "success", "seq", "chain"]
    )
    for e in entries:
        w.writerow(e.fields())
    write_output(outfile, buf.getvalue().encode())


# --- vhsm user ... ----------------------------------------------------------------------------


@click.group("user")
@_common
@click.pass_context
def user_group(c: click.Context, **kw: Any) -> None:
    """The persisted user context recorded in every audit line."""
    _make_ctx(c, **kw)


@user_group.command("set")
@click.argument("user")
@click.pass_context
@guarded
def user_set(c: click.Context, user: str) -> None:
    """Persist USER for later operations (stored in <data dir>/.hsm_user)."""
    do_set_user(_ctx(c), user)


@user_group.command("show")
@output.options("json")
@click.pass_context
@guarded
def user_show(c: click.Context) -> None:
    if output.settings().json:
        output.emit_json({"user": _ctx(c).user})
        return
    say(_ctx(c).user)


# --- vhsm keysvc ... --------------------------------------------------------------------------


@click.group("keysvc")
def keysvc_group() -> None:
    """The key service daemon."""


@keysvc_group.command("serve")
@click.option("--data-dir", envvar="HSM_DATA_DIR", type=click.Path(file_okay=False))
@click.option("--audit-log", envvar="HSM_AUDIT_LOG", type=click.Path(dir_okay=False))
@click.option("--socket", "socket_path", envvar="HSM_SOCKET", type=click.Path(dir_okay=False))
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(dir_okay=False),
    help="Access policy (TOML); default <data dir>/keysvc-policy.toml if present.",
)
@click.option("--socket-mode", default="0660", show_default=True, help="Octal socket mode.")
@click.option("--rotation-check-interval", type=float, default=60.0, show_default=True)
@click.option(
    "--flush-interval",
    type=float,
    default=2.0,
    show_default=True,
    help="Seconds between saves of use counters.",
)
@click.option("--no-harden", is_flag=True, help="Skip mlockall/no-dump (debugging only).")
@click.option(
    "--max-connections",
    type=click.IntRange(1),
    default=1024,
    show_default=True,
    help="Connections open at once (lowered to fit under the open-files limit).",
)
@click.option(
    "--max-connections-per-uid",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="Connections open at once from one uid (the service's own uid is exempt).",
)
@click.option(
    "--group-cache-seconds",
    type=click.FloatRange(0, 3600),
    default=5.0,
    show_default=True,
    help="How long a group membership lookup is trusted (SIGHUP forgets them all).",
)
@guarded
def serve(
    data_dir: str | None,
    audit_log: str | None,
    socket_path: str | None,
    policy_path: str | None,
    socket_mode: str,
    rotation_check_interval: float,
    flush_interval: float,
    no_harden: bool,
    max_connections: int,
    max_connections_per_uid: int,
    group_cache_seconds: float,
) -> None:
    """Run the daemon in the foreground (SIGTERM/SIGINT stop it, SIGHUP reloads the policy)."""
    from keysvc.daemon import DaemonConfig
    from keysvc.daemon import serve as run_daemon

    # the lookup the CLI uses (keysvc.discovery), minus the system-wide sockets: /run is
    # bound only when asked for (the systemd unit passes --socket /run/vhsm/keysvc.sock)
    lookup = discovery.resolve(data_dir, socket_path)
    d = lookup.data_dir.absolute()
    try:
        mode = int(socket_mode, 8)
    except ValueError:
        fail(f"--socket-mode must be octal, got {socket_mode!r}")
    cfg = DaemonConfig(
        data_dir=d,
        socket=lookup.serve_socket().absolute(),
        audit_log=paths.audit_log_path(audit_log, d).absolute(),
        policy=Path(policy_path) if policy_path else None,
        socket_mode=mode,
        rotation_check_interval=rotation_check_interval,
        flush_interval=flush_interval,
        harden=not no_harden,
        max_connections=max_connections,
        max_connections_per_uid=max_connections_per_uid,
        group_cache_ttl=group_cache_seconds,
    )
    try:
        run_daemon(cfg)
    except OSError as e:
        fail(f"key service: {e.strerror or e}")


STATUS_FIELDS = ("pid", "uptime", "keys", "requests", "batches", "keystore", "audit_log")


@keysvc_group.command("status")
@click.option("--data-dir", envvar="HSM_DATA_DIR", type=click.Path(file_okay=False))
@click.option("--socket", "socket_path", envvar="HSM_SOCKET", type=click.Path(dir_okay=False))
@output.options("json")
@guarded
def status(data_dir: str | None, socket_path: str | None) -> None:
    """Is the daemon running? (exit 0 and details if so, exit 3 if not)."""
    as_json = output.settings().json
    lookup = discovery.resolve(data_dir, socket_path)
    client, tried = find_daemon(lookup)
    if client is None:
        if as_json:
            output.emit_json({"running": False})
        else:
            say(f"key service: not running ({where_looked(lookup, tried)})")
        sys.exit(3)
    with client:
        try:
            reply, _ = client.call({"op": "status"})
        except OSError as e:  # not our stdout: the daemon hung up (exit_if_stdout_closed)
            fail(f"key service connection failed: {e.strerror or e}")
    if not reply.get("ok"):
        fail(str(reply.get("message")))
    if as_json:
        res = {"running": True, "locked": bool(reply.get("locked"))}
        res.update({f: reply.get(f) for f in STATUS_FIELDS})
        output.emit_json(res)
        return
    if reply.get("locked"):
        say(f"key service: running, LOCKED (pid {reply['pid']}): run vhsm keysvc unlock")
        return
    say(f"key service: running (pid {reply['pid']}, up {reply['uptime']:.0f} s)")
    say(f"keys: {reply['keys']}  requests: {reply['requests']}  batches: {reply['batches']}")
    say(f"keystore: {reply['keystore']}")
    say(f"audit log: {reply['audit_log']}")


@keysvc_group.command("unlock")
@click.option("--data-dir", envvar="HSM_DATA_DIR", type=click.Path(file_okay=False))
@click.option("--socket", "socket_path", envvar="HSM_SOCKET", type=click.Path(dir_okay=False))
@click.option(
    "--fido2",
    is_flag=True,
    help="Unlock through a FIDO2 slot: the daemon asks the security key (touch it); its PIN, "
    "if it has one, from HSM_PROTECTOR_PIN or a prompt.",
)
@guarded
def unlock(data_dir: str | None, socket_path: str | None, fido2: bool) -> None:
    """Unlock a daemon that started locked: the passphrase from HSM_MASTER_PASSPHRASE or a
    prompt goes to the daemon over its socket, which tries its passphrase slots. With
    --fido2 the daemon tries its FIDO2 slots with the security key attached to its machine."""
    lookup = discovery.resolve(data_dir, socket_path)
    client, tried = find_daemon(lookup)
    if client is None:
        fail(f"key service: not running ({where_looked(lookup, tried)})")
    with client:
        status_reply, _ = client.call({"op": "status"})
        raise_for(status_reply)
        if not status_reply.get("locked"):
            say("key service: already unlocked")
            return
        if fido2:
            secret = os.environ.get("HSM_PROTECTOR_PIN", "")
            if not secret and sys.stdin.isatty():
                secret = getpass.getpass("FIDO2 PIN (empty if the key has none): ")
            if sys.stderr.isatty():  # a hint for a person; scripts get only the outcome
                say("Touch the security key of the key service's machine...", err=True)
            header = {"op": "unlock", "kind": protectorslots.FIDO2}
        else:
            secret = protectorslots.env_or_prompt("HSM_MASTER_PASSPHRASE")(
                "Master key passphrase: "
            )
            header = {"op": "unlock"}
        reply, _ = client.call(header, secret.encode())
    raise_for(reply)
    say("key service: unlocked")


@click.command("scan-hardware")
@click.option("--json", "as_json", is_flag=True, help="the report as JSON, for scripts")
@guarded
def scan_hardware(as_json: bool) -> None:
    """Report hardware roots of trust really present (TPM, PKCS#11, PC/SC, FIDO2).

    Each stack is asked through its library; one that is missing says how to install it, one
    that fails or does not answer within VHSM_SCAN_TIMEOUT seconds (default 10) says why."""
    do_scan_hardware(as_json)


def register(vhsm: click.Group) -> None:
    from cli import transit_cmds

    transit_cmds.register(key)
    # -o of every `vhsm key` command refuses an existing file unless --force (cli/output.py);
    # generate and policy print results, so they take --json too
    for cmd in key.commands.values():
        if any("-o" in getattr(p, "opts", ()) for p in cmd.params):
            output.attach(cmd, "force")
    output.attach(generate, "json", "quiet")
    output.attach(policy, "json")
    vhsm.add_command(key)
    vhsm.add_command(audit_group)
    vhsm.add_command(user_group)
    vhsm.add_command(keysvc_group)
    vhsm.add_command(scan_hardware)
