"""Envelopes across languages against one live gateway: the Python SDK seals and the Swift
`hsmgw` CLI (HSMGW_BIN) opens, and the other way round, at several sizes and frame sizes; data
keys made by one and decrypted by the other. The CLI connects with the same HSMGW_* settings as
hsm-admin (HSMGW_SERVER, HSMGW_TOKEN_FILE; HSMGW_CA_FILE and HSMGW_SERVER_NAME on TLS).
Without HSMGW_BIN, or with no executable there, these tests fail: they are never skipped."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import subprocess
from typing import Dict, List

import pytest

import hsmgw

CONTEXT = {"purpose": "cross-language", "lang": "python+swift"}
SIZES = [0, 1, 1024, 65536, 65537, 300_000]


@pytest.fixture(scope="module")
def cli(address: str, admin_token_file: str) -> "tuple[str, Dict[str, str]]":
    path = os.environ.get("HSMGW_BIN", "")
    if not path or not os.access(path, os.X_OK):
        pytest.fail(
            "HSMGW_BIN (the Swift `hsmgw` CLI) is %s: the cross-language envelope tests need it"
            % ("not set" if not path else "not an executable at " + path),
            pytrace=False,
        )
    env = dict(os.environ)
    env.update({"HSMGW_SERVER": address, "HSMGW_TOKEN_FILE": admin_token_file})
    for name in ("HSMGW_CA_FILE", "HSMGW_SERVER_NAME", "HSMGW_CERT_FILE", "HSMGW_KEY_FILE", "HSMGW_TOKEN"):
        env.pop(name, None)
    # Over TLS when the live gateway is (the CLI's CA file implies TLS, as hsm-admin's does).
    if os.environ.get("HSMGW_LIVE_CA_FILE"):
        env["HSMGW_CA_FILE"] = os.environ["HSMGW_LIVE_CA_FILE"]
        env["HSMGW_SERVER_NAME"] = os.environ.get("HSMGW_LIVE_SERVER_NAME", "")
    return path, env


def run(cli: "tuple[str, Dict[str, str]]", arguments: List[str], stdin: bytes = b"") -> bytes:
    path, env = cli
    result = subprocess.run([path] + arguments, input=stdin, capture_output=True, env=env, timeout=120)
    assert result.returncode == 0, "hsmgw %s: exit %d: %s" % (
        " ".join(arguments[:1]),
        result.returncode,
        result.stderr.decode(errors="replace")[-2000:],
    )
    return result.stdout


def context_flags() -> List[str]:
    flags: List[str] = []
    for key, value in CONTEXT.items():
        flags += ["--context", "%s=%s" % (key, value)]
    return flags


@pytest.mark.parametrize("size", SIZES)
def test_python_seals_swift_opens(
    cli: "tuple[str, Dict[str, str]]", admin: hsmgw.Client, tenant: str, size: int, tmp_path: pathlib.Path
) -> None:
    message = os.urandom(size)
    sealed = tmp_path / "python.hgwe"
    sealed.write_bytes(admin.envelope_encrypt(tenant, message, CONTEXT, frame_size=4096 if size > 60000 else 1024))
    opened = tmp_path / "opened"
    run(cli, ["decrypt", "--in", str(sealed), "--out", str(opened)])
    assert opened.read_bytes() == message


@pytest.mark.parametrize("size", SIZES)
def test_swift_seals_python_opens(
    cli: "tuple[str, Dict[str, str]]", admin: hsmgw.Client, tenant: str, size: int
) -> None:
    message = os.urandom(size)
    sealed = run(cli, ["encrypt", "--tenant", tenant] + context_flags(), stdin=message)
    assert sealed[:6] == b"HGWE\x01\x01"
    assert admin.envelope_decrypt(sealed, required_context=CONTEXT) == message


def test_swift_frame_size_option_is_read_by_python(
    cli: "tuple[str, Dict[str, str]]", admin: hsmgw.Client, tenant: str
) -> None:
    message = os.urandom(10_000)
    sealed = run(cli, ["encrypt", "--tenant", tenant, "--frame-size", "1024"] + context_flags(), stdin=message)
    header = hsmgw.envelope.read_header(__import__("io").BytesIO(sealed))
    assert header.frame_size == 1024 and header.tenant == tenant and header.context == CONTEXT
    assert admin.envelope_decrypt(sealed) == message


def test_a_swift_envelope_tampered_is_refused_by_python(
    cli: "tuple[str, Dict[str, str]]", admin: hsmgw.Client, tenant: str
) -> None:
    sealed = bytearray(run(cli, ["encrypt", "--tenant", tenant] + context_flags(), stdin=b"x" * 100))
    sealed[-1] ^= 1
    with pytest.raises(hsmgw.EnvelopeError):
        admin.envelope_decrypt(bytes(sealed))


def json_field(document: Dict[str, object], *names: str) -> str:
    for name in names:
        value = document.get(name)
        if isinstance(value, str) and value:
            return value
    raise AssertionError("none of %s in the CLI's JSON: %s" % (names, sorted(document)))


def test_a_data_key_generated_by_the_cli_decrypts_in_python(
    cli: "tuple[str, Dict[str, str]]", admin: hsmgw.Client, tenant: str, tmp_path: pathlib.Path
) -> None:
    plaintext_file = tmp_path / "key.bin"
    out = json.loads(
        run(
            cli,
            ["data-key", "generate", "--tenant", tenant, "--plaintext-out", str(plaintext_file), "--json"]
            + context_flags(),
        )
    )
    key_id = json_field(out, "id", "key_id", "keyId")
    assert plaintext_file.stat().st_mode & 0o777 == 0o600
    key = admin.decrypt_data_key(tenant, key_id, CONTEXT)
    assert key.plaintext == plaintext_file.read_bytes()
    assert key.wrapped == base64.b64decode(json_field(out, "wrapped"))


def test_a_data_key_generated_in_python_decrypts_and_rewraps_with_the_cli(
    cli: "tuple[str, Dict[str, str]]", admin: hsmgw.Client, tenant: str, tmp_path: pathlib.Path
) -> None:
    key = admin.generate_data_key(tenant, CONTEXT)
    out_file = tmp_path / "key.bin"
    run(
        cli,
        ["data-key", "decrypt", "--tenant", tenant, "--key-id", key.id, "--out", str(out_file), "--json"]
        + context_flags(),
    )
    assert out_file.read_bytes() == key.plaintext
    rewrapped = json.loads(run(cli, ["rewrap", "--tenant", tenant, "--key-id", key.id, "--json"] + context_flags()))
    assert json_field(rewrapped, "id", "key_id", "keyId") == key.id
