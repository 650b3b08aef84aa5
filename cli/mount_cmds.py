"""`vhsm mount` and `vhsm umount`: the vault as an ordinary folder (docs/MOUNT.md).
Parsing and printing only; the work is in vhsmfs.mount."""

from __future__ import annotations

import os
import sys

import click

from cli.display import say
from cli.errors import run_guarded
from cli.keyopts import ANY_KEY, key_option, provider, store_option
from keysvc.errors import KeysvcError
from vhsmfs.errors import VhsmError


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@store_option
@key_option
@click.option(
    "--background",
    is_flag=True,
    help="Detach once the mount is ready (prints the mount process id).",
)
@click.option(
    "--allow-other",
    is_flag=True,
    help="Let other users in (modes still apply; needs user_allow_other).",
)
@click.option(
    "--chunk-size",
    type=click.IntRange(512, 16 * 1024 * 1024),
    default=None,
    help="Chunk size of files created through the mount "
    "(default: TOKEN_CHUNK_SIZE if set, else 64 KiB).",
)
@click.option(
    "--log",
    "log_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="With --background: append the mount's log here.",
)
@click.option(
    "--debug",
    is_flag=True,
    help="Debug log, with file names in it (plaintext: keep that log private).",
)
@click.option(
    "--mlock/--no-mlock",
    default=True,
    show_default=True,
    help="Lock the mount's memory (keys, plaintext) so it is never swapped.",
)
@click.option(
    "--no-harden",
    is_flag=True,
    help="Allow core dumps and ptrace, no memory locking (debugging only).",
)
@click.option(
    "--ready-fd",
    type=int,
    default=None,
    hidden=True,
    help="(internal) pipe on which the detached mount reports readiness.",
)
def mount(
    mountpoint: str,
    store_dir: str,
    key_file: str | None,
    key_service: str | None,
    background: bool,
    allow_other: bool,
    chunk_size: int | None,
    log_file: str | None,
    debug: bool,
    mlock: bool,
    no_harden: bool,
    ready_fd: int | None,
) -> None:
    """Mount the vault at MOUNTPOINT: one directory per token, plus the files you put there."""
    import logging

    from keysvc import hardening
    from vhsmfs.mount import fusebuild

    with run_guarded():
        if not fusebuild.available():
            raise VhsmError(fusebuild.INSTALL_HINT)
        from vhsmfs.mount import runner

        is_patched, build = fusebuild.describe()
        # Before the key is loaded. The detached parent only starts the child: no mlock there.
        # MCL_ONFAULT: thread stacks and other memory mapped but never touched stay unlocked
        # and not resident (docs/MOUNT.md, "Hardening": +85 MiB peak RSS without it)
        lock = mlock and not background
        warnings = [] if no_harden else hardening.harden(lock=lock, on_fault=True)
        if key_service == ANY_KEY:
            raise VhsmError("mount --key-service needs the name of an AES key (for new files)")
        keys = provider(key_file, key_service)  # fails early, in the caller's terminal
        if keys is None:
            raise VhsmError("the mount needs a key: --key FILE or --key-service NAME")
        if background:
            # the child is this command in the foreground: same logging and hardening choices
            same = ["--debug"] * debug + ["--no-mlock"] * (not mlock) + ["--no-harden"] * no_harden
            pid = runner.start_background(
                _child_argv(mountpoint, store_dir, key_file, key_service, allow_other, chunk_size)
                + same,
                mountpoint,
                log_file=log_file,
                env=_child_env(key_service),
            )
            say(f"Mounted {store_dir} at {mountpoint} (pid {pid})")
            if not is_patched:  # the child logs it too, but its log may go nowhere
                say(f"Note: {build}", err=True)
            return
        logging.basicConfig(
            level=logging.DEBUG if debug else logging.INFO,
            format="%(asctime)s vhsm-mount %(levelname)s %(message)s",
        )
        mount_log = logging.getLogger("vhsm.mount")
        if is_patched:
            mount_log.info("%s", build)
        else:
            mount_log.warning("%s", build)
        for w in warnings:
            mount_log.warning("%s", w)
        try:
            runner.run(
                store_dir,
                mountpoint,
                keys,
                allow_other=allow_other,
                ready=ready_fd,
                chunk_size=chunk_size,
            )
        except KeysvcError as e:  # run() itself reports VhsmError on the pipe
            runner.report_ready(ready_fd, f"error: {e}")
            raise


def _child_argv(
    mountpoint: str,
    store_dir: str,
    key_file: str | None,
    key_service: str | None,
    allow_other: bool,
    chunk_size: int | None,
) -> list[str]:
    """The detached mount is this same command in the foreground, so that the key provider is
    built here in the CLI (vhsmfs never imports the key service)."""
    argv = [
        sys.executable,
        "-m",
        "cli.main",
        "mount",
        os.path.abspath(mountpoint),
        "--store",
        os.path.abspath(store_dir),
    ]
    if key_file:
        argv += ["--key", os.path.abspath(key_file)]
    if key_service:
        argv += ["--key-service", key_service]
    if allow_other:
        argv.append("--allow-other")
    if chunk_size:
        argv += ["--chunk-size", str(chunk_size)]
    return argv


def _child_env(key_service: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if key_service and "HSM_DATA_DIR" not in env:
        # the detached process runs in /; the key service's files are found from here
        env["HSM_DATA_DIR"] = os.getcwd()
    return env


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("-z", "--lazy", is_flag=True, help="Detach even if files are still open.")
def umount(mountpoint: str, lazy: bool) -> None:
    """Unmount a vault; waits until the mount process has published everything."""
    from vhsmfs.mount import fusebuild

    with run_guarded():
        if not fusebuild.available():
            raise VhsmError(fusebuild.INSTALL_HINT)
        from vhsmfs.mount import runner

        pid = runner.unmount(mountpoint, lazy=lazy, notice=lambda m: say(m, err=True))
        if pid is None:
            say(f"Unmounted {mountpoint}")
        elif lazy:
            say(
                f"Detached {mountpoint}; the mount process (pid {pid}) publishes the files "
                "still open as they are closed, then exits"
            )
        else:
            raise click.ClickException(
                f"unmounted {mountpoint}, but the mount process (pid {pid}) has not exited "
                "yet; its pending data is published when it does"
            )


def register(group: click.Group) -> None:
    group.add_command(mount)
    group.add_command(umount)
