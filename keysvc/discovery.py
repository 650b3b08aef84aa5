"""Finding the key service: which data dir a command works on and which sockets it tries.

One lookup for every command (docs/KEYSVC.md, "Finding the daemon"). Data dir, first match:

1. `--data-dir`, else $HSM_DATA_DIR (explicit);
2. the current directory, if it holds a keystore (keystore.dat, master.key or
   master.key.protected): compat.md's scripts work in their directory, whatever else runs;
3. the config file's `data_dir`;
4. the current directory.

Sockets, tried in order until one answers:

1. `--socket`, else $HSM_SOCKET (then nothing else is tried);
2. the config file's `socket`;
3. $XDG_RUNTIME_DIR/vhsm/keysvc.sock (a daemon of your own session);
4. /run/vhsm/keysvc.sock (the systemd unit's RuntimeDirectory);
5. <data dir>/.vhsm-keysvc.sock.

An explicit or local data dir (1 or 2 above) skips 2-4: a daemon found there serves some
other keystore, and talking to it would put keys where the user did not ask. The config's
socket is kept only when the config's `data_dir` is that same directory.

The config file is the first of $XDG_CONFIG_HOME/vhsm/config.toml (platformdirs: ~/.config
without the variable) and /etc/vhsm/config.toml that exists; the other is not read. It decides
where secrets go (the socket gets passphrases, data to sign) and vhsm often runs as root, so it
is opened like the key service's own files (keysvc/safefs.py: no final symlink, no FIFO or
device, a directory others cannot write, at most 64 KiB) and must belong to root or to the
user running vhsm, as must its directory: root never takes a config from another user's
$XDG_CONFIG_HOME.
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from keysvc import paths, safefs
from keysvc.errors import ConfigError

CONFIG_NAME = "config.toml"
SYSTEM_CONFIG = Path("/etc/vhsm/config.toml")
SYSTEM_SOCKET = Path("/run/vhsm/keysvc.sock")  # contrib/keysvc/vhsm-keysvc.service
RUNTIME_SOCKET = Path("vhsm") / "keysvc.sock"  # below $XDG_RUNTIME_DIR
MAX_CONFIG = 64 * 1024
_KEYS = ("socket", "data_dir")
# any of these in a directory makes it a keystore (one being set up has its master key first)
KEYSTORE_MARKERS = (paths.KEYSTORE_NAME, paths.MASTER_KEY_NAME, paths.PROTECTED_MASTER_KEY_NAME)


@dataclass(frozen=True)
class Config:
    path: Path | None = None  # None: no config file exists
    socket: Path | None = None
    data_dir: Path | None = None


@dataclass(frozen=True)
class Candidate:
    path: Path
    origin: str  # what named it, for messages: "--socket", "config /etc/...", "data dir", ...
    system: bool = False  # a system-wide default: never bound by `keysvc serve`


@dataclass(frozen=True)
class Lookup:
    data_dir: Path
    data_origin: str  # "explicit", "cwd", "config" or "default"
    sockets: tuple[Candidate, ...]
    config: Config = field(default_factory=Config)
    skipped: tuple[str, ...] = ()  # candidates left out, and why (for "where it looked")

    def serve_socket(self) -> Path:
        """Where `vhsm keysvc serve` binds: the first candidate that is not a system-wide
        default (the systemd unit passes /run/vhsm/keysvc.sock itself)."""
        return next(c.path for c in self.sockets if not c.system)


def config_paths() -> tuple[Path, Path]:
    return (platformdirs.user_config_path("vhsm", appauthor=False) / CONFIG_NAME, SYSTEM_CONFIG)


def _trusted(uid: int) -> bool:
    return uid in (0, os.getuid())


def _read_config(path: Path) -> bytes | None:
    """The config file's bytes, None if it (or its directory) does not exist; ConfigError
    for anything unsafe (module docstring)."""
    d = safefs.open_dir_if_exists(path.parent, "config directory", ConfigError)
    if d is None:
        return None
    with d:
        opened = d.open_file(path.name, "config file", os.O_RDONLY, owner_writes=True)
        if opened is None:
            return None
        fd = opened[0]
        try:
            st = os.fstat(fd)
            for what, uid in (("directory", d.st.st_uid), ("file", st.st_uid)):
                if not _trusted(uid):
                    raise ConfigError(
                        f"config file {path}: its {what} belongs to uid {uid}, not to root or "
                        "you; refusing it"
                    )
            data = safefs.read_at_most(fd, MAX_CONFIG)
        finally:
            os.close(fd)
    if len(data) > MAX_CONFIG:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG} bytes; refusing it")
    return data


def _abs_path(path: Path, key: str, value: object) -> Path:
    if not isinstance(value, str) or not value or "\0" in value or not value.startswith("/"):
        shown = repr(value)[:80]
        raise ConfigError(f"config file {path}: {key} must be an absolute path, got {shown}")
    return Path(value)


def parse_config(path: Path, data: bytes) -> Config:
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    unknown = sorted(set(doc) - set(_KEYS))
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown key {unknown[0][:80]!r} (known: {', '.join(_KEYS)})"
        )
    vals = {k: _abs_path(path, k, doc[k]) for k in _KEYS if k in doc}
    return Config(path, vals.get("socket"), vals.get("data_dir"))


def load_config() -> Config:
    """The first config file that exists (module docstring), or an empty Config."""
    for p in config_paths():
        data = _read_config(p)
        if data is not None:
            return parse_config(p, data)
    return Config()


def has_keystore(d: Path) -> bool:
    return any(os.path.lexists(d / m) for m in KEYSTORE_MARKERS)


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _private_dir(p: Path) -> bool:
    """Is `p` (symlinks resolved) a directory of the caller's that nobody else can change:
    owned by them and not writable by group or others, below directories each owned by root
    or them and not writable by others (unless sticky, like /tmp)? As OpenSSH's StrictModes."""
    for i, part in enumerate([p, *p.parents]):
        try:
            st = os.lstat(part)
        except OSError:
            return False
        open_to_others = st.st_mode & 0o022 and not (i and st.st_mode & stat.S_ISVTX)
        if not stat.S_ISDIR(st.st_mode) or open_to_others or not _trusted(st.st_uid):
            return False
        if i == 0 and st.st_uid != os.getuid():
            return False
    return True


def _runtime_socket() -> tuple[Candidate | None, str | None]:
    """$XDG_RUNTIME_DIR's socket, if that directory is the caller's own (the XDG spec: owned
    by the user, mode 0700). Someone else's (root run with a user's environment), or one
    another user could swap (a path through their directory), is skipped: its owner could make
    vhsm send passphrases or data to a daemon of theirs."""
    rt = os.environ.get("XDG_RUNTIME_DIR")
    if not rt:
        return None, None
    if not rt.startswith("/"):
        return None, f"{Path(rt) / RUNTIME_SOCKET} (skipped: $XDG_RUNTIME_DIR is not absolute)"
    p = Path(os.path.realpath(rt))  # checked and then used as resolved: no link swapped later
    sock = p / RUNTIME_SOCKET
    if not os.path.isdir(p):
        return Candidate(sock, "$XDG_RUNTIME_DIR", system=True), None  # "no socket" later
    if not _private_dir(p):
        return None, f"{sock} (skipped: $XDG_RUNTIME_DIR is not yours alone)"
    return Candidate(sock, "$XDG_RUNTIME_DIR", system=True), None


def resolve(
    data_dir: str | os.PathLike[str] | None = None,
    socket: str | os.PathLike[str] | None = None,
) -> Lookup:
    """The data dir and the socket candidates for one command (module docstring)."""
    env_dir = os.environ.get("HSM_DATA_DIR")
    explicit_dir = data_dir or env_dir or None
    env_sock = os.environ.get("HSM_SOCKET")
    explicit_sock = socket or env_sock or None
    # a config that cannot matter is not read (a broken one must not stop such a command)
    config = Config() if explicit_dir and explicit_sock else load_config()
    if explicit_dir:
        d, origin = Path(explicit_dir), "explicit"
    elif has_keystore(cwd := Path.cwd()):
        d, origin = cwd, "cwd"
    elif config.data_dir is not None:
        d, origin = config.data_dir, "config"
    else:
        d, origin = cwd, "default"
    if explicit_sock:
        if socket is None:
            what = "$HSM_SOCKET"
        else:  # click fills --socket from $HSM_SOCKET: say which when they are the same
            what = "--socket or $HSM_SOCKET" if str(socket) == env_sock else "--socket"
        return Lookup(d, origin, (Candidate(Path(explicit_sock), what),), config)
    wide = origin in ("config", "default")
    cands: list[Candidate] = []
    skipped: list[str] = []
    if config.socket is not None and (
        wide or (config.data_dir is not None and _same_dir(config.data_dir, d))
    ):
        cands.append(Candidate(config.socket, f"config {config.path}"))
    if wide:
        rt, note = _runtime_socket()
        if rt is not None:
            cands.append(rt)
        if note:
            skipped.append(note)
        cands.append(Candidate(SYSTEM_SOCKET, "systemd unit", system=True))
    cands.append(Candidate(d / paths.SOCKET_NAME, "data dir"))
    unique: dict[Path, Candidate] = {}
    for c in cands:
        unique.setdefault(c.path, c)
    return Lookup(d, origin, tuple(unique.values()), config, tuple(skipped))
