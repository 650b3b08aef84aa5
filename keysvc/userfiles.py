"""Files the user names on the command line: `-i FILE` inputs and `-o FILE` outputs of
`vhsm key ...`, `vhsm audit export` and `hsm_enhanced` (docs/KEYSVC.md "Input and output files").

vhsm often runs as root, so `-o PATH` must never destroy what is at PATH when that is not an
ordinary file (replacing /dev/null by rename used to do just that). The rule, decided once here:

* PATH missing: created atomically (O_EXCL temp file in the same directory, fsync, rename).
* PATH a regular file (not a symlink): replaced atomically, keeping its permission bits and, for
  root, its owner, as the overwrite of the original tool did. Scripts rely on overwriting.
* PATH a character device or a FIFO, reached directly or through a symlink (/dev/null,
  /dev/stdout, a named pipe): written through, opened O_WRONLY|O_NOCTTY without O_CREAT, never
  replaced. A symlink to the file that is already our stdout or stderr (`-o /dev/stdout >file`)
  is written through that descriptor.
* anything else (a symlink to a regular file, a directory or nothing, a directory, a block
  device, a socket): refused with one line.

With `replace=False` (what `vhsm` commands pass unless `--force`), an existing regular file is
refused instead of replaced, and a new file is published with link(2), which never replaces a
file created meanwhile. Devices and FIFOs are still written through (`-o /dev/stdout`).

Secret outputs (decrypt, unwrap, data keys) are 0600. Inputs may be anything readable, FIFOs and
/dev/stdin included (users pipe data), but are read only up to MAX_INPUT bytes.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys

from keysvc.errors import InvalidInputError
from keysvc.protocol import MAX_PAYLOAD
from keysvc.safefs import kind, publish_new, read_at_most, rename_over, write_all, write_temp

# The daemon protocol's payload limit: more could not be sent to the daemon, so it is refused
# before it is all read into memory.
MAX_INPUT = MAX_PAYLOAD


def read_input(path: str, *, limit: int = MAX_INPUT) -> bytes:
    """The contents of `path` ('-' = stdin), refused beyond `limit` bytes."""
    if path == "-":
        return _bounded(sys.stdin.fileno(), "standard input", limit)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidInputError(f"cannot read {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_size > limit:
            raise _too_large(path, limit)
        return _bounded(fd, path, limit)
    finally:
        os.close(fd)


def _bounded(fd: int, name: str, limit: int) -> bytes:
    try:
        data = read_at_most(fd, limit)
    except OSError as e:
        raise InvalidInputError(f"cannot read {name}: {e.strerror}") from None
    if len(data) > limit:
        raise _too_large(name, limit)
    return data


def _too_large(name: str, limit: int) -> InvalidInputError:
    return InvalidInputError(f"input {name} is larger than the {limit >> 20} MiB limit")


def write_output(path: str, data: bytes, *, secret: bool = False, replace: bool = True) -> None:
    """Write `data` to the file the user named, by the rule in the module docstring;
    `replace=False`: an existing regular file is refused, not replaced."""
    parent, name = os.path.split(path)
    if name in ("", ".", ".."):
        raise InvalidInputError(f"output {path} is a directory; refusing to write it")
    try:
        dir_fd = os.open(parent or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidInputError(f"cannot write {path}: {e.strerror}") from None
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    except OSError as e:
        os.close(dir_fd)
        raise InvalidInputError(f"cannot write {path}: {e.strerror}") from None
    try:
        if st is not None and stat.S_ISREG(st.st_mode) and not replace:
            raise InvalidInputError(f"output {path} already exists (use --force to replace it)")
        if st is None and not replace:
            _create(dir_fd, name, path, data, secret)
        elif st is None or stat.S_ISREG(st.st_mode):
            _replace(dir_fd, name, path, data, st, secret)
        else:
            _write_through(dir_fd, name, path, data, st)
    except OSError as e:
        raise InvalidInputError(f"cannot write {path}: {e.strerror}") from None
    finally:
        os.close(dir_fd)


def check_output(path: str, *, replace: bool = True) -> None:
    """Refuse now what write_output(path, replace=replace) would refuse, without writing: for
    commands that should fail before they ask the key service for anything (the write checks
    again, so a change in between is still caught)."""
    parent, name = os.path.split(path)
    if name in ("", ".", ".."):
        raise InvalidInputError(f"output {path} is a directory; refusing to write it")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not os.path.isdir(parent or "."):
            raise InvalidInputError(f"cannot write {path}: No such file or directory") from None
        return
    except OSError as e:
        raise InvalidInputError(f"cannot write {path}: {e.strerror}") from None
    if stat.S_ISREG(st.st_mode):
        if not replace:
            raise InvalidInputError(f"output {path} already exists (use --force to replace it)")
        return
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.stat(path)
        except OSError:
            raise InvalidInputError(
                f"output {path} is a symbolic link to a missing file; refusing to write it"
            ) from None
        if _std_fd(target) is None and not _writable_through(target.st_mode):
            raise InvalidInputError(
                f"output {path} is a symbolic link to {kind(target.st_mode)}; "
                "refusing to write it (name the file itself)"
            )
    elif not _writable_through(st.st_mode):
        raise _refused(path, st.st_mode)


def _create(dir_fd: int, name: str, path: str, data: bytes, secret: bool) -> None:
    tmp = write_temp(dir_fd, name, data, 0o600 if secret else 0o644)
    try:
        publish_new(dir_fd, tmp, name)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        if isinstance(e, FileExistsError):
            raise InvalidInputError(
                f"output {path} already exists (use --force to replace it)"
            ) from None
        raise


def _replace(
    dir_fd: int, name: str, path: str, data: bytes, old: os.stat_result | None, secret: bool
) -> None:
    owner = None
    if old is None:
        tmp = write_temp(dir_fd, name, data, 0o600 if secret else 0o644)
    else:
        if os.geteuid() == 0 and old.st_uid != 0:
            owner = (old.st_uid, old.st_gid)  # an overwrite would have kept the owner
        mode = stat.S_IMODE(old.st_mode) & (0o600 if secret else 0o777)
        tmp = write_temp(dir_fd, name, data, mode, owner, exact_mode=True)

    def accept(st: os.stat_result) -> None:
        # missing or a regular file a moment ago: never rename over anything else
        if not stat.S_ISREG(st.st_mode):
            raise _refused(path, st.st_mode)

    try:
        rename_over(dir_fd, tmp, name, accept)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def _write_through(dir_fd: int, name: str, path: str, data: bytes, st: os.stat_result) -> None:
    """Devices and FIFOs are written, never replaced; a symlink only when it leads to one (or
    to the file that is already our stdout or stderr)."""
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.stat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            raise InvalidInputError(
                f"output {path} is a symbolic link to a missing file; refusing to write it"
            ) from None
        std = _std_fd(target)
        if std is not None:
            write_all(std, data)
            return
        if not _writable_through(target.st_mode):
            raise InvalidInputError(
                f"output {path} is a symbolic link to {kind(target.st_mode)}; "
                "refusing to write it (name the file itself)"
            )
    elif not _writable_through(st.st_mode):
        raise _refused(path, st.st_mode)
    # no O_CREAT: what is there is written, nothing is ever made
    fd = os.open(name, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        now = os.fstat(fd)
        if not _writable_through(now.st_mode):  # changed since the stat: nothing written yet
            raise _refused(path, now.st_mode)
        write_all(fd, data)
    finally:
        os.close(fd)


def _writable_through(mode: int) -> bool:
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def _std_fd(target: os.stat_result) -> int | None:
    """1 or 2 if `target` is the file our stdout or stderr already is."""
    for fd in (1, 2):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            return fd
    return None


def _refused(path: str, mode: int) -> InvalidInputError:
    return InvalidInputError(f"output {path} is {kind(mode)}; refusing to write it")
