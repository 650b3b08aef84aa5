"""Backup consistency harness (issue 12, ARCHITECTURE.md rule 8): copies of a live token store
taken with real backup tools while a real mount, the CLI and `gc` write to it; every copy is
restored, gc'd, verified with and without the key, and every token in it is retrieved and
compared with the versions the writers know they wrote.

Named backup_harness (not helpers) so the module name is unique on the test tree's sys.path.

The model. Every file (a file written through the mount, or a file stored with the CLI) goes
through numbered *states*: (name, content digest) or *absent*. For each state the writer records
t0 (just before the operation that publishes it started) and t1 (after it returned; the state
was committed in between). A copy runs from T0 (the backup tool is started) to T1 (it exited).
The state a file had when the copy began is the newest one with t1 < T0 (the *floor*); states
that began before T1 may have been published while the copy ran. So a restored copy must hold,
for every file, one of the states from the floor up to the newest one begun before T1:
older states (superseded before the copy began) are a rollback, a missing file whose floor is
present was lost, a file whose floor is absent (deleted before the copy began) must not come
back, and any token must verify and retrieve.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mount_writer import HEADER_LEN, header, payload

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent

# What a backup of a store must leave out, relative to the store root; each entry is a
# directory, excluded with everything below it. The one list: docs/BACKUP.md prints the same
# list and the flags below for each tool, contrib/backup/backup-store.sh uses it
# (test_backup_docs.py checks that all three agree).
EXCLUDES = (".tmp",)

TOOLS = ("rsync", "tar", "restic", "borg")
STORE_ITSELF = "the store itself, at the end"

# Exit codes that mean "a copy was made" (docs/BACKUP.md explains why each is benign here).
OK_CODES = {
    "rsync": {0, 24},  # 24: some files vanished between the listing and their transfer
    "tar": {0, 1},  # 1: some file changed or was removed while being read
    "restic": {0, 3},  # 3: snapshot written, some source files could not be read
    "borg": {0, 1},  # 1: warning (file changed or vanished while backed up)
}

CLI_TIMEOUT = 120
MAX_PROBLEMS_SHOWN = 8  # per copy, in the failure message
TOOL_TIMEOUT = 300
STOP_TIMEOUT = 30


def _load_mount_fixtures():  # type: ignore[no-untyped-def]
    """tests/mount/conftest.py's Mount (start with a key file, stop with SIGTERM, then a lazy
    unmount and SIGKILL, each step bounded): loaded by path, since conftest modules are not
    importable by name."""
    spec = importlib.util.spec_from_file_location(
        "vhsm_mount_fixtures", REPO / "tests" / "mount" / "conftest.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mount_fixtures = _load_mount_fixtures()
Mount = mount_fixtures.Mount
FUSE_MISSING = mount_fixtures.FUSE_MISSING


# -- tools --------------------------------------------------------------------------------


def rsync_excludes() -> list[str]:
    return [f"--exclude=/{p}/" for p in EXCLUDES]  # leading /: at the top of the transfer only


def tar_excludes() -> list[str]:
    return ["--anchored", *[f"--exclude=./{p}" for p in EXCLUDES]]  # archive made with -C STORE .


def restic_excludes(store: Path) -> list[str]:
    return [f"--exclude={store}/{p}" for p in EXCLUDES]  # restic matches the absolute path


def borg_excludes() -> list[str]:
    return [f"--exclude=pp:{p}" for p in EXCLUDES]  # path prefix, archive made from `.` in STORE


def missing_tools() -> list[str]:
    need = {"rsync": "rsync", "tar": "tar", "restic": "restic", "borg": "borgbackup"}
    return [pkg for exe, pkg in need.items() if shutil.which(exe) is None]


# The writers here rewrite files all the time, and superseded data stays for the grace period:
# with the default hour, the store (and so every copy, taken at 4 MiB/s) keeps growing. A
# minute is far longer than any copy of one token's directory takes, which is what the
# guarantee needs (docs/FORMAT.md, "Backups").
GRACE_SECONDS = "60"


def env_for(**extra: str) -> dict[str, str]:
    """This checkout's code first, the venv's scripts on PATH, no vhsm settings inherited
    but the test's grace period."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HSM_", "VHSM_", "TOKEN_", "PYTEST_", "RESTIC_", "BORG_"))
    }
    env["PATH"] = f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin"
    env["PYTHONPATH"] = str(REPO)
    env["VHSM_GRACE_SECONDS"] = GRACE_SECONDS
    env.update(extra)
    return env


def vhsm(*args: str | os.PathLike[str], cwd: Path, timeout: float = CLI_TIMEOUT):  # type: ignore[no-untyped-def]
    """The real CLI (`python -m cli.main`, this checkout) in a subprocess; never raises on a
    non-zero exit (a hang raises TimeoutExpired)."""
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *map(os.fspath, args)],
        cwd=cwd,
        env=env_for(),
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
    )


def tail(text: str, lines: int = 12) -> str:
    """A tool's output for a failure message: lines that differ only in a path or name
    (`file has vanished: "..."`, one per file) are shown once, with their count."""
    groups: dict[str, list[str]] = {}
    for ln in text.splitlines():
        if ln.strip():
            key = re.sub(r'"[^"]*"|\'[^\']*\'|/\S+|[0-9a-f]{8}-[0-9a-f-]{27}', "…", ln)
            groups.setdefault(key, []).append(ln)
    out = [
        g[0] if len(g) == 1 else f"{g[-1]}  [and {len(g) - 1} more like it]"
        for g in groups.values()
    ]
    if len(out) > lines:
        out = [f"... ({len(out) - lines} more lines)", *out[-lines:]]
    return "\n".join(out)


class ToolError(Exception):
    pass


class Tools:
    """The four backup tools, each with its own repository or archive directory under root,
    run non-interactively (passwords in the environment, caches under root)."""

    def __init__(self, root: Path, store: Path, rate: int | None = None) -> None:
        self.root, self.store = root, store
        self.rate = rate  # bytes/s for rsync and tar (a slow link); None: full speed
        self.restic_env = env_for(
            RESTIC_REPOSITORY=str(root / "restic-repo"),
            RESTIC_PASSWORD="backup-test-password",
            RESTIC_CACHE_DIR=str(root / "restic-cache"),
            HOME=str(root / "home"),
        )
        self.borg_repo = root / "borg-repo"
        self.borg_env = env_for(
            BORG_BASE_DIR=str(root / "borg-home"),
            BORG_PASSPHRASE="backup-test-password",
            BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
            BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
            BORG_DISPLAY_PASSPHRASE="no",
            HOME=str(root / "home"),
        )
        (root / "home").mkdir(parents=True, exist_ok=True)
        self.ready: set[str] = set()

    def _run(self, argv: list[str], *, cwd: Path, env: dict[str, str], ok: Iterable[int] = (0,)):  # type: ignore[no-untyped-def]
        try:
            p = subprocess.run(
                argv,
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=TOOL_TIMEOUT,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as e:
            raise ToolError(f"`{' '.join(argv)}` did not finish in {TOOL_TIMEOUT}s") from e
        if p.returncode not in set(ok):
            raise ToolError(
                f"`{' '.join(argv)}` exited {p.returncode}:\n{tail(p.stdout + p.stderr)}"
            )
        return p

    def prepare(self) -> None:
        """Create the restic and borg repositories (before any copy is timed)."""
        self._run(["restic", "init", "-q"], cwd=self.root, env=self.restic_env)
        self._run(
            ["borg", "init", "--encryption=repokey-blake2", str(self.borg_repo)],
            cwd=self.root,
            env=self.borg_env,
        )

    def backup_argv(self, tool: str, n: int) -> tuple[list[str], Path, dict[str, str], str]:
        """(argv, cwd, env, artifact) of copy number n."""
        if tool == "rsync":
            dest = self.root / "rsync" / f"copy-{n}"
            dest.mkdir(parents=True)
            limit = [f"--bwlimit={max(1, self.rate >> 10)}"] if self.rate else []
            argv = ["rsync", "-a", *limit, *rsync_excludes(), f"{self.store}/", f"{dest}/"]
            return argv, self.root, env_for(), str(dest)
        if tool == "tar":
            (self.root / "tar").mkdir(exist_ok=True)
            archive = self.root / "tar" / f"copy-{n}.tar"
            out = "-" if self.rate else str(archive)  # `tar -c -f - ... | slow link`
            argv = ["tar", "-c", "-f", out, "-C", str(self.store), *tar_excludes(), "."]
            return argv, self.root, env_for(), str(archive)
        if tool == "restic":
            argv = ["restic", "backup", "-q", "--tag", f"copy-{n}", *restic_excludes(self.store)]
            return [*argv, "."], self.store, self.restic_env, f"copy-{n}"
        if tool == "borg":
            archive = f"{self.borg_repo}::copy-{n}"
            return (
                ["borg", "create", *borg_excludes(), archive, "."],
                self.store,
                self.borg_env,
                archive,
            )
        raise ValueError(tool)

    def backup(self, tool: str, n: int) -> tuple[list[str], str, int, str]:
        """Take copy number n with `tool`: (argv, artifact, exit status, output). The status
        is -1 if it did not finish within TOOL_TIMEOUT (it is killed then)."""
        argv, cwd, env, artifact = self.backup_argv(tool, n)
        stream = argv[:4] == ["tar", "-c", "-f", "-"]
        with open(os.devnull, "rb") as devnull, subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=devnull, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True,
        ) as p:  # fmt: skip
            errs: list[bytes] = []
            readers = [threading.Thread(target=lambda: errs.append(p.stderr.read()))]
            if not stream:
                readers.append(threading.Thread(target=lambda: errs.append(p.stdout.read())))
            for r in readers:
                r.daemon = True
                r.start()
            deadline = time.monotonic() + TOOL_TIMEOUT
            try:
                if stream:
                    self._drain(p.stdout, Path(artifact), deadline)
                rc = p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=STOP_TIMEOUT)
                rc = -1
            for r in readers:
                r.join(timeout=STOP_TIMEOUT)
        out = b"".join(errs).decode(errors="replace")
        if rc == -1:
            out += f"\n(killed: did not finish in {TOOL_TIMEOUT}s)"
        return argv, artifact, rc, out

    def _drain(self, pipe, dest: Path, deadline: float) -> None:  # type: ignore[no-untyped-def]
        """Copy a tool's output to dest at self.rate bytes/s (it blocks on its pipe
        meanwhile, as it would writing to a slow link)."""
        start, done = time.monotonic(), 0
        with open(dest, "wb") as f:
            while block := pipe.read(64 << 10):
                f.write(block)
                done += len(block)
                ahead = start + done / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired("tar", TOOL_TIMEOUT)

    def restore(self, tool: str, artifact: str, dest: Path) -> None:
        """Restore a copy into dest (a fresh directory), as a user of the tool would."""
        dest.mkdir(parents=True)
        if tool == "rsync":
            self._run(["rsync", "-a", f"{artifact}/", f"{dest}/"], cwd=self.root, env=env_for())
        elif tool == "tar":
            self._run(["tar", "-x", "-f", artifact, "-C", str(dest)], cwd=self.root, env=env_for())
        elif tool == "restic":
            self._run(
                ["restic", "restore", "latest", "-q", "--tag", artifact, "--target", str(dest)],
                cwd=self.root,
                env=self.restic_env,
            )
        elif tool == "borg":
            self._run(["borg", "extract", artifact], cwd=dest, env=self.borg_env)
        else:
            raise ValueError(tool)


# -- the model ----------------------------------------------------------------------------


@dataclasses.dataclass
class State:
    fid: str
    idx: int  # -1: the file did not exist yet
    name: str | None
    sha: str | None  # None: absent (deleted)
    size: int | None
    op: str
    t0: float
    t1: float = math.inf  # inf: the operation never returned (writer killed or failed)
    token: str | None = None  # CLI files: the token `store` printed

    @property
    def absent(self) -> bool:
        return self.sha is None


class History:
    """Every state of every file, from all writers (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.files: dict[str, dict[int, State]] = {}

    def begin(self, st: State) -> State:
        with self.lock:
            self.files.setdefault(st.fid, {})[st.idx] = st
        return st

    def end(self, st: State, t1: float | None = None) -> None:
        with self.lock:
            st.t1 = time.monotonic() if t1 is None else t1

    def load_writer_log(self, path: Path) -> list[str]:
        """Read a mount writer's JSON lines; returns the errors it reported."""
        errors = []
        tokens: dict[str, str] = {}
        for line in path.read_text().splitlines():
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                errors.append(f"unreadable log line {line!r}")  # killed mid-line
                continue
            if ev["ev"] == "begin":
                st = State(ev["f"], ev["i"], ev["name"], ev["sha"], ev["size"], ev["op"], ev["t0"])
                st.token = tokens.get(ev["f"])
                self.begin(st)
            elif ev["ev"] == "end":
                self.end(self.files[ev["f"]][ev["i"]], ev["t1"])
            elif ev["ev"] == "token":  # the token that holds a file from its creation on
                if ev["token"] is None:
                    errors.append(f"mount writer {path.name}: no token directory for {ev['f']}")
                tokens[ev["f"]] = ev["token"]
                for st in self.files[ev["f"]].values():
                    st.token = ev["token"]
            elif ev["ev"] == "error":
                errors.append(f"mount writer {path.name}: {ev['error']}")
        return errors

    def states(self, fid: str) -> list[State]:
        before = State(fid, -1, None, None, None, "not yet created", -math.inf, -math.inf)
        return [before, *sorted(self.files[fid].values(), key=lambda s: s.idx)]

    def window(self, fid: str, t0: float, t1: float) -> tuple[list[State], State]:
        """(the states a copy taken from t0 to t1 may hold, the state at t0)."""
        sts = self.states(fid)
        floor = max(s.idx for s in sts if s.t1 < t0)
        ceil = max(s.idx for s in sts if s.t0 < t1)
        return [s for s in sts if floor <= s.idx <= ceil], sts[floor + 1]

    def fids_for_name(self, name: str) -> list[str]:
        return sorted(
            {s.fid for sts in self.files.values() for s in sts.values() if s.name == name}
        )


def file_id(content: bytes) -> str | None:
    """The file a content belongs to, from its 32-byte header (None if it has none)."""
    if len(content) < HEADER_LEN or not content.startswith(b"vhsm-backup-test "):
        return None
    return content[17 : HEADER_LEN - 1].decode("ascii", "replace").strip()


# -- the writers --------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    copies_per_tool: int = 3  # make test: 12 copies; 15 per tool at full size
    mount_writers: int = 1
    cli_writers: int = 1
    max_size: int = 1 << 20  # files written through the mount
    cli_max_size: int = 512 << 10
    mount_live: tuple[int, int] = (4, 10)
    cli_live: tuple[int, int] = (3, 8)
    mount_pause: float = 0.005  # seconds, at most, between two operations of a writer
    cli_pause: float = 0.2
    gc_pause: tuple[float, float] = (0.3, 1.5)
    gap: tuple[float, float] = (0.1, 1.0)  # seconds between two copies
    # rsync and tar copy at this many bytes/s (`rsync --bwlimit`, `tar -c -f - | slow link`),
    # as to a remote host: the small test store then takes as long to walk as a larger store
    # on a fast disk would, relative to the writers' pace. restic and borg run at full speed.
    tool_rate: int | None = 4 << 20
    warmup: float = 2.0
    check_workers: int = 2


class Harness:
    """The store, its mount, the writers, the copies. Use as a context manager: leaving it
    always stops the writers and unmounts (each step bounded), whatever happened inside."""

    def __init__(self, root: Path, seed: int, cfg: Config) -> None:
        self.root, self.seed, self.cfg = root, seed, cfg
        self.rng = random.Random(f"copies/{seed}")
        self.store = root / "store"
        self.mnt = root / "mnt"
        self.work = root / "work"
        self.work.mkdir(parents=True)
        self.key = self.work / "vault.key"
        self.history = History()
        self.errors: list[str] = []  # writer, CLI and gc failures while the copies were taken
        self.stop_event = threading.Event()
        self.stop_file = root / "writers.stop"
        self.threads: list[threading.Thread] = []
        self.writer_procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.mount = None
        self.tools = Tools(root / "backups", self.store, cfg.tool_rate)
        self.copies: list[Copy] = []
        self.t_start = time.monotonic()
        self.gc_runs = 0

    # -- lifetime --

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        res = vhsm("token", "generate-key", self.key, cwd=self.work)
        assert res.returncode == 0, res.stderr
        self.tools.prepare()
        before = os.environ.get("VHSM_GRACE_SECONDS")
        os.environ["VHSM_GRACE_SECONDS"] = GRACE_SECONDS  # the mount inherits os.environ
        try:
            self.mount = Mount(self.store, self.mnt, self.key).start()
        finally:
            if before is None:
                os.environ.pop("VHSM_GRACE_SECONDS", None)
            else:
                os.environ["VHSM_GRACE_SECONDS"] = before
        for w in range(self.cfg.mount_writers):
            log = self.root / f"mount-writer-{w}.jsonl"
            prefix = "m" if self.cfg.mount_writers == 1 else f"m{w}-"
            argv = [
                sys.executable,
                str(HERE / "mount_writer.py"),
                "--mnt",
                str(self.mnt),
                "--log",
                str(log),
                "--stop-file",
                str(self.stop_file),
                "--prefix",
                prefix,
                "--seed",
                str(self.seed),
                "--max-size",
                str(self.cfg.max_size),
                "--min-live",
                str(self.cfg.mount_live[0]),
                "--max-live",
                str(self.cfg.mount_live[1]),
                "--pause",
                str(self.cfg.mount_pause),
            ]
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
            self.writer_procs.append((proc, log))
        for w in range(self.cfg.cli_writers):
            prefix = "c" if self.cfg.cli_writers == 1 else f"c{w}-"
            self.threads.append(threading.Thread(target=self._cli_writer, args=(prefix,)))
        self.threads.append(threading.Thread(target=self._gc_runner))
        for t in self.threads:
            t.daemon = True
            t.start()

    def stop(self) -> None:
        """Stop the writers, then unmount (each step bounded; safe to call again)."""
        try:
            self.stop_writers()
        finally:
            if self.mount is not None:
                self.mount.stop()

    def stop_writers(self) -> None:
        """Stop the CLI writers and gc (after the command under way), then the mount writers
        (stop file, then SIGTERM, then SIGKILL)."""
        self.stop_event.set()
        self.stop_file.touch()
        for t in self.threads:
            t.join(timeout=CLI_TIMEOUT + 10)
        for proc, _ in self.writer_procs:
            for sig, wait in ((None, STOP_TIMEOUT), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                if proc.poll() is not None:
                    break
                if sig is not None:
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        break
                try:
                    proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    continue

    def collect(self) -> None:
        """After stop(): read the mount writers' logs into the model, and check the store
        itself like a copy taken now (unmounted, nothing writing): every file must be there
        as its last state. A failure there is data lost in the store, not only in backups."""
        for proc, log in self.writer_procs:
            if log.exists():
                self.errors.extend(self.history.load_writer_log(log))
            if proc.returncode not in (0, None):
                self.errors.append(f"mount writer {log.name} exited {proc.returncode}")
        now = time.monotonic()
        self.copies.append(Copy(-1, STORE_ITSELF, [], str(self.store), now, now, 0, ""))

    def rel(self, t: float) -> str:
        return f"{t - self.t_start:.2f}s" if math.isfinite(t) else "never"

    # -- writers run in threads of this process (they only start subprocesses) --

    def _cli_writer(self, prefix: str) -> None:
        """`vhsm token store` of new files and `vhsm token delete` of stored ones, at random."""
        rng = random.Random(f"cli-writer/{self.seed}/{prefix}")
        live: dict[str, State] = {}  # fid -> its stored state
        lo, hi = self.cfg.cli_live
        n = 0
        while not self.stop_event.is_set():
            try:
                if len(live) < lo or (len(live) < hi and rng.random() < 0.55):
                    fid = f"{prefix}{n:04d}"
                    n += 1
                    size = rng.randint(1 << 10, self.cfg.cli_max_size)
                    st = self._cli_store(fid, header(fid) + payload(self.seed, fid, 0, size))
                    if st is not None:
                        live[fid] = st
                elif live:
                    self._cli_delete(live.pop(rng.choice(sorted(live))))
            except subprocess.TimeoutExpired as e:
                self.errors.append(f"CLI writer: {e}")
            self.stop_event.wait(rng.uniform(0, self.cfg.cli_pause))

    def _cli_store(self, fid: str, data: bytes) -> State | None:
        src = self.work / f"{fid}.bin"
        src.write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        st = self.history.begin(State(fid, 0, src.name, sha, len(data), "store", time.monotonic()))
        r = vhsm(
            "token", "store", src, "--key", self.key, "--store", self.store, "-q", cwd=self.work
        )
        if r.returncode != 0:  # its state stays open: it may or may not be in a copy
            self.errors.append(f"`vhsm token store` of {fid} failed: {r.stderr.strip()}")
            return None
        self.history.end(st)
        st.token = r.stdout.strip()
        src.unlink()
        return st

    def _cli_delete(self, stored: State) -> None:
        st = self.history.begin(
            State(stored.fid, 1, stored.name, None, None, "delete", time.monotonic(),
                  token=stored.token)
        )  # fmt: skip
        r = vhsm("token", "delete", stored.token, "--store", self.store, cwd=self.work)
        if r.returncode != 0:
            self.errors.append(
                f"`vhsm token delete {stored.token}` ({stored.fid}) failed: {r.stderr.strip()}"
            )
            return
        self.history.end(st)

    def _gc_runner(self) -> None:
        rng = random.Random(f"gc/{self.seed}")
        while not self.stop_event.wait(rng.uniform(*self.cfg.gc_pause)):
            try:
                r = vhsm("token", "gc", "--store", self.store, cwd=self.work)
            except subprocess.TimeoutExpired as e:
                self.errors.append(f"gc: {e}")
                continue
            self.gc_runs += 1
            if r.returncode != 0:
                self.errors.append(
                    f"`vhsm token gc --store STORE` exited {r.returncode}: "
                    f"{tail(r.stdout + r.stderr)}"
                )

    # -- copies --

    def take_copies(self) -> None:
        """Wait for the warm-up, then take the copies at random moments, rotating the tools."""
        time.sleep(self.cfg.warmup)
        first = self.rng.randrange(len(TOOLS))
        total = self.cfg.copies_per_tool * len(TOOLS)
        for n in range(total):
            time.sleep(self.rng.uniform(*self.cfg.gap))
            self.take_copy(n, TOOLS[(first + n) % len(TOOLS)])

    def take_copy(self, n: int, tool: str) -> Copy:
        t0 = time.monotonic()
        argv, artifact, rc, out = self.tools.backup(tool, n)
        c = Copy(n, tool, argv, artifact, t0, time.monotonic(), rc, out)
        self.copies.append(c)
        return c

    def copy_script(self, n: int, script: Path) -> Copy:
        """A copy made by contrib/backup/backup-store.sh (one rsync pass, gc, verify --no-key),
        its rsync slowed to cfg.tool_rate like the harness's own rsync copies."""
        dest_root = self.root / "script" / f"run-{n}"
        argv = ["bash", str(script), str(self.store), str(dest_root)]
        env = env_for()
        if self.cfg.tool_rate:
            env["RSYNC_OPTS"] = f"--bwlimit={max(1, self.cfg.tool_rate >> 10)}"
        t0 = time.monotonic()
        try:
            p = subprocess.run(
                argv, cwd=self.work, env=env, capture_output=True, text=True, errors="replace",
                timeout=TOOL_TIMEOUT,
            )  # fmt: skip
            rc, out = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired:
            rc, out = -1, f"(killed: did not finish in {TOOL_TIMEOUT}s)"
        c = Copy(n, "backup-store.sh", argv, str(dest_root), t0, time.monotonic(), rc, out)
        self.copies.append(c)
        return c

    def take_quiet_copies(self) -> None:
        """The control: after the warm-up, stop every writer, then one copy with each tool of
        the store at rest (still mounted). Nothing changes while these copies run, so they
        must pass with any format: a failure here is the harness's (or a tool's) fault."""
        time.sleep(self.cfg.warmup)
        self.stop_writers()
        for n, tool in enumerate(TOOLS):
            self.take_copy(n, tool)

    def take_script_copies(self, script: Path, count: int) -> None:
        time.sleep(self.cfg.warmup)
        for n in range(count):
            time.sleep(self.rng.uniform(*self.cfg.gap))
            self.copy_script(n, script)

    # -- checks --

    def check_all(self) -> list[CopyReport]:
        """Restore, gc, verify and retrieve every copy (in parallel), then compare each with
        the model. A token that cannot be retrieved from one copy is told apart by its id in
        the copies it could be retrieved from (a token keeps its id through rewrites and
        renames), else by its name."""
        with ThreadPoolExecutor(self.cfg.check_workers) as pool:
            reports = list(pool.map(self.check_copy, self.copies))
        written: dict[str, str] = {}  # token -> file, as the writers saw it
        for sts in self.history.files.values():
            for s in sts.values():
                if s.token:
                    written[s.token] = s.fid
        known = dict(written)
        for rep in reports:
            for t in rep.seen.values():
                if t.fid is not None and t.sha is not None:
                    known.setdefault(t.token, t.fid)
        for rep in reports:
            for t in rep.seen.values():
                if t.fid is None and t.token in known:
                    t.fid = known[t.token]
            if rep.checked:
                for t in rep.seen.values():
                    if t.sha is not None and t.fid != written.get(t.token, t.fid):
                        rep.problem(
                            f"SWAPPED: token {t.token} is file {written[t.token]}'s, but "
                            f"retrieving it gave content of file {t.fid}"
                        )
                self.compare(rep.copy, rep, rep.seen)
            if not rep.problems:  # keep only what a failure message points to
                self.discard(rep)
        return reports

    def discard(self, rep: CopyReport) -> None:
        c = rep.copy
        if c.tool == STORE_ITSELF:
            return
        for path in (rep.restored, Path(c.artifact) if c.tool in ("rsync", "tar") else None):
            if path is None or not path.exists():
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink()

    def check_copy(self, c: Copy) -> CopyReport:
        rep = CopyReport(c)
        base = self.root / "checks" / f"copy-{c.n}"
        restored = base / "restored"
        work = base / "work"
        work.mkdir(parents=True)
        rep.restored = restored
        ok_codes = OK_CODES.get(c.tool, {0})
        if c.tool == "backup-store.sh" and c.rc == 0 and "backup OK: " not in c.output:
            rep.problem(f"backup-store.sh exited 0 without 'backup OK':\n{tail(c.output)}")
        if c.rc not in ok_codes:
            rep.problem(f"{c.tool} exited {c.rc} (accepted: {sorted(ok_codes)}):\n{tail(c.output)}")
        if c.tool == STORE_ITSELF:
            restored = rep.restored = self.store
        elif c.tool == "backup-store.sh":  # the script's dated copy, also after a failed run
            root = Path(c.artifact)
            dests = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            if len(dests) != 1:
                rep.problem(f"expected one dated copy in {c.artifact}, found {dests}")
                return rep
            restored = rep.restored = dests[0]
        else:
            try:
                self.tools.restore(c.tool, c.artifact, restored)
            except ToolError as e:
                rep.problem(f"restore failed: {e}")
                return rep

        r = vhsm("token", "gc", "--store", restored, cwd=work)
        rep.gc_output = r.stdout + r.stderr
        if r.returncode != 0:
            rep.problem(
                f"`vhsm token gc --store COPY` exited {r.returncode}:\n{tail(rep.gc_output)}"
            )

        r = vhsm("token", "list", "--store", restored, "--key", self.key, "--json", cwd=work)
        try:
            rows = json.loads(r.stdout) if r.stdout.strip() else []
        except json.JSONDecodeError:
            rows = []
            rep.problem(
                f"`vhsm token list --json` printed no JSON (exit {r.returncode}):\n"
                f"{tail(r.stdout + r.stderr)}"
            )
        tokens: dict[str, TokenSeen] = {}
        for row in rows:
            t = tokens[row["token"]] = TokenSeen(row["token"], row.get("name"))
            if "error" in row:
                t.fail("list", row["error"])

        if tokens:
            for flag in (["--no-key"], ["--key", str(self.key)]):
                what = f"verify {flag[0]}"
                r = vhsm("token", "verify", *flag, "--store", restored, cwd=work)
                for line in r.stdout.splitlines():
                    if line.startswith("FAILED "):
                        tok, _, reason = line[len("FAILED ") :].partition(": ")
                        tokens.setdefault(tok, TokenSeen(tok, None)).fail(what, reason)
                if r.returncode != 0 and not any(what in t.failures for t in tokens.values()):
                    rep.problem(
                        f"`vhsm token {what} --store COPY` exited {r.returncode}:\n"
                        f"{tail(r.stdout + r.stderr)}"
                    )

        jobs = [
            [t.token, "token", "retrieve", t.token, str(work / "out" / t.token),
             "--key", str(self.key), "--store", str(restored)]
            for t in tokens.values()
            if "list" not in t.failures
        ]  # fmt: skip
        for res in self.retrieve_many(jobs, work):
            t = tokens[res["token"]]
            if res["rc"] != 0:
                t.fail("retrieve", res["err"].strip().removeprefix("Error: "))
                continue
            path = Path(res["out"].strip())
            path = path if path.is_absolute() else work / path
            data = path.read_bytes()
            t.sha, t.size = hashlib.sha256(data).hexdigest(), len(data)
            t.fid = file_id(data)
            path.unlink()

        rep.seen, rep.checked = tokens, True
        return rep

    @staticmethod
    def retrieve_many(jobs: list[list[str]], work: Path) -> list[dict]:
        """`vhsm token retrieve` for each job, in one interpreter (retrieve_many.py)."""
        if not jobs:
            return []
        spec = work / "retrieve-jobs.json"
        spec.write_text(json.dumps(jobs))
        p = subprocess.run(
            [sys.executable, str(HERE / "retrieve_many.py"), str(spec)],
            cwd=work, env=env_for(), capture_output=True, text=True, errors="replace",
            timeout=CLI_TIMEOUT + 10 * len(jobs),
        )  # fmt: skip
        if p.returncode != 0:
            raise AssertionError(f"retrieve_many.py exited {p.returncode}:\n{tail(p.stderr)}")
        return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]

    def compare(self, c: Copy, rep: CopyReport, tokens: dict[str, TokenSeen]) -> None:
        h = self.history
        by_fid: dict[str, list[TokenSeen]] = {}
        for t in tokens.values():
            if t.fid is None and t.name is not None:
                # no content to read the header from (unreadable, or an empty file just
                # created): tell the file by its name, among the files that may hold that
                # name in this copy
                cands = [
                    fid for fid in h.fids_for_name(t.name)
                    if any(s.name == t.name for s in h.window(fid, c.t0, c.t1)[0])
                ] or h.fids_for_name(t.name)  # fmt: skip
                if len(cands) == 1:
                    t.fid = cands[0]
                else:
                    t.note = f"name held by files {', '.join(cands) or 'none'}"
            if t.fid is None or t.fid not in h.files:
                rep.problem(
                    f"UNKNOWN TOKEN: {t.token} (name {t.name!r}"
                    + (f", {t.note}" if t.note else "")
                    + ") cannot be told apart as a file a writer wrote"
                    + (f"; {t.describe_failures()}" if t.failures else "")
                )
                continue
            by_fid.setdefault(t.fid, []).append(t)

        for fid in sorted(h.files):
            allowed, floor = h.window(fid, c.t0, c.t1)
            seen = by_fid.get(fid, [])
            if len(seen) > 1:
                rep.problem(
                    f"DUPLICATE: file {fid} is in {len(seen)} tokens: "
                    f"{', '.join(f'{t.token} ({t.name!r})' for t in seen)}"
                )
            if not seen:
                if not any(s.absent for s in allowed):
                    rep.problem(
                        f"LOST: file {fid} is not in the copy; it may hold "
                        f"{self.describe_window(allowed)}"
                    )
                continue
            for t in seen:
                label = f"token {t.token} (file {fid}, name {t.name!r})"
                if t.failures:
                    rep.problem(
                        f"BROKEN: {label}: {t.describe_failures()}; the copy may hold "
                        f"{self.describe_window(allowed)}"
                    )
                    continue
                if all(s.absent for s in allowed):
                    what = "RESURRECTED" if floor.idx >= 0 else "FROM THE FUTURE"
                    rep.problem(
                        f"{what}: {label} is in the copy, but when the copy began the "
                        f"file was {self.describe(floor)}, and nothing that wrote it "
                        f"began before the copy ended"
                    )
                    continue
                if any(s.sha == t.sha and s.name == t.name for s in allowed):
                    continue
                matches = [s for s in h.states(fid) if s.sha == t.sha and s.name == t.name]
                if matches:
                    s = matches[-1]
                    when = "older than" if s.idx < floor.idx else "newer than"
                    rep.problem(
                        f"WRONG VERSION: {label} holds state {s.idx} "
                        f"({self.describe(s)}), {when} what the copy may hold: from "
                        f"state {floor.idx} ({self.describe(floor)}) to state "
                        f"{allowed[-1].idx}"
                    )
                elif any(s.sha == t.sha for s in h.states(fid)):
                    rep.problem(
                        f"WRONG NAME: {label}: its content is a version the writer wrote "
                        f"but never under this name"
                    )
                else:
                    rep.problem(
                        f"UNKNOWN CONTENT: {label}: {t.size} bytes (sha256 {t.sha}) "
                        f"match no version the writer wrote"
                    )

    def describe_window(self, allowed: list[State]) -> str:
        if len(allowed) <= 2:
            return " or ".join(self.describe(s) for s in allowed)
        return (
            f"one of states {allowed[0].idx}..{allowed[-1].idx}, from "
            f"{self.describe(allowed[0])} to {self.describe(allowed[-1])}"
        )

    def describe(self, s: State) -> str:
        if s.idx < 0:
            return "not yet created"
        what = "absent" if s.absent else f"{s.name!r}, {s.size} bytes"
        return f"state {s.idx}: {what} (by {s.op}, {self.rel(s.t0)} to {self.rel(s.t1)})"


@dataclasses.dataclass
class Copy:
    n: int
    tool: str
    argv: list[str]
    artifact: str
    t0: float
    t1: float
    rc: int
    output: str


@dataclasses.dataclass
class TokenSeen:
    token: str
    name: str | None
    failures: dict[str, str] = dataclasses.field(default_factory=dict)
    sha: str | None = None
    size: int | None = None
    fid: str | None = None
    note: str = ""

    def fail(self, what: str, reason: str) -> None:
        self.failures[what] = reason

    def describe_failures(self) -> str:
        """`verify --no-key, verify --key, retrieve: object 00000004 is missing`: each
        reason once, with the commands that gave it."""
        by_reason: dict[str, list[str]] = {}
        for what, reason in self.failures.items():
            reason = reason.removeprefix(f"token {self.token}: ")
            by_reason.setdefault(reason, []).append(what)
        return "; ".join(f"{', '.join(w)}: {r}" for r, w in by_reason.items())


@dataclasses.dataclass
class CopyReport:
    copy: Copy
    problems: list[str] = dataclasses.field(default_factory=list)
    restored: Path | None = None
    gc_output: str = ""
    seen: dict[str, TokenSeen] = dataclasses.field(default_factory=dict)
    checked: bool = False  # restored and looked at (compared with the model then)

    def problem(self, text: str) -> None:
        self.problems.append(text)


def report(h: Harness, reports: list[CopyReport]) -> str:
    """One block per failed copy: tool, number, when, exit code, every problem."""
    bad = [r for r in reports if r.problems]
    copies = [r for r in reports if r.copy.tool != STORE_ITSELF]
    store = [r for r in reports if r.copy.tool == STORE_ITSELF]
    store_state = ("FAILED" if store[0].problems else "OK") if store else "not checked"
    lines = []
    if h.errors:
        lines.append(f"{len(h.errors)} error(s) while the copies were taken:")
        lines += [f"  {e}" for e in h.errors]
    for r in bad:
        c = r.copy
        if c.tool == STORE_ITSELF:
            lines.append(f"{STORE_ITSELF} ({c.artifact}, after the writers stopped):")
        else:
            lines.append(
                f"copy {c.n} ({c.tool}, {h.rel(c.t0)} to {h.rel(c.t1)} into the run, "
                f"exit {c.rc}; restored at {r.restored}):"
            )
        for p in r.problems[:MAX_PROBLEMS_SHOWN]:
            lines += ["  " + ln for ln in p.splitlines()]
        if len(r.problems) > MAX_PROBLEMS_SHOWN:
            lines.append(f"  ... and {len(r.problems) - MAX_PROBLEMS_SHOWN} more")
        gc_lines = [ln for ln in r.gc_output.splitlines() if ln.strip()]
        if gc_lines:
            lines.append("  gc on the copy said: " + " | ".join(gc_lines[:8]))
    if h.mount is not None:
        noted = [
            ln
            for ln in h.mount.read_log().splitlines()
            if any(w in ln for w in ("ERROR", "WARNING", "Traceback", "Error"))
        ]
        if noted:
            lines.append(f"the mount logged ({h.mount.log}):")
            lines += ["  " + ln for ln in noted[-20:]]
    kinds: dict[str, int] = {}
    for r in reports:
        for p in r.problems:
            kind = p.split(":", 1)[0] if p.split(":", 1)[0].isupper() else "TOOL/COMMAND"
            kinds[kind] = kinds.get(kind, 0) + 1
    head = (
        f"backup consistency: {sum(1 for r in copies if r.problems)} of {len(copies)} copies "
        f"failed ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items())) or 'no problems'}); "
        f"the store itself: {store_state}; {len(h.errors)} writer error(s); seed {h.seed} "
        f"(rerun with VHSM_BACKUP_SEED={h.seed}); store, copies and writer logs under {h.root}"
    )
    return "\n".join([head, *lines])


def summary(h: Harness, reports: list[CopyReport]) -> str:
    """One line per tool: copies made, exit codes seen, copies that failed."""
    out = []
    for tool in sorted({r.copy.tool for r in reports} - {STORE_ITSELF}):
        rs = [r for r in reports if r.copy.tool == tool]
        codes = sorted({r.copy.rc for r in rs})
        took = sorted(r.copy.t1 - r.copy.t0 for r in rs)
        out.append(
            f"{tool}: {len(rs)} copies ({took[0]:.2f}-{took[-1]:.2f}s each), exit codes {codes}, "
            f"{sum(1 for r in rs if r.problems)} failed"
        )
    states = sum(len(v) for v in h.history.files.values())
    counts = sorted(len(r.seen) for r in reports) or [0]
    out.append(
        f"{len(h.history.files)} files, {states} states written, {h.gc_runs} gc runs; "
        f"{counts[0]}-{counts[-1]} tokens per copy"
    )
    return "\n".join(out)


def check_and_report(h: Harness) -> list[CopyReport]:
    """Restore and check every copy of a stopped harness; fail the test with the whole
    diagnosis (seed, tool, copy number, token, what failed) if anything is wrong."""
    import pytest

    t = time.monotonic()
    reports = h.check_all()
    print(f"checking {len(reports)} copies: {time.monotonic() - t:.1f}s")
    print(summary(h, reports))
    if h.errors or any(r.problems for r in reports):
        pytest.fail(report(h, reports), pytrace=False)
    return reports
