"""A real SoftHSM2 for tests: a private token directory named by SOFTHSM2_CONF, tokens made with
`softhsm2-util --init-token --free` (found by label later: slot ids are random), and a direct
python-pkcs11 session for looking at what the code under test left on a token.

Everything lives under the test's tmp dir, so nothing outlives the test; SoftHSM2 is a library,
not a server, so there is no process to stop. python-pkcs11 keeps a module loaded once per
process, so every direct use here finalises it again (SoftHSM2 rereads SOFTHSM2_CONF on the next
C_Initialize, and sees tokens made since)."""

from __future__ import annotations

import contextlib
import glob
import os
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pkcs11

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TIMEOUT = 30
SO_PIN = "5678-so"

# SoftHSM2's file object store (src/lib/object_store/OSToken.cpp, ObjectFile.cpp): token.object
# is an 8-byte generation, then attributes as (type u64, kind u64, value) big-endian, kind 1 a
# bool (1 byte), 2 an unsigned long (8 bytes), 3 a byte string (u64 length + bytes).
_CKA_OS_TOKENFLAGS = 0x8000534B
CKF_USER_PIN_LOCKED = 0x00040000


@dataclass
class SoftHsm:
    tokendir: Path
    conf: Path

    @property
    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}

    def util(self, *args: str) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(
            ["softhsm2-util", *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        if p.returncode != 0:
            raise AssertionError(f"softhsm2-util {args[0]} failed: {p.stderr or p.stdout}")
        return p

    def init_token(self, label: str, pin: str) -> None:
        self.util("--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", SO_PIN)

    def delete_token(self, label: str) -> None:
        self.util("--delete-token", "--token", label)

    @contextlib.contextmanager
    def session(self, label: str, pin: str, *, rw: bool = False) -> Iterator[Any]:
        """A logged-in python-pkcs11 session on the token `label` (module finalised after)."""
        lib = pkcs11.lib(MODULE)
        try:
            token = lib.get_token(token_label=label)
            with token.open(rw=rw, user_pin=pin) as s:
                yield s
        finally:
            lib.finalize()

    def serial(self, label: str) -> str:
        lib = pkcs11.lib(MODULE)
        try:
            return lib.get_token(token_label=label).serial.decode().strip()
        finally:
            lib.finalize()

    def lock_user_pin(self, label: str) -> None:
        """Mark the user PIN locked in the token's stored flags, as a token reports it after too
        many wrong PINs. SoftHSM2 counts no tries itself (it only sets CKF_USER_PIN_COUNT_LOW),
        but it reports the stored flags through C_GetTokenInfo."""
        for path in glob.glob(str(self.tokendir / "*" / "token.object")):
            data = bytearray(Path(path).read_bytes())
            if _label_in(data) == label:
                _or_flags(data, CKF_USER_PIN_LOCKED)
                Path(path).write_bytes(bytes(data))
                return
        raise AssertionError(f"no token.object for token {label}")


def _records(data: bytearray) -> Iterator[tuple[int, int, int, int]]:
    """(type, kind, value offset, value length) of each attribute of a SoftHSM2 object file."""
    off = 8
    while off < len(data):
        typ, kind = struct.unpack_from(">QQ", data, off)
        off += 16
        if kind == 1:
            n = 1
        elif kind == 2:
            n = 8
        elif kind == 3:
            (n,) = struct.unpack_from(">Q", data, off)
            off += 8
        else:
            raise AssertionError(f"SoftHSM2 object file: unknown attribute kind {kind}")
        yield typ, kind, off, n
        off += n


def _label_in(data: bytearray) -> str:
    for typ, _kind, off, n in _records(data):
        if typ == 0x80005349:  # CKA_OS_TOKENLABEL: 32 bytes, blank padded
            return bytes(data[off : off + n]).decode().rstrip()
    raise AssertionError("SoftHSM2 token.object without a label")


def _or_flags(data: bytearray, bits: int) -> None:
    for typ, _kind, off, _n in _records(data):
        if typ == _CKA_OS_TOKENFLAGS:
            (flags,) = struct.unpack_from(">Q", data, off)
            struct.pack_into(">Q", data, off, flags | bits)
            return
    raise AssertionError("SoftHSM2 token.object without token flags")


def make_softhsm(tmp: Path) -> SoftHsm:
    tokendir = tmp / "softhsm-tokens"
    tokendir.mkdir(mode=0o700)
    conf = tmp / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokendir}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    return SoftHsm(tokendir, conf)
