"""`vhsm key protector add|list|remove`: the protector slots of master.key.protected.

Printing only: keysvc.protectorslots unlocks, validates, writes and audits."""

from __future__ import annotations

import json
from typing import Any

import click

from cli.display import say
from cli.errors import guarded
from keysvc import protectorslots
from keysvc.client import Context


def _ctx(c: click.Context) -> Context:
    return c.find_object(Context)  # type: ignore[return-value]


@click.group("protector")
def protector() -> None:
    """Protector slots: any one of them unlocks the master key (like LUKS key slots)."""


@protector.command("add")
@click.argument("kind")
@click.option("--label", default="", help="A name for the slot (shown by list).")
@click.option("--tcti", help="tpm2: TCTI, e.g. swtpm:host=127.0.0.1,port=2321.")
@click.option("--pcrs", help="tpm2: seal to these PCRs (SHA-256 bank), e.g. 0,7.")
@click.option("--token-label", help="pkcs11: the token holding the wrapping key.")
@click.option("--module", help="pkcs11: the PKCS#11 module (.so) path.")
@click.option(
    "--pin-source",
    help="pkcs11, fido2-hmac-secret: env:NAME | file:PATH | credential:NAME (stored in the "
    "slot, so unlock needs no prompt).",
)
@click.option(
    "--remove-raw",
    is_flag=True,
    help="Delete a raw master.key once the protected file holds the key.",
)
@click.pass_context
@guarded
def add(c: click.Context, kind: str, label: str, remove_raw: bool, **opts: Any) -> None:
    """Add a slot of KIND (passphrase-argon2id, tpm2, pkcs11, fido2-hmac-secret).

    The master key is unlocked first: through an existing slot (HSM_MASTER_PASSPHRASE or a
    prompt), or a raw key (HSM_MASTER_KEY, master.key) when there is no protected file yet.
    The new passphrase comes from HSM_NEW_MASTER_PASSPHRASE or a prompt."""
    ctx = _ctx(c)
    params = {k: v for k, v in opts.items() if v is not None}
    if "pcrs" in params:
        params["pcrs"] = protectorslots.parse_pcrs(params["pcrs"])
    protectorslots.validate_label(label)
    # the new protector first: an unknown or unavailable kind fails before any unlock prompt
    prot = protectorslots.build(kind, params, protectorslots.new_secret_source())
    unlocked = protectorslots.unlock_for_change(
        ctx.data_dir, ctx.master_key_hex, audit_log=ctx.audit_log, user=ctx.user
    )
    slot = protectorslots.add_slot(
        ctx.data_dir,
        unlocked,
        prot,
        params=params,
        label=label,
        audit_log=ctx.audit_log,
        user=ctx.user,
        remove_raw=remove_raw,
    )
    say(f"Protector slot {slot.id} added ({slot.kind})")


@protector.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
@click.pass_context
@guarded
def list_slots(c: click.Context, as_json: bool) -> None:
    """The slots: id, kind, label, when added (never anything sealed)."""
    sf = protectorslots.read_slots(_ctx(c).data_dir)
    slots = [] if sf is None else [s.public() for s in sf.slots]
    if as_json:
        click.echo(json.dumps(slots))
        return
    if sf is None:
        say("no master.key.protected: no protector slots")
        return
    if sf.version == 1:
        say("(version 1 file: becomes version 2 on the first change)", err=True)
    for s in slots:
        added = protectorslots.fmt_added(s["added"])
        say(f"{s['id']:>3}  {s['kind']:<20} {added:<19}  {s['label']}")


@protector.command("remove")
@click.argument("slot_id", metavar="ID", type=int)
@click.pass_context
@guarded
def remove(c: click.Context, slot_id: int) -> None:
    """Remove slot ID (after unlocking the master key; the last slot is never removed)."""
    ctx = _ctx(c)
    unlocked = protectorslots.unlock_for_change(
        ctx.data_dir, ctx.master_key_hex, audit_log=ctx.audit_log, user=ctx.user
    )
    slot = protectorslots.remove_slot(
        ctx.data_dir, unlocked, slot_id, audit_log=ctx.audit_log, user=ctx.user
    )
    say(f"Protector slot {slot.id} removed ({slot.kind})")
