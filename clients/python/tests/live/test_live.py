"""The SDK against a live gateway (plaintext dev gateway or TLS, as the environment says): every
check of the former interop client (Tests/Interop/python) and every data-plane method."""

from __future__ import annotations

import os
import re
import struct
import uuid

import pytest

import hsmgw
from hsmgw import Code, Method, encoding, pb
from hsmgw._wire import Frame, Kind
from hsmgw.config import Target
from hsmgw.connection import Connection, status_error

UUID_TEXT = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# A method number no version 1 server defines (section 9.1).
UNKNOWN_METHOD = 9999
CONTEXT = {"purpose": "interop", "run": "python"}


def raw_connection(address: str, tls: "hsmgw.TLSConfig | None") -> Connection:
    return Connection.connect(
        Target.parse(address),
        ssl_context=tls.ssl_context() if tls else None,
        server_hostname=tls.server_name if tls else None,
    )


def test_the_token_file_holds_an_api_token_of_the_documented_shape(admin_token_file: str) -> None:
    assert hsmgw.APIToken.from_file(admin_token_file).has_gateway_shape


def test_before_the_handshake_only_hello_is_served(
    address: str, tls: "hsmgw.TLSConfig | None", admin_token_file: str
) -> None:
    with raw_connection(address, tls) as connection:
        frame = connection.call(Method.SERVER_INFO, b"", 5.0)
        error = status_error(frame)
        assert (error.code, error.reason, error.status_payload_code) == (Code.UNAUTHENTICATED, "HANDSHAKE_REQUIRED", 16)
        hello = connection.hello(hsmgw.APIToken.from_file(admin_token_file).secret, "hsmgw-python-live", 5.0)
        assert hello.principal
        assert hello.max_frame_bytes >= 1024 and hello.max_requests_in_flight >= 1 and hello.keepalive_seconds > 0
        assert any(r.tenant == "*" and r.role == "admin" for r in hello.roles)
        # Several requests in flight at once, each answered under its own id.
        first = connection.start(Method.SERVER_INFO, b"", 10.0)
        second = connection.start(Method.SERVER_INFO, b"", 10.0)
        assert first != second
        assert pb.ServerInfoResponse.FromString(connection.wait(second, 11.0).payload).principal == hello.principal
        assert pb.ServerInfoResponse.FromString(connection.wait(first, 11.0).payload).principal == hello.principal
        # An unknown method number: UNIMPLEMENTED, the number echoed.
        frame = connection.call(UNKNOWN_METHOD, b"", 5.0)
        assert (frame.status, frame.method) == (Code.UNIMPLEMENTED, UNKNOWN_METHOD)
        payload = os.urandom(16)
        assert connection.ping(payload) == payload
        assert connection.usable and connection.goaway is None


def test_reserved_flags_get_a_goaway_with_the_code_in_header_and_status(
    address: str, tls: "hsmgw.TLSConfig | None"
) -> None:
    with raw_connection(address, tls) as connection:
        connection.send_raw(struct.pack(">IBBHHHII", 16, 1, 1, 1, 2, 0, 9, 0))  # flags 1: reserved
        connection._reader.join(timeout=10)  # the server sends its goaway and closes
        goaway = connection.goaway
        assert goaway is not None
        assert (goaway.code, goaway.status_payload_code, goaway.reason) == (
            Code.INVALID_ARGUMENT,
            Code.INVALID_ARGUMENT,
            "RESERVED_FLAGS",
        )


def test_hello_and_server_info(admin: hsmgw.Client) -> None:
    hello = admin.hello()
    info = admin.server_info()
    assert info.server_version and info.principal == hello.principal and info.instance_id == hello.instance_id
    assert info.store in ("sqlite", "postgres") and info.ready


def test_data_keys_generate_decrypt_rewrap(admin: hsmgw.Client, tenant: str) -> None:
    created = admin.call(Method.GET_TENANT, pb.GetTenantRequest(tenant=tenant), pb.GetTenantResponse).tenant
    assert created.id == tenant and created.state == "enabled" and created.primary_master_key_version >= 1
    key = admin.generate_data_key(tenant, CONTEXT)
    assert UUID_TEXT.match(key.id) and key.plaintext is not None and len(key.plaintext) == 32
    assert len(key.wrapped) == 83 and key.master_key_version == created.primary_master_key_version
    other_order = dict(reversed(list(CONTEXT.items())))
    decrypted = admin.decrypt_data_key(tenant, key.id, other_order)
    assert decrypted.id == key.id and decrypted.plaintext == key.plaintext
    assert decrypted.wrapped == key.wrapped  # the current wrapped copy (section 9.3)
    before = admin.get_data_key(tenant, key.id)
    rewrapped = admin.rewrap_data_key(tenant, key.id, CONTEXT)
    assert rewrapped == before  # already under the primary: left as it is
    assert admin.decrypt_data_key(tenant, key.id, CONTEXT).wrapped == key.wrapped
    with pytest.raises(hsmgw.InvalidArgument) as caught:
        admin.decrypt_data_key(tenant, key.id, {"purpose": "interop", "run": "other"})
    assert caught.value.reason == "DECRYPTION_FAILED" and caught.value.status_payload_code == Code.INVALID_ARGUMENT


def test_decrypt_by_the_kept_wrapped_copy(admin: hsmgw.Client, tenant: str) -> None:
    key = admin.generate_data_key(tenant, CONTEXT)
    by_copy = admin.decrypt_data_key(tenant, "", CONTEXT, wrapped=key.wrapped)
    assert by_copy.id == key.id and by_copy.plaintext == key.plaintext
    with pytest.raises(hsmgw.InvalidArgument):
        admin.decrypt_data_key(tenant, "", CONTEXT, wrapped=key.wrapped[:-1])


def test_batches(admin: hsmgw.Client, tenant: str) -> None:
    keys = admin.generate_data_keys(tenant, 3, CONTEXT, include_plaintext=False)
    assert len(keys) == 3 and all(k.plaintext is None and len(k.wrapped) == 83 for k in keys)
    results = admin.decrypt_data_keys(
        tenant,
        [
            hsmgw.DataKeyRef(keys[0].id, CONTEXT),
            hsmgw.DataKeyRef(keys[1].id, {"wrong": "context"}),
            hsmgw.DataKeyRef("", CONTEXT, keys[2].wrapped),
        ],
    )
    assert isinstance(results[0], hsmgw.DataKey) and results[0].plaintext is not None
    assert isinstance(results[1], hsmgw.InvalidArgument) and results[1].reason == "DECRYPTION_FAILED"
    assert isinstance(results[2], hsmgw.DataKey) and results[2].id == keys[2].id


def test_idempotency_key_returns_the_first_key(admin: hsmgw.Client, tenant: str) -> None:
    idempotency_key = str(uuid.uuid4())
    first = admin.generate_data_key(tenant, CONTEXT, idempotency_key=idempotency_key)
    again = admin.generate_data_key(tenant, CONTEXT, idempotency_key=idempotency_key)
    assert (again.id, again.wrapped, again.plaintext) == (first.id, first.wrapped, first.plaintext)
    with pytest.raises(hsmgw.AlreadyExists):
        admin.generate_data_key(tenant, {"other": "request"}, idempotency_key=idempotency_key)


def test_encrypt_and_decrypt_inside_the_gateway(admin: hsmgw.Client, tenant: str) -> None:
    key = admin.generate_data_key(tenant, CONTEXT, include_plaintext=False)
    message = os.urandom(1000)
    ciphertext = admin.encrypt(tenant, key.id, message, CONTEXT)
    assert ciphertext[:3] == b"hc\x01" and ciphertext[3:19] == encoding.uuid_bytes(key.id)
    opened = admin.decrypt(tenant, ciphertext, CONTEXT)
    assert (opened.plaintext, opened.data_key_id) == (message, key.id)
    assert message.hex() not in repr(opened)
    # The ciphertext opens with the data key and the AAD of section 16.2.
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    plaintext_key = admin.decrypt_data_key(tenant, key.id, CONTEXT).plaintext
    assert plaintext_key is not None
    aad = encoding.payload_aad(tenant, key.id, CONTEXT)
    assert AESGCM(plaintext_key).decrypt(ciphertext[19:31], ciphertext[31:], aad) == message
    tampered = bytearray(ciphertext)
    tampered[-1] ^= 1
    with pytest.raises(hsmgw.InvalidArgument) as caught:
        admin.decrypt(tenant, bytes(tampered), CONTEXT)
    assert caught.value.reason == "DECRYPTION_FAILED"


def test_list_disable_enable_destroy(admin: hsmgw.Client, tenant: str) -> None:
    key = admin.generate_data_key(tenant, CONTEXT, include_plaintext=False)
    listed = [k.id for k in admin.iter_data_keys(tenant, page_size=2)]
    assert key.id in listed and len(listed) == len(set(listed))
    assert admin.disable_data_key(tenant, key.id).state == "disabled"
    with pytest.raises(hsmgw.FailedPrecondition):
        admin.decrypt_data_key(tenant, key.id, CONTEXT)
    assert admin.enable_data_key(tenant, key.id).state == "enabled"
    assert admin.decrypt_data_key(tenant, key.id, CONTEXT).id == key.id
    assert admin.destroy_data_key(tenant, key.id).state == "destroyed"
    with pytest.raises(hsmgw.FailedPrecondition):
        admin.decrypt_data_key(tenant, key.id, CONTEXT, wrapped=key.wrapped)
    with pytest.raises(hsmgw.NotFound):
        admin.get_data_key(tenant, str(uuid.uuid4()))


def test_envelope_round_trip_through_the_gateway(admin: hsmgw.Client, tenant: str) -> None:
    message = os.urandom(200_000)
    sealed = admin.envelope_encrypt(tenant, message, CONTEXT, frame_size=16384)
    assert admin.envelope_decrypt(sealed, required_context={"purpose": "interop"}) == message
    with pytest.raises(hsmgw.EnvelopeError):
        admin.envelope_decrypt(sealed, required_context={"purpose": "other"})


def test_the_audit_log_rehashes_as_section_16_says(admin: hsmgw.Client, tenant: str) -> None:
    # Runs before the test that makes a refused Hello, whose audit record is written later on its
    # own path (protocol 7.1): the log checked here is not being appended to by that writer.
    key = admin.generate_data_key(tenant, CONTEXT, include_plaintext=False)
    records: "list[pb.AuditRecordInfo]" = []
    after = 0
    while True:
        page = admin.call(
            Method.LIST_AUDIT_RECORDS, pb.ListAuditRecordsRequest(after=after, limit=1000), pb.ListAuditRecordsResponse
        )
        records += page.records
        if len(page.records) < 1000:
            break
        after = page.records[-1].sequence
    expected = "context-sha256=" + encoding.context_hash(CONTEXT).hex()
    generated = [r for r in records if r.operation == "data-key.generate" and key.id in r.key_ids]
    assert len(generated) == 1 and expected in generated[0].detail.split(" ")
    previous = bytes(32)
    assert records and records[0].sequence == 1
    for record in records:
        assert record.previous_hash == previous, record.sequence
        assert encoding.audit_record_hash(record, previous) == record.hash, record.sequence
        previous = record.hash
    assert all(r.outcome == "ok" or r.outcome.startswith("error:") for r in records)
    verified = admin.call(Method.VERIFY_AUDIT_LOG, pb.VerifyAuditLogRequest(), pb.VerifyAuditLogResponse)
    assert verified.intact, (
        verified.problem_kind,
        verified.problem_sequence,
        verified.problem,
        verified.records_checked,
    )


def test_the_deadline_travels_and_a_tiny_one_fails_as_deadline_exceeded(admin: hsmgw.Client, tenant: str) -> None:
    with pytest.raises(hsmgw.DeadlineExceeded):
        admin.generate_data_keys(tenant, 1000, CONTEXT, timeout=0.001)
    # The client is still usable afterwards.
    assert admin.server_info().ready


def test_a_key_user_token_from_a_string_is_limited_to_its_tenant(
    admin: hsmgw.Client, tenant: str, address: str, tls: "hsmgw.TLSConfig | None"
) -> None:
    name = "py-user-" + uuid.uuid4().hex[:8]
    admin.call(
        Method.CREATE_PRINCIPAL,
        pb.CreatePrincipalRequest(name=name, roles=[pb.RoleBinding(tenant=tenant, role="key-user")]),
        pb.PrincipalResponse,
    )
    token = admin.call(
        Method.CREATE_API_TOKEN, pb.CreateAPITokenRequest(principal=name), pb.CreateAPITokenResponse
    ).token
    with hsmgw.Client(address, token=token, tls=tls) as user:
        assert user.hello().principal == name
        key = user.generate_data_key(tenant, CONTEXT)
        assert user.envelope_decrypt(user.envelope_encrypt(tenant, b"x", CONTEXT, data_key=key)) == b"x"
        with pytest.raises(hsmgw.PermissionDenied):
            user.generate_data_key("some-other-tenant", CONTEXT)
        with pytest.raises(hsmgw.PermissionDenied):
            user.disable_data_key(tenant, key.id)  # admin only
    with pytest.raises(hsmgw.Unauthenticated):
        with hsmgw.Client(address, token=token[:-2] + ("AA" if not token.endswith("AA") else "BB"), tls=tls) as wrong:
            wrong.server_info()


def test_threads_share_a_small_pool(
    admin_token_file: str, address: str, tls: "hsmgw.TLSConfig | None", tenant: str
) -> None:
    import threading

    with hsmgw.Client(address, token_file=admin_token_file, tls=tls, max_connections=2) as client:
        key = client.generate_data_key(tenant, CONTEXT)
        failures: "list[BaseException]" = []
        done: "list[int]" = []

        def worker() -> None:
            try:
                for _ in range(25):
                    assert client.decrypt_data_key(tenant, key.id, CONTEXT).plaintext == key.plaintext
                    done.append(1)
            except BaseException as error:
                failures.append(error)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, failures[:3]
        assert len(done) == 200
        assert 1 <= len(client.connections) <= 2
