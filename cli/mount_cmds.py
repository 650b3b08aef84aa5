"""`vhsm mount` and `vhsm umount`: the vault as an ordinary folder (docs/MOUNT.md).
Parsing and printing only; the work is in vhsmfs.mount."""

from __future__ import annotations

import click

from cli.errors import run_guarded

DEFAULT_STORE = "secure_storage"  # same default as `vhsm token`


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--store", "store_dir", envvar="VHSM_STORE", default=DEFAULT_STORE,
              show_default=True, type=click.Path(file_okay=False),
              help="Store directory (env VHSM_STORE).")
@click.option("--key", "key_file", type=click.Path(dir_okay=False), default=None,
              help="Key file (32 raw bytes, mode 0600).")
@click.option("--key-service", is_flag=True, help="Get token keys from the key service.")
@click.option("--background", is_flag=True,
              help="Detach once the mount is ready (prints the mount process id).")
@click.option("--allow-other", is_flag=True,
              help="Let other users in (modes still apply; needs user_allow_other).")
@click.option("--chunk-size", type=click.IntRange(512, 16 * 1024 * 1024), default=None,
              help="Chunk size of files created through the mount "
                   "(default: TOKEN_CHUNK_SIZE if set, else 64 KiB).")
@click.option("--log", "log_file", type=click.Path(dir_okay=False), default=None,
              help="With --background: append the mount's log here.")
def mount(mountpoint: str, store_dir: str, key_file: str | None, key_service: bool,
          background: bool, allow_other: bool, chunk_size: int | None,
          log_file: str | None) -> None:
    """Mount the vault at MOUNTPOINT: one directory per token, plus the files you put there."""
    import logging

    from vhsmfs.mount import runner

    with run_guarded():
        if key_file and key_service:
            raise click.UsageError("use either --key or --key-service")
        if background:
            pid = runner.start_background(store_dir, mountpoint, key_file, key_service,
                                          allow_other=allow_other, log_file=log_file,
                                          chunk_size=chunk_size)
            click.echo(f"Mounted {store_dir} at {mountpoint} (pid {pid})")
            return
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s vhsm-mount %(levelname)s %(message)s")
        keys = runner.key_provider(key_file, key_service)
        runner.run(store_dir, mountpoint, keys, allow_other=allow_other, chunk_size=chunk_size)


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("-z", "--lazy", is_flag=True, help="Detach even if files are still open.")
def umount(mountpoint: str, lazy: bool) -> None:
    """Unmount a vault; waits until the mount process has published everything."""
    from vhsmfs.mount import runner

    with run_guarded():
        runner.unmount(mountpoint, lazy=lazy)
        click.echo(f"Unmounted {mountpoint}")


def register(group: click.Group) -> None:
    group.add_command(mount)
    group.add_command(umount)
