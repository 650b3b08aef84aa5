"""TEST HELPER: the client side of the PC/SC tests, run inside the pcscd namespace (see
pcsc_fixture.NsPcsc.run_client). Reads one JSON request on stdin, prints one JSON answer.

Requests ("op"):
  seal    {pin, rp_id, master_key: hex}  -> {sealed}
  unseal  {pin, sealed}                  -> {master_key: hex}
  set_pin {pin}                          -> {retries}   (clientPIN setPIN over PC/SC)
  devices {}                             -> {devices: [repr...], readers: [...]}
A keysvc error is answered as {error: class name, message}, so tests can assert on both.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from keysvc.errors import KeysvcError
from keysvc.protect_fido2 import Fido2Protector, find_devices


def handle(req: dict[str, Any]) -> dict[str, Any]:
    op = req["op"]
    if op == "seal":
        prot = Fido2Protector(pin=req.get("pin"), rp_id=req.get("rp_id", "vhsm.local"))
        return {"sealed": prot.seal(bytes.fromhex(req["master_key"]))}
    if op == "unseal":
        return {"master_key": Fido2Protector(pin=req.get("pin")).unseal(req["sealed"]).hex()}
    if op == "set_pin":
        from fido2.ctap2 import Ctap2
        from fido2.ctap2.pin import ClientPin

        (dev,) = find_devices()
        ClientPin(Ctap2(dev)).set_pin(req["pin"])
        return {"retries": ClientPin(Ctap2(dev)).get_pin_retries()[0]}
    if op == "devices":
        from smartcard.System import readers

        return {
            "devices": [repr(d) for d in find_devices()],
            "readers": [str(r) for r in readers()],
        }
    raise ValueError(f"unknown op {op!r}")


def main() -> int:
    req = json.load(sys.stdin)
    try:
        answer = handle(req)
    except KeysvcError as e:
        answer = {"error": type(e).__name__, "message": str(e)}
    json.dump(answer, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
