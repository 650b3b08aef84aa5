"""Process hardening for the processes that hold keys: the key service daemon and the mount.

* No core dumps (RLIMIT_CORE = 0) and not dumpable (prctl PR_SET_DUMPABLE 0): a crash does not
  write key material or plaintext to disk, and other processes of the same user cannot ptrace
  the process or read its memory through /proc.
* Memory locked (mlockall) where allowed, so keys are not written to swap. It needs
  CAP_IPC_LOCK (root) or a large enough RLIMIT_MEMLOCK (systemd `LimitMEMLOCK=`); refused, it is
  a warning, not an error. With MCL_FUTURE every later allocation is locked as well, and one the
  limit does not cover fails, so a process that cannot lock all it has now does not lock at all.

Every step is best effort: `harden()` returns warnings for the caller to print.
"""

from __future__ import annotations

import ctypes
import os
import resource

_PR_SET_DUMPABLE = 4
_MCL_CURRENT = 1
_MCL_FUTURE = 2
_MCL_ONFAULT = 4  # Linux 4.4+: lock pages as they are touched, not all mapped memory at once


def no_core_dumps() -> list[str]:
    """RLIMIT_CORE = 0 and PR_SET_DUMPABLE 0 (not inherited across exec)."""
    warnings = []
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError) as e:
        warnings.append(f"cannot set RLIMIT_CORE to 0: {e}")
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        warnings.append(f"prctl(PR_SET_DUMPABLE, 0) failed: {os.strerror(ctypes.get_errno())}")
    return warnings


def lock_memory(*, on_fault: bool = False) -> list[str]:
    """mlockall(MCL_CURRENT | MCL_FUTURE), with MCL_ONFAULT if asked (memory mapped but never
    touched, e.g. the unused part of thread stacks, is then not made resident)."""
    libc = ctypes.CDLL(None, use_errno=True)
    flags = _MCL_CURRENT | _MCL_FUTURE
    if on_fault and libc.mlockall(flags | _MCL_ONFAULT) == 0:
        return []
    # without MCL_ONFAULT (kernels before 4.4 refuse it with EINVAL), or not asked for
    if libc.mlockall(flags) != 0:
        err = ctypes.get_errno()
        return [
            f"mlockall failed ({os.strerror(err)}): key material may be swapped; "
            "raise the memlock limit (see docs)"
        ]
    return []


def harden(*, lock: bool = True, on_fault: bool = False) -> list[str]:
    """No core dumps, not ptrace-attachable by the same user, memory locked where allowed
    (`lock`). Returns warnings (one line each) for what could not be done."""
    warnings = no_core_dumps()
    if lock:
        warnings += lock_memory(on_fault=on_fault)
    return warnings
