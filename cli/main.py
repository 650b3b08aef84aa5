"""The `vhsm` command: a click group that mounts each area's subcommands."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vhsm")
def vhsm() -> None:
    """vhsm: a virtual HSM (token store, vault mount, key service)."""


def _register() -> None:
    # Each area registers its own group; imported here so `vhsm --help` lists them all.
    from cli import token_cmds

    vhsm.add_command(token_cmds.token)
    from cli import key_cmds  # key service (keys, audit, user, keysvc, scan-hardware)

    key_cmds.register(vhsm)
    from cli import mount_cmds  # the FUSE mount

    mount_cmds.register(vhsm)
    from cli import passkey_cmds  # FIDO2 passkeys

    passkey_cmds.register(vhsm)
    from cli import agent_cmds  # `vhsm ssh-agent`

    agent_cmds.register(vhsm)


def main() -> None:
    _register()
    vhsm(prog_name="vhsm")


if __name__ == "__main__":
    main()
