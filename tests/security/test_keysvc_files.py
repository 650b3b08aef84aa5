"""Attacks on the files the key service keeps in its data dir (issue 11, class 1): symlinks,
FIFOs, device nodes, hard links and files of another user planted at keystore.dat, master.key,
master.key.protected, .hsm_user, the locks and the audit log with its key and head. The real
CLI runs as root (as vhsm usually does) and must refuse each with one line naming the file,
without following it, hanging, or touching anything outside the data dir.

Every run is capped in memory (a device planted where a file is read must not make vhsm read
until the machine's memory is gone) and in time (a FIFO must not hang it)."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from attack import assert_one_line_error, env_for, snapshot, tree_snapshot, vhsm

MEM = 1 << 30  # address-space cap of every CLI run below
QUICK = 30  # seconds: a refusal is immediate; a hang fails the test


def run(site: Site, *args: str, entry: str = "cli.main") -> subprocess.CompletedProcess[bytes]:
    """`vhsm` (or with entry="cli.compat" `hsm_enhanced`) as root in site.root, the data dir
    named explicitly, no daemon."""
    if entry == "cli.compat":
        args = (*args, "-data_dir", str(site.data), "-no_daemon")
    else:
        args = (args[0], "--data-dir", str(site.data), "--no-daemon", *args[1:])
    return vhsm(*args, cwd=site.root, entry=entry, timeout=QUICK, max_memory=MEM)


@dataclass
class Site:
    root: Path  # reachable by every user
    data: Path  # the data dir (hsm_audit.log and its sidecars included)
    victim: Path  # a directory outside the data dir that no attack may change
    doc: Path  # something to sign

    def sign(self, entry: str = "cli.main") -> subprocess.CompletedProcess[bytes]:
        io = ("-i", str(self.doc), "-o", str(self.root / "sig"))
        if entry == "cli.compat":
            return run(self, "-sign", "k", *io, entry=entry)
        return run(self, "key", "sign", "k", *io)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir with a master key, an Ed25519 key `k` and a few audit lines, made once."""
    root = tmp_path_factory.mktemp("keysvc-template")
    data = root / "data"
    data.mkdir(mode=0o700)
    (root / "doc").write_bytes(b"release\n")
    for args in (
        ("key", "--data-dir", str(data), "generate-master-key"),
        ("key", "--data-dir", str(data), "--no-daemon", "generate", "k"),
        ("key", "--data-dir", str(data), "--no-daemon", "sign", "k", "-i", "doc", "-o", "sig"),
    ):
        p = vhsm(*args, cwd=root)
        assert p.returncode == 0, p.stderr
    return data


@pytest.fixture
def site(template: Path, shared_dir: Path) -> Site:
    data = shared_dir / "data"
    shutil.copytree(template, data, symlinks=True)
    os.chmod(data, 0o700)
    victim = shared_dir / "victim"
    victim.mkdir()
    (victim / "target").write_bytes(b"precious, not to be read or changed\n")
    os.chmod(victim / "target", 0o600)
    doc = shared_dir / "doc"
    doc.write_bytes(b"release\n")
    os.chmod(doc, 0o644)
    return Site(shared_dir, data, victim, doc)


# file -> what the error calls it
FILES = {
    "keystore.dat": "keystore",
    "master.key": "master key file",
    "master.key.protected": "protected master key",
    ".hsm_user": "user context",
    ".keystore.lock": "keystore lock",
    "hsm_audit.log": "audit log",
    ".hsm_audit.log.key": "audit key",
    ".hsm_audit.log.head": "audit head",
    ".hsm_audit.log.lock": "audit lock",
}
KINDS = {
    "symlink": "is a symbolic link",
    "dangling-symlink": "is a symbolic link",
    "fifo": "is a FIFO",
    "device": "is a character device",
    "other-owner": "is owned by uid",
    "hardlink": "hard links",
}


def plant(site: Site, name: str, kind: str, other_uid: int) -> None:
    """Put `kind` at data/name as root could find it after an attacker's visit (or a careless
    admin's). The master key moves aside when the protected one is attacked, so it is reached."""
    path = site.data / name
    if name == "master.key.protected":
        os.rename(site.data / "master.key", site.root / "master.key.aside")
    old = path.read_bytes() if path.exists() else b"mallory\n"
    if os.path.lexists(path):
        os.unlink(path)
    if kind == "symlink":
        os.symlink(site.victim / "target", path)
    elif kind == "dangling-symlink":  # O_CREAT through it would create the target
        os.symlink(site.victim / "created", path)
    elif kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "device":  # like /dev/zero: endless to read, swallows writes
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))
    elif kind == "other-owner":
        path.write_bytes(old)
        os.chmod(path, 0o600)
        os.chown(path, other_uid, other_uid)
    elif kind == "hardlink":  # a root-owned file elsewhere, linked in
        os.link(site.victim / "target", path)
    else:
        raise AssertionError(kind)


CASES = [(n, k) for n in FILES for k in KINDS if k != "hardlink"] + [
    # only files written in place can be hurt through a hard link; replaced files are renamed
    ("hsm_audit.log", "hardlink"),
    (".hsm_audit.log.head", "hardlink"),
]


@pytest.mark.parametrize(("name", "kind"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_planted_entry_refused(
    site: Site, other_user: pwd.struct_passwd, name: str, kind: str
) -> None:
    plant(site, name, kind, other_user.pw_uid)
    victim = tree_snapshot(site.victim)
    planted = snapshot(site.data / name)
    p = site.sign()
    line = assert_one_line_error(p, FILES[name], str(site.data / name), KINDS[kind])
    assert "refusing" in line
    assert tree_snapshot(site.victim) == victim
    assert snapshot(site.data / name) == planted
    assert not (site.root / "sig").exists()


@pytest.mark.parametrize("entry", ["cli.main", "cli.compat"])
def test_audit_key_of_another_user_refused(
    site: Site, other_user: pwd.struct_passwd, entry: str
) -> None:
    """The issue's example: an audit key owned by another user was accepted, so whoever planted
    it could forge the chain. Both command syntaxes refuse it."""
    plant(site, ".hsm_audit.log.key", "other-owner", other_user.pw_uid)
    log = snapshot(site.data / "hsm_audit.log")
    p = site.sign(entry)
    assert_one_line_error(
        p,
        f"audit key {site.data}/.hsm_audit.log.key is owned by uid {other_user.pw_uid}, "
        "not by you or the directory's owner; refusing it",
    )
    assert snapshot(site.data / "hsm_audit.log") == log


READERS = [
    (("audit", "verify"), "hsm_audit.log"),
    (("audit", "verify"), ".hsm_audit.log.key"),
    (("audit", "verify"), ".hsm_audit.log.head"),
    (("audit", "logs"), "hsm_audit.log"),
    (("audit", "export", "--csv"), "hsm_audit.log"),
    (("user", "show"), ".hsm_user"),
]


@pytest.mark.parametrize("kind", ["symlink", "fifo", "device"])
@pytest.mark.parametrize(
    ("cmd", "name"), READERS, ids=[f"{'-'.join(c[:2])}-{n}" for c, n in READERS]
)
def test_readers_refuse_planted_entry(
    site: Site, other_user: pwd.struct_passwd, cmd: tuple[str, ...], name: str, kind: str
) -> None:
    """Commands that only read (audit verify/logs/export, user show) neither follow, hang on,
    nor read without end what is planted where they read."""
    plant(site, name, kind, other_user.pw_uid)
    victim = tree_snapshot(site.victim)
    p = run(site, *cmd)
    assert_one_line_error(p, FILES[name], str(site.data / name), KINDS[kind])
    assert b"precious" not in p.stdout
    assert tree_snapshot(site.victim) == victim


@pytest.mark.parametrize("kind", ["fifo", "dangling-symlink", "other-owner"])
def test_user_set_refuses_planted_user_file(
    site: Site, other_user: pwd.struct_passwd, kind: str
) -> None:
    """`vhsm user set` and `hsm_enhanced -set_user` replace .hsm_user: never over (or through)
    what someone planted there."""
    plant(site, ".hsm_user", kind, other_user.pw_uid)
    planted, victim = snapshot(site.data / ".hsm_user"), tree_snapshot(site.victim)
    for p in (run(site, "user", "set", "bob"), run(site, "-set_user", "bob", entry="cli.compat")):
        assert_one_line_error(p, "user context", str(site.data / ".hsm_user"), KINDS[kind])
    assert snapshot(site.data / ".hsm_user") == planted
    assert tree_snapshot(site.victim) == victim


SIZES = {  # file -> the most the format allows
    "keystore.dat": 64 << 20,
    "master.key": 32,
    "master.key.protected": 64 << 10,
    ".hsm_user": 4096,
    ".hsm_audit.log.key": 32,
    ".hsm_audit.log.head": 512,
}


@pytest.mark.parametrize("name", list(SIZES))
def test_oversized_file_refused_without_reading_it(site: Site, name: str) -> None:
    """A (sparse) file far larger than its format allows is refused after reading at most one
    byte more than the limit; reading it whole would exceed the memory cap."""
    if name == "master.key.protected":
        os.rename(site.data / "master.key", site.root / "master.key.aside")
    path = site.data / name
    with open(path, "ab") as f:
        f.truncate(4 << 30)
    os.chmod(path, 0o600)
    p = site.sign()
    assert_one_line_error(p, FILES[name], str(path), f"is larger than {SIZES[name]} bytes")


def _as(user: pwd.struct_passwd, *argv: str) -> None:
    subprocess.run(
        argv, check=True, timeout=QUICK, user=user.pw_uid, group=user.pw_gid, extra_groups=[]
    )


@pytest.mark.parametrize(
    ("name", "how", "expect"),
    [
        (".hsm_audit.log.key", "key", "is owned by uid"),
        (".hsm_user", "user", "is owned by uid"),
        (".keystore.lock", "symlink", "is a symbolic link"),
        (".hsm_audit.log.head", "fifo", "is a FIFO"),
    ],
)
def test_another_user_preplants_in_sticky_data_dir(
    site: Site, other_user: pwd.struct_passwd, name: str, how: str, expect: str
) -> None:
    """Root runs vhsm in a sticky world-writable directory (like /tmp, where hsm_enhanced's
    default of the working directory puts it). Another user, really running as that user,
    plants names before root first uses them: their own audit key (to forge the chain), their
    own user context, a lock symlink that root would create through, a FIFO head."""
    for n in (name, ".hsm_audit.log.head", ".hsm_audit.log.key", "hsm_audit.log"):
        if os.path.lexists(site.data / n):
            os.unlink(site.data / n)  # a fresh log: its key and head do not exist yet
    os.chmod(site.data, 0o1777)
    os.chmod(site.victim, 0o1777)  # the attacker's own link target would go here
    path = str(site.data / name)
    if how == "key":
        _as(other_user, "sh", "-c", f"head -c 32 /dev/urandom > {path} && chmod 600 {path}")
    elif how == "user":
        _as(other_user, "sh", "-c", f"echo somebody-else > {path}")
    elif how == "symlink":
        _as(other_user, "ln", "-s", str(site.victim / "created"), path)
    else:
        _as(other_user, "mkfifo", path)
    victim = tree_snapshot(site.victim)
    p = site.sign()
    assert_one_line_error(p, FILES[name], path, expect)
    assert tree_snapshot(site.victim) == victim
    log = site.data / "hsm_audit.log"
    assert not log.exists() or b"SIGN_OPERATION" not in log.read_bytes()


@pytest.mark.parametrize("mode", [0o777, 0o770])
def test_data_dir_writable_by_others_refused(site: Site, mode: int) -> None:
    """StrictModes: whoever may write a (non-sticky) data dir can rename, roll back or delete
    keystore.dat and the log, so vhsm refuses to use files in it and says how to fix it.
    Reading a file that is not there needs no trust: `user show` still works."""
    os.chmod(site.data, mode)
    before = tree_snapshot(site.data)
    p = site.sign()
    assert_one_line_error(
        p, f"data dir {site.data} is writable by group or others", f"chmod go-w {site.data}"
    )
    assert tree_snapshot(site.data) == before
    assert run(site, "user", "show").returncode == 0
    os.chmod(site.data, mode | stat.S_ISVTX)  # sticky, like /tmp: others cannot swap files
    assert site.sign().returncode == 0


def test_root_in_service_users_data_dir_gives_files_to_that_user(
    shared_dir: Path, other_user: pwd.struct_passwd
) -> None:
    """`sudo vhsm ...` in the data dir of the service user: every file root creates there
    belongs to that user afterwards, so the service (running as that user) can still use it,
    and root itself keeps trusting them (they belong to the directory's owner)."""
    data = shared_dir / "svc"
    data.mkdir(mode=0o700)
    os.chown(data, other_user.pw_uid, other_user.pw_gid)
    (shared_dir / "doc").write_bytes(b"release\n")
    os.chmod(shared_dir / "doc", 0o644)
    common = ("--data-dir", str(data), "--no-daemon")
    for args in (
        ("key", "--data-dir", str(data), "generate-master-key"),
        ("key", *common, "generate", "k"),
        ("user", *common, "set", "root-admin"),
        ("key", *common, "sign", "k", "-i", "doc", "-o", "-"),
    ):
        p = vhsm(*args, cwd=shared_dir, timeout=QUICK)
        assert p.returncode == 0, p.stderr
    names = sorted(os.listdir(data))
    assert {"keystore.dat", "master.key", ".hsm_user", "hsm_audit.log"} <= set(names)
    assert not [n for n in names if n.endswith(".tmp")]
    for n in names:
        st = os.lstat(data / n)
        assert stat.S_ISREG(st.st_mode), n
        assert (st.st_uid, st.st_gid) == (other_user.pw_uid, other_user.pw_gid), n
        assert stat.S_IMODE(st.st_mode) == 0o600, n
    env = env_for(home=shared_dir)
    p = vhsm(
        "key", *common, "sign", "k", "-i", "doc", "-o", "-",
        cwd=shared_dir, env=env, user=other_user.pw_uid, group=other_user.pw_gid, timeout=QUICK,
    )  # fmt: skip
    assert p.returncode == 0 and len(p.stdout) == 64, p.stderr
    p = vhsm("audit", *common, "verify", cwd=shared_dir, timeout=QUICK)
    assert p.returncode == 0, p.stderr
