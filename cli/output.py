"""Script-friendly output of `vhsm` commands, decided in one place (docs/KEYSVC.md "Output for
scripts"):

* `--json`: the command's result as one JSON object on stdout (keys documented, stable; ASCII
  only, so a name cannot drive a terminal), and nothing else on stdout;
* `-q/--quiet`: no confirmations (the lines a command prints besides its result);
* `-o FILE` never replaces an existing file without `--force` (the write itself follows
  keysvc.userfiles: a symlink to a file is refused even with `--force`).

The flags live in the click context of the running command (`ctx.meta`), so the shared `do_*`
functions of cli/key_cmds.py ask `settings()` instead of growing parameters. `hsm_enhanced`
runs without a click context and gets the defaults of the original tool: human text,
confirmations, and `-o` overwriting (users' scripts re-run it).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from cli.display import say
from keysvc import userfiles

F = TypeVar("F", bound=Callable[..., Any])
_META = "vhsm.output"


@dataclass(slots=True)
class Settings:
    json: bool = False
    quiet: bool = False
    force: bool = False
    vhsm: bool = False  # a `vhsm` command: -o refuses an existing file unless --force


def settings() -> Settings:
    """The output flags of the running command (defaults outside click: hsm_enhanced)."""
    c = click.get_current_context(silent=True)
    if c is None:
        return Settings()
    return c.meta.setdefault(_META, Settings(vhsm=True))  # type: ignore[no-any-return]


def _store(attr: str) -> Callable[[click.Context, click.Parameter, bool], None]:
    def callback(c: click.Context, _p: click.Parameter, value: bool) -> None:
        if value:
            setattr(settings(), attr, True)

    return callback


_HELP = {
    "json": "Print the result as one JSON object (for scripts).",
    "quiet": "Print nothing but the result (no confirmations).",
    "force": "Replace an existing -o file (never a symlink, even so).",
}


def _option(name: str) -> click.Option:
    decls = {"json": ["--json"], "quiet": ["-q", "--quiet"], "force": ["--force"]}[name]
    return click.Option(
        decls, is_flag=True, expose_value=False, callback=_store(name), help=_HELP[name]
    )


def options(*names: str) -> Callable[[F], F]:
    """Decorator: add the named flags ("json", "quiet", "force") to a command."""

    def deco(fn: F) -> F:
        params = getattr(fn, "__click_params__", None)
        if params is None:
            params = fn.__click_params__ = []  # type: ignore[attr-defined]
        params.extend(_option(n) for n in names)
        return fn

    return deco


def attach(cmd: click.Command, *names: str) -> None:
    """Add flags to a command defined elsewhere (without touching its code); a flag it
    already has is left alone."""
    have = {o for p in cmd.params for o in getattr(p, "opts", [])}
    for n in names:
        opt = _option(n)
        if not have.intersection(opt.opts):
            cmd.params.append(opt)


def emit_json(obj: Any) -> None:
    """The result for scripts: one JSON document, one line, on stdout."""
    click.echo(json.dumps(obj, ensure_ascii=True, allow_nan=False))


def note(text: str, *, err: bool = False) -> None:
    """A confirmation for people: left out with -q, and with --json (stdout is data then)."""
    s = settings()
    if s.quiet or (s.json and not err):
        return
    say(text, err=err)


def write_output(path: str | None, data: bytes, *, secret: bool = False) -> None:
    """`-o FILE` ('-' or none: stdout). A `vhsm` command refuses an existing file unless
    --force; hsm_enhanced overwrites it as the original tool did."""
    if path is None or path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    s = settings()
    userfiles.write_output(path, data, secret=secret, replace=s.force or not s.vhsm)


def check_new(path: str | None) -> None:
    """Refuse early, before the key service is asked for anything, an -o file that the write
    would refuse (an existing one without --force in a `vhsm` command, a symlink to a file,
    ...); the write checks again (keysvc.userfiles)."""
    if to_file(path):
        s = settings()
        userfiles.check_output(path, replace=s.force or not s.vhsm)  # type: ignore[arg-type]


def to_file(path: str | None) -> bool:
    """Whether `-o` names a file (not stdout)."""
    return bool(path) and path != "-"
