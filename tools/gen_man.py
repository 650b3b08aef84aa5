"""Write man pages (roff, section 1) generated from the click commands: `make man`.

    python tools/gen_man.py OUTDIR

One page per command group: vhsm.1, vhsm-token.1, vhsm-key.1, vhsm-key-protector.1, ...; each
documents its own commands (usage, help text, options) and names its subgroups' pages, plus
hsm_enhanced.1 from that tool's usage text. Generated from the same objects that parse the
command line, so a page never lists an option the command lacks. No dependency beyond click
(click-man would do the same, at one page per command and one more package).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import re
import sys
from pathlib import Path

import click

SOURCE_DATE = datetime.date(2026, 1, 1)  # pages do not change with the day they are built


def _esc(text: str) -> str:
    """Text safe inside roff: backslashes and hyphens escaped, no line starting with a
    control character ('.' or "'")."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + ln if ln.startswith((".", "'")) else ln) for ln in text.splitlines())


def _paragraphs(text: str) -> list[str]:
    text = click.unstyle(text or "").replace("\b\n", "")
    return [re.sub(r"\s*\n\s*", " ", p.strip()) for p in text.split("\n\n") if p.strip()]


def _options(cmd: click.Command, ctx: click.Context) -> list[str]:
    out: list[str] = []
    for param in cmd.get_params(ctx):
        if isinstance(param, click.Argument):  # named in the usage line already
            continue
        rec = param.get_help_record(ctx)
        if rec is None:
            continue
        names, help_text = rec
        out += [".TP", f"\\fB{_esc(names)}\\fR", _esc(help_text) if help_text else ""]
    return out


def _command_section(name: str, cmd: click.Command, ctx: click.Context) -> list[str]:
    usage = " ".join(cmd.collect_usage_pieces(ctx))
    out = [f'.SS "{_esc(name)}"', f"\\fB{_esc(name)}\\fR {_esc(usage)}", ".PP"]
    for p in _paragraphs(cmd.help or cmd.short_help or ""):
        out += [_esc(p), ".PP"]
    opts = _options(cmd, ctx)
    if opts:
        out += [".RS", *opts, ".RE"]
    return out


def _page_name(path: list[str]) -> str:
    return "-".join(path)


def _header(path: list[str], summary: str, version: str) -> list[str]:
    title = _page_name(path).upper()
    return [
        f'.TH "{_esc(title)}" "1" "{SOURCE_DATE.isoformat()}" "vhsm {version}" "vhsm manual"',
        ".SH NAME",
        f"{_esc(_page_name(path))} \\- {_esc(summary)}",
    ]


def group_page(path: list[str], group: click.Group, ctx: click.Context, version: str) -> str:
    paras = _paragraphs(group.help or "")
    summary = paras[0].rstrip(".") if paras else " ".join(path)
    out = _header(path, summary, version)
    out += [".SH SYNOPSIS", f"\\fB{_esc(' '.join(path))}\\fR COMMAND [ARGS]..."]
    out += [".SH DESCRIPTION"]
    for p in paras:
        out += [_esc(p), ".PP"]
    opts = _options(group, ctx)
    if opts:
        out += [".SH OPTIONS", *opts]
    leaves, groups = [], []
    for name in group.list_commands(ctx):
        sub = group.get_command(ctx, name)
        if sub is None or sub.hidden:
            continue
        (groups if isinstance(sub, click.Group) else leaves).append((name, sub))
    if leaves:
        out.append(".SH COMMANDS")
        for name, sub in leaves:
            sub_ctx = click.Context(sub, info_name=name, parent=ctx)
            out += _command_section(" ".join([*path, name]), sub, sub_ctx)
    see = [f"\\fB{_esc(_page_name([*path, name]))}\\fR(1)" for name, _ in groups]
    if groups:
        out.append(".SH COMMAND GROUPS")
        for name, sub in groups:
            out += [".TP", f"\\fB{_esc(' '.join([*path, name]))}\\fR"]
            out.append(_esc(sub.get_short_help_str(limit=200)) + f" See {see.pop(0)}.")
    if len(path) > 1:
        out += [".SH SEE ALSO", f"\\fB{_esc(_page_name(path[:-1]))}\\fR(1)"]
    return "\n".join(out) + "\n"


def compat_page(version: str) -> str:
    from cli import compat

    out = _header(["hsm_enhanced"], "the original Virtual HSM tool's command syntax", version)
    out += [".SH SYNOPSIS", "\\fBhsm_enhanced\\fR [\\-master_key HEX] COMMAND [options]"]
    out += [".SH DESCRIPTION"]
    for p in _paragraphs(compat.__doc__ or ""):
        out += [_esc(p), ".PP"]
    out += [".SH USAGE", ".nf", _esc(compat.USAGE.rstrip()), ".fi"]
    out += [".SH SEE ALSO", "\\fBvhsm\\fR(1), \\fBvhsm\\-key\\fR(1)"]
    return "\n".join(out) + "\n"


def generate(outdir: Path) -> list[Path]:
    from cli import main as cli_main

    cli_main._register()
    try:
        version = importlib.metadata.version("vhsm")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout without install
        version = "dev"
    outdir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def walk(path: list[str], group: click.Group, parent: click.Context | None) -> None:
        ctx = click.Context(group, info_name=path[-1], parent=parent)
        target = outdir / f"{_page_name(path)}.1"
        target.write_text(group_page(path, group, ctx, version))
        written.append(target)
        for name in group.list_commands(ctx):
            sub = group.get_command(ctx, name)
            if isinstance(sub, click.Group) and not sub.hidden:
                walk([*path, name], sub, ctx)

    walk(["vhsm"], cli_main.vhsm, None)
    target = outdir / "hsm_enhanced.1"
    target.write_text(compat_page(version))
    written.append(target)
    return written


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: gen_man.py OUTDIR")
    for path in generate(Path(sys.argv[1])):
        print(path)


if __name__ == "__main__":
    main()
