"""Every row of compat.md's key-command table, through the real `hsm_enhanced` and `vhsm` CLIs,
with signatures checked by OpenSSL."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from ksutil import Work, openssl_verify_ed25519

HEX64 = re.compile(r"^[0-9a-f]{64}$")


def test_generate_master_key(tmp_path: Path) -> None:
    w = Work(tmp_path)
    p = w.hsm("-generate_master_key")
    hex_lines = [ln for ln in p.stdout.splitlines() if "hex" in ln]
    assert len(hex_lines) == 1
    key = hex_lines[0].split()[-1]
    assert HEX64.match(key) and key != "0" * 64
    mk = tmp_path / "master.key"
    assert mk.read_bytes().hex() == key
    assert (mk.stat().st_mode & 0o777) == 0o600
    # the addendum's pipeline works as written
    sh = w.run(
        "bash", "-c", "hsm_enhanced -generate_master_key -force | grep hex | awk '{print $NF}'"
    )
    assert HEX64.match(sh.stdout.strip()) and sh.stdout.strip() != key
    # never silently replaces an existing master key
    again = w.hsm("-generate_master_key", check=False)
    assert again.returncode != 0 and "already exists" in again.stderr
    assert mk.read_bytes().hex() == sh.stdout.strip()


def test_generate_sign_verify_export_with_openssl(work: Work) -> None:
    work.hsm("-set_user", "alice@example.com")
    p = work.hsm("-generate_key_pair", "my_signing_key")
    assert "ed25519" in p.stdout
    created = work.events("KEY_CREATED")
    assert created[-1][2:4] == ["my_signing_key", "alice@example.com"]
    assert created[-1][5] == "SUCCESS"
    # any size (the original failed over 1 KiB)
    data = work.path / "big.bin"
    data.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    work.hsm("-sign", "my_signing_key", "-i", str(data), "-o", "big.sig")
    sig = work.path / "big.sig"
    assert len(sig.read_bytes()) == 64
    pem = work.hsm("-export_public_key", "my_signing_key").stdout
    assert "-----BEGIN PUBLIC KEY-----" in pem
    (work.path / "pub.pem").write_text(pem)
    ok = openssl_verify_ed25519(work, work.path / "pub.pem", data, sig)
    assert ok.returncode == 0, ok.stderr
    v = work.hsm("-verify", "my_signing_key", "-i", str(data), "-s", "big.sig")
    assert "verified" in v.stdout
    # a changed file: exit 1, FAILURE audited, OpenSSL agrees
    raw = data.read_bytes()
    data.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0x01]))  # always a change (b"X" was not, 1 in 256)
    bad = work.hsm("-verify", "my_signing_key", "-i", str(data), "-s", "big.sig", check=False)
    assert bad.returncode == 1 and "verified" not in bad.stdout
    assert work.events("VERIFY_OPERATION")[-1][5] == "FAILURE"
    assert openssl_verify_ed25519(work, work.path / "pub.pem", data, sig).returncode != 0
    assert [e[1] for e in work.audit_lines()].count("SIGN_OPERATION") == 1


def test_list_is_names_only(work: Work) -> None:
    for n in ("b_key", "a_key", "c.key"):
        work.hsm("-generate_key_pair", n)
    p = work.hsm("-list")
    assert p.stdout.splitlines() == ["a_key", "b_key", "c.key"]
    assert work.vhsm("key", "list").stdout == p.stdout


def test_key_info_lines_and_rotation_warning(work: Work) -> None:
    work.hsm("-generate_key_pair", "k")
    work.hsm("-sign", "k", "-i", str(work.log), "-o", "s.sig")
    out = work.hsm("-key_info", "k").stdout
    assert out.splitlines()[0] == "=== Key Information: k ==="
    for pat in (
        r"^State: ACTIVE$",
        r"^Created: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d$",
        r"^Last Used: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d$",
        r"^Last Rotated: \d{4}-",
        r"^Days Since Rotation: \d+\.\d$",
        r"^Rotation Version: 1$",
        r"^Use Count: 1$",
    ):
        assert re.search(pat, out, re.M), pat
    assert not re.search("WARNING.*rotation", out)
    # due: max age passed (policy of a few milliseconds)
    work.vhsm("key", "policy", "k", "--max-age-days", "0.00000001")
    out = work.hsm("-key_info", "k").stdout
    assert re.search("WARNING.*rotation", out)
    # unknown key: error, exit 1 (the original invented one)
    p = work.hsm("-key_info", "nope", check=False)
    assert p.returncode == 1 and p.stderr.strip() == "Error: key nope not found"
    assert p.stdout == ""


def test_rotate_keeps_old_signatures_valid(work: Work) -> None:
    work.hsm("-generate_key_pair", "rk")
    f = work.path / "doc.txt"
    f.write_text("release 1.0\n")
    work.hsm("-sign", "rk", "-i", str(f), "-o", "v1.sig")
    work.vhsm("key", "export-public", "rk", "-o", "v1.pem")
    p = work.hsm("-rotate_key", "rk")
    assert "Key rotated successfully" in p.stdout
    assert re.search(r"^New version: 2$", p.stdout, re.M)
    assert work.events("KEY_ROTATED")[-1][2] == "rk"
    work.hsm("-sign", "rk", "-i", str(f), "-o", "v2.sig")
    assert (work.path / "v1.sig").read_bytes() != (work.path / "v2.sig").read_bytes()
    for s in ("v1.sig", "v2.sig"):
        assert "verified" in work.hsm("-verify", "rk", "-i", str(f), "-s", s).stdout
    work.vhsm("key", "export-public", "rk", "-o", "v2.pem")
    assert (
        openssl_verify_ed25519(work, work.path / "v1.pem", f, work.path / "v1.sig").returncode == 0
    )
    assert (
        openssl_verify_ed25519(work, work.path / "v2.pem", f, work.path / "v2.sig").returncode == 0
    )
    assert "Rotation Version: 2" in work.hsm("-key_info", "rk").stdout
    # retiring version 1 ends its validity
    work.vhsm("key", "retire", "rk", "--min-version", "2")
    bad = work.hsm("-verify", "rk", "-i", str(f), "-s", "v1.sig", check=False)
    assert bad.returncode == 1
    assert "verified" in work.hsm("-verify", "rk", "-i", str(f), "-s", "v2.sig").stdout


def test_audit_logs_and_total(work: Work) -> None:
    work.hsm("-generate_key_pair", "k1")
    work.hsm("-generate_key_pair", "k2")
    out = work.hsm("-audit_logs", "7").stdout
    n = len(work.audit_lines())
    assert re.search(rf"^Total entries: {n}$", out, re.M)
    assert "KEY_CREATED" in out
    assert re.search(rf"^Total entries: {n}$", work.hsm("-audit_logs").stdout, re.M)  # default 7
    assert f"Total entries: {n}" in work.vhsm("audit", "logs", "1").stdout


def test_set_user_persists(work: Work) -> None:
    work.hsm("-set_user", "aws-automation@example.com")
    assert (work.path / ".hsm_user").read_text().strip() == "aws-automation@example.com"
    work.hsm("-generate_key_pair", "prod_signing_key")
    line = work.events("KEY_CREATED")[-1]
    assert line[3] == "aws-automation@example.com"
    assert "[uid=0]" in line[4]  # the real uid is recorded alongside
    # a user name cannot forge separators or lines
    work.hsm("-set_user", "mallory|x")
    work.hsm("-generate_key_pair", "k2")
    assert work.events("KEY_CREATED")[-1][3] == "mallory%7Cx"
    assert work.vhsm("audit", "verify").returncode == 0


def test_master_key_anywhere_and_argv_warning(work: Work) -> None:
    hexkey = work.master_hex  # type: ignore[attr-defined]
    (work.path / "master.key").unlink()
    work.hsm("-master_key", hexkey, "-generate_key_pair", "k")
    p = work.hsm("-list", "-master_key", hexkey)
    assert p.stdout.splitlines() == ["k"]
    assert "visible to other users" in p.stderr
    f = work.path / "f"
    f.write_text("x")
    work.hsm("-sign", "k", "-i", str(f), "-master_key", hexkey, "-o", "f.sig")
    # HSM_MASTER_KEY works too, and no key material appears in output or log
    env = {**work.env, "HSM_MASTER_KEY": hexkey}
    p = work.hsm("-verify", "k", "-i", str(f), "-s", "f.sig", env=env)
    assert "verified" in p.stdout and "visible" not in p.stderr
    assert hexkey not in work.log.read_text()
    assert hexkey not in (work.path / "keystore.dat").read_text()


def test_wrong_master_key_detected_and_audited(work: Work) -> None:
    work.hsm("-generate_key_pair", "k")
    p = work.hsm("-master_key", "11" * 32, "-list", check=False)
    assert p.returncode == 1
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("Error")]
    assert err == ["Error: wrong master key: it does not match this keystore"]
    assert p.stdout == ""
    assert work.events("AUTH_FAILURE")[-1][4].startswith("wrong master key")
    bad = work.hsm("-master_key", "zz", "-list", check=False)
    assert bad.returncode == 1 and "64 hex" in bad.stderr


def test_world_readable_master_key_refused(work: Work) -> None:
    os.chmod(work.path / "master.key", 0o644)
    p = work.hsm("-generate_key_pair", "k", check=False)
    assert p.returncode == 1 and "chmod 600" in p.stderr
    assert not (work.path / "keystore.dat").exists()


def test_scan_hardware_asks_pkcs11(work: Work, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    env = {**work.env, "SOFTHSM2_CONF": str(conf)}
    work.run(
        "softhsm2-util",
        "--init-token",
        "--free",
        "--label",
        "scan-me",
        "--pin",
        "1234",
        "--so-pin",
        "5678",
        env=env,
    )
    out = work.hsm("-scan_hardware", env=env).stdout
    assert re.search(r"PKCS#11 module .*softhsm2\.so: SoftHSM", out)
    assert "token 'scan-me'" in out  # found by asking the module, not by checking paths
    for what in ("FIDO2", "TPM", "Smart-card"):
        assert what in out


@pytest.mark.parametrize(
    ("key_type", "sig_check"),
    [("ecdsa-p256", "dgst"), ("rsa-3072", "dgst")],
)
def test_ecdsa_rsa_verify_with_openssl_dgst(work: Work, key_type: str, sig_check: str) -> None:
    work.hsm("-generate_key_pair", "k", "-type", key_type)
    f = work.path / "msg"
    f.write_bytes(os.urandom(5000))
    work.vhsm("key", "sign", "k", "-i", str(f), "-o", "msg.sig")
    work.vhsm("key", "export-public", "k", "-o", "pub.pem")
    p = work.run(
        "openssl", "dgst", "-sha256", "-verify", "pub.pem", "-signature", "msg.sig", str(f)
    )
    assert "Verified OK" in p.stdout
    f.write_bytes(b"other")
    bad = work.run(
        "openssl",
        "dgst",
        "-sha256",
        "-verify",
        "pub.pem",
        "-signature",
        "msg.sig",
        str(f),
        check=False,
    )
    assert bad.returncode != 0


def test_hmac_and_aes_keys(work: Work) -> None:
    work.vhsm("key", "generate", "mac", "--type", "hmac-sha256")
    work.vhsm("key", "generate", "aes", "--type", "aes-256-gcm")
    f = work.path / "plain"
    f.write_bytes(b"secret payload" * 1000)
    work.vhsm("key", "sign", "mac", "-i", str(f), "-o", "mac.sig")
    assert len((work.path / "mac.sig").read_bytes()) == 32
    assert "verified" in work.vhsm("key", "verify", "mac", "-i", str(f), "-s", "mac.sig").stdout
    work.vhsm("key", "encrypt", "aes", "-i", str(f), "-o", "ct1", "--aad", "ctx")
    work.vhsm("key", "rotate", "aes")
    work.vhsm("key", "encrypt", "aes", "-i", str(f), "-o", "ct2")
    work.vhsm("key", "decrypt", "aes", "-i", "ct1", "-o", "pt1", "--aad", "ctx")
    work.vhsm("key", "decrypt", "aes", "-i", "ct2", "-o", "pt2")
    assert (work.path / "pt1").read_bytes() == f.read_bytes() == (work.path / "pt2").read_bytes()
    assert (work.path / "pt1").stat().st_mode & 0o777 == 0o600
    wrong = work.vhsm(
        "key", "decrypt", "aes", "-i", "ct1", "-o", "pt3", "--aad", "other", check=False
    )
    assert wrong.returncode == 1 and not (work.path / "pt3").exists()
    dk = work.path / "dk"
    dk.write_bytes(os.urandom(32))
    work.vhsm("key", "wrap", "aes", "-i", "dk", "-o", "dk.wrapped")
    assert dk.read_bytes() not in (work.path / "dk.wrapped").read_bytes()
    work.vhsm("key", "unwrap", "aes", "-i", "dk.wrapped", "-o", "dk.out")
    assert (work.path / "dk.out").read_bytes() == dk.read_bytes()
    events = [e[1] for e in work.audit_lines()]
    assert events.count("ENCRYPTION") == 3 and events.count("DECRYPTION") == 4
    # an AES key cannot sign, an Ed25519 key cannot encrypt: one-line errors
    p = work.vhsm("key", "sign", "aes", "-i", str(f), "-o", "x", check=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "cannot sign" in p.stderr


def test_bad_input_one_line_errors(work: Work) -> None:
    work.hsm("-generate_key_pair", "k")
    cases = [
        ["-sign", "k", "-i", "missing.txt", "-o", "x.sig"],
        ["-sign", "nokey", "-i", str(work.log), "-o", "x.sig"],
        ["-generate_key_pair", "bad name"],
        ["-generate_key_pair", "k"],
        ["-frobnicate"],
        ["-sign", "k"],
    ]
    for args in cases:
        p = work.hsm(*args, check=False)
        assert p.returncode != 0, args
        errors = [ln for ln in p.stderr.splitlines() if ln.startswith("Error")]
        assert len(errors) == 1, (args, p.stderr)
        assert not (work.path / "x.sig").exists()


def test_passphrase_protected_master_key(tmp_path: Path) -> None:
    w = Work(tmp_path)
    env = {**w.env, "HSM_MASTER_PASSPHRASE": "correct horse battery staple"}
    w.vhsm("key", "generate-master-key", "--passphrase", env=env)
    prot = tmp_path / "master.key.protected"
    assert prot.exists() and not (tmp_path / "master.key").exists()
    assert prot.stat().st_mode & 0o777 == 0o600
    assert '"argon2id"' in prot.read_text() or "passphrase-argon2id" in prot.read_text()
    w.hsm("-generate_key_pair", "k", env=env)
    assert w.hsm("-list", env=env).stdout.strip() == "k"
    wrong = {**w.env, "HSM_MASTER_PASSPHRASE": "wrong"}
    p = w.hsm("-list", env=wrong, check=False)
    assert p.returncode == 1 and "wrong passphrase" in p.stderr
    none = w.hsm("-list", check=False)  # no passphrase, stdin not a terminal: no prompt, error
    assert none.returncode == 1 and "HSM_MASTER_PASSPHRASE" in none.stderr
