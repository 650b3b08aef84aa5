#!/usr/bin/env python3
"""A writer that works through a real `vhsm mount` for the backup-consistency tests.

Runs in a process of its own (`python mount_writer.py ...`) that never starts a subprocess:
a process that forks while it holds a file of the mount open makes the child's copy of that
descriptor close at exec, and every close is a FUSE FLUSH, which the mount commits. The test
process starts backup tools and CLI runs all the time, so a writer thread in it would see
intermediate states of its files (half a write) published by somebody else's fork: legal
POSIX behaviour, but states the test could not know it wrote.

It creates files at the top level of the mount, rewrites them in place, appends, truncates,
renames them (also over each other) and deletes them, at a random pace, until the stop file
appears or SIGTERM arrives. Every file starts with a fixed 32-byte header naming it
(`vhsm-backup-test m0007`), which no operation changes, so the test can tell which file a
restored token holds whatever name it has.

For every state a file goes through it writes one JSON line *before* the operation
(`begin`: file id, state index, name, SHA-256 and size of the content, or `sha: null` for
"absent", and `t0`, CLOCK_MONOTONIC) and one *after* it returned (`end`, `t1`). The commit of
that state happened between t0 and t1, so the test knows, for any copy taken between two
instants, which states a token may hold. An operation that never ended (killed) has no `end`
line: its state may or may not have been published.

When a state is published (docs/MOUNT.md, "Durability"): `close()` commits what was written;
`truncate(2)` and `rename(2)` of a closed file on return. A deletion (`unlink`, or the file a
rename replaces) is durable once `fsync` of the directory returns (the mount wipes deleted
tokens in the background and `fsyncdir` waits for those wipes), as on any POSIX filesystem.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import sys
import time

HEADER_LEN = 32
TOKEN_DIR = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def header(fid: str) -> bytes:
    h = f"vhsm-backup-test {fid}".encode()
    assert len(h) < HEADER_LEN
    return h.ljust(HEADER_LEN - 1, b" ") + b"\n"


def payload(seed: int, fid: str, idx: int, n: int) -> bytes:
    """n bytes that differ for every (file, version): a readable tag, then random bytes."""
    tag = f"<{fid} v{idx}>".encode()
    body = random.Random(f"{seed}/{fid}/{idx}").randbytes(max(0, n - len(tag)))
    return (tag + body)[:n]


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


class Writer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.mnt = args.mnt
        self.prefix = args.prefix
        self.seed = args.seed
        self.rng = random.Random(f"mount-writer/{args.seed}/{args.prefix}")
        self.max_size = args.max_size
        self.min_live, self.max_live = args.min_live, args.max_live
        self.pause = args.pause
        self.stop_file = args.stop_file
        self.log = open(args.log, "a", buffering=1)  # noqa: SIM115 - lives as long as the writer
        self.files: dict[str, dict] = {}  # live files: fid -> {"name", "data", "idx"}
        self.next_file = 0
        self.next_name = 0
        self.stopping = False
        self.ops = 0
        self.other_dirs: set[str] = set()  # token directories known not to hold our new files

    # -- the log ---------------------------------------------------------------------------

    def emit(self, **obj: object) -> None:
        self.log.write(json.dumps(obj, separators=(",", ":")) + "\n")

    def begin(self, op: str, fid: str, name: str, data: bytes | bytearray | None) -> int:
        f = self.files.get(fid)
        idx = f["idx"] + 1 if f else 0
        if f:
            f["idx"] = idx
        self.emit(
            ev="begin",
            op=op,
            f=fid,
            i=idx,
            name=name,
            sha=None if data is None else sha(data),
            size=None if data is None else len(data),
            t0=time.monotonic(),
        )
        return idx

    def end(self, fid: str, idx: int) -> None:
        self.emit(ev="end", f=fid, i=idx, t1=time.monotonic())

    # -- helpers ---------------------------------------------------------------------------

    def path(self, name: str) -> str:
        return os.path.join(self.mnt, name)

    def fresh_name(self, fid: str) -> str:
        self.next_name += 1
        return f"{fid}-r{self.next_name}.bin"

    def size(self) -> int:
        """Mostly small files, some medium, a few up to max_size."""
        r = self.rng.random()
        if r < 0.7:
            return self.rng.randint(2 << 10, 64 << 10)
        if r < 0.95:
            return self.rng.randint(64 << 10, max(64 << 10, self.max_size // 2))
        return self.rng.randint(self.max_size // 2, self.max_size)

    def fsync_dir(self) -> None:
        fd = os.open(self.mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def write_all(fd: int, data: bytes, offset: int | None = None) -> None:
        view = memoryview(data)
        done = 0
        while done < len(view):
            if offset is None:
                done += os.write(fd, view[done:])
            else:
                done += os.pwrite(fd, view[done:], offset + done)

    # -- operations ------------------------------------------------------------------------

    def create(self) -> None:
        fid = f"{self.prefix}{self.next_file:04d}"
        self.next_file += 1
        name = f"{fid}.bin"
        data = header(fid) + payload(self.seed, fid, 1, self.size() - HEADER_LEN)
        # A mount may publish the empty file it created before the data arrives: state 0.
        i0 = self.begin("create-empty", fid, name, b"")
        self.files[fid] = {"name": name, "data": bytearray(), "idx": i0}
        i1 = self.begin("create", fid, name, data)
        fd = os.open(self.path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            self.write_all(fd, data)
        finally:
            os.close(fd)
        self.end(fid, i0)
        self.end(fid, i1)
        self.files[fid]["data"] = bytearray(data)
        self.find_token(fid, name)

    def find_token(self, fid: str, name: str) -> None:
        """Log which token holds a new file: the mount shows it in its token directory too
        (`<uuid>/<name>`). A token keeps its id through rewrites and renames, so the test can
        tell a token it cannot read (a broken copy) by its id."""
        for entry in os.listdir(self.mnt):
            if not TOKEN_DIR.match(entry) or entry in self.other_dirs:
                continue
            try:
                names = os.listdir(os.path.join(self.mnt, entry))
            except OSError:  # deleted meanwhile (by the CLI writer)
                continue
            if name in names:
                self.emit(ev="token", f=fid, token=entry)
                self.other_dirs.add(entry)
                return
            self.other_dirs.add(entry)
        self.emit(ev="token", f=fid, token=None)

    def rewrite(self, fid: str) -> None:
        f = self.files[fid]
        data = f["data"]
        off = self.rng.randint(HEADER_LEN, len(data))
        n = self.rng.randint(1, min(256 << 10, max(1, self.max_size - off)))
        new = bytearray(data)
        chunk = payload(self.seed, fid, f["idx"] + 1, n)
        new[off : off + n] = chunk
        idx = self.begin("rewrite", fid, f["name"], new)
        fd = os.open(self.path(f["name"]), os.O_WRONLY)
        try:
            self.write_all(fd, chunk, off)
        finally:
            os.close(fd)
        self.end(fid, idx)
        f["data"] = new

    def append(self, fid: str) -> None:
        f = self.files[fid]
        n = self.rng.randint(1, 128 << 10)
        if len(f["data"]) + n > self.max_size:
            return self.truncate(fid)
        chunk = payload(self.seed, fid, f["idx"] + 1, n)
        new = f["data"] + chunk
        idx = self.begin("append", fid, f["name"], new)
        fd = os.open(self.path(f["name"]), os.O_WRONLY | os.O_APPEND)
        try:
            self.write_all(fd, chunk)
        finally:
            os.close(fd)
        self.end(fid, idx)
        f["data"] = new
        return None

    def truncate(self, fid: str) -> None:
        f = self.files[fid]
        size = len(f["data"])
        if self.rng.random() < 0.25 and size + (64 << 10) <= self.max_size:
            new_size = size + self.rng.randint(1, 64 << 10)  # grow: a hole of zeros
        else:
            new_size = self.rng.randint(HEADER_LEN, size)
        new = bytearray(f["data"][:new_size])
        new.extend(bytes(new_size - len(new)))
        idx = self.begin("truncate", fid, f["name"], new)
        os.truncate(self.path(f["name"]), new_size)
        self.end(fid, idx)
        f["data"] = new

    def rename(self, fid: str) -> None:
        f = self.files[fid]
        name = self.fresh_name(fid)
        idx = self.begin("rename", fid, name, f["data"])
        os.rename(self.path(f["name"]), self.path(name))
        self.end(fid, idx)
        f["name"] = name

    def rename_over(self, fid: str, victim: str) -> None:
        f, v = self.files[fid], self.files[victim]
        idx = self.begin("rename-over", fid, v["name"], f["data"])
        vidx = self.begin("replaced", victim, v["name"], None)
        os.rename(self.path(f["name"]), self.path(v["name"]))
        self.end(fid, idx)
        self.fsync_dir()  # the replaced token's wipe is durable once this returns
        self.end(victim, vidx)
        f["name"] = v["name"]
        del self.files[victim]

    def delete(self, fid: str) -> None:
        f = self.files[fid]
        idx = self.begin("delete", fid, f["name"], None)
        os.unlink(self.path(f["name"]))
        self.fsync_dir()
        self.end(fid, idx)
        del self.files[fid]

    def step(self) -> None:
        live = sorted(self.files)
        if len(live) < self.min_live:
            return self.create()
        if len(live) >= self.max_live:
            op = self.rng.choice(["delete", "rename_over"])
        else:
            op = self.rng.choices(
                ["create", "rewrite", "append", "truncate", "rename", "rename_over", "delete"],
                weights=[15, 30, 20, 10, 10, 5, 10],
            )[0]
        if op == "create":
            return self.create()
        fid = self.rng.choice(live)
        if op == "rename_over":
            others = [x for x in live if x != fid]
            if not others:
                return self.rename(fid)
            return self.rename_over(fid, self.rng.choice(others))
        getattr(self, op)(fid)
        return None

    def run(self) -> int:
        self.emit(ev="start", pid=os.getpid(), t=time.monotonic())
        while not self.stopping and not os.path.exists(self.stop_file):
            try:
                self.step()
            except OSError as e:
                self.emit(ev="error", op_count=self.ops, error=repr(e), t=time.monotonic())
                return 2
            self.ops += 1
            if self.pause:
                time.sleep(self.rng.uniform(0, self.pause))
        self.emit(ev="stop", ops=self.ops, t=time.monotonic())
        return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mnt", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--stop-file", required=True)
    ap.add_argument("--prefix", default="m")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--max-size", type=int, default=1 << 20)
    ap.add_argument("--min-live", type=int, default=4)
    ap.add_argument("--max-live", type=int, default=10)
    ap.add_argument("--pause", type=float, default=0.05)
    args = ap.parse_args()
    w = Writer(args)

    def on_term(signum: int, frame: object) -> None:
        w.stopping = True  # finish the operation under way, then stop

    signal.signal(signal.SIGTERM, on_term)
    return w.run()


if __name__ == "__main__":
    sys.exit(main())
