"""`scan_hardware`: report what is really present by asking each stack, not by checking paths.

Each probe loads the real library (python-pkcs11, tpm2-pytss, pyscard, python-fido2) and asks
it; a stack whose Python binding is not installed is reported as "not checked", never as absent.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

# Where distributions install PKCS#11 modules; each candidate is then *loaded* and asked.
_PKCS11_GLOBS = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/*/softhsm/libsofthsm2.so",
    "/usr/lib/*/opensc-pkcs11.so",
    "/usr/lib/*/pkcs11/*.so",
    "/usr/lib/pkcs11/*.so",
    "/usr/local/lib/*pkcs11*.so",
)


def _pkcs11() -> Iterator[str]:
    try:
        import pkcs11
    except ImportError:
        yield "PKCS#11: not checked (python-pkcs11 not installed)"
        return
    # pkcs11-spy is a logging proxy for another module, not a device stack
    mods = {
        os.path.realpath(p)
        for g in _PKCS11_GLOBS
        for p in glob.glob(g)
        if "spy" not in os.path.basename(p)
    }
    if os.environ.get("PKCS11_MODULE"):
        mods.add(os.environ["PKCS11_MODULE"])
    if not mods:
        yield "PKCS#11: no modules installed"
        return
    for m in sorted(mods):
        try:
            lib = pkcs11.lib(m)
            slots = lib.get_slots(token_present=True)
        except Exception as e:  # noqa: BLE001 - any loader failure is reported, not fatal
            yield f"PKCS#11 module {m}: cannot be used ({type(e).__name__})"
            continue
        yield f"PKCS#11 module {m}: {lib.manufacturer_id.strip()} ({len(slots)} token(s))"
        for s in slots:
            try:
                t = s.get_token()
                yield (
                    f"  token '{t.label.strip()}' in slot {s.slot_id}: "
                    f"{t.manufacturer_id.strip()} {t.model.strip()}"
                )
            except Exception as e:  # noqa: BLE001
                yield f"  slot {s.slot_id}: token unreadable ({type(e).__name__})"


def _tpm() -> Iterator[str]:
    try:
        from tpm2_pytss import ESAPI  # type: ignore[import-not-found]
    except ImportError:
        yield "TPM 2.0: not checked (tpm2-pytss not installed)"
        return
    try:
        with ESAPI() as e:
            e.get_random(8)
        yield "TPM 2.0: present and responding"
    except Exception as e:  # noqa: BLE001
        yield f"TPM 2.0: none reachable ({type(e).__name__})"


def _pcsc() -> Iterator[str]:
    try:
        from smartcard.System import readers  # type: ignore[import-not-found]
    except ImportError:
        yield "Smart-card readers (PC/SC): not checked (pyscard not installed)"
        return
    try:
        rs = readers()
    except Exception as e:  # noqa: BLE001
        yield f"Smart-card readers (PC/SC): service unavailable ({type(e).__name__})"
        return
    yield f"Smart-card readers (PC/SC): {len(rs)}"
    for r in rs:
        yield f"  {r}"


def _fido2() -> Iterator[str]:
    try:
        from fido2.hid import CtapHidDevice  # type: ignore[import-not-found]
    except ImportError:
        yield "FIDO2 devices: not checked (python-fido2 not installed)"
        return
    devs = list(CtapHidDevice.list_devices())
    yield f"FIDO2 devices: {len(devs)}"
    for d in devs:
        yield f"  {d.descriptor.product_name or d.descriptor.path}"


def scan() -> list[str]:
    out = ["=== Hardware Scan ==="]
    for probe in (_fido2, _tpm, _pkcs11, _pcsc):
        out.extend(probe())
    return out
