"""Section 16 of docs/protocol.md computed from the document's rules, against its hex vectors."""

from __future__ import annotations

import pytest

from hsmgw import encoding, pb

from .support import PROTOCOL_MD, hex_blocks

TENANT = "acme"
KEY_ID = "5f0c1a9e-3b7d-4c2a-9e8f-0123456789ab"
CONTEXT = {"purpose": "known-answer", "app": "billing"}
VECTORS = hex_blocks(PROTOCOL_MD, "vector")


def test_the_document_holds_these_vectors() -> None:
    assert sorted(VECTORS) == sorted(
        [
            "context",
            "context-hash",
            "payload-aad",
            "payload-ciphertext",
            "wrapped-aad",
            "audit-record",
            "audit-hash",
            "audit-checkpoint",
        ]
    )


def test_context_and_its_hash() -> None:
    assert encoding.canonical_context(CONTEXT) == VECTORS["context"]
    assert encoding.context_hash(CONTEXT) == VECTORS["context-hash"]
    assert encoding.canonical_context({}) == b"\x00\x00\x00\x00"
    assert encoding.context_hash({}) == encoding.EMPTY_CONTEXT_HASH


def test_context_keys_sort_by_their_utf8_bytes_a_prefix_first() -> None:
    encoded = encoding.canonical_context({"ab": "1", "a": "2", "é": "3", "z": "4"})
    order = [b"a", b"ab", b"z", "é".encode()]
    position = 4
    for key in order:
        length = int.from_bytes(encoded[position : position + 4], "big")
        assert encoded[position + 4 : position + 4 + length] == key
        position += 4 + length
        position += 4 + int.from_bytes(encoded[position : position + 4], "big")


def test_context_limits_are_enforced_without_naming_values() -> None:
    with pytest.raises(ValueError):
        encoding.canonical_context({str(i): "" for i in range(65)})
    with pytest.raises(ValueError):
        encoding.canonical_context({"": "v"})
    with pytest.raises(ValueError) as caught:
        encoding.canonical_context({"k": "secret-value" * 400})
    assert "secret-value" not in str(caught.value)
    with pytest.raises(ValueError):
        encoding.canonical_context({"k%d" % i: "v" * 200 for i in range(40)})


def test_payload_and_wrapped_aads() -> None:
    assert encoding.payload_aad(TENANT, KEY_ID, CONTEXT) == VECTORS["payload-aad"]
    assert encoding.wrapped_aad(TENANT, KEY_ID, 1, CONTEXT) == VECTORS["wrapped-aad"]


def test_payload_ciphertext_opens_with_its_data_key() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    ciphertext = VECTORS["payload-ciphertext"]
    assert ciphertext[:3] == b"hc\x01"
    assert ciphertext[3:19] == encoding.uuid_bytes(KEY_ID)
    assert ciphertext[19:31] == bytes(range(0xC0, 0xCC))
    plaintext = AESGCM(bytes(range(32))).decrypt(ciphertext[19:31], ciphertext[31:], VECTORS["payload-aad"])
    assert plaintext == b"hello, gateway"


def test_audit_record_hash_and_checkpoint() -> None:
    record = pb.AuditRecordInfo(
        sequence=1,
        time_ms=1_767_225_600_000,
        principal="admin",
        tenant="acme",
        operation="data-key.generate",
        key_ids=[KEY_ID],
        outcome="ok",
        request_id="1-2",
        detail="version=1 count=1 plaintext=true context-sha256=" + encoding.context_hash(CONTEXT).hex(),
    )
    assert encoding.audit_record_encoding(record) == VECTORS["audit-record"]
    assert encoding.audit_record_hash(record, bytes(32)) == VECTORS["audit-hash"]
    assert encoding.checkpoint_message(1, VECTORS["audit-hash"]) == VECTORS["audit-checkpoint"]
