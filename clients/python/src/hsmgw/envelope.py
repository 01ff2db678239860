"""Client-side envelope encryption, format version 1 (docs/envelope-format.md), byte for byte the
Swift client's (``EnvelopeEncryptor`` / ``EnvelopeDecryptor``).

A header names the tenant, the data key id and the encryption context; the plaintext follows in
AES-256-GCM frames under a key derived with HKDF-SHA256 from the data key and a random message
id, with a key commitment in the header. Streaming in both directions: one frame of memory,
whatever the size of the message.

The functions here take the data key's plaintext directly (no gateway); :class:`hsmgw.Client`
has ``envelope_encrypt`` / ``envelope_decrypt`` that fetch it from the gateway.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Dict, Mapping, Optional

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import encoding
from .errors import HsmgwError

MAGIC = b"HGWE"
FORMAT_VERSION = 1
#: AES-256-GCM frames, HKDF-SHA256, key commitment.
SUITE_AES256GCM_HKDF_SHA256_COMMITTED = 1
MESSAGE_ID_BYTES = 32
COMMITMENT_BYTES = 32
DATA_KEY_BYTES = 32
TAG_BYTES = 16
#: magic, version, suite, message id, frame size, tenant length.
FIXED_HEADER_BYTES = 43
DEFAULT_FRAME_SIZE = 64 * 1024
MIN_FRAME_SIZE = 1024
MAX_FRAME_SIZE = 4 << 20
#: Frames per message (u32 sequence numbers).
MAX_FRAME_COUNT = 0xFFFFFFFF
MAX_TENANT_BYTES = 63
MAX_DATA_KEY_ID_BYTES = 64
#: The smallest context encoding (the empty context).
MIN_CONTEXT_BYTES = 4
MAX_HEADER_BYTES = FIXED_HEADER_BYTES + MAX_TENANT_BYTES + 1 + MAX_DATA_KEY_ID_BYTES + 2 + 8192 + COMMITMENT_BYTES
REGULAR_FRAME = 0
FINAL_FRAME = 1
ENCRYPTION_KEY_INFO = b"HGWE v1 encryption key"
COMMITMENT_INFO = b"HGWE v1 key commitment"


class EnvelopeError(HsmgwError):
    """An envelope could not be written or read. ``kind`` is one of the class constants (the
    Swift client's ``EnvelopeError.Code`` names); messages never hold plaintext or key bytes."""

    MALFORMED = "malformed"
    UNSUPPORTED = "unsupported"
    AUTHENTICATION_FAILED = "authenticationFailed"
    TRUNCATED = "truncated"
    TRAILING_DATA = "trailingData"
    CONTEXT_MISMATCH = "contextMismatch"
    INVALID_ARGUMENT = "invalidArgument"

    def __init__(self, kind: str, message: str) -> None:
        super().__init__("%s: %s" % (kind, message))
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class EnvelopeHeader:
    """A parsed header. ``raw`` is its bytes (H is their SHA-256)."""

    message_id: bytes
    frame_size: int
    tenant: str
    data_key_id: str
    context: Dict[str, str]
    commitment: bytes
    raw: bytes = field(repr=False)

    @property
    def header_hash(self) -> bytes:
        return hashlib.sha256(self.raw).digest()


def _hkdf(data_key: bytes, message_id: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=message_id, info=info).derive(data_key)


def derive_keys(data_key: bytes, message_id: bytes) -> "tuple[bytes, bytes]":
    """(frame key, commitment) of a data key and message id."""
    if len(data_key) != DATA_KEY_BYTES:
        raise EnvelopeError(EnvelopeError.INVALID_ARGUMENT, "a data key is %d bytes" % DATA_KEY_BYTES)
    return _hkdf(data_key, message_id, ENCRYPTION_KEY_INFO), _hkdf(data_key, message_id, COMMITMENT_INFO)


def _nonce(sequence: int) -> bytes:
    return bytes(8) + struct.pack(">I", sequence)


def _aad(header_hash: bytes, sequence: int, frame_type: int) -> bytes:
    return header_hash + struct.pack(">IB", sequence, frame_type)


def _check_key_id(data_key_id: str) -> bytes:
    raw = data_key_id.encode("utf-8")
    if not 1 <= len(raw) <= MAX_DATA_KEY_ID_BYTES or not all(0x21 <= b <= 0x7E for b in raw):
        raise EnvelopeError(
            EnvelopeError.INVALID_ARGUMENT,
            "a data key id is 1 to %d bytes of printable ASCII" % MAX_DATA_KEY_ID_BYTES,
        )
    return raw


def _check_tenant(tenant: str) -> bytes:
    if not encoding.TENANT_ID.match(tenant):
        raise EnvelopeError(EnvelopeError.INVALID_ARGUMENT, "a tenant id is 1 to 63 of [a-z0-9_-], not %r" % tenant)
    return tenant.encode("ascii")


def _check_frame_size(frame_size: int) -> None:
    if not MIN_FRAME_SIZE <= frame_size <= MAX_FRAME_SIZE:
        raise EnvelopeError(
            EnvelopeError.INVALID_ARGUMENT,
            "the frame size is %d to %d bytes, not %d" % (MIN_FRAME_SIZE, MAX_FRAME_SIZE, frame_size),
        )


def encode_header(
    *,
    data_key: bytes,
    data_key_id: str,
    tenant: str,
    context: Mapping[str, str],
    frame_size: int = DEFAULT_FRAME_SIZE,
    message_id: Optional[bytes] = None,
) -> "tuple[bytes, bytes]":
    """(header bytes, frame key). ``message_id`` is drawn from the OS CSPRNG unless given (tests)."""
    _check_frame_size(frame_size)
    tenant_bytes = _check_tenant(tenant)
    key_id_bytes = _check_key_id(data_key_id)
    try:
        context_bytes = encoding.canonical_context(context)
    except ValueError as error:
        raise EnvelopeError(EnvelopeError.INVALID_ARGUMENT, str(error)) from None
    if message_id is None:
        message_id = os.urandom(MESSAGE_ID_BYTES)
    if len(message_id) != MESSAGE_ID_BYTES:
        raise EnvelopeError(EnvelopeError.INVALID_ARGUMENT, "a message id is %d bytes" % MESSAGE_ID_BYTES)
    frame_key, commitment = derive_keys(data_key, message_id)
    header = (
        MAGIC
        + bytes([FORMAT_VERSION, SUITE_AES256GCM_HKDF_SHA256_COMMITTED])
        + message_id
        + struct.pack(">IB", frame_size, len(tenant_bytes))
        + tenant_bytes
        + bytes([len(key_id_bytes)])
        + key_id_bytes
        + struct.pack(">H", len(context_bytes))
        + context_bytes
        + commitment
    )
    return header, frame_key


class EnvelopeWriter:
    """Writes one envelope to ``sink`` as plaintext is given to :meth:`write`; :meth:`close`
    writes the final frame (a message is complete only then). Holds at most one frame of
    plaintext: a full frame is kept back until more input shows it is not the last."""

    def __init__(
        self,
        sink: BinaryIO,
        *,
        data_key: bytes,
        data_key_id: str,
        tenant: str,
        context: Mapping[str, str],
        frame_size: int = DEFAULT_FRAME_SIZE,
        message_id: Optional[bytes] = None,
    ) -> None:
        header, frame_key = encode_header(
            data_key=data_key,
            data_key_id=data_key_id,
            tenant=tenant,
            context=context,
            frame_size=frame_size,
            message_id=message_id,
        )
        self._sink = sink
        self._aes = AESGCM(frame_key)
        self._header_hash = hashlib.sha256(header).digest()
        self._frame_size = frame_size
        self._buffer = bytearray()
        self._sequence = 1
        self._closed = False
        sink.write(header)

    def write(self, data: bytes) -> None:
        if self._closed:
            raise EnvelopeError(EnvelopeError.INVALID_ARGUMENT, "the envelope is already closed")
        self._buffer += data
        # Keep the last full frame back: only more input shows it is a regular frame.
        while len(self._buffer) > self._frame_size:
            self._seal(bytes(self._buffer[: self._frame_size]), REGULAR_FRAME)
            del self._buffer[: self._frame_size]

    def close(self) -> None:
        """Writes the final frame (0 to F bytes). Closing twice does nothing."""
        if self._closed:
            return
        self._seal(bytes(self._buffer), FINAL_FRAME)
        self._buffer[:] = bytes(len(self._buffer))
        self._buffer.clear()
        self._closed = True

    def _seal(self, plaintext: bytes, frame_type: int) -> None:
        if self._sequence > MAX_FRAME_COUNT:
            raise EnvelopeError(EnvelopeError.INVALID_ARGUMENT, "more than 2^32-1 frames")
        sealed = self._aes.encrypt(
            _nonce(self._sequence), plaintext, _aad(self._header_hash, self._sequence, frame_type)
        )
        prefix = struct.pack(">IB", self._sequence, frame_type)
        if frame_type == FINAL_FRAME:
            prefix += struct.pack(">I", len(plaintext))
        self._sink.write(prefix + sealed)
        self._sequence += 1

    def __enter__(self) -> "EnvelopeWriter":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()


def encrypt_stream(
    source: BinaryIO,
    sink: BinaryIO,
    *,
    data_key: bytes,
    data_key_id: str,
    tenant: str,
    context: Mapping[str, str],
    frame_size: int = DEFAULT_FRAME_SIZE,
    message_id: Optional[bytes] = None,
) -> int:
    """Seals everything ``source`` holds into ``sink``; returns the plaintext byte count."""
    writer = EnvelopeWriter(
        sink,
        data_key=data_key,
        data_key_id=data_key_id,
        tenant=tenant,
        context=context,
        frame_size=frame_size,
        message_id=message_id,
    )
    total = 0
    while True:
        chunk = source.read(frame_size)
        if not chunk:
            break
        total += len(chunk)
        writer.write(chunk)
    writer.close()
    return total


def seal(
    plaintext: bytes,
    *,
    data_key: bytes,
    data_key_id: str,
    tenant: str,
    context: Mapping[str, str],
    frame_size: int = DEFAULT_FRAME_SIZE,
    message_id: Optional[bytes] = None,
) -> bytes:
    """The envelope of ``plaintext`` (in memory)."""
    out = io.BytesIO()
    encrypt_stream(
        io.BytesIO(plaintext),
        out,
        data_key=data_key,
        data_key_id=data_key_id,
        tenant=tenant,
        context=context,
        frame_size=frame_size,
        message_id=message_id,
    )
    return out.getvalue()


def _read_exact(source: BinaryIO, count: int, what: str) -> bytes:
    data = b""
    while len(data) < count:
        chunk = source.read(count - len(data))
        if not chunk:
            raise EnvelopeError(EnvelopeError.TRUNCATED, "the envelope ends inside %s" % what)
        data += chunk
    return data


def _decode_context(data: bytes) -> Dict[str, str]:
    """The canonical context encoding, refusing anything that is not the one encoding."""

    def fail(why: str) -> EnvelopeError:
        return EnvelopeError(EnvelopeError.MALFORMED, "the encryption context is not canonical: " + why)

    if len(data) < 4:
        raise fail("too short")
    (count,) = struct.unpack_from(">I", data, 0)
    if count > encoding.MAX_CONTEXT_PAIRS:
        raise fail("more than %d pairs" % encoding.MAX_CONTEXT_PAIRS)
    position, previous, context = 4, None, {}
    for _ in range(count):
        pieces = []
        for limit_low, limit_high in ((1, encoding.MAX_CONTEXT_KEY_BYTES), (0, encoding.MAX_CONTEXT_VALUE_BYTES)):
            if position + 4 > len(data):
                raise fail("lengths do not add up")
            (length,) = struct.unpack_from(">I", data, position)
            position += 4
            if not limit_low <= length <= limit_high or position + length > len(data):
                raise fail("a key or value length is out of range")
            pieces.append(data[position : position + length])
            position += length
        key, value = pieces
        if previous is not None and not previous < key:
            raise fail("keys out of order or repeated")
        try:
            context[key.decode("utf-8")] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise fail("invalid UTF-8") from None
        previous = key
    if position != len(data):
        raise fail("lengths do not add up")
    return context


def read_header(source: BinaryIO) -> EnvelopeHeader:
    """Reads and checks a header, each field against its limit before what it announces is read."""
    fixed = _read_exact(source, FIXED_HEADER_BYTES, "the header")
    if fixed[:4] != MAGIC:
        raise EnvelopeError(EnvelopeError.MALFORMED, "not an envelope (bad magic)")
    if fixed[4] != FORMAT_VERSION:
        raise EnvelopeError(EnvelopeError.UNSUPPORTED, "envelope format version %d" % fixed[4])
    if fixed[5] != SUITE_AES256GCM_HKDF_SHA256_COMMITTED:
        raise EnvelopeError(EnvelopeError.UNSUPPORTED, "envelope suite %d" % fixed[5])
    message_id = fixed[6:38]
    frame_size, tenant_length = struct.unpack_from(">IB", fixed, 38)
    if not MIN_FRAME_SIZE <= frame_size <= MAX_FRAME_SIZE:
        raise EnvelopeError(EnvelopeError.MALFORMED, "frame size %d is out of range" % frame_size)
    if not 1 <= tenant_length <= MAX_TENANT_BYTES:
        raise EnvelopeError(EnvelopeError.MALFORMED, "tenant length %d is out of range" % tenant_length)
    tenant_bytes = _read_exact(source, tenant_length, "the header")
    tenant = tenant_bytes.decode("ascii", errors="replace")
    if not encoding.TENANT_ID.match(tenant):
        raise EnvelopeError(EnvelopeError.MALFORMED, "the tenant is not a tenant id")
    key_id_length = _read_exact(source, 1, "the header")[0]
    if not 1 <= key_id_length <= MAX_DATA_KEY_ID_BYTES:
        raise EnvelopeError(EnvelopeError.MALFORMED, "key id length %d is out of range" % key_id_length)
    key_id_bytes = _read_exact(source, key_id_length, "the header")
    if not all(0x21 <= b <= 0x7E for b in key_id_bytes):
        raise EnvelopeError(EnvelopeError.MALFORMED, "the data key id is not printable ASCII")
    (context_length,) = struct.unpack(">H", _read_exact(source, 2, "the header"))
    if not MIN_CONTEXT_BYTES <= context_length <= encoding.MAX_CONTEXT_ENCODED_BYTES:
        raise EnvelopeError(EnvelopeError.MALFORMED, "context length %d is out of range" % context_length)
    context_bytes = _read_exact(source, context_length, "the header")
    context = _decode_context(context_bytes)
    commitment = _read_exact(source, COMMITMENT_BYTES, "the header")
    raw = (
        fixed
        + tenant_bytes
        + bytes([key_id_length])
        + key_id_bytes
        + struct.pack(">H", context_length)
        + context_bytes
        + commitment
    )
    return EnvelopeHeader(
        message_id=message_id,
        frame_size=frame_size,
        tenant=tenant,
        data_key_id=key_id_bytes.decode("ascii"),
        context=context,
        commitment=commitment,
        raw=raw,
    )


#: Given a parsed header, returns the 32-byte data key (DecryptDataKey on the gateway).
DataKeySource = Callable[[EnvelopeHeader], bytes]


def decrypt_stream(
    source: BinaryIO,
    sink: BinaryIO,
    data_key: DataKeySource,
    *,
    required_context: Optional[Mapping[str, str]] = None,
) -> EnvelopeHeader:
    """Opens the envelope ``source`` holds into ``sink``; returns its header.

    Each frame's plaintext is written once it authenticated; the final frame's only after the
    input is known to end there. The output is complete and authentic only when this returns
    without an error: on an error, discard what was written.
    """
    header = read_header(source)
    if required_context is not None:
        for name, value in required_context.items():
            if header.context.get(name) != value:
                raise EnvelopeError(
                    EnvelopeError.CONTEXT_MISMATCH, "the envelope's context does not hold the required pair %r" % name
                )
    frame_key, commitment = derive_keys(data_key(header), header.message_id)
    if not hmac.compare_digest(commitment, header.commitment):
        raise EnvelopeError(
            EnvelopeError.AUTHENTICATION_FAILED, "key commitment mismatch: not the key that sealed the envelope"
        )
    aes = AESGCM(frame_key)
    header_hash = header.header_hash
    expected = 1
    while True:
        sequence, frame_type = struct.unpack(">IB", _read_exact(source, 5, "a frame (no final frame)"))
        if sequence != expected:
            raise EnvelopeError(
                EnvelopeError.AUTHENTICATION_FAILED, "frame %d where %d was expected" % (sequence, expected)
            )
        if frame_type == FINAL_FRAME:
            (length,) = struct.unpack(">I", _read_exact(source, 4, "a frame"))
            if length > header.frame_size:
                raise EnvelopeError(EnvelopeError.MALFORMED, "a final frame longer than the frame size")
        elif frame_type == REGULAR_FRAME:
            length = header.frame_size
        else:
            raise EnvelopeError(EnvelopeError.MALFORMED, "frame type %d" % frame_type)
        body = _read_exact(source, length + TAG_BYTES, "a frame")
        try:
            plaintext = aes.decrypt(_nonce(sequence), body, _aad(header_hash, sequence, frame_type))
        except InvalidTag:
            raise EnvelopeError(
                EnvelopeError.AUTHENTICATION_FAILED, "frame %d does not authenticate" % sequence
            ) from None
        if frame_type == FINAL_FRAME:
            if source.read(1):
                raise EnvelopeError(EnvelopeError.TRAILING_DATA, "bytes after the final frame")
            sink.write(plaintext)
            return header
        sink.write(plaintext)
        if expected == MAX_FRAME_COUNT:
            raise EnvelopeError(EnvelopeError.MALFORMED, "more than 2^32-1 frames")
        expected += 1


def open_envelope(
    envelope: bytes, data_key: DataKeySource, *, required_context: Optional[Mapping[str, str]] = None
) -> bytes:
    """The plaintext of an in-memory envelope."""
    out = io.BytesIO()
    decrypt_stream(io.BytesIO(envelope), out, data_key, required_context=required_context)
    return out.getvalue()
