"""The byte-exact encodings of docs/protocol.md, section 16: the encryption context and its hash,
the AADs of Encrypt ciphertexts and wrapped data keys, the audit record hash and checkpoint.

Clients never need these to use the gateway; they let a ciphertext be opened with its data key,
an auditor recompute the audit chain from a listing, and tests pin the documented bytes.
"""

from __future__ import annotations

import hashlib
import re
import struct
from typing import Mapping, Protocol, Sequence

#: Pairs in an encryption context (section 11).
MAX_CONTEXT_PAIRS = 64
#: Bytes of a context key (1 to this).
MAX_CONTEXT_KEY_BYTES = 256
#: Bytes of a context value (0 to this).
MAX_CONTEXT_VALUE_BYTES = 4096
#: Bytes of the whole canonical context encoding.
MAX_CONTEXT_ENCODED_BYTES = 8192

#: Tenant ids (section 9.2).
TENANT_ID = re.compile(r"\A[a-z0-9][a-z0-9_-]{0,62}\Z")

EMPTY_CONTEXT_HASH = bytes.fromhex("df3f619804a92fdb4057192dc43dd748ea778adc52bc498ce80524c014b81119")


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def u64(n: int) -> bytes:
    return struct.pack(">Q", n & 0xFFFFFFFFFFFFFFFF)  # two's complement for negative values


def text(value: str) -> bytes:
    """``str(s)`` of section 16: u32 length, then the UTF-8 bytes."""
    data = value.encode("utf-8")
    return u32(len(data)) + data


def blob(data: bytes) -> bytes:
    """``bin(b)`` of section 16: u32 length, then the bytes."""
    return u32(len(data)) + data


def canonical_context(context: Mapping[str, str]) -> bytes:
    """16.1: u32 pair count, then str(key) || str(value), sorted by the keys' UTF-8 bytes.

    Raises ValueError for a context over the limits of section 11 (the message names no value).
    """
    pairs = sorted(((k.encode("utf-8"), v.encode("utf-8")) for k, v in context.items()), key=lambda kv: kv[0])
    if len(pairs) > MAX_CONTEXT_PAIRS:
        raise ValueError("an encryption context holds at most %d pairs, not %d" % (MAX_CONTEXT_PAIRS, len(pairs)))
    for key, value in pairs:
        if not 1 <= len(key) <= MAX_CONTEXT_KEY_BYTES:
            raise ValueError("encryption context keys are 1 to %d bytes" % MAX_CONTEXT_KEY_BYTES)
        if len(value) > MAX_CONTEXT_VALUE_BYTES:
            raise ValueError("encryption context values are at most %d bytes" % MAX_CONTEXT_VALUE_BYTES)
    encoded = u32(len(pairs)) + b"".join(blob(k) + blob(v) for k, v in pairs)
    if len(encoded) > MAX_CONTEXT_ENCODED_BYTES:
        raise ValueError("an encryption context is at most %d bytes encoded" % MAX_CONTEXT_ENCODED_BYTES)
    return encoded


def context_hash(context: Mapping[str, str]) -> bytes:
    """16.1: SHA-256 of the canonical encoding."""
    return hashlib.sha256(canonical_context(context)).digest()


def uuid_bytes(data_key_id: str) -> bytes:
    """A data key id in binary: the 16 bytes of the UUID in the order of its text form."""
    raw = bytes.fromhex(data_key_id.replace("-", ""))
    if len(raw) != 16:
        raise ValueError("a data key id is a UUID")
    return raw


def payload_aad(tenant: str, data_key_id: str, context: Mapping[str, str]) -> bytes:
    """16.2: the AAD of an Encrypt ciphertext."""
    return text("hsmgw-payload") + u32(1) + text(tenant) + blob(uuid_bytes(data_key_id)) + blob(context_hash(context))


def wrapped_aad(tenant: str, data_key_id: str, version: int, context: Mapping[str, str]) -> bytes:
    """16.3: the AAD of a wrapped data key (checked inside the HSM)."""
    return (
        text("hsmgw-data-key")
        + u32(1)
        + text(tenant)
        + blob(uuid_bytes(data_key_id))
        + u32(version)
        + blob(context_hash(context))
    )


class AuditRecord(Protocol):
    """The fields of ``AuditRecordInfo`` the hash covers (a ListAuditRecords entry fits)."""

    @property
    def sequence(self) -> int: ...
    @property
    def time_ms(self) -> int: ...
    @property
    def principal(self) -> str: ...
    @property
    def tenant(self) -> str: ...
    @property
    def operation(self) -> str: ...
    @property
    def key_ids(self) -> Sequence[str]: ...
    @property
    def outcome(self) -> str: ...
    @property
    def request_id(self) -> str: ...
    @property
    def detail(self) -> str: ...


def audit_record_encoding(record: AuditRecord) -> bytes:
    """16.4: the canonical encoding of an audit record."""
    return (
        text("hsmgw-audit-v1")
        + u64(record.sequence)
        + u64(record.time_ms)
        + text(record.principal)
        + text(record.tenant)
        + text(record.operation)
        + u32(len(record.key_ids))
        + b"".join(text(key_id) for key_id in record.key_ids)
        + text(record.outcome)
        + text(record.request_id)
        + text(record.detail)
    )


def audit_record_hash(record: AuditRecord, previous_hash: bytes) -> bytes:
    """16.4: SHA-256(previous hash || the record's encoding)."""
    return hashlib.sha256(previous_hash + audit_record_encoding(record)).digest()


def checkpoint_message(sequence: int, record_hash: bytes) -> bytes:
    """16.5: what the HSM's HMAC of an audit checkpoint covers."""
    return text("hsmgw-audit-anchor-v1") + u64(sequence) + blob(record_hash)
