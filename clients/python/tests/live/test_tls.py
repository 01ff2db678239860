"""TLS, mutual TLS and the Unix socket against a gateway started with a throwaway PKI
(scripts/python-sdk-test.sh): server verification and name checks, a client certificate
authenticating a principal without a token, a refused certificate, and the Unix listener."""

from __future__ import annotations

import ssl
import uuid

import pytest

import hsmgw
from hsmgw import Method, pb

from .conftest import require

CONTEXT = {"transport": "tls"}


def test_the_admin_connection_is_tls_verified(admin: hsmgw.Client, tls: "hsmgw.TLSConfig | None") -> None:
    assert tls is not None, "HSMGW_LIVE_CA_FILE must be set for the TLS tests"
    assert admin.server_info().ready
    (connection,) = admin.connections
    sock = connection._sock
    assert isinstance(sock, ssl.SSLSocket) and sock.version() in ("TLSv1.2", "TLSv1.3")


def test_an_untrusted_server_is_refused(address: str, admin_token_file: str) -> None:
    # The system trust store does not hold the throwaway CA.
    with hsmgw.Client(address, token_file=admin_token_file, tls=hsmgw.TLSConfig(), retry=hsmgw.NO_RETRIES) as client:
        with pytest.raises(hsmgw.Unavailable) as caught:
            client.server_info()
    assert caught.value.reason == "CONNECT_FAILED"


def test_a_wrong_server_name_is_refused(address: str, admin_token_file: str) -> None:
    tls = hsmgw.TLSConfig(ca_file=require("HSMGW_LIVE_CA_FILE"), server_name="not-the-gateway.example")
    with hsmgw.Client(address, token_file=admin_token_file, tls=tls, retry=hsmgw.NO_RETRIES) as client:
        with pytest.raises(hsmgw.Unavailable):
            client.server_info()


def test_mutual_tls_authenticates_a_principal_by_its_certificate(
    admin: hsmgw.Client, tenant: str, address: str
) -> None:
    common_name = require("HSMGW_LIVE_CLIENT_CN")
    name = "py-mtls-" + uuid.uuid4().hex[:8]
    admin.call(
        Method.CREATE_PRINCIPAL,
        pb.CreatePrincipalRequest(
            name=name, certificate_common_name=common_name, roles=[pb.RoleBinding(tenant=tenant, role="key-user")]
        ),
        pb.PrincipalResponse,
    )
    tls = hsmgw.TLSConfig(
        ca_file=require("HSMGW_LIVE_CA_FILE"),
        server_name=require("HSMGW_LIVE_SERVER_NAME"),
        cert_file=require("HSMGW_LIVE_CLIENT_CERT"),
        key_file=require("HSMGW_LIVE_CLIENT_KEY"),
    )
    with hsmgw.Client(address, tls=tls) as client:  # no token: the certificate is the credential
        assert client.hello().principal == name
        sealed = client.envelope_encrypt(tenant, b"over mutual TLS", CONTEXT)
        assert client.envelope_decrypt(sealed) == b"over mutual TLS"


def test_a_certificate_without_client_auth_is_refused(address: str, admin_token_file: str) -> None:
    tls = hsmgw.TLSConfig(
        ca_file=require("HSMGW_LIVE_CA_FILE"),
        server_name=require("HSMGW_LIVE_SERVER_NAME"),
        cert_file=require("HSMGW_LIVE_SERVERAUTH_CERT"),
        key_file=require("HSMGW_LIVE_SERVERAUTH_KEY"),
    )
    # A token does not help: the Hello is never read (protocol 7.3).
    with hsmgw.Client(address, token_file=admin_token_file, tls=tls, retry=hsmgw.NO_RETRIES) as client:
        with pytest.raises(hsmgw.Unavailable):
            client.server_info()


def test_the_unix_socket_listener(admin_token_file: str, tenant: str) -> None:
    path = require("HSMGW_LIVE_UNIX_SOCKET")
    with hsmgw.Client("unix:" + path, token_file=admin_token_file) as client:
        key = client.generate_data_key(tenant, CONTEXT)
        assert client.decrypt_data_key(tenant, key.id, CONTEXT).plaintext == key.plaintext
