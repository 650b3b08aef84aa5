"""The options shared by `vhsm token` and `vhsm mount`: `--store DIR`, and `--key FILE` or
`--key-service [NAME]` with the key provider they select (vhsmfs.keyfile.KeyProvider)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from vhsmfs.errors import VhsmError
from vhsmfs.keyfile import KeyProvider, StaticKeyProvider, load_key_file

DEFAULT_STORE = "secure_storage"  # the addendum's ./secure_storage

store_option = click.option(
    "--store",
    "store_dir",
    envvar="VHSM_STORE",
    default=DEFAULT_STORE,
    show_default=True,
    type=click.Path(file_okay=False),
    help="Store directory (env VHSM_STORE).",
)

ANY_KEY = "*"  # --key-service without a name: use whichever key each token names


def key_option(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--key-service",
        "key_service",
        is_flag=False,
        flag_value=ANY_KEY,
        default=None,
        metavar="[NAME]",
        help="Use the key service: each token's data key is wrapped by the AES key NAME "
        "(new tokens need NAME; reading uses the key recorded in the token).",
    )(f)
    return click.option(
        "--key",
        "key_file",
        type=click.Path(dir_okay=False),
        default=None,
        help="Key file (32 raw bytes, mode 0600).",
    )(f)


def provider(key_file: str | None, key_service: str | None) -> KeyProvider | None:
    """The provider the options ask for; None when neither was given."""
    if key_file and key_service:
        raise VhsmError("--key and --key-service exclude each other")
    if key_service:
        from keysvc.tokenkeys import KeyServiceTokenKeys  # the key service only when asked

        return KeyServiceTokenKeys(key_service)
    return StaticKeyProvider(load_key_file(key_file)) if key_file else None
