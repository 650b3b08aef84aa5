"""TEST FIXTURE: a software FIDO2 (CTAP2.1) authenticator, as a virtual smart card behind vpcd.

No USB or NFC authenticator exists on the test machines (and no /dev/uhid for a virtual HID one),
so this software authenticator stands in for the hardware. It is never part of the product: it
keeps its secrets in plain process memory and "user presence" is always granted.

Three layers, each usable alone:

- `VirtualAuthenticator.handle(request)`: CTAP2 command byte + CBOR in, status byte + CBOR out.
  authenticatorGetInfo, makeCredential (ES256, packed self-attestation, hmac-secret),
  getAssertion (hmac-secret with PIN/UV auth protocol 2) and clientPIN (getRetries,
  getKeyAgreement, setPIN, getPinToken, getPinUvAuthTokenUsingPinWithPermissions), protocol 2.
  Credentials are not stored: the credential id is the private key and CredRandom sealed with
  AES-GCM under the card's secret (bound to the RP id hash), so a card with another secret
  cannot use it, exactly like a real authenticator that does not hold the credential.
- `VirtualCtapDevice`: the authenticator as a python-fido2 `CtapDevice` (in-process, no PC/SC).
- `CtapApplet` + `serve_vpcd`: the NFC/CCID applet (SELECT AID A0000006472F0001, NFCCTAP_MSG
  80 10, command chaining, extended APDUs, GET RESPONSE 61xx) spoken over the vpcd socket
  protocol: 2-byte big-endian length + payload; a 1-byte payload is a control byte from vpcd
  (0 power off, 1 power on, 2 reset, 4 get ATR: the only one answered).

Run as a script (inside the pcscd namespace, see pcsc_fixture.py):
    echo SECRET_HEX | python virtual_ctap_card.py --port 35963
It prints "ready" once pcscd has powered the card up (asked for its ATR).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from threading import Event
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from fido2 import cbor
from fido2.cose import ES256
from fido2.ctap import CtapDevice, CtapError
from fido2.ctap2.pin import PinProtocolV2
from fido2.hid import CAPABILITY, CTAPHID
from fido2.webauthn import AttestedCredentialData, AuthenticatorData

ERR = CtapError.ERR
AAGUID = bytes.fromhex("7668736d2d746573742d63617264ff01")  # "vhsm-test-card" + tag
AID_FIDO = bytes.fromhex("A0000006472F0001")
ATR = bytes.fromhex("3B80800101")  # T=1, no historical bytes; TCK = XOR(T0..TD2)
PIN_RETRIES_MAX = 8
PERM_MC, PERM_GA = 0x01, 0x02
PUAT_REQUIRED = 0x36  # CTAP2_ERR_PUAT_REQUIRED (named PIN_REQUIRED in older python-fido2)


class _Fail(Exception):
    """A CTAP2 error status to answer with."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(secret)


def _cose_p256(pub: ec.EllipticCurvePublicKey, alg: int) -> dict[int, Any]:
    n = pub.public_numbers()
    return {1: 2, 3: alg, -1: 1, -2: n.x.to_bytes(32, "big"), -3: n.y.to_bytes(32, "big")}


def _p256_from_cose(key: Any) -> ec.EllipticCurvePublicKey:
    try:
        x, y = key[-2], key[-3]
        if key[1] != 2 or key[-1] != 1 or len(x) != 32 or len(y) != 32:
            raise ValueError
        nums = ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
        )
        return nums.public_key()
    except (KeyError, TypeError, ValueError):
        raise _Fail(ERR.INVALID_PARAMETER) from None


class VirtualAuthenticator:
    """The CTAP2 state machine. `secret` (32 bytes) is the card's identity: it seals every
    credential id, so two cards with different secrets never accept each other's credentials."""

    def __init__(self, secret: bytes) -> None:
        self._wrap = AESGCM(_hkdf(secret, b"virtual ctap card: credential wrap"))
        self._pin_hash: bytes | None = None  # LEFT(SHA-256(PIN), 16), as the spec stores it
        self._retries = PIN_RETRIES_MAX
        self._counter = 0
        self._proto = PinProtocolV2()
        self._new_key_agreement()
        self._token: bytes | None = None
        self._token_perms = 0
        self._token_rp: str | None = None

    def _new_key_agreement(self) -> None:
        # The spec regenerates the key agreement key after a wrong PIN (and at power up).
        self._ka = ec.generate_private_key(ec.SECP256R1())

    # --- dispatch -------------------------------------------------------------------------

    def handle(self, request: bytes) -> bytes:
        if not request:
            return bytes([ERR.INVALID_LENGTH])
        handlers: dict[int, Callable[[dict[int, Any]], dict[int, Any]]] = {
            0x01: self._make_credential,
            0x02: self._get_assertion,
            0x04: lambda _p: self._get_info(),
            0x06: self._client_pin,
        }
        handler = handlers.get(request[0])
        if handler is None:
            return bytes([ERR.INVALID_COMMAND])
        try:
            params = cbor.decode(request[1:]) if len(request) > 1 else {}
            if not isinstance(params, dict):
                raise _Fail(ERR.CBOR_UNEXPECTED_TYPE)
            result = handler(params)
        except _Fail as e:
            return bytes([e.code])
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return bytes([ERR.INVALID_CBOR])
        return b"\x00" + cbor.encode(result)

    def _get_info(self) -> dict[int, Any]:
        return {
            1: ["FIDO_2_0", "FIDO_2_1"],
            2: ["hmac-secret"],
            3: AAGUID,
            4: {
                "rk": False,
                "up": True,
                "plat": False,
                "clientPin": self._pin_hash is not None,
                "pinUvAuthToken": True,
            },
            5: 1200,
            6: [2],
            8: 128,
            9: ["nfc"],
            10: [{"type": "public-key", "alg": -7}],
        }

    # --- PIN / UV auth protocol 2 -----------------------------------------------------------

    def _shared_secret(self, params: dict[int, Any]) -> bytes:
        if params.get(1) != 2:
            raise _Fail(ERR.INVALID_PARAMETER)
        peer = _p256_from_cose(params.get(3))
        return self._proto.kdf(self._ka.exchange(ec.ECDH(), peer))

    def _verify(self, key: bytes, message: bytes, tag: Any) -> None:
        if not isinstance(tag, bytes) or not hmac.compare_digest(
            self._proto.authenticate(key, message), tag
        ):
            raise _Fail(ERR.PIN_AUTH_INVALID)

    def _decrypt(self, shared: bytes, data: Any, sizes: tuple[int, ...]) -> bytes:
        if not isinstance(data, bytes) or len(data) - 16 not in sizes:
            raise _Fail(ERR.INVALID_PARAMETER)
        return self._proto.decrypt(shared, data)

    def _client_pin(self, p: dict[int, Any]) -> dict[int, Any]:
        sub = p.get(2)
        if sub == 0x01:  # getPINRetries
            return {3: self._retries}
        if sub == 0x02:  # getKeyAgreement
            return {1: _cose_p256(self._ka.public_key(), -25)}
        if sub == 0x03:  # setPIN
            if self._pin_hash is not None:
                raise _Fail(ERR.NOT_ALLOWED)
            shared = self._shared_secret(p)
            self._verify(shared, p.get(5, b""), p.get(4))
            padded = self._decrypt(shared, p.get(5), (64,))
            pin = padded.rstrip(b"\0")
            if len(pin.decode("utf-8", "replace")) < 4:
                raise _Fail(ERR.PIN_POLICY_VIOLATION)
            self._pin_hash = hashlib.sha256(pin).digest()[:16]
            self._retries = PIN_RETRIES_MAX
            return {}
        if sub in (0x05, 0x09):  # getPinToken (legacy) / ...UsingPinWithPermissions
            return self._pin_token(p, legacy=sub == 0x05)
        raise _Fail(ERR.INVALID_SUBCOMMAND)

    def _pin_token(self, p: dict[int, Any], legacy: bool) -> dict[int, Any]:
        if self._pin_hash is None:
            raise _Fail(ERR.PIN_NOT_SET)
        if self._retries == 0:
            raise _Fail(ERR.PIN_BLOCKED)
        perms = PERM_MC | PERM_GA if legacy else p.get(9)
        if not isinstance(perms, int) or perms == 0:
            raise _Fail(ERR.MISSING_PARAMETER)
        shared = self._shared_secret(p)
        pin_hash = self._decrypt(shared, p.get(6), (16,))
        self._retries -= 1
        if not hmac.compare_digest(pin_hash, self._pin_hash):
            self._new_key_agreement()
            raise _Fail(ERR.PIN_BLOCKED if self._retries == 0 else ERR.PIN_INVALID)
        self._retries = PIN_RETRIES_MAX
        self._token = os.urandom(32)
        self._token_perms = perms
        self._token_rp = None if legacy else p.get(10)
        return {2: self._proto.encrypt(shared, self._token)}

    def _check_uv(self, cdh: bytes, param: Any, proto: Any, perm: int, rp_id: str) -> bool:
        """True when a valid pinUvAuthParam came with the request (user verified)."""
        if param is None:
            if self._pin_hash is not None:
                raise _Fail(PUAT_REQUIRED)
            return False
        if proto != 2:
            raise _Fail(ERR.INVALID_PARAMETER)
        if self._token is None:
            raise _Fail(ERR.PIN_AUTH_INVALID)
        self._verify(self._token, cdh, param)
        if not self._token_perms & perm or self._token_rp not in (None, rp_id):
            raise _Fail(ERR.PIN_AUTH_INVALID)
        return True

    # --- credentials --------------------------------------------------------------------------

    def _seal_credential(self, rp_hash: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
        scalar = key.private_numbers().private_value.to_bytes(32, "big")
        nonce = os.urandom(12)
        # Two CredRandoms as the spec has: one for assertions with UV, one without.
        body = scalar + os.urandom(32) + os.urandom(32)
        return nonce + self._wrap.encrypt(nonce, body, rp_hash)

    def _open_credential(
        self, rp_hash: bytes, cred_id: bytes
    ) -> tuple[ec.EllipticCurvePrivateKey, bytes, bytes] | None:
        try:
            body = self._wrap.decrypt(cred_id[:12], cred_id[12:], rp_hash)
        except (InvalidTag, ValueError):
            return None
        key = ec.derive_private_key(int.from_bytes(body[:32], "big"), ec.SECP256R1())
        return key, body[32:64], body[64:96]

    def _make_credential(self, p: dict[int, Any]) -> dict[int, Any]:
        cdh, rp, params = p.get(1), p.get(2), p.get(4)
        if not isinstance(cdh, bytes) or not isinstance(rp, dict) or not isinstance(params, list):
            raise _Fail(ERR.MISSING_PARAMETER)
        rp_id = rp.get("id")
        if not isinstance(rp_id, str):
            raise _Fail(ERR.MISSING_PARAMETER)
        if not any(isinstance(c, dict) and c.get("alg") == -7 for c in params):
            raise _Fail(ERR.UNSUPPORTED_ALGORITHM)
        if (p.get(7) or {}).get("rk"):
            raise _Fail(ERR.UNSUPPORTED_OPTION)
        uv = self._check_uv(cdh, p.get(8), p.get(9), PERM_MC, rp_id)
        rp_hash = hashlib.sha256(rp_id.encode()).digest()
        key = ec.generate_private_key(ec.SECP256R1())
        cred_id = self._seal_credential(rp_hash, key)
        for excluded in p.get(5) or []:
            if isinstance(excluded, dict) and self._open_credential(
                rp_hash, excluded.get("id", b"")
            ):
                raise _Fail(ERR.CREDENTIAL_EXCLUDED)
        exts = {"hmac-secret": True} if (p.get(6) or {}).get("hmac-secret") is True else None
        flags = AuthenticatorData.FLAG.UP | AuthenticatorData.FLAG.AT
        flags |= AuthenticatorData.FLAG.UV if uv else 0
        flags |= AuthenticatorData.FLAG.ED if exts else 0
        self._counter += 1
        cred_data = AttestedCredentialData.create(
            AAGUID, cred_id, ES256.from_cryptography_key(key.public_key())
        )
        auth_data = AuthenticatorData.create(rp_hash, flags, self._counter, cred_data, exts)
        sig = key.sign(auth_data + cdh, ec.ECDSA(hashes.SHA256()))  # packed self-attestation
        return {1: "packed", 2: auth_data, 3: {"alg": -7, "sig": sig}}

    def _hmac_secret(self, ext: Any, cred_random: bytes) -> bytes:
        if not isinstance(ext, dict):
            raise _Fail(ERR.INVALID_PARAMETER)
        shared = self._shared_secret({1: ext.get(4, 1), 3: ext.get(1)})
        salt_enc = ext.get(2)
        self._verify(shared, salt_enc if isinstance(salt_enc, bytes) else b"", ext.get(3))
        salts = self._decrypt(shared, salt_enc, (32, 64))
        out = b"".join(
            hmac.new(cred_random, salts[i : i + 32], hashlib.sha256).digest()
            for i in range(0, len(salts), 32)
        )
        return self._proto.encrypt(shared, out)

    def _get_assertion(self, p: dict[int, Any]) -> dict[int, Any]:
        rp_id, cdh, allow = p.get(1), p.get(2), p.get(3)
        if not isinstance(rp_id, str) or not isinstance(cdh, bytes):
            raise _Fail(ERR.MISSING_PARAMETER)
        uv = self._check_uv(cdh, p.get(6), p.get(7), PERM_GA, rp_id)
        rp_hash = hashlib.sha256(rp_id.encode()).digest()
        found = None
        for desc in allow if isinstance(allow, list) else []:
            cid = desc.get("id") if isinstance(desc, dict) else None
            if isinstance(cid, bytes) and (opened := self._open_credential(rp_hash, cid)):
                found = cid, opened
                break
        if found is None:  # no resident keys: only the allow list can name a credential
            raise _Fail(ERR.NO_CREDENTIALS)
        cred_id, (key, random_uv, random_no_uv) = found
        exts = None
        if "hmac-secret" in (p.get(4) or {}):
            random = random_uv if uv else random_no_uv
            exts = {"hmac-secret": self._hmac_secret(p[4]["hmac-secret"], random)}
        flags = AuthenticatorData.FLAG.UP
        flags |= AuthenticatorData.FLAG.UV if uv else 0
        flags |= AuthenticatorData.FLAG.ED if exts else 0
        self._counter += 1
        auth_data = AuthenticatorData.create(rp_hash, flags, self._counter, b"", exts)
        sig = key.sign(auth_data + cdh, ec.ECDSA(hashes.SHA256()))
        return {1: {"type": "public-key", "id": cred_id}, 2: auth_data, 3: sig}


class VirtualCtapDevice(CtapDevice):
    """The authenticator plugged straight into python-fido2 as a CtapDevice (no transport)."""

    def __init__(self, authenticator: VirtualAuthenticator) -> None:
        self._auth = authenticator

    @property
    def capabilities(self) -> int:
        return CAPABILITY.CBOR

    def call(
        self,
        cmd: int,
        data: bytes = b"",
        event: Event | None = None,
        on_keepalive: Callable[[int], None] | None = None,
    ) -> bytes:
        if cmd != CTAPHID.CBOR:
            raise CtapError(ERR.INVALID_COMMAND)
        return self._auth.handle(bytes(data))

    @classmethod
    def list_devices(cls):  # type: ignore[override]
        return iter(())


# --- ISO 7816-4 applet ----------------------------------------------------------------------

SW_OK = b"\x90\x00"
SW_WRONG_LENGTH = b"\x67\x00"
SW_NOT_FOUND = b"\x6a\x82"
SW_INS_UNKNOWN = b"\x6d\x00"
SW_CLA_UNKNOWN = b"\x6e\x00"
SW_CONDITIONS = b"\x69\x85"


def parse_apdu(apdu: bytes) -> tuple[int, int, int, int, bytes, bool] | None:
    """(cla, ins, p1, p2, data, extended) for cases 1-4, short or extended; None if malformed."""
    if len(apdu) < 4:
        return None
    cla, ins, p1, p2 = apdu[:4]
    body = apdu[4:]
    if len(body) <= 1:  # case 1, or short case 2 (Le only)
        return cla, ins, p1, p2, b"", False
    if body[0] != 0:  # short Lc
        lc = body[0]
        if len(body) not in (1 + lc, 2 + lc):
            return None
        return cla, ins, p1, p2, body[1 : 1 + lc], False
    if len(body) == 3:  # extended case 2: 00 Le1 Le2
        return cla, ins, p1, p2, b"", True
    lc = int.from_bytes(body[1:3], "big")
    if lc == 0 or len(body) not in (3 + lc, 5 + lc):
        return None
    return cla, ins, p1, p2, body[3 : 3 + lc], True


class CtapApplet:
    """The FIDO applet of an NFC/CCID authenticator (CTAP2.1 section 11.3)."""

    def __init__(
        self, authenticator: VirtualAuthenticator, trace: Callable[[str], None] | None = None
    ) -> None:
        self._auth = authenticator
        # trace("chained" | "get-response" | "extended"): lets PC/SC tests prove those paths ran.
        self._trace = trace or (lambda _event: None)
        self.reset()

    def reset(self) -> None:
        self._selected = False
        self._chain = b""
        self._pending = b""  # response bytes left for GET RESPONSE

    def _respond(self, data: bytes, limit: int | None) -> bytes:
        """data + 9000, or its first `limit` bytes + 61xx (xx: bytes left, 00 for 256 or more)."""
        if limit is None or len(data) <= limit:
            self._pending = b""
            return data + SW_OK
        self._pending = data[limit:]
        left = len(self._pending)
        return data[:limit] + bytes([0x61, left if left < 256 else 0])

    def process(self, apdu: bytes) -> bytes:
        parsed = parse_apdu(apdu)
        if parsed is None:
            return SW_WRONG_LENGTH
        cla, ins, p1, p2, data, extended = parsed
        if extended:
            self._trace("extended")
        if ins == 0xC0 and cla & 0x7F == 0:  # GET RESPONSE; Le is P3, 0 meaning 256
            self._trace("get-response")
            rest, self._pending = self._pending, b""
            le = apdu[4] if len(apdu) == 5 and apdu[4] else 256
            return self._respond(rest, le) if rest else SW_CONDITIONS
        if ins == 0xA4 and p1 == 0x04:  # SELECT by AID
            self.reset()
            if data != AID_FIDO:
                return SW_NOT_FOUND
            self._selected = True
            return b"FIDO_2_0" + SW_OK
        if not self._selected:
            return SW_CONDITIONS
        if cla & 0x10:  # command chaining: more blocks follow
            self._trace("chained")
            self._chain += data
            return SW_OK
        data, self._chain = self._chain + data, b""
        if cla & ~0x10 != 0x80:
            return SW_CLA_UNKNOWN
        if ins == 0x10:  # NFCCTAP_MSG: answered at once, so never 9100 keepalives
            # Short APDUs carry at most 256 response bytes; the rest waits behind SW 61xx.
            return self._respond(self._auth.handle(data), None if extended else 256)
        if ins == 0x11:  # NFCCTAP_GETRESPONSE: nothing is ever in progress
            return SW_CONDITIONS
        return SW_INS_UNKNOWN


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def serve_vpcd(
    applet: CtapApplet, host: str, port: int, on_ready: Callable[[], None] | None = None
) -> None:
    """Connect to vpcd (retrying until it listens, 10 s) and serve until it hangs up."""
    deadline = time.monotonic() + 10
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    sock.settimeout(None)
    with sock:
        while (head := _recv_exact(sock, 2)) is not None:
            msg = _recv_exact(sock, struct.unpack(">H", head)[0])
            if msg is None:
                return
            if len(msg) == 1:  # control byte
                if msg[0] in (0, 1, 2):
                    applet.reset()
                elif msg[0] == 4:
                    sock.sendall(struct.pack(">H", len(ATR)) + ATR)
                    if on_ready is not None:
                        on_ready()
                        on_ready = None
                continue
            resp = applet.process(msg)
            sock.sendall(struct.pack(">H", len(resp)) + resp)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="virtual CTAP2 card for vpcd (test fixture)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=35963)
    args = ap.parse_args(argv)
    # The card secret comes on stdin (hex, one line), not argv: argv is visible to every user.
    secret = bytes.fromhex(sys.stdin.readline().strip())
    if len(secret) != 32:
        ap.error("the card secret on stdin must be 32 bytes of hex")

    def ready() -> None:
        print("ready", flush=True)

    def trace(event: str) -> None:
        print(f"apdu {event}", file=sys.stderr, flush=True)

    applet = CtapApplet(VirtualAuthenticator(secret), trace)
    serve_vpcd(applet, args.host, args.port, ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
