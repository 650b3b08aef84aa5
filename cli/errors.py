"""One place that turns failures into a one-line message and an exit status.

Every command body runs under `run_guarded()` (or the `guarded` decorator): library errors,
unexpected OSErrors and Ctrl-C become one escaped `Error: ...` line on stderr (cli/display.py:
a name inside a message cannot add a line or drive the terminal) and a non-zero exit, never a
traceback. A reader that went away (`vhsm ... | head -1`) ends the command quietly, as coreutils
do: no message, exit status 141 (128 + SIGPIPE, what a shell reports for `cat` in the same
place), while a broken socket to the key service is still a clear error.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import select
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

from cli.display import say
from keysvc.errors import KeysvcError
from vhsmfs.errors import VhsmError

F = TypeVar("F", bound=Callable[..., Any])
EXIT_PIPE = 141  # 128 + SIGPIPE


def fail(e: BaseException | str, code: int = 1) -> NoReturn:
    """`Error: <message>` (one escaped line) on stderr, then exit with the error's code."""
    msg = str(e) or type(e).__name__
    with contextlib.suppress(OSError):  # stderr itself may be a closed pipe
        say(f"Error: {msg}", err=True)
    sys.exit(getattr(e, "exit_code", code))


def _stdout_closed() -> bool:
    """Our stdout is a pipe or socket nobody reads any more (the kernel reports POLLERR or
    POLLHUP for its write end): then an EPIPE came from it, not from a socket we opened."""
    try:
        p = select.poll()
        p.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))
    except (OSError, ValueError):
        return False


def exit_if_stdout_closed(e: OSError) -> None:
    """Exit quietly (status 141) when `e` is the EPIPE of a stdout nobody reads."""
    if e.errno != errno.EPIPE or not _stdout_closed():
        return
    # What is still buffered for stdout would fail again at exit ("Exception ignored ..."):
    # point fd 1 at /dev/null so the interpreter's last flush succeeds.
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    sys.exit(EXIT_PIPE)


@contextlib.contextmanager
def run_guarded() -> Iterator[None]:
    """Run a command body: VhsmError/KeysvcError -> `Error: <message>` on stderr and its exit
    code; an unexpected OSError -> its one-line description; Ctrl-C -> 130; a closed stdout ->
    quiet exit 141. No tracebacks."""
    try:
        yield
    except (VhsmError, KeysvcError) as e:
        fail(e)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except OSError as e:
        exit_if_stdout_closed(e)
        where = f": {e.filename}" if e.filename else ""
        reason = "no space left on device" if e.errno == errno.ENOSPC else e.strerror or str(e)
        fail(f"{reason}{where}")


def guarded(fn: F) -> F:
    """`run_guarded()` as a decorator for click commands."""

    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        with run_guarded():
            return fn(*a, **kw)

    return wrapper  # type: ignore[return-value]
