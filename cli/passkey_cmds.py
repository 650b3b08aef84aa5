"""`vhsm passkey generate|authenticate|list NAME`: WebAuthn-style passkeys on a FIDO2
authenticator, against a local relying party.

Parsing and printing only: keysvc.passkeys registers, verifies, stores and audits."""

from __future__ import annotations

import getpass
import sys
from typing import Any

import click

from cli import output
from cli.display import say
from cli.errors import guarded
from keysvc import audit, discovery, passkeys, paths, pinsource


def _pin(source: str | None) -> passkeys.PinSource:
    """The PIN, asked for only when the authenticator needs one: from the source, else a prompt
    on a terminal, else None (the library then says a PIN is needed)."""

    def get() -> str | None:
        if source:
            return pinsource.pin_from(source)
        if sys.stdin.isatty():
            return getpass.getpass("FIDO2 authenticator PIN: ") or None
        return None

    return get


def _where(data_dir: str | None, audit_log: str | None) -> dict[str, Any]:
    d = discovery.resolve(data_dir).data_dir  # the data dir every command finds
    return {
        "data_dir": d,
        "audit_log": paths.audit_log_path(audit_log, d),
        "user": audit.current_user(d),
    }


def _options(fn: Any) -> Any:
    fn = click.option(
        "--audit-log",
        envvar="HSM_AUDIT_LOG",
        type=click.Path(dir_okay=False),
        help="Audit log path (default: <data dir>/hsm_audit.log).",
    )(fn)
    return click.option(
        "--data-dir",
        envvar="HSM_DATA_DIR",
        type=click.Path(file_okay=False),
        help="Where passkeys.json lives (default: the key service lookup, docs/KEYSVC.md).",
    )(fn)


_PIN_OPTION = click.option(
    "--pin-source",
    help="The authenticator's PIN, if it has one: env:NAME | file:PATH | credential:NAME "
    "(default: a prompt on a terminal).",
)


@click.group("passkey")
def passkey() -> None:
    """Passkeys: register a FIDO2 credential and authenticate with it (verified, audited)."""


@passkey.command("generate")
@click.argument("name")
@click.option(
    "--rp-id", default=passkeys.DEFAULT_RP_ID, show_default=True, help="Relying party id."
)
@_PIN_OPTION
@_options
@guarded
def generate(
    name: str, rp_id: str, pin_source: str | None, data_dir: str | None, audit_log: str | None
) -> None:
    """Create a credential NAME on the first authenticator found (PC/SC, then USB) and store
    its public key after verifying the attestation."""
    say("Touch your authenticator if it blinks...", err=True)
    pk = passkeys.register(name, pin=_pin(pin_source), rp_id=rp_id, **_where(data_dir, audit_log))
    say(f"Passkey {name} registered (rp {pk.rp_id}, attestation {pk.attestation})")
    say(f"Credential ID: {pk.credential_id}")


@passkey.command("authenticate")
@click.argument("name")
@_PIN_OPTION
@_options
@guarded
def authenticate(
    name: str, pin_source: str | None, data_dir: str | None, audit_log: str | None
) -> None:
    """Ask the authenticator to sign a fresh challenge with NAME's credential; verify the
    signature against the stored public key and check the signature counter."""
    say("Touch your authenticator if it blinks...", err=True)
    pk = passkeys.authenticate(name, pin=_pin(pin_source), **_where(data_dir, audit_log))
    say(f"Passkey {name} authenticated (signature verified, counter {pk.sign_count})")


@passkey.command("list")
@_options
@output.options("json")
@guarded
def list_cmd(data_dir: str | None, audit_log: str | None) -> None:
    """The stored passkeys: name, RP id, counter, attestation."""
    d = _where(data_dir, audit_log)["data_dir"]  # the data dir every command finds
    if output.settings().json:  # public data only: a passkey's private key never leaves it
        output.emit_json([{"name": pk.name, **pk.to_json()} for pk in passkeys.list_passkeys(d)])
        return
    for pk in passkeys.list_passkeys(d):
        say(f"{pk.name}  {pk.rp_id}  counter {pk.sign_count}  {pk.attestation}")


def register(vhsm: click.Group) -> None:
    vhsm.add_command(passkey)
