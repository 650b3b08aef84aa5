"""`scan_hardware`: report what is really present by asking each stack, not by checking paths.

Each probe loads the real library (tpm2-pytss, python-pkcs11, pyscard, python-fido2) and asks
it. `report()` gives one dict per stack for `--json`; `scan()` renders it for people. Every
stack has a `status`:

- "present": the stack answered and something is there (details in the other fields);
- "not present": the stack answered (or nothing answered) and there is nothing;
- "library missing": its Python binding does not import; `install` says how to install it;
- "error": the stack failed; `error` says why in one line. The other stacks are still asked.

Each probe runs in a worker thread given up after `timeout` seconds, so a TCTI that accepts a
connection and never answers (or a wedged pcscd) cannot hang the scan (as keysvc/protect_tpm.py
does for the TPM protector; a stuck worker is a daemon thread and dies with the process).
"""

from __future__ import annotations

import glob
import os
import threading
from collections.abc import Callable
from typing import Any

PRESENT, ABSENT, MISSING, ERROR = "present", "not present", "library missing", "error"
TIMEOUT = 10.0  # seconds per stack; every real stack answers in well under one
DEFAULT_TCTI = "device:/dev/tpmrm0"

INSTALL = {
    "tpm": "pip install tpm2-pytss (builds against apt libtss2-dev), or pip install vhsm[hardware]",
    "pkcs11": "pip install python-pkcs11, or pip install vhsm[hardware]",
    "pcsc": "apt install pcscd libpcsclite-dev; pip install pyscard, or pip install vhsm[hardware]",
    "fido2": "pip install 'fido2>=2' (and pyscard for PC/SC), or pip install vhsm[hardware]",
}
TITLES = {
    "tpm": "TPM 2.0",
    "pkcs11": "PKCS#11",
    "pcsc": "Smart-card readers (PC/SC)",
    "fido2": "FIDO2 devices",
}

# Where distributions install PKCS#11 modules; each candidate is then *loaded* and asked.
_PKCS11_GLOBS = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/*/softhsm/libsofthsm2.so",
    "/usr/lib/*/opensc-pkcs11.so",
    "/usr/lib/*/pkcs11/*.so",
    "/usr/lib/pkcs11/*.so",
    "/usr/local/lib/*pkcs11*.so",
)
# The mechanisms reported per slot: what vhsm's protectors and key types would use.
_MECHANISMS = (("AES-GCM", "AES_GCM"), ("EdDSA", "EDDSA"), ("ECDSA", "ECDSA"))
# TPM2_PT_MANUFACTURER .. TPM2_PT_FIRMWARE_VERSION_2 (TPM 2.0 Part 2, table "TPM_PT")
_PT_MANUFACTURER, _PT_VENDOR_1, _PT_FW_1, _PT_FW_2 = 0x105, 0x106, 0x10B, 0x10C


def _line(e: BaseException) -> str:
    """An exception as one short printable line."""
    text = " ".join(str(e).split()) or type(e).__name__
    if text != type(e).__name__:
        text = f"{type(e).__name__}: {text}"
    return text[:200]


def _ascii(raw: bytes) -> str:
    return " ".join("".join(chr(b) for b in raw if 32 <= b < 127).split())


def _text(v: object) -> str:
    if isinstance(v, bytes):
        v = v.decode(errors="replace")
    return " ".join(str(v).split())


# --- TPM ------------------------------------------------------------------------------------


def _tcti() -> str:
    return os.environ.get("TPM2TOOLS_TCTI") or DEFAULT_TCTI


def _tpm() -> dict[str, Any]:
    os.environ.setdefault("TSS2_LOG", "all+none")  # the TSS logs every failed connect
    tcti = _tcti()
    try:
        from tpm2_pytss import ESAPI, TSS2_Exception  # type: ignore[import-not-found]
        from tpm2_pytss.constants import TPM2_ALG, TPM2_CAP  # type: ignore[import-not-found]
    except (ImportError, OSError):  # OSError: the libtss2 shared libraries are missing
        return {"status": MISSING, "install": INSTALL["tpm"], "tcti": tcti}
    try:
        ectx = ESAPI(tcti)
    except TSS2_Exception as e:
        return {"status": ABSENT, "tcti": tcti, "reason": _line(e)}
    with ectx:
        _, caps = ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, _PT_MANUFACTURER, 8)
        props = {p.property: p.value for p in caps.data.tpmProperties}
        _, pcrs = ectx.get_capability(TPM2_CAP.PCRS, 0, 1)
        banks = []
        for sel in pcrs.data.assignedPCR:
            if any(bytes(sel.pcrSelect)[: sel.sizeofSelect]):  # a bank with no PCR is off
                alg = TPM2_ALG(sel.hash)
                banks.append("sha1" if alg == TPM2_ALG.SHA1 else str(alg).lower())
    vendor = b"".join(props.get(_PT_VENDOR_1 + i, 0).to_bytes(4, "big") for i in range(4))
    fw1, fw2 = props.get(_PT_FW_1, 0), props.get(_PT_FW_2, 0)
    return {
        "status": PRESENT,
        "tcti": tcti,
        "manufacturer": _ascii(props.get(_PT_MANUFACTURER, 0).to_bytes(4, "big")),
        "vendor": _ascii(vendor),
        # as tpm2_getcap and Windows show it: four 16-bit fields
        "firmware": f"{fw1 >> 16}.{fw1 & 0xFFFF}.{fw2 >> 16}.{fw2 & 0xFFFF}",
        "pcr_banks": banks,
    }


# --- PKCS#11 --------------------------------------------------------------------------------


def _pkcs11_modules() -> list[str]:
    mods: list[str] = []
    for name in ("VHSM_PKCS11_MODULE", "PKCS11_MODULE"):
        if os.environ.get(name):
            mods.append(os.environ[name])
    # pkcs11-spy is a logging proxy for another module, not a device stack
    found = {
        os.path.realpath(p)
        for g in _PKCS11_GLOBS
        for p in glob.glob(g)
        if "spy" not in os.path.basename(p)
    }
    for m in sorted(found):
        if os.path.realpath(m) not in {os.path.realpath(x) for x in mods}:
            mods.append(m)
    return mods


def _pkcs11_module(pkcs11: Any, path: str) -> dict[str, Any]:
    try:
        lib = pkcs11.lib(path)
    except Exception as e:  # noqa: BLE001 - any loader failure is reported, not fatal
        return {"path": path, "error": _line(e)}
    try:
        out: dict[str, Any] = {
            "path": path,
            "manufacturer": _text(lib.manufacturer_id),
            "description": _text(lib.library_description),
            "slots": [],
        }
        for slot in lib.get_slots(token_present=True):
            out["slots"].append(_pkcs11_slot(pkcs11, slot))
        return out
    except Exception as e:  # noqa: BLE001
        return {"path": path, "error": _line(e)}
    finally:
        try:
            lib.finalize()  # so another module (or a later scan) starts clean
        except Exception:  # noqa: BLE001, S110 - finalising is best effort
            pass


def _pkcs11_slot(pkcs11: Any, slot: Any) -> dict[str, Any]:
    s: dict[str, Any] = {"slot": slot.slot_id, "description": _text(slot.slot_description)}
    try:
        t = slot.get_token()
        if not t.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED:
            s["token"] = None
            s["note"] = "no initialised token (a free slot)"
            return s
        s["token"] = {
            "label": _text(t.label),
            "serial": _text(t.serial),
            "manufacturer": _text(t.manufacturer_id),
            "model": _text(t.model),
        }
    except Exception as e:  # noqa: BLE001
        s["error"] = f"token unreadable ({_line(e)})"
        return s
    try:
        have = set(slot.get_mechanisms())
        s["mechanisms"] = [
            label for label, name in _MECHANISMS if getattr(pkcs11.Mechanism, name, None) in have
        ]
    except Exception as e:  # noqa: BLE001
        s["mechanisms_error"] = _line(e)
    return s


def _pkcs11() -> dict[str, Any]:
    try:
        import pkcs11
    except ImportError:
        return {"status": MISSING, "install": INSTALL["pkcs11"]}
    mods = [_pkcs11_module(pkcs11, m) for m in _pkcs11_modules()]
    if any(s.get("token") for m in mods for s in m.get("slots", [])):
        status = PRESENT
    elif mods and all("error" in m for m in mods):
        status = ERROR  # modules installed, none could be asked: say so, not "absent"
    else:
        status = ABSENT
    out: dict[str, Any] = {"status": status, "modules": mods}
    if status == ERROR:
        out["error"] = "; ".join(f"{m['path']}: {m['error']}" for m in mods)
    return out


# --- PC/SC ----------------------------------------------------------------------------------


def _pcsc_reason(e: BaseException) -> str:
    if "0X8010001D" in str(e).upper():  # SCARD_E_NO_SERVICE
        return "no PC/SC service (is pcscd running?)"
    return _line(e)


def _pcsc() -> dict[str, Any]:
    try:
        from smartcard import scard  # type: ignore[import-not-found]
        from smartcard.System import readers  # type: ignore[import-not-found]
    except ImportError:
        return {"status": MISSING, "install": INSTALL["pcsc"]}
    try:
        names = [str(r) for r in readers()]
    except Exception as e:  # noqa: BLE001 - no pcscd: nothing present through PC/SC
        return {"status": ABSENT, "readers": [], "reason": _pcsc_reason(e)}
    out = [_pcsc_reader(scard, n) for n in names]
    return {"status": PRESENT if out else ABSENT, "readers": out}


def _pcsc_reader(scard: Any, name: str) -> dict[str, Any]:
    """The reader's state as pcscd knows it (SCardGetStatusChange, timeout 0): the ATR without
    connecting to the card, so a card another program holds exclusively (scdaemon, a PIV
    middleware) is still seen, and no card is reset or powered down by the scan."""
    entry: dict[str, Any] = {"name": _text(name), "atr": None}
    hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if hr != scard.SCARD_S_SUCCESS:
        entry["card"] = f"state unknown ({scard.SCardGetErrorMessage(hr)})"
        return entry
    try:
        hr, states = scard.SCardGetStatusChange(ctx, 0, [(name, scard.SCARD_STATE_UNAWARE)])
        if hr != scard.SCARD_S_SUCCESS:
            entry["card"] = f"state unknown ({scard.SCardGetErrorMessage(hr)})"
        else:
            (_, state, atr) = states[0]
            if state & scard.SCARD_STATE_PRESENT and atr:
                entry["atr"] = bytes(atr).hex().upper()
                if state & scard.SCARD_STATE_EXCLUSIVE:
                    entry["card"] = "in exclusive use by another program"
            else:
                entry["card"] = "no card"
    finally:
        scard.SCardReleaseContext(ctx)
    return entry


# --- FIDO2 ----------------------------------------------------------------------------------


def _fido2_info(dev: Any, transport: str, name: str) -> dict[str, Any]:
    from fido2.ctap2 import Ctap2

    d: dict[str, Any] = {"transport": transport, "name": name}
    try:
        info = Ctap2(dev).info
        d["aaguid"] = str(info.aaguid)
        d["versions"] = [str(v) for v in info.versions]
        d["extensions"] = [str(x) for x in info.extensions]
    except Exception as e:  # noqa: BLE001 - e.g. a U2F-only key: listed, with why
        d["error"] = _line(e)
    finally:
        try:
            dev.close()
        except Exception:  # noqa: BLE001, S110
            pass
    return d


def _fido2() -> dict[str, Any]:
    try:
        import fido2.ctap2  # noqa: F401
    except ImportError:
        return {"status": MISSING, "install": INSTALL["fido2"]}
    devices: list[dict[str, Any]] = []
    notes: list[str] = []
    try:
        from fido2.pcsc import CtapPcscDevice
    except ImportError as e:
        notes.append(f"PC/SC transport unusable ({_line(e)}): {INSTALL['pcsc']}")
    else:
        try:
            for dev in CtapPcscDevice.list_devices():
                devices.append(_fido2_info(dev, "pcsc", _text(getattr(dev, "_name", dev))))
        except Exception as e:  # noqa: BLE001 - no pcscd: no PC/SC authenticators
            if "0X8010001D" not in str(e).upper():  # no service: the PC/SC row says so
                notes.append(f"PC/SC: {_line(e)}")
    try:
        from fido2.hid import CtapHidDevice

        for dev in CtapHidDevice.list_devices():
            desc = dev.descriptor
            name = desc.product_name or str(desc.path)
            devices.append(_fido2_info(dev, "hid", _text(name)))
    except Exception as e:  # noqa: BLE001 - no hidraw access: no HID authenticators
        notes.append(f"HID: {_line(e)}")
    out: dict[str, Any] = {"status": PRESENT if devices else ABSENT, "devices": devices}
    if notes:
        out["notes"] = notes
    return out


# --- running and rendering ------------------------------------------------------------------

PROBES: dict[str, Callable[[], dict[str, Any]]] = {
    "tpm": _tpm,
    "pkcs11": _pkcs11,
    "pcsc": _pcsc,
    "fido2": _fido2,
}


def _bounded(name: str, fn: Callable[[], dict[str, Any]], timeout: float) -> dict[str, Any]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported as this stack's error
            box["error"] = e

    worker = threading.Thread(target=run, name=f"vhsm-scan-{name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        where = f" at TCTI {_tcti()}" if name == "tpm" else ""
        return {"status": ERROR, "error": f"no answer{where} within {timeout:g} s"}
    if "error" in box:
        return {"status": ERROR, "error": _line(box["error"])}
    value: dict[str, Any] = box["value"]
    return value


def report(timeout: float | None = None) -> dict[str, dict[str, Any]]:
    """Ask every stack; {stack: {status, ...}} in the order tpm, pkcs11, pcsc, fido2."""
    if timeout is None:
        try:
            timeout = float(os.environ.get("VHSM_SCAN_TIMEOUT", TIMEOUT))
        except ValueError:
            timeout = TIMEOUT
        if not 0 < timeout <= 600:  # also NaN
            timeout = TIMEOUT
    # one at a time: pyscard and fido2's PC/SC transport share pcscd, and a stack's library
    # may not be thread-safe against another's; each still has its own deadline
    return {name: _bounded(name, fn, timeout) for name, fn in PROBES.items()}


def _summary(name: str, r: dict[str, Any]) -> str:
    st = r["status"]
    if st == MISSING:
        return f"install: {r['install']}"
    if st == ERROR:
        return str(r["error"])
    if name == "tpm":
        if st == PRESENT:
            banks = ",".join(r["pcr_banks"]) or "none"
            return (
                f"{r['manufacturer']} {r['vendor']}, firmware {r['firmware']}, "
                f"PCR banks {banks} (TCTI {r['tcti']})"
            )
        return f"nothing answers at TCTI {r['tcti']}"
    if name == "pkcs11":
        mods = r["modules"]
        n = sum(1 for m in mods for s in m.get("slots", []) if s.get("token"))
        return f"{len(mods)} module(s), {n} token(s)" if mods else "no module installed"
    if name == "pcsc":
        if "reason" in r:
            return str(r["reason"])
        cards = sum(1 for x in r["readers"] if x.get("atr"))
        return f"{len(r['readers'])} reader(s), {cards} card(s)"
    return f"{len(r['devices'])} authenticator(s)"


def _details(name: str, r: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if name == "pkcs11":
        for m in r.get("modules", []):
            if "error" in m:
                out.append(f"PKCS#11 module {m['path']}: cannot be used ({m['error']})")
                continue
            n = sum(bool(s.get("token")) for s in m["slots"])
            out.append(f"PKCS#11 module {m['path']}: {m['manufacturer']} ({n} token(s))")
            for s in m["slots"]:
                if not s.get("token"):
                    out.append(f"  slot {s['slot']}: {s.get('error') or s.get('note')}")
                    continue
                t = s["token"]
                mechs = ", ".join(s.get("mechanisms", [])) or "none of AES-GCM, EdDSA, ECDSA"
                out.append(
                    f"  token '{t['label']}' in slot {s['slot']}: {t['manufacturer']} "
                    f"{t['model']}, serial {t['serial']}, mechanisms {mechs}"
                )
    elif name == "pcsc":
        for x in r.get("readers", []):
            if x.get("atr"):
                card = f"card ATR {x['atr']}" + (f" ({x['card']})" if x.get("card") else "")
            else:
                card = x.get("card") or "no card"
            out.append(f"  reader '{x['name']}': {card}")
    elif name == "fido2":
        for d in r.get("devices", []):
            if "error" in d:
                out.append(f"  {d['transport']} '{d['name']}': getInfo failed ({d['error']})")
                continue
            out.append(
                f"  {d['transport']} '{d['name']}': AAGUID {d['aaguid']}, versions "
                f"{' '.join(d['versions'])}, extensions {' '.join(d['extensions']) or 'none'}"
            )
        for note in r.get("notes", []):
            out.append(f"  note: {note}")
    return out


def render(rep: dict[str, dict[str, Any]]) -> list[str]:
    """The report for people: a table (stack, status, summary), then the details per stack."""
    rows = [(TITLES[n], r["status"], _summary(n, r)) for n, r in rep.items()]
    w0 = max(len("STACK"), *(len(a) for a, _, _ in rows))
    w1 = max(len("STATUS"), *(len(b) for _, b, _ in rows))
    out = ["=== Hardware Scan ===", f"{'STACK':<{w0}}  {'STATUS':<{w1}}  DETAILS"]
    out += [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    for n, r in rep.items():
        more = _details(n, r)
        if more:
            out.append("")
            out.append(f"{TITLES[n]}:")
            out.extend(more)
    return out


def scan() -> list[str]:
    return render(report())
