"""Live tests against a real gateway, started by scripts/python-sdk-test.sh. Their settings come
from the environment; a test whose settings are missing FAILS (it is never skipped), so a run that
was meant to cover something cannot silently cover less."""

from __future__ import annotations

import os
import uuid
from typing import Iterator

import pytest

import hsmgw


def require(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        pytest.fail("%s is not set: run the live tests through scripts/python-sdk-test.sh" % name, pytrace=False)
    return value


@pytest.fixture(scope="session")
def address() -> str:
    return require("HSMGW_LIVE_ADDRESS")


@pytest.fixture(scope="session")
def admin_token_file() -> str:
    return require("HSMGW_LIVE_TOKEN_FILE")


@pytest.fixture(scope="session")
def tls() -> "hsmgw.TLSConfig | None":
    ca_file = os.environ.get("HSMGW_LIVE_CA_FILE", "")
    if not ca_file:
        return None
    return hsmgw.TLSConfig(ca_file=ca_file, server_name=os.environ.get("HSMGW_LIVE_SERVER_NAME") or None)


@pytest.fixture(scope="session")
def admin(address: str, admin_token_file: str, tls: "hsmgw.TLSConfig | None") -> Iterator[hsmgw.Client]:
    with hsmgw.Client(address, token_file=admin_token_file, tls=tls, client_name="hsmgw-python-live") as client:
        yield client


@pytest.fixture(scope="session")
def tenant(admin: hsmgw.Client) -> str:
    name = "py-" + uuid.uuid4().hex[:12]
    admin.call(
        hsmgw.Method.CREATE_TENANT,
        hsmgw.pb.CreateTenantRequest(tenant=name),
        hsmgw.pb.CreateTenantResponse,
        timeout=60,
    )
    return name
