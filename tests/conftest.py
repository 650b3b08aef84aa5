"""Fixtures every area of the suite uses: a second, real Unix user. The suite runs as root, as
vhsm usually does; tests that need another user (access policy, ownership rules, attacks) get
one created here and always removed."""

from __future__ import annotations

import os
import pwd
import subprocess
import uuid
from collections.abc import Iterator

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
