"""Text for a human's terminal: every line the CLI prints goes through `shown()` (or `say()`).

Names come from places an attacker can write: file names stored as tokens, entries planted in
the raw store, key and user names recorded in the audit log (a denied socket client chooses
them), hardware descriptions. Printed raw, their control characters would drive the terminal
(ESC/OSC sequences retitle it, rewrite earlier lines, or on some terminals write files) and
CR/LF would forge output lines. So they are escaped, in the form of `ls -b`:

* control characters (C0, DEL, C1) as `\\xHH`, e.g. ESC as `\\x1b`, LF as `\\x0a`;
* bidirectional formatting characters (U+061C, U+200E/F, U+202A-U+202E, U+2066-U+2069) and the
  Unicode line and paragraph separators (U+2028/9) as `\\uHHHH`, so text cannot be shown
  reordered;
* bytes that are not UTF-8 (file names decoded with surrogateescape) as `\\xHH`;
* the backslash itself as `\\\\`, so the escaped form is unambiguous.

JSON and CSV output is data, not meant for a terminal: those encoders quote, and it stays exact.
"""

from __future__ import annotations

import re

import click

_UNSAFE = re.compile(
    "[\\\\\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    code = ord(c)
    if c == "\\":
        return "\\\\"
    if code < 0x100:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the byte the name really holds
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"


def shown(value: object) -> str:
    """`value` as one line of inert text (see the module docstring for the form)."""
    return _UNSAFE.sub(_escape, str(value))


def say(text: object = "", *, err: bool = False) -> None:
    """Print one line for a human (stdout, or stderr with err=True), escaped."""
    click.echo(shown(text), err=err)
