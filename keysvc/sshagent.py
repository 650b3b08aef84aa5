"""The ssh-agent protocol (draft-miller-ssh-agent, OpenSSH PROTOCOL.agent) as `vhsm ssh-agent`
speaks it: framing, parsing and dispatch, with no sockets (keysvc.agentserver serves it).

The agent holds no keys. It lists the keys the key service offers for SSH and forwards each
signature request to the daemon's `sign` op, so every signature goes through the daemon's
policy, lifecycle and audit. Everything that would add, remove, lock or export keys is refused
with SSH_AGENT_FAILURE: the keys live in the key service and are managed with `vhsm key`.

Messages: uint32 length, then a type byte and its fields. Everything received may come from
an attacker: a frame longer than MAX_FRAME breaks the connection (the agent closes it, as
OpenSSH's agent does), a complete frame that does not parse is answered SSH_AGENT_FAILURE.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from keysvc import keytypes, sshwire
from keysvc.errors import AccessDenied, KeysvcError
from keysvc.sshwire import SshWireError

MAX_FRAME = 256 * 1024  # a sign request carries a session id or an SSHSIG digest: far below
MAX_KNOWN = 65536  # public blobs the agent remembers (more: it forgets them and lists again)

# message numbers (draft-miller-ssh-agent section 6.1)
SSH_AGENT_FAILURE = 5
SSH_AGENT_SUCCESS = 6
SSH_AGENTC_REQUEST_IDENTITIES = 11
SSH_AGENT_IDENTITIES_ANSWER = 12
SSH_AGENTC_SIGN_REQUEST = 13
SSH_AGENT_SIGN_RESPONSE = 14
SSH_AGENTC_ADD_IDENTITY = 17
SSH_AGENTC_REMOVE_IDENTITY = 18
SSH_AGENTC_REMOVE_ALL_IDENTITIES = 19
SSH_AGENTC_ADD_SMARTCARD_KEY = 20
SSH_AGENTC_REMOVE_SMARTCARD_KEY = 21
SSH_AGENTC_LOCK = 22
SSH_AGENTC_UNLOCK = 23
SSH_AGENTC_ADD_ID_CONSTRAINED = 25
SSH_AGENTC_ADD_SMARTCARD_KEY_CONSTRAINED = 26
SSH_AGENTC_EXTENSION = 27

# sign request flags (section 4.5.1)
SSH_AGENT_RSA_SHA2_256 = 2
SSH_AGENT_RSA_SHA2_512 = 4

_LEN = struct.Struct(">I")


class FrameTooLarge(ValueError):
    """A frame length over MAX_FRAME: the connection cannot be read any further."""


def frame(msg: bytes) -> bytes:
    """A message with its length prefix."""
    return _LEN.pack(len(msg)) + msg


FAILURE = frame(bytes([SSH_AGENT_FAILURE]))


def split(buf: bytearray) -> list[bytes]:
    """Remove and return every complete message at the start of buf (without the length).
    FrameTooLarge once an oversized length is at the start (after the complete ones)."""
    out: list[bytes] = []
    pos = 0
    n = len(buf)
    while n - pos >= 4:
        (length,) = _LEN.unpack_from(buf, pos)
        if length > MAX_FRAME:
            if out:
                break
            raise FrameTooLarge(f"agent message of {length} bytes exceeds the limit")
        if n - pos - 4 < length:
            break
        out.append(bytes(buf[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    if pos:
        del buf[:pos]
    return out


# --- requests --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestIdentities:
    pass


@dataclass(frozen=True, slots=True)
class SignRequest:
    key_blob: bytes
    data: bytes
    flags: int


@dataclass(frozen=True, slots=True)
class Refused:
    """Any other message: answered SSH_AGENT_FAILURE. `what` says which (for the debug log;
    never message contents)."""

    what: str


Request = RequestIdentities | SignRequest | Refused

_REFUSED_NAMES = {
    SSH_AGENTC_ADD_IDENTITY: "add identity",
    SSH_AGENTC_REMOVE_IDENTITY: "remove identity",
    SSH_AGENTC_REMOVE_ALL_IDENTITIES: "remove all identities",
    SSH_AGENTC_ADD_SMARTCARD_KEY: "add smartcard key",
    SSH_AGENTC_REMOVE_SMARTCARD_KEY: "remove smartcard key",
    SSH_AGENTC_LOCK: "lock",
    SSH_AGENTC_UNLOCK: "unlock",
    SSH_AGENTC_ADD_ID_CONSTRAINED: "add constrained identity",
    SSH_AGENTC_ADD_SMARTCARD_KEY_CONSTRAINED: "add constrained smartcard key",
}


def parse(msg: bytes) -> Request:
    """One message (without its length). SshWireError when a known message is malformed."""
    if not msg:
        raise SshWireError("empty agent message")
    kind = msg[0]
    r = sshwire.Reader(msg[1:])
    if kind == SSH_AGENTC_REQUEST_IDENTITIES:
        r.end()
        return RequestIdentities()
    if kind == SSH_AGENTC_SIGN_REQUEST:
        blob = r.string(16384)
        data = r.string(MAX_FRAME)
        flags = r.uint32()
        r.end()
        return SignRequest(blob, data, flags)
    if kind == SSH_AGENTC_EXTENSION:
        # no extension is supported (not even "query"): session-bind@openssh.com and the
        # like are answered with a failure, which OpenSSH's clients accept
        return Refused("extension")
    return Refused(_REFUSED_NAMES.get(kind, f"unknown message type {kind}"))


def identities_answer(ids: list[tuple[bytes, str]]) -> bytes:
    body = bytearray([SSH_AGENT_IDENTITIES_ANSWER])
    body += sshwire.uint32(len(ids))
    for blob, comment in ids:
        body += sshwire.string(blob) + sshwire.string(comment.encode())
    return frame(bytes(body))


def sign_response(signature_blob: bytes) -> bytes:
    return frame(bytes([SSH_AGENT_SIGN_RESPONSE]) + sshwire.string(signature_blob))


def signature_choice(key_type: str, flags: int) -> tuple[str, str | None] | None:
    """(SSH signature algorithm, hash for the daemon's `sign` op) for a request's flags; None
    when refused: an RSA request without SHA-2 flags asks for ssh-rsa (SHA-1), which the key
    service does not make (OpenSSH itself stopped accepting it by default in 8.8). SHA-256
    wins when both flags are set, as in OpenSSH's agent."""
    if key_type == keytypes.RSA_3072:
        if flags & SSH_AGENT_RSA_SHA2_256:
            return "rsa-sha2-256", "sha256"
        if flags & SSH_AGENT_RSA_SHA2_512:
            return "rsa-sha2-512", "sha512"
        return None
    if key_type == keytypes.ECDSA_P256:
        return "ecdsa-sha2-nistp256", "sha256"
    if key_type == keytypes.ED25519:
        return "ssh-ed25519", None
    return None


# --- dispatch --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identity:
    """One key version the key service offers for SSH."""

    key: str
    version: int
    key_type: str
    blob: bytes  # the SSH public key blob

    @property
    def comment(self) -> str:
        return f"vhsm:{self.key}:v{self.version}"


class Backend(Protocol):
    """The key service as the agent needs it (async; KeysvcError on failure)."""

    async def identities(self) -> list[Identity]: ...

    async def sign(self, ident: Identity, data: bytes, hash_name: str | None) -> bytes:
        """The raw signature as the daemon's `sign` returns it (ECDSA: DER)."""
        ...


class Agent:
    """Answers agent messages (one event loop: the server awaits `handle` per message).

    Signature requests name a key by its public blob. The agent maps blobs to (key, version)
    from the listings it made, and lists again when a blob is unknown. A stale entry cannot make
    a wrong signature: a (key, version) pair's public key never changes (a key name is never
    reused, destroyed keys keep their record), and the daemon checks policy, state, the SSH
    mark and the version's retirement on every signature."""

    def __init__(self, backend: Backend, log: Callable[[str], None] | None = None) -> None:
        self.backend = backend
        self.log = log or (lambda _msg: None)
        self._by_blob: dict[bytes, Identity] = {}

    async def _list(self) -> list[Identity]:
        ids = await self.backend.identities()
        # kept, not replaced: a key that left the listing (suspended, unmarked) is still sent
        # to the daemon, which refuses it and audits the attempt
        if len(self._by_blob) > MAX_KNOWN:
            self._by_blob.clear()
        self._by_blob.update((i.blob, i) for i in ids)
        return ids

    async def _lookup(self, blob: bytes) -> Identity | None:
        hit = self._by_blob.get(blob)
        if hit is None:
            hit = next((i for i in await self._list() if i.blob == blob), None)
        return hit

    async def handle(self, msg: bytes) -> bytes:
        """The framed answer to one message. Never raises for bad input or a failing key
        service: those are SSH_AGENT_FAILURE."""
        try:
            req = parse(msg)
        except SshWireError as e:
            self.log(f"malformed request: {e}")
            return FAILURE
        try:
            if isinstance(req, RequestIdentities):
                try:
                    ids = await self._list()
                except AccessDenied as e:
                    # the policy grants this user nothing: no keys, as far as ssh is concerned
                    # (the daemon audited the denial); a daemon that is down stays a failure
                    self.log(f"key service: {e}")
                    ids = []
                return identities_answer([(i.blob, i.comment) for i in ids])
            if isinstance(req, SignRequest):
                return await self._sign(req)
        except KeysvcError as e:
            self.log(f"key service: {e}")
            return FAILURE
        except Exception as e:  # a bug or an odd reply must not end the agent
            self.log(f"request failed: {type(e).__name__}")
            return FAILURE
        self.log(f"refused: {req.what}")
        return FAILURE

    async def _sign(self, req: SignRequest) -> bytes:
        ident = await self._lookup(req.key_blob)
        if ident is None:
            self.log("sign request for a key this agent does not offer")
            return FAILURE
        choice = signature_choice(ident.key_type, req.flags)
        if choice is None:
            self.log(f"refused ssh-rsa (SHA-1) signature with {ident.comment}")
            return FAILURE
        algorithm, hash_name = choice
        raw = await self.backend.sign(ident, req.data, hash_name)
        return sign_response(sshwire.signature_blob(algorithm, raw))
