"""Shell completion of key names and token ids (click's `shell_complete=` callbacks).

Enable it with `eval "$(_VHSM_COMPLETE=bash_source vhsm)"` (zsh_source, fish_source likewise;
README "Install"). Completion runs on every <TAB>, so these callbacks never prompt, never wait
long and never print: anything that goes wrong gives no candidates.

* Key names come from the running key service, found as the command would find it
  (keysvc.discovery), through its `list` operation, which names only keys the caller may use.
  Without a daemon there are none: listing keys in-process would need the master key, which
  may mean a passphrase prompt or a hardware touch.
* Token ids are the names of the store's metadata files, read without the key (as
  `vhsm token list` without --key does).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import click
from click.shell_completion import CompletionItem

# A daemon that accepts the connection but does not answer within this must not freeze the
# shell: the user pressed <TAB> and is waiting.
DAEMON_TIMEOUT = 0.5


def _param(ctx: click.Context | None, name: str) -> object:
    """`name` as parsed so far on this command or any parent (`vhsm key --socket S sign`)."""
    while ctx is not None:
        value = ctx.params.get(name)
        if value is not None:
            return value
        ctx = ctx.parent
    return None


def _key_names(ctx: click.Context) -> list[str]:
    from keysvc import discovery
    from keysvc.client import DaemonClient

    data_dir = _param(ctx, "data_dir")
    sock = _param(ctx, "socket_path")
    # the same sockets, in the same order, as the command itself would try
    lookup = discovery.resolve(str(data_dir) if data_dir else None, str(sock) if sock else None)
    for candidate in lookup.sockets:
        try:
            client = DaemonClient(candidate.path, timeout=DAEMON_TIMEOUT)
        except OSError:  # not there, stale, or not ours to open: the next one
            continue
        with client:
            reply, _ = client.call({"op": "list"})
        keys = reply.get("keys") if reply.get("ok") else None
        return [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []
    return []


def _token_ids(ctx: click.Context) -> list[str]:
    from cli.keyopts import DEFAULT_STORE
    from vhsmfs.backend import LocalBackend

    store = _param(ctx, "store_dir") or os.environ.get("VHSM_STORE") or DEFAULT_STORE
    if not os.path.isdir(str(store)):  # never create a store by pressing <TAB>
        return []
    return [str(t) for t in LocalBackend(str(store), create=False).token_ids()]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No exception escapes to the shell (click would print a traceback into the prompt)."""
    try:
        yield
    except Exception:  # noqa: S110  (completion has nowhere to report anything)
        pass


def complete_key_names(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    names: list[str] = []
    with _quiet():
        names = _key_names(ctx)
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]


def complete_token_ids(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    ids: list[str] = []
    with _quiet():
        ids = _token_ids(ctx)
    already = (
        set(ctx.params.get(param.name or "") or ()) if param.multiple or param.nargs != 1 else set()
    )
    return [CompletionItem(t) for t in ids if t.startswith(incomplete) and t not in already]
