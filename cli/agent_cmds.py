"""`vhsm ssh-agent`: an ssh-agent whose keys live in the key service (keysvc.agentserver).

Used like OpenSSH's ssh-agent: `eval "$(vhsm ssh-agent)"` starts it in the background and sets
SSH_AUTH_SOCK and SSH_AGENT_PID; `-D` stays in the foreground; `-k` stops the agent named by
SSH_AGENT_PID.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
from pathlib import Path

import click

from cli.display import say
from cli.errors import fail, guarded
from keysvc import agentserver, sockpath
from keysvc.client import Context, find_daemon, where_looked


def _env_lines(sock: Path, pid: int, csh: bool) -> str:
    q = shlex.quote(str(sock))
    if csh:
        return f"setenv SSH_AUTH_SOCK {q};\nsetenv SSH_AGENT_PID {pid};\necho Agent pid {pid};\n"
    return (
        f"SSH_AUTH_SOCK={q}; export SSH_AUTH_SOCK;\n"
        f"SSH_AGENT_PID={pid}; export SSH_AGENT_PID;\n"
        f"echo Agent pid {pid};\n"
    )


def _kill(csh: bool) -> None:
    raw = os.environ.get("SSH_AGENT_PID", "")
    if not raw.isdigit() or int(raw) < 2:
        fail("SSH_AGENT_PID is not set or not a process id")
    pid = int(raw)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        fail(f"no agent with pid {pid}")
    # never signal a process that is not an agent (a stale SSH_AGENT_PID may be reused)
    if b"ssh-agent" not in cmdline:
        fail(f"process {pid} is not an ssh-agent")
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError as e:
        fail(f"cannot stop agent pid {pid}: {e.strerror}")
    if csh:
        sys.stdout.write("unsetenv SSH_AUTH_SOCK;\nunsetenv SSH_AGENT_PID;\n")
    else:
        sys.stdout.write("unset SSH_AUTH_SOCK;\nunset SSH_AGENT_PID;\n")
    sys.stdout.write(f"echo Agent pid {pid} killed;\n")


def _detach() -> None:
    """The child's side of the fork: its own session, no terminal, cwd /."""
    os.setsid()
    os.chdir("/")
    fd = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(fd, target)
    os.close(fd)


@click.command("ssh-agent")
@click.option("-a", "bind_address", type=click.Path(dir_okay=False), help="Agent socket path.")
@click.option("-D", "foreground", is_flag=True, help="Stay in the foreground.")
@click.option("-d", "debug", is_flag=True, help="Foreground, and log refusals to stderr.")
@click.option("-s", "sh", is_flag=True, help="Print sh commands (default unless $SHELL is csh).")
@click.option("-c", "csh", is_flag=True, help="Print csh commands.")
@click.option("-k", "kill", is_flag=True, help="Stop the agent named by $SSH_AGENT_PID.")
@click.option("--data-dir", envvar="HSM_DATA_DIR", type=click.Path(file_okay=False))
@click.option(
    "--socket",
    "socket_path",
    envvar="HSM_SOCKET",
    type=click.Path(dir_okay=False),
    help="The key service daemon's socket.",
)
@guarded
def ssh_agent(
    bind_address: str | None,
    foreground: bool,
    debug: bool,
    sh: bool,
    csh: bool,
    kill: bool,
    data_dir: str | None,
    socket_path: str | None,
) -> None:
    """An ssh-agent offering the keys marked --ssh that the key service lets you sign with.

    It holds no keys: every signature is made by the daemon (`vhsm keysvc serve`), under its
    policy, lifecycle and audit log. Adding, removing, locking keys is refused."""
    if sh and csh:
        fail("-s and -c exclude each other")
    if not sh and not csh:
        csh = os.environ.get("SHELL", "").endswith("csh")
    if kill:
        _kill(csh)
        return
    ctx = Context(data_dir=data_dir, socket_path=socket_path)
    found, tried = find_daemon(ctx.lookup)  # the CLI's own lookup, so the agent finds the same
    if found is None:
        say(
            "Warning: the key service is not running "
            f"({where_looked(ctx.lookup, tried)}): the agent offers no keys until it does",
            err=True,
        )
    else:
        found.close()
    made_dir: Path | None = None
    if bind_address:
        path = Path(bind_address).absolute()
    else:
        made_dir = agentserver.default_socket_dir()
        path = made_dir / f"agent.{os.getpid()}"
    try:
        listener, ident = sockpath.bind(path, 0o600)
    except BaseException:
        if made_dir is not None:
            os.rmdir(made_dir)
        raise
    listener.listen(128)
    backend = agentserver.DaemonBackend(ctx.lookup, ctx.user)
    if foreground or debug:
        sys.stdout.write(_env_lines(path, os.getpid(), csh))
        sys.stdout.flush()
    else:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            # the parent reports the child and leaves; the child owns the socket from now on
            sys.stdout.write(_env_lines(path, pid, csh))
            sys.stdout.flush()
            os._exit(0)
        _detach()
    try:
        agentserver.serve(listener, backend, debug=debug)
    finally:
        listener.close()
        sockpath.remove(path, ident)
        if made_dir is not None:
            with contextlib.suppress(OSError):
                os.rmdir(made_dir)


def register(vhsm: click.Group) -> None:
    vhsm.add_command(ssh_agent)
