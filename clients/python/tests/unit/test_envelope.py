"""The envelope format against docs/envelope-format.md: the known-answer vectors byte for byte
(the same as Tests/GatewayClientTests/Envelope/EnvelopeKnownAnswerTests.swift), the reference
reader of the document, streaming, and every change the format claims to detect."""

from __future__ import annotations

import hashlib
import io
import re
import struct
from typing import Any, Callable, Dict

import pytest

from hsmgw import envelope
from hsmgw.envelope import EnvelopeError, EnvelopeHeader

from .support import ENVELOPE_MD, hex_blocks

DATA_KEY = bytes(range(32))
MESSAGE_ID = bytes(range(0xA0, 0xC0))
KEY_ID = "5f0c1a9e-3b7d-4c2a-9e8f-0123456789ab"
CONTEXT = {"purpose": "known-answer", "app": "billing"}
VECTORS = hex_blocks(ENVELOPE_MD, "vector")
FOX = b"The quick brown fox jumps over the lazy dog"
THREE_FRAMES = bytes((7 * i + 3) % 256 for i in range(2148))


def kat(plaintext: bytes) -> bytes:
    return envelope.seal(
        plaintext,
        data_key=DATA_KEY,
        data_key_id=KEY_ID,
        tenant="acme",
        context=CONTEXT,
        frame_size=1024,
        message_id=MESSAGE_ID,
    )


def fixed_key(_: EnvelopeHeader) -> bytes:
    return DATA_KEY


def test_the_document_holds_the_vectors() -> None:
    assert sorted(VECTORS) == ["empty", "fox", "header"]
    assert len(VECTORS["header"]) == 167


def test_header_vector() -> None:
    header, _ = envelope.encode_header(
        data_key=DATA_KEY, data_key_id=KEY_ID, tenant="acme", context=CONTEXT, frame_size=1024, message_id=MESSAGE_ID
    )
    assert header == VECTORS["header"]


def test_empty_vector() -> None:
    assert kat(b"") == VECTORS["empty"]


def test_fox_vector() -> None:
    assert kat(FOX) == VECTORS["fox"]


def test_three_frame_vector() -> None:
    sealed = kat(THREE_FRAMES)
    assert len(sealed) == 2382
    assert hashlib.sha256(sealed).hexdigest() == "b09ce4379e3703caa6645457f75b4e8e7235e7dad763ccf5ceb4f8baf101055d"
    text = ENVELOPE_MD.read_text(encoding="utf-8")
    assert "b09ce4379e3703caa6645457f75b4e8e7235e7dad763ccf5ceb4f8baf101055d" in text


def test_derived_keys_are_hkdf_sha256_as_documented() -> None:
    import hmac

    def hkdf(info: bytes) -> bytes:
        prk = hmac.new(MESSAGE_ID, DATA_KEY, hashlib.sha256).digest()
        return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()

    frame_key, commitment = envelope.derive_keys(DATA_KEY, MESSAGE_ID)
    assert frame_key == hkdf(b"HGWE v1 encryption key")
    assert commitment == hkdf(b"HGWE v1 key commitment")
    assert VECTORS["header"][-32:] == commitment


@pytest.mark.parametrize("plaintext", [b"", FOX, THREE_FRAMES], ids=["empty", "fox", "three-frames"])
def test_vectors_open(plaintext: bytes) -> None:
    assert envelope.open_envelope(kat(plaintext), fixed_key) == plaintext


def test_the_documents_reference_reader_opens_what_this_writes() -> None:
    text = ENVELOPE_MD.read_text(encoding="utf-8")
    source = re.search(r"## A reference reader in Python\n.*?```python\n(.*?)```", text, re.S)
    assert source is not None
    namespace: Dict[str, Any] = {}
    exec(compile(source.group(1), "envelope-format.md", "exec"), namespace)
    decrypt: Callable[..., bytes] = namespace["decrypt"]
    for plaintext in (b"", FOX, THREE_FRAMES, bytes(5000)):
        sealed = envelope.seal(
            plaintext, data_key=DATA_KEY, data_key_id="k", tenant="t1", context={"a": "b"}, frame_size=1024
        )
        assert decrypt(sealed, lambda tenant, key_id, context: DATA_KEY) == plaintext


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1025, 2048, 2049, 5000])
def test_frames_are_cut_as_the_document_says(size: int) -> None:
    sealed = envelope.seal(bytes(size), data_key=DATA_KEY, data_key_id="k", tenant="t", context={}, frame_size=1024)
    header = envelope.read_header(io.BytesIO(sealed))
    frames = max(1, -(-size // 1024))
    final = size - (frames - 1) * 1024
    assert len(sealed) == len(header.raw) + (frames - 1) * (5 + 1024 + 16) + 9 + final + 16
    assert envelope.open_envelope(sealed, fixed_key) == bytes(size)


def test_streaming_writer_in_small_pieces_gives_the_same_bytes() -> None:
    out = io.BytesIO()
    with envelope.EnvelopeWriter(
        out,
        data_key=DATA_KEY,
        data_key_id=KEY_ID,
        tenant="acme",
        context=CONTEXT,
        frame_size=1024,
        message_id=MESSAGE_ID,
    ) as writer:
        for i in range(0, len(THREE_FRAMES), 7):
            writer.write(THREE_FRAMES[i : i + 7])
    assert out.getvalue() == kat(THREE_FRAMES)


def test_streaming_reader_writes_each_frame_and_reads_one_frame_at_a_time() -> None:
    sealed = kat(THREE_FRAMES)

    class CountingReader(io.BytesIO):
        largest = 0

        def read(self, size: "int | None" = -1) -> bytes:
            assert size is not None and size >= 0, "the reader never reads to the end at once"
            CountingReader.largest = max(CountingReader.largest, size)
            return super().read(size)

    out = io.BytesIO()
    header = envelope.decrypt_stream(CountingReader(sealed), out, fixed_key)
    assert out.getvalue() == THREE_FRAMES
    assert header.tenant == "acme" and header.data_key_id == KEY_ID and header.context == CONTEXT
    assert CountingReader.largest <= 1024 + 16


def expect(kind: str, data: bytes, key: Callable[[EnvelopeHeader], bytes] = fixed_key, **kwargs: Any) -> None:
    with pytest.raises(EnvelopeError) as caught:
        envelope.open_envelope(data, key, **kwargs)
    assert caught.value.kind == kind, caught.value


def test_every_header_byte_is_authenticated() -> None:
    sealed = kat(FOX)
    header_length = len(VECTORS["header"])
    for position in range(header_length):
        changed = bytearray(sealed)
        changed[position] ^= 0x01
        with pytest.raises(EnvelopeError):
            envelope.open_envelope(bytes(changed), fixed_key)


def test_every_frame_byte_is_authenticated() -> None:
    sealed = kat(FOX)
    for position in range(len(VECTORS["header"]), len(sealed)):
        changed = bytearray(sealed)
        changed[position] ^= 0x80
        with pytest.raises(EnvelopeError):
            envelope.open_envelope(bytes(changed), fixed_key)


def test_truncation_reordering_and_trailing_data() -> None:
    sealed = kat(THREE_FRAMES)
    h = len(VECTORS["header"])
    regular = 5 + 1024 + 16
    frame1, frame2, final = sealed[h : h + regular], sealed[h + regular : h + 2 * regular], sealed[h + 2 * regular :]
    header = sealed[:h]
    expect(EnvelopeError.TRUNCATED, header + frame1 + frame2)  # no final frame
    expect(EnvelopeError.TRUNCATED, sealed[:-1])
    expect(EnvelopeError.AUTHENTICATION_FAILED, header + frame2 + frame1 + final)
    expect(EnvelopeError.AUTHENTICATION_FAILED, header + frame1 + frame1 + frame2 + final)
    expect(EnvelopeError.TRAILING_DATA, sealed + b"\x00")
    # A regular frame relabelled final (with a length) fails its tag.
    relabelled = header + frame1[:4] + b"\x01" + struct.pack(">I", 1024) + frame1[5:]
    expect(EnvelopeError.AUTHENTICATION_FAILED, relabelled)


def test_another_key_fails_the_commitment() -> None:
    expect(EnvelopeError.AUTHENTICATION_FAILED, kat(FOX), lambda _: bytes(32))


def test_unsupported_version_and_suite() -> None:
    sealed = bytearray(kat(FOX))
    sealed[4] = 2
    expect(EnvelopeError.UNSUPPORTED, bytes(sealed))
    sealed = bytearray(kat(FOX))
    sealed[5] = 2
    expect(EnvelopeError.UNSUPPORTED, bytes(sealed))


def test_required_context() -> None:
    sealed = kat(FOX)
    assert envelope.open_envelope(sealed, fixed_key, required_context={"app": "billing"}) == FOX
    expect(EnvelopeError.CONTEXT_MISMATCH, sealed, required_context={"app": "other"})
    expect(EnvelopeError.CONTEXT_MISMATCH, sealed, required_context={"missing": ""})


def test_non_canonical_contexts_are_refused() -> None:
    def with_context(encoded: bytes) -> bytes:
        header = VECTORS["header"]
        start = 43 + 4 + 1 + 36
        return header[:start] + struct.pack(">H", len(encoded)) + encoded + header[start + 2 + 49 :]

    def pair(k: bytes, v: bytes) -> bytes:
        return struct.pack(">I", len(k)) + k + struct.pack(">I", len(v)) + v

    out_of_order = struct.pack(">I", 2) + pair(b"b", b"") + pair(b"a", b"")
    repeated = struct.pack(">I", 2) + pair(b"a", b"") + pair(b"a", b"")
    not_utf8 = struct.pack(">I", 1) + pair(b"\xff", b"")
    short = struct.pack(">I", 2) + pair(b"a", b"")
    for encoded in (out_of_order, repeated, not_utf8, short):
        with pytest.raises(EnvelopeError) as caught:
            envelope.read_header(io.BytesIO(with_context(encoded)))
        assert caught.value.kind == EnvelopeError.MALFORMED


def test_limits_when_writing() -> None:
    for kwargs in (
        {"frame_size": 1023},
        {"frame_size": (4 << 20) + 1},
        {"tenant": "Acme"},
        {"tenant": "a" * 64},
        {"data_key_id": ""},
        {"data_key_id": "k" * 65},
        {"data_key_id": "with space"},
        {"context": {"": "v"}},
    ):
        arguments: Dict[str, Any] = {"data_key": DATA_KEY, "data_key_id": "k", "tenant": "t", "context": {}}
        arguments.update(kwargs)
        with pytest.raises(EnvelopeError) as caught:
            envelope.seal(b"x", **arguments)
        assert caught.value.kind == EnvelopeError.INVALID_ARGUMENT, kwargs


def test_errors_never_show_plaintext_or_keys() -> None:
    secret = b"top-secret-plaintext"
    sealed = envelope.seal(secret, data_key=DATA_KEY, data_key_id="k", tenant="t", context={}, frame_size=1024)
    with pytest.raises(EnvelopeError) as caught:
        envelope.open_envelope(sealed, lambda _: bytes(32))
    text = str(caught.value) + repr(caught.value)
    assert "top-secret" not in text and DATA_KEY.hex() not in text
    assert "raw" not in repr(envelope.read_header(io.BytesIO(sealed)))
