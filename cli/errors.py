"""One place that turns library errors into a one-line message and an exit status."""

from __future__ import annotations

import contextlib
import errno
import sys
from collections.abc import Iterator

import click

from keysvc.errors import KeysvcError
from vhsmfs.errors import VhsmError


@contextlib.contextmanager
def run_guarded() -> Iterator[None]:
    """Run a command body: VhsmError -> `Error: <message>` on stderr and its exit code;
    an unexpected OSError -> its one-line description; Ctrl-C -> 130. No tracebacks."""
    try:
        yield
    except (VhsmError, KeysvcError) as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("Error: interrupted", err=True)
        sys.exit(130)
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        reason = "no space left on device" if e.errno == errno.ENOSPC else e.strerror or str(e)
        click.echo(f"Error: {reason}{where}", err=True)
        sys.exit(1)
