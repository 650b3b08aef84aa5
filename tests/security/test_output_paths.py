"""`-o PATH` and `-i PATH` of the key commands (issue 11, class 2), run as root.

The rule (keysvc/userfiles.py, docs/KEYSVC.md "Input and output files"): a missing PATH is
created and a regular file replaced, both atomically; a character device or FIFO, directly or
through a symlink, is written through and never replaced; anything else is refused. Inputs are
bounded by the daemon protocol's 256 MiB limit.

Tests that name /dev/null or /dev/stdout literally run the CLI in a private mount namespace whose
/dev is a fresh tmpfs with its own null node: if the rule ever broke, the machine's /dev would
still be intact."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from attack import assert_one_line_error, env_for, snapshot, tree_snapshot, vhsm

MEM = 1 << 30
QUICK = 30


@dataclass
class Site:
    root: Path
    data: Path

    def cli(self, cmd: tuple[str, ...], out: str) -> subprocess.CompletedProcess[bytes]:
        """`cmd -o out` with vhsm or (first word starting with '-') hsm_enhanced."""
        if cmd[0].startswith("-"):
            args = (*cmd, "-o", out, "-data_dir", str(self.data), "-no_daemon")
            return vhsm(*args, cwd=self.root, entry="cli.compat", timeout=QUICK)
        args = (cmd[0], "--data-dir", str(self.data), "--no-daemon", *cmd[1:], "-o", out)
        return vhsm(*args, cwd=self.root, timeout=QUICK)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site with an Ed25519 key `k`, an AES key `a`, a document, a ciphertext and a wrapped
    data key, made once."""
    root = tmp_path_factory.mktemp("outputs")
    data = root / "data"
    data.mkdir(mode=0o700)
    (root / "doc").write_bytes(b"release\n")
    (root / "dek").write_bytes(os.urandom(32))
    common = ("--data-dir", str(data), "--no-daemon")
    for args in (
        ("key", "--data-dir", str(data), "generate-master-key"),
        ("key", *common, "generate", "k"),
        ("key", *common, "generate", "a", "--type", "aes-256-gcm"),
        ("key", *common, "encrypt", "a", "-i", "doc", "-o", "ct"),
        ("key", *common, "wrap", "a", "-i", "dek", "-o", "wk"),
    ):
        p = vhsm(*args, cwd=root)
        assert p.returncode == 0, p.stderr
    return root


@pytest.fixture
def site(template: Path, tmp_path: Path) -> Site:
    root = tmp_path / "site"
    shutil.copytree(template, root, symlinks=True)
    return Site(root, root / "data")


COMMANDS = [
    ("key", "sign", "k", "-i", "doc"),
    ("key", "export-public", "k"),
    ("key", "encrypt", "a", "-i", "doc"),
    ("key", "decrypt", "a", "-i", "ct"),
    ("key", "wrap", "a", "-i", "dek"),
    ("key", "unwrap", "a", "-i", "wk"),
    ("audit", "export", "--csv"),
    ("-sign", "k", "-i", "doc"),
    ("-export_public_key", "k"),
    ("-encrypt", "a", "-i", "doc"),
    ("-decrypt", "a", "-i", "ct"),
]
IDS = ["-".join(c[:2]).lstrip("-") for c in COMMANDS]


@pytest.mark.parametrize("cmd", COMMANDS, ids=IDS)
def test_symlink_to_regular_file_refused(site: Site, cmd: tuple[str, ...]) -> None:
    """A symlink at PATH is neither followed into the file it names nor replaced."""
    victim_dir = site.root / "victim"
    victim_dir.mkdir()
    (victim_dir / "passwd").write_bytes(b"root:x:0:0::/root:/bin/sh\n")
    out = site.root / "out"
    out.symlink_to(victim_dir / "passwd")
    before, link = tree_snapshot(victim_dir), snapshot(out)
    p = site.cli(cmd, str(out))
    assert_one_line_error(p, f"output {out} is a symbolic link to a regular file; refusing")
    assert tree_snapshot(victim_dir) == before
    assert snapshot(out) == link


def _block_device(path: Path) -> None:
    os.mknod(path, stat.S_IFBLK | 0o600, os.makedev(7, 250))  # a loop device number


def _socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


REFUSED = {
    "directory": (lambda p: p.mkdir(), "is a directory"),
    "block-device": (_block_device, "is a block device"),
    "socket": (_socket, "is a socket"),
    "dangling-symlink": (lambda p: p.symlink_to(p.parent / "nowhere"), "to a missing file"),
    "symlink-to-directory": (
        lambda p: p.symlink_to(p.parent / "data", target_is_directory=True),
        "is a symbolic link to a directory",
    ),
}


@pytest.mark.parametrize("kind", list(REFUSED))
@pytest.mark.parametrize(
    "cmd", [COMMANDS[0], COMMANDS[3], COMMANDS[7]], ids=["sign", "decrypt", "hsm-sign"]
)
def test_other_kinds_refused(site: Site, cmd: tuple[str, ...], kind: str) -> None:
    make, expect = REFUSED[kind]
    out = site.root / "out"
    make(out)
    before, data = snapshot(out), tree_snapshot(site.data)
    p = site.cli(cmd, str(out))
    assert_one_line_error(p, f"output {out}", expect, "refusing to write it")
    assert snapshot(out) == before
    assert not (site.root / "nowhere").exists()
    assert not [n for n in os.listdir(site.root) if n.endswith(".tmp")]
    assert set(tree_snapshot(site.data)) == set(data)  # nothing left behind


def _identity(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return stat.S_IFMT(st.st_mode), st.st_rdev, st.st_ino


@pytest.mark.parametrize("via_symlink", [False, True], ids=["direct", "symlink"])
@pytest.mark.parametrize("cmd", COMMANDS, ids=IDS)
def test_character_device_written_through(
    site: Site, cmd: tuple[str, ...], via_symlink: bool
) -> None:
    """A /dev/null node (reached directly or through a symlink) is written, never replaced."""
    null = site.root / "null"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    out = null
    if via_symlink:
        out = site.root / "out"
        out.symlink_to(null)
    before, link = _identity(null), snapshot(out)
    p = site.cli(cmd, str(out))
    assert p.returncode == 0, p.stderr
    assert _identity(null) == before
    assert snapshot(out) == link


def test_fifo_written_through(site: Site) -> None:
    """A named pipe gets the output (a reader waits on it) and stays a pipe."""
    fifo = site.root / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    p = site.cli(("key", "export-public", "k"), str(fifo))
    reader.join(QUICK)
    assert p.returncode == 0, p.stderr
    assert got and got[0].startswith(b"-----BEGIN PUBLIC KEY-----")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_regular_file_replaced_keeping_mode_and_owner(site: Site) -> None:
    """An existing file is replaced atomically (a new inode: a reader never sees half of it),
    as the original tool's overwrite would: its mode and, for root, its owner are kept. A secret
    output is never more open than 0600."""
    out = site.root / "out.pem"
    out.write_bytes(b"old contents\n")
    os.chmod(out, 0o640)
    os.chown(out, 4242, 4343)
    ino = out.stat().st_ino
    # `vhsm` replaces an existing file only with --force (hsm_enhanced always did)
    p = site.cli(("key", "export-public", "k", "--force"), str(out))
    assert p.returncode == 0, p.stderr
    st = out.stat()
    assert out.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert st.st_ino != ino
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 4242, 4343)
    plain = site.root / "plain"
    plain.write_bytes(b"x")
    os.chmod(plain, 0o644)
    assert site.cli(("key", "decrypt", "a", "-i", "ct", "--force"), str(plain)).returncode == 0
    assert plain.read_bytes() == b"release\n"
    assert stat.S_IMODE(plain.stat().st_mode) == 0o600
    new = site.root / "new-plain"
    assert site.cli(("-decrypt", "a", "-i", "ct"), str(new)).returncode == 0
    assert stat.S_IMODE(new.stat().st_mode) == 0o600


# -- the literal /dev/null and /dev/stdout, in a private /dev --------------------------------

_PRIVATE_DEV = """
set -e
mount -t tmpfs -o mode=0755 vhsm-test-dev /dev
mknod -m 0666 /dev/null c 1 3
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout
ln -s /proc/self/fd/2 /dev/stderr
set +e
"$@" {redirect}
rc=$?
echo "after: $(stat -c %F /dev/null) $(stat -c %t,%T /dev/null) $(stat -c %F /dev/stdout)" >&2
exit $rc
"""


def _private_dev(
    site: Site, args: list[str], redirect: str = ""
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
         _PRIVATE_DEV.format(redirect=redirect), "sh", sys.executable, "-m", *args],
        cwd=site.root, env=env_for(), capture_output=True, timeout=QUICK,
    )  # fmt: skip


def _after(p: subprocess.CompletedProcess[bytes]) -> str:
    lines = p.stderr.decode().splitlines()
    assert lines and lines[-1].startswith("after: "), p.stderr
    return lines[-1]


DEV_NULL = {
    "sign": "cli.main key --data-dir {data} --no-daemon sign k -i doc -o /dev/null",
    "hsm-sign": "cli.compat -sign k -i doc -o /dev/null -data_dir {data} -no_daemon",
    "audit-export": "cli.main audit --data-dir {data} export --csv -o /dev/null",
}


@pytest.mark.parametrize("name", list(DEV_NULL))
def test_dev_null_stays_a_device(site: Site, name: str) -> None:
    """As root, `-o /dev/null` used to rename a regular file over /dev/null."""
    p = _private_dev(site, DEV_NULL[name].format(data=site.data).split())
    assert p.returncode == 0, p.stderr
    assert "after: character special file 1,3 symbolic link" in _after(p)


def test_dev_stdout_written_through(site: Site) -> None:
    """`-o /dev/stdout` works whether stdout is a pipe or a regular file (`>file`): the output
    goes where stdout goes, and /dev/stdout is never replaced."""
    args = ["cli.main", "key", "--data-dir", str(site.data), "--no-daemon",
            "export-public", "k", "-o", "/dev/stdout"]  # fmt: skip
    p = _private_dev(site, args)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert "symbolic link" in _after(p)
    p = _private_dev(site, args, redirect="> captured")
    assert p.returncode == 0, p.stderr
    assert "symbolic link" in _after(p)
    assert (site.root / "captured").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")


# -- inputs ----------------------------------------------------------------------------------


def test_input_bounded_by_protocol_limit(site: Site) -> None:
    """`-i` may be a pipe (users pipe data in), but an endless source (/dev/zero, or a link to
    it) is refused once 256 MiB are read, and a larger regular file before reading it."""
    fifo = site.root / "in"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(b"piped\n"), daemon=True)
    writer.start()
    p = vhsm("key", "--data-dir", str(site.data), "--no-daemon", "sign", "k", "-i", "in",
             cwd=site.root, timeout=QUICK)  # fmt: skip
    writer.join(QUICK)
    assert p.returncode == 0 and len(p.stdout) == 64, p.stderr
    big = site.root / "big"
    with open(big, "wb") as f:
        f.truncate((256 << 20) + 1)
    for src in ("/dev/zero", str(big)):
        p = vhsm("key", "--data-dir", str(site.data), "--no-daemon", "sign", "k", "-i", src,
                 cwd=site.root, timeout=QUICK, max_memory=MEM)  # fmt: skip
        assert_one_line_error(p, f"input {src} is larger than", "256 MiB")  # sign says why
