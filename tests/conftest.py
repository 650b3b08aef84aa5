"""Fixtures every area of the suite uses: a second, real Unix user and a directory both users
can reach. The suite runs as root, as vhsm usually does; tests that need another user (access
policy, ownership rules, attacks) get one created here and always removed."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def other_user() -> Iterator[pwd.struct_passwd]:
    """A fresh unprivileged user (own group, no home, no login shell); its processes are
    killed and the user deleted afterwards, whatever the test did."""
    assert os.geteuid() == 0, "the attack tests create a Unix user: run them as root"
    name = f"vhsmx{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
        timeout=60,
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True, timeout=30)
        subprocess.run(["userdel", name], capture_output=True, timeout=60)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory under /tmp that every user can reach (pytest's tmp_path is private to root):
    mode 0755, owned by root. Tests open it up further where the attack needs write access."""
    d = Path(tempfile.mkdtemp(prefix="vhsm-shared-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
