"""Client settings: addresses, API tokens (string or a 0600 file, as the Swift tools require),
TLS contexts, and the refusal of plaintext to remote addresses."""

from __future__ import annotations

import os
import pathlib
import ssl

import pytest

from hsmgw import APIToken, Client, ConfigurationError, Target, TLSConfig, client_from_environment

TOKEN = "hsmgw_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"


def write(path: pathlib.Path, text: str, mode: int) -> str:
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def test_token_from_a_0600_file_with_whitespace(tmp_path: pathlib.Path) -> None:
    token = APIToken.from_file(write(tmp_path / "t", "  %s\n" % TOKEN, 0o600))
    assert token.secret == TOKEN and token.has_gateway_shape
    assert APIToken.from_file(write(tmp_path / "r", TOKEN, 0o400)).secret == TOKEN


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o660, 0o644])
def test_token_file_readable_by_others_is_refused(tmp_path: pathlib.Path, mode: int) -> None:
    path = write(tmp_path / "t", TOKEN, mode)
    with pytest.raises(ConfigurationError) as caught:
        APIToken.from_file(path)
    assert "chmod 600" in str(caught.value) and TOKEN not in str(caught.value)


def test_token_file_must_be_a_small_regular_file_with_one_token(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigurationError):
        APIToken.from_file(str(tmp_path))  # a directory
    with pytest.raises(ConfigurationError):
        APIToken.from_file(str(tmp_path / "missing"))
    with pytest.raises(ConfigurationError):
        APIToken.from_file(write(tmp_path / "big", "x" * 5000, 0o600))
    with pytest.raises(ConfigurationError) as caught:
        APIToken.from_file(write(tmp_path / "two", "hsmgw_one hsmgw_two", 0o600))
    assert "hsmgw_one" not in str(caught.value)
    with pytest.raises(ConfigurationError):
        APIToken.from_file(write(tmp_path / "empty", "\n", 0o600))
    # A symbolic link is followed; the target's mode is what counts.
    target = write(tmp_path / "target", TOKEN, 0o600)
    os.symlink(target, tmp_path / "link")
    assert APIToken.from_file(str(tmp_path / "link")).secret == TOKEN


def test_tokens_never_show_in_reprs() -> None:
    token = APIToken(TOKEN)
    assert TOKEN not in repr(token) and TOKEN not in str(token)
    client = Client("127.0.0.1:1", token=TOKEN)
    assert TOKEN not in repr(client)
    client.close()


def test_addresses() -> None:
    assert Target.parse("127.0.0.1:7700") == Target(host="127.0.0.1", port=7700)
    assert Target.parse("[::1]:7700") == Target(host="::1", port=7700)
    assert Target.parse("unix:/run/hsmgw.sock") == Target(unix_path="/run/hsmgw.sock")
    assert str(Target.parse("[::1]:7700")) == "[::1]:7700"
    for wrong in ("localhost", "host:0", "host:70000", "unix:", "unix:/" + "x" * 200, ":7700"):
        with pytest.raises(ConfigurationError):
            Target.parse(wrong)
    assert Target.parse("127.0.0.2:1").is_local and Target.parse("[::1]:1").is_local
    assert not Target.parse("10.0.0.1:7700").is_local and not Target.parse("gateway.internal:7700").is_local


def test_plaintext_only_to_local_targets_unless_allowed() -> None:
    with pytest.raises(ConfigurationError):
        Client("gateway.internal:7700", token=TOKEN)
    Client("gateway.internal:7700", token=TOKEN, allow_insecure_plaintext=True).close()
    Client("unix:/tmp/x.sock", token=TOKEN).close()


def test_credentials_are_required() -> None:
    with pytest.raises(ConfigurationError):
        Client("127.0.0.1:7700")
    with pytest.raises(ConfigurationError):
        Client("127.0.0.1:7700", token=TOKEN, token_file="/x")


def test_client_name_rule() -> None:
    for bad in ("a" * 129, "line\nbreak", "zero\u200bwidth", "bidi\u202e", "sep\u2028"):
        with pytest.raises(ConfigurationError):
            Client("127.0.0.1:7700", token=TOKEN, client_name=bad)
    Client("127.0.0.1:7700", token=TOKEN, client_name="billing-service/2.3.1 ünïcode").close()


def test_tls_context_verifies_and_offers_alpn() -> None:
    context = TLSConfig().ssl_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    with pytest.raises(ConfigurationError):
        TLSConfig(ca_file="/nonexistent/ca.pem").ssl_context()
    with pytest.raises(ConfigurationError):
        TLSConfig(key_file="/x.key").ssl_context()


def test_client_from_environment(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path / "t", TOKEN, 0o600)
    client = client_from_environment({"HSMGW_SERVER": "127.0.0.1:7711", "HSMGW_TOKEN_FILE": path})
    assert str(client.target) == "127.0.0.1:7711" and client.tls is None
    client.close()
    client = client_from_environment({"HSMGW_SOCKET": "/tmp/s.sock", "HSMGW_TOKEN": TOKEN})
    assert client.target.unix_path == "/tmp/s.sock"
    client.close()
