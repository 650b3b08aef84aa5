"""`hsm_enhanced`: the original tool's flag syntax (compat.md), mapped onto cli.key_cmds.

    hsm_enhanced [-master_key HEX] -COMMAND [ARGS] [-i FILE] [-o FILE] [-s FILE]

`-master_key` (and every option) may appear anywhere on the line. Exactly one command per run.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from cli import key_cmds as k
from cli.display import say
from cli.errors import fail, run_guarded
from keysvc import discovery
from keysvc.client import Context

# command flag -> number of positional arguments it takes
COMMANDS: dict[str, int] = {
    "-generate_master_key": 0,
    "-generate_key_pair": 1,
    "-generate_key": 1,
    "-sign": 1,
    "-verify": 1,
    "-export_public_key": 1,
    "-list": 0,
    "-key_info": 1,
    "-rotate_key": 1,
    "-audit_logs": -1,  # optional DAYS
    "-set_user": 1,
    "-scan_hardware": 0,
    "-encrypt": 1,
    "-decrypt": 1,
    "-set_state": 2,
    "-destroy_key": 1,
    "-verify_audit": 0,
    "-help": 0,
}
# option flag -> takes a value
OPTIONS: dict[str, bool] = {
    "-master_key": True,
    "-i": True,
    "-o": True,
    "-s": True,
    "-type": True,
    "-key_type": True,
    "-aad": True,
    "-data_dir": True,
    "-force": False,
    "-confirm_destroy": False,
    "-no_daemon": False,
    "-json": False,
}

USAGE = """usage: hsm_enhanced [-master_key HEX] COMMAND [options]
commands:
  -generate_master_key              new master.key; prints 'Generated master key (hex): ...'
  -generate_key_pair NAME [-type T] Ed25519 (default), ecdsa-p256, rsa-3072
  -generate_key NAME -type T        aes-256-gcm or hmac-sha256
  -sign NAME -i FILE -o SIG         sign a file
  -verify NAME -i FILE -s SIG       verify (exit 1 on failure)
  -export_public_key NAME [-o F]    PEM
  -list                             key names, one per line
  -key_info NAME                    metadata (WARNING line when rotation is due)
  -rotate_key NAME                  new version; old ones still verify
  -audit_logs [DAYS]                last DAYS days (default 7) and Total entries
  -set_user USER                    persisted user context for the audit log
  -scan_hardware [-json]            TPM, PKCS#11, smart-card readers, FIDO2
  -encrypt NAME -i F -o F / -decrypt NAME -i F -o F   AES-256-GCM keys
  -set_state NAME STATE [-confirm_destroy]  lifecycle transition
  -verify_audit                     check the audit log chain
options: -master_key HEX (or HSM_MASTER_KEY, or master.key), -data_dir D, -no_daemon"""


class UsageError(Exception):
    pass


def parse(argv: list[str]) -> tuple[str, list[str], dict[str, str | bool]]:
    command: str | None = None
    args: list[str] = []
    opts: dict[str, str | bool] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("--help", "-h"):
            tok = "-help"
        if tok in OPTIONS:
            if OPTIONS[tok]:
                if i + 1 >= len(argv):
                    raise UsageError(f"{tok} needs a value")
                opts[tok] = argv[i + 1]
                i += 2
            else:
                opts[tok] = True
                i += 1
            continue
        if tok in COMMANDS:
            if command is not None:
                raise UsageError(f"only one command per run ({command} and {tok} given)")
            command = tok
            n = COMMANDS[tok]
            i += 1
            if n == -1:
                if i < len(argv) and not argv[i].startswith("-"):
                    args.append(argv[i])
                    i += 1
                continue
            for _ in range(n):
                if i >= len(argv) or (argv[i] in COMMANDS or argv[i] in OPTIONS):
                    raise UsageError(f"{tok} needs {n} argument(s)")
                args.append(argv[i])
                i += 1
            continue
        raise UsageError(f"unknown option {tok!r}")
    if command is None:
        raise UsageError("no command given")
    return command, args, opts


def _need(opts: dict[str, str | bool], flag: str, command: str) -> str:
    v = opts.get(flag)
    if not isinstance(v, str) or not v:
        raise UsageError(f"{command} needs {flag} FILE")
    return v


def run(argv: list[str]) -> None:
    try:
        command, args, opts = parse(argv)
    except UsageError as e:
        say(f"Error: {e}", err=True)  # escaped: the message quotes what was given
        click.echo(USAGE, err=True)
        sys.exit(2)
    with run_guarded():
        _dispatch(command, args, opts)


def _dispatch(command: str, args: list[str], opts: dict[str, str | bool]) -> None:
    if command == "-help":
        click.echo(USAGE)
        return
    mk = opts.get("-master_key")
    if isinstance(mk, str):
        click.echo(k.ARGV_WARNING, err=True)
        if not mk:
            fail("-master_key was given an empty value")
    data_dir = opts.get("-data_dir")
    data_dir = data_dir if isinstance(data_dir, str) else None
    try:
        if command == "-generate_master_key":
            # the data dir every command finds (keysvc.discovery): never a second keystore
            # beside the one a config file names
            k.do_generate_master_key(
                str(discovery.resolve(data_dir).data_dir),
                passphrase=None,
                force=bool(opts.get("-force")),
                show_hex=True,
            )
            return
        if command == "-scan_hardware":
            k.do_scan_hardware(as_json=bool(opts.get("-json")))
            return
        ctx = Context(
            data_dir=data_dir,
            master_key_hex=mk if isinstance(mk, str) else None,
            use_daemon=not opts.get("-no_daemon"),
        )
        key_type = opts.get("-type") or opts.get("-key_type")
        handlers: dict[str, Callable[[], None]] = {
            "-generate_key_pair": lambda: k.do_generate(ctx, args[0], str(key_type or "ed25519")),
            "-generate_key": lambda: k.do_generate(ctx, args[0], str(key_type or "aes-256-gcm")),
            "-sign": lambda: k.do_sign(
                ctx, args[0], _need(opts, "-i", command), _need(opts, "-o", command)
            ),
            "-verify": lambda: k.do_verify(
                ctx, args[0], _need(opts, "-i", command), _need(opts, "-s", command)
            ),
            "-export_public_key": lambda: k.do_export_public(ctx, args[0], _opt(opts, "-o")),
            "-list": lambda: k.do_list(ctx),
            "-key_info": lambda: k.do_info(ctx, args[0]),
            "-rotate_key": lambda: k.do_rotate(ctx, args[0]),
            "-audit_logs": lambda: k.do_audit_logs(ctx, _days(args)),
            "-set_user": lambda: k.do_set_user(ctx, args[0]),
            "-encrypt": lambda: k.do_cipher(
                ctx,
                "encrypt",
                args[0],
                _need(opts, "-i", command),
                _need(opts, "-o", command),
                _opt(opts, "-aad"),
            ),
            "-decrypt": lambda: k.do_cipher(
                ctx,
                "decrypt",
                args[0],
                _need(opts, "-i", command),
                _need(opts, "-o", command),
                _opt(opts, "-aad"),
            ),
            "-set_state": lambda: k.do_set_state(
                ctx, args[0], args[1], bool(opts.get("-confirm_destroy"))
            ),
            "-destroy_key": lambda: k.do_set_state(
                ctx, args[0], "DESTROYED", bool(opts.get("-confirm_destroy"))
            ),
            "-verify_audit": lambda: _verify_audit(ctx),
        }
        handlers[command]()
    except UsageError as e:
        fail(e, 2)


def _opt(opts: dict[str, str | bool], flag: str) -> str | None:
    v = opts.get(flag)
    return v if isinstance(v, str) else None


def _days(args: list[str]) -> float:
    if not args:
        return 7.0
    try:
        return k.check_days(float(args[0]))
    except ValueError:
        raise UsageError(f"-audit_logs DAYS must be a number, got {args[0]!r}") from None


def _verify_audit(ctx: Context) -> None:
    res = ctx.audit_verify()  # by the daemon when one answers
    if not res.ok:
        fail(f"audit log verification FAILED: {res.message}")
    say(res.message)


def main() -> None:
    run(sys.argv[1:])


if __name__ == "__main__":
    main()
