"""How the mount's event loop waits for the next FUSE request (vhsmfs/mount/requestwait.py),
on a real pipe in place of /dev/fuse: a queued request is taken at once, a request that comes
while the loop spins is taken without sleeping, and the loop sleeps through trio when it may
not spin, when spinning is off, or while it backs off after a spin that found nothing. The
count of background jobs (vhsmfs/mount/workers.py) that keeps the loop from spinning, and
`vhsm mount` refusing a bad VHSM_MOUNT_SPIN_US."""

from __future__ import annotations

import os
import threading
import time

import pytest
import trio

from vhsmfs.mount import requestwait, workers
from vhsmfs.mount.requestwait import RequestWait

pytestmark = pytest.mark.timeout(60)


class Probe:
    """Counts the slow path (trio's real wait_readable) and the loop's permission to spin."""

    def __init__(self, may_spin: bool = True) -> None:
        self.real_waits = 0
        self.asked = 0
        self.allow = may_spin

    async def real(self, fd: int) -> None:
        self.real_waits += 1
        await trio.lowlevel.wait_readable(fd)

    def may_spin(self) -> bool:
        self.asked += 1
        return self.allow


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


def write_later(fd: int, delay: float) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(delay), os.write(fd, b"x")))
    t.start()
    return t


def run_waits(wait: RequestWait, fd: int, n: int) -> None:
    async def main() -> None:
        for _ in range(n):
            await wait.wait_readable(fd)
            os.read(fd, 1)

    trio.run(main)


def test_queued_request_is_taken_without_the_slow_path(pipe):
    r, w = pipe
    probe = Probe()
    wait = RequestWait(probe.real, probe.may_spin, max_skip=60.0, spin=0.0)
    os.write(w, b"a")
    run_waits(wait, r, 1)  # the first wait always takes trio's path
    os.write(w, b"b")
    run_waits(wait, r, 1)
    assert probe.real_waits == 1


def test_request_arriving_while_spinning_is_taken_without_sleeping(pipe):
    r, w = pipe
    probe = Probe()
    wait = RequestWait(probe.real, probe.may_spin, max_skip=60.0, spin=30.0)

    async def main() -> None:
        os.write(w, b"a")
        await wait.wait_readable(r)  # first: trio's path
        os.read(r, 1)
        writer = write_later(w, 0.05)  # arrives while the loop polls
        await wait.wait_readable(r)
        os.read(r, 1)
        writer.join()

    trio.run(main)
    assert probe.real_waits == 1
    assert probe.asked == 1


@pytest.mark.parametrize("allow, spin", [(False, 30.0), (True, 0.0)])
def test_no_spin_when_the_loop_has_other_work_or_spinning_is_off(pipe, allow, spin):
    r, w = pipe
    probe = Probe(may_spin=allow)
    wait = RequestWait(probe.real, probe.may_spin, max_skip=60.0, spin=spin)

    async def main() -> None:
        os.write(w, b"a")
        await wait.wait_readable(r)
        os.read(r, 1)
        writer = write_later(w, 0.05)
        await wait.wait_readable(r)  # must sleep in trio: a 30 s spin would hit the timeout
        os.read(r, 1)
        writer.join()

    trio.run(main)
    assert probe.real_waits == 2


def test_a_spin_that_finds_nothing_backs_off(pipe):
    r, w = pipe
    probe = Probe()
    wait = RequestWait(probe.real, probe.may_spin, max_skip=60.0, spin=0.001, backoff=30.0)

    async def main() -> None:
        os.write(w, b"a")
        await wait.wait_readable(r)
        os.read(r, 1)
        writer = write_later(w, 0.2)  # later than the 1 ms spin
        await wait.wait_readable(r)  # spins 1 ms, then sleeps in trio
        os.read(r, 1)
        writer.join()
        writer = write_later(w, 0.05)
        await wait.wait_readable(r)  # backing off: straight to trio, without asking to spin
        os.read(r, 1)
        writer.join()

    trio.run(main)
    assert probe.real_waits == 3
    assert probe.asked == 1


def test_background_jobs_are_counted_until_they_finish():
    pool = workers.CountingPool(max_workers=1)
    gate = threading.Event()
    before = workers.busy()
    try:
        running = pool.submit(gate.wait, 30)
        queued = pool.submit(lambda: 1 / 0)  # fails: must still be uncounted when done
        assert workers.busy() == before + 2
        gate.set()
        assert running.result(timeout=30) is True
        with pytest.raises(ZeroDivisionError):
            queued.result(timeout=30)
        assert workers.busy() == before  # uncounted before the result is handed over
    finally:
        gate.set()
        pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(print)  # refused after shutdown, and not counted
    assert workers.busy() == before


@pytest.mark.parametrize("value", ["abc", "-1", "2000000"])
def test_mount_refuses_a_bad_spin_setting(
    run_cli, is_mounted, key_file, store_dir, tmp_path, value
):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = run_cli(
        "mount",
        "--store",
        str(store_dir),
        "--key",
        str(key_file),
        "--background",
        str(mnt),
        check=False,
        timeout=60,
        extra_env={"VHSM_MOUNT_SPIN_US": value},
    )
    if is_mounted(mnt):  # only if the check failed: never leave a mount behind
        run_cli("umount", str(mnt), check=False, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"Error: VHSM_MOUNT_SPIN_US must be 0-100000 microseconds, not {value!r}"
    )
    assert not is_mounted(mnt)


def test_spin_setting_from_the_environment():
    assert requestwait.spin_from_env({}, cpus=2) == requestwait.SPIN
    assert requestwait.spin_from_env({"VHSM_MOUNT_SPIN_US": "0"}, cpus=2) == 0.0
    assert requestwait.spin_from_env({"VHSM_MOUNT_SPIN_US": "250"}, cpus=2) == 0.00025
    # one CPU: polling would only keep the client from running
    assert requestwait.spin_from_env({}, cpus=1) == 0.0
    assert requestwait.spin_from_env({"VHSM_MOUNT_SPIN_US": "250"}, cpus=1) == 0.0
