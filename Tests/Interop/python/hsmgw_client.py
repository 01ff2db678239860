"""A small synchronous client for the hsm-gateway wire protocol, version 1.

Written from docs/protocol.md and proto/hsmgw/v1/gateway.proto alone, as a team outside the
project would write one, to check that the document is enough and that the server agrees with
it. Standard library only (socket, ssl, struct), plus the `protobuf` package for the payloads;
the message classes come from `protoc --python_out` on proto/ (module `hsmgw.v1.gateway_pb2`,
which must be importable).

One thread, no background reader: server pings are answered whenever the client reads (while
waiting for a response, or in `poll()`). A program that stays idle for longer than the server's
keepalive interval without calling `poll()` is disconnected by the server (section 6.1).

Secrets: the API token and data-key plaintext never appear in an exception or a repr.
"""

from __future__ import annotations

import enum
import hashlib
import os
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

from hsmgw.v1 import gateway_pb2 as pb

# --------------------------------------------------------------------------------------------
# Framing (protocol.md section 3)
# --------------------------------------------------------------------------------------------

PROTOCOL_VERSION = 1
LENGTH_PREFIX_SIZE = 4
HEADER_SIZE = 16
# u32 length, u8 version, u8 kind, u16 flags, u16 method, u16 status, u32 request id, u32 deadline
_PREFIX_AND_HEADER = struct.Struct(">IBBHHHII")

# The frame limit before the Hello response announces the server's (section 11).
DEFAULT_MAX_FRAME_BYTES = 1 << 20
# The largest frame limit a server may be configured with.
PROTOCOL_MAX_FRAME_BYTES = 16 << 20
# The largest ping payload (section 6.1).
MAX_PING_PAYLOAD_BYTES = 64
# How much longer than a request's deadline the client waits for the server's own
# DEADLINE_EXCEEDED before giving up locally (section 5.1).
DEADLINE_GRACE_SECONDS = 1.0


class Kind(enum.IntEnum):
    """Frame kinds (section 3.2)."""

    REQUEST = 1
    RESPONSE = 2
    CANCEL = 3
    PING = 4
    PONG = 5
    GOAWAY = 6


# Kinds a client may receive; anything else from a server is a connection error.
_SERVER_KINDS = frozenset({Kind.RESPONSE, Kind.PING, Kind.PONG, Kind.GOAWAY})


class Code(enum.IntEnum):
    """gRPC canonical status codes (section 10.1)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


def code_name(code: int) -> str:
    """The upper-case name of a status code; unknown numbers read as UNKNOWN (section 10.1)."""
    try:
        return Code(code).name
    except ValueError:
        return "UNKNOWN(%d)" % code


@dataclass(frozen=True)
class Frame:
    """One frame, without its length prefix."""

    kind: int
    method: int = 0
    status: int = 0
    request_id: int = 0
    deadline_ms: int = 0
    payload: bytes = b""
    version: int = PROTOCOL_VERSION
    flags: int = 0

    def encode(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
        """The frame as bytes on the wire; refuses a frame the peer would refuse for its size."""
        length = HEADER_SIZE + len(self.payload)
        if length > max_frame_bytes:
            raise ValueError("frame of %d bytes is over the limit of %d bytes" % (length, max_frame_bytes))
        return (
            _PREFIX_AND_HEADER.pack(
                length,
                self.version,
                self.kind,
                self.flags,
                self.method,
                self.status,
                self.request_id,
                self.deadline_ms,
            )
            + self.payload
        )

    def __repr__(self) -> str:  # payloads may hold secrets: show their size only
        return "Frame(kind=%s, method=%d, status=%d, request_id=%d, deadline_ms=%d, payload=<%d bytes>)" % (
            _kind_name(self.kind),
            self.method,
            self.status,
            self.request_id,
            self.deadline_ms,
            len(self.payload),
        )


def _kind_name(kind: int) -> str:
    try:
        return Kind(kind).name.lower()
    except ValueError:
        return "kind(%d)" % kind


class ProtocolViolation(Exception):
    """The peer broke the framing rules; `reason` is the goaway reason the spec gives for it."""

    def __init__(self, reason: str, message: str):
        super().__init__("%s: %s" % (reason, message))
        self.reason = reason
        self.message = message


class FrameDecoder:
    """Turns a byte stream into frames. Fed whatever arrived; returns the complete frames.

    Checks as soon as the bytes are there (section 3.3): the declared length from the 4-byte
    prefix alone, then version, kind and flags, before waiting for the payload.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes received that are not yet part of a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> List[Frame]:
        self._buffer += data
        frames: List[Frame] = []
        while True:
            frame = self._next()
            if frame is None:
                return frames
            frames.append(frame)

    def _next(self) -> Optional[Frame]:
        buf = self._buffer
        if len(buf) < LENGTH_PREFIX_SIZE:
            return None
        (length,) = struct.unpack_from(">I", buf, 0)
        if length < HEADER_SIZE:
            raise ProtocolViolation("FRAME_TOO_SMALL", "frame length %d is shorter than the header" % length)
        if length > self.max_frame_bytes:
            raise ProtocolViolation(
                "FRAME_TOO_LARGE", "frame length %d is over the limit of %d" % (length, self.max_frame_bytes)
            )
        if len(buf) > 4 and buf[4] != PROTOCOL_VERSION:
            raise ProtocolViolation("UNSUPPORTED_VERSION", "protocol version %d" % buf[4])
        if len(buf) > 5 and buf[5] not in Kind._value2member_map_:
            raise ProtocolViolation("UNKNOWN_FRAME_KIND", "unknown frame kind %d" % buf[5])
        if len(buf) >= 8:
            (flags,) = struct.unpack_from(">H", buf, 6)
            if flags != 0:
                raise ProtocolViolation("RESERVED_FLAGS", "reserved flags set: 0x%04x" % flags)
        if len(buf) < LENGTH_PREFIX_SIZE + length:
            return None
        _, version, kind, flags, method, status, request_id, deadline = _PREFIX_AND_HEADER.unpack_from(buf, 0)
        payload = bytes(buf[LENGTH_PREFIX_SIZE + HEADER_SIZE : LENGTH_PREFIX_SIZE + length])
        del buf[: LENGTH_PREFIX_SIZE + length]
        return Frame(
            kind=kind,
            method=method,
            status=status,
            request_id=request_id,
            deadline_ms=deadline,
            payload=payload,
            version=version,
            flags=flags,
        )


# --------------------------------------------------------------------------------------------
# Methods (protocol.md section 9.1): name -> (number, request message, response message)
# --------------------------------------------------------------------------------------------

METHODS: Dict[str, Tuple[int, str, str]] = {
    "Hello": (1, "HelloRequest", "HelloResponse"),
    "ServerInfo": (2, "ServerInfoRequest", "ServerInfoResponse"),
    "GenerateDataKey": (10, "GenerateDataKeyRequest", "GenerateDataKeyResponse"),
    "GenerateDataKeys": (11, "GenerateDataKeysRequest", "GenerateDataKeysResponse"),
    "DecryptDataKey": (12, "DecryptDataKeyRequest", "DecryptDataKeyResponse"),
    "DecryptDataKeys": (13, "DecryptDataKeysRequest", "DecryptDataKeysResponse"),
    "Encrypt": (14, "EncryptRequest", "EncryptResponse"),
    "Decrypt": (15, "DecryptRequest", "DecryptResponse"),
    "RewrapDataKey": (16, "RewrapDataKeyRequest", "RewrapDataKeyResponse"),
    "GetDataKey": (17, "GetDataKeyRequest", "GetDataKeyResponse"),
    "ListDataKeys": (18, "ListDataKeysRequest", "ListDataKeysResponse"),
    "DisableDataKey": (19, "DataKeyStateRequest", "DataKeyStateResponse"),
    "EnableDataKey": (20, "DataKeyStateRequest", "DataKeyStateResponse"),
    "DestroyDataKey": (21, "DataKeyStateRequest", "DataKeyStateResponse"),
    "CreateTenant": (30, "CreateTenantRequest", "CreateTenantResponse"),
    "GetTenant": (31, "GetTenantRequest", "GetTenantResponse"),
    "ListTenants": (32, "ListTenantsRequest", "ListTenantsResponse"),
    "DisableTenant": (33, "TenantStateRequest", "TenantStateResponse"),
    "EnableTenant": (34, "TenantStateRequest", "TenantStateResponse"),
    "ShredTenant": (35, "ShredTenantRequest", "ShredTenantResponse"),
    "ListMasterKeys": (40, "ListMasterKeysRequest", "ListMasterKeysResponse"),
    "RotateMasterKey": (41, "RotateMasterKeyRequest", "MasterKeyResponse"),
    "ActivateMasterKey": (42, "MasterKeyVersionRequest", "MasterKeyResponse"),
    "SetMasterKeyState": (43, "MasterKeyVersionRequest", "MasterKeyResponse"),
    "ScheduleMasterKeyDestruction": (44, "MasterKeyVersionRequest", "MasterKeyResponse"),
    "CancelMasterKeyDestruction": (45, "MasterKeyVersionRequest", "MasterKeyResponse"),
    "StartRewrapJob": (50, "RewrapJobRequest", "RewrapJobResponse"),
    "GetRewrapJob": (51, "RewrapJobRequest", "RewrapJobResponse"),
    "CreatePrincipal": (60, "CreatePrincipalRequest", "PrincipalResponse"),
    "ListPrincipals": (61, "ListPrincipalsRequest", "ListPrincipalsResponse"),
    "GrantRole": (62, "RoleRequest", "PrincipalResponse"),
    "RevokeRole": (63, "RoleRequest", "PrincipalResponse"),
    "CreateAPIToken": (64, "CreateAPITokenRequest", "CreateAPITokenResponse"),
    "ListAPITokens": (65, "ListAPITokensRequest", "ListAPITokensResponse"),
    "RevokeAPIToken": (66, "RevokeAPITokenRequest", "RevokeAPITokenResponse"),
    "ListAuditRecords": (70, "ListAuditRecordsRequest", "ListAuditRecordsResponse"),
    "VerifyAuditLog": (71, "VerifyAuditLogRequest", "VerifyAuditLogResponse"),
    "UnsealSubmitShare": (80, "UnsealSubmitShareRequest", "UnsealSubmitShareResponse"),
    "UnsealReset": (81, "UnsealResetRequest", "UnsealResetResponse"),
    "Seal": (82, "SealRequest", "SealResponse"),
}
_METHOD_BY_NUMBER = {number: name for name, (number, _, _) in METHODS.items()}

MethodRef = Union[str, int]


def method_number(method: MethodRef) -> int:
    if isinstance(method, int):
        if not 0 <= method <= 0xFFFF:
            raise ValueError("method numbers are u16")
        return method
    return METHODS[method][0]


def response_class(number: int):
    """The response message class of a known method number, else None."""
    name = _METHOD_BY_NUMBER.get(number)
    return getattr(pb, METHODS[name][2]) if name else None


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class GatewayError(Exception):
    """A non-OK answer: the gRPC `code`, the stable `reason` (may be empty), the `message`."""

    def __init__(
        self,
        code: int,
        message: str = "",
        reason: str = "",
        method: int = 0,
        request_id: int = 0,
        status_payload_code: Optional[int] = None,
    ):
        self.code = code
        self.reason = reason
        self.message = message
        self.method = method
        self.request_id = request_id
        # The code inside the `Status` payload; the spec says it equals the header's.
        self.status_payload_code = code if status_payload_code is None else status_payload_code
        super().__init__(str(self))

    @property
    def code_name(self) -> str:
        return code_name(self.code)

    def __str__(self) -> str:
        text = self.code_name
        if self.reason:
            text += " (%s)" % self.reason
        if self.message:
            text += ": " + self.message
        return text


class ConnectionClosed(GatewayError):
    """The connection ended with the request in flight: its outcome is unknown (section 6.5).

    Carries the goaway's status when the server sent one, else UNAVAILABLE.
    """


class LocalDeadlineExceeded(GatewayError):
    """No answer arrived within the deadline plus a grace period; a cancel was sent."""


def status_error(frame: Frame) -> GatewayError:
    """The error for a non-OK response frame (or a goaway): header code, payload `Status`."""
    status = pb.Status()
    try:
        status.ParseFromString(frame.payload)
    except Exception:  # a malformed Status still has the header's code
        status = pb.Status(code=frame.status, message="undecodable Status payload")
    return GatewayError(
        frame.status,
        status.message,
        status.reason,
        method=frame.method,
        request_id=frame.request_id,
        status_payload_code=status.code,
    )


# --------------------------------------------------------------------------------------------
# Byte-exact encodings (protocol.md section 16)
# --------------------------------------------------------------------------------------------


def _u32(n: int) -> bytes:
    return struct.pack(">I", n)


def _u64(n: int) -> bytes:
    return struct.pack(">Q", n & 0xFFFFFFFFFFFFFFFF)  # two's complement for negative values


def _str(text: str) -> bytes:
    data = text.encode("utf-8")
    return _u32(len(data)) + data


def _bin(data: bytes) -> bytes:
    return _u32(len(data)) + data


def canonical_context(context: Dict[str, str]) -> bytes:
    """16.1: u32 pair count, then str(key) || str(value) in the order of the keys' UTF-8 bytes."""
    pairs = sorted(((k.encode("utf-8"), v.encode("utf-8")) for k, v in context.items()), key=lambda kv: kv[0])
    return _u32(len(pairs)) + b"".join(_bin(k) + _bin(v) for k, v in pairs)


def context_hash(context: Dict[str, str]) -> bytes:
    """16.1: SHA-256 of the canonical encoding."""
    return hashlib.sha256(canonical_context(context)).digest()


def uuid_bytes(text: str) -> bytes:
    """A data key id in binary: the 16 bytes of the UUID in the order of its text form."""
    return bytes.fromhex(text.replace("-", ""))


def payload_aad(tenant: str, data_key_id: str, context: Dict[str, str]) -> bytes:
    """16.2: the AAD of an Encrypt ciphertext."""
    return _str("hsmgw-payload") + _u32(1) + _str(tenant) + _bin(uuid_bytes(data_key_id)) + _bin(context_hash(context))


def wrapped_aad(tenant: str, data_key_id: str, version: int, context: Dict[str, str]) -> bytes:
    """16.3: the AAD of a wrapped data key (checked inside the HSM)."""
    return (
        _str("hsmgw-data-key")
        + _u32(1)
        + _str(tenant)
        + _bin(uuid_bytes(data_key_id))
        + _u32(version)
        + _bin(context_hash(context))
    )


def audit_record_encoding(record) -> bytes:
    """16.4: the canonical encoding of an `AuditRecordInfo` (its fields as listed)."""
    return (
        _str("hsmgw-audit-v1")
        + _u64(record.sequence)
        + _u64(record.time_ms)
        + _str(record.principal)
        + _str(record.tenant)
        + _str(record.operation)
        + _u32(len(record.key_ids))
        + b"".join(_str(key_id) for key_id in record.key_ids)
        + _str(record.outcome)
        + _str(record.request_id)
        + _str(record.detail)
    )


def audit_record_hash(record, previous_hash: bytes) -> bytes:
    """16.4: SHA-256(previous hash || the record's encoding)."""
    return hashlib.sha256(previous_hash + audit_record_encoding(record)).digest()


def checkpoint_message(sequence: int, record_hash: bytes) -> bytes:
    """16.5: what the HSM's HMAC of an audit checkpoint covers."""
    return _str("hsmgw-audit-anchor-v1") + _u64(sequence) + _bin(record_hash)


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------

API_TOKEN_PREFIX = "hsmgw_"
API_TOKEN_LENGTH = len(API_TOKEN_PREFIX) + 43
_BASE64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def is_api_token(text: str) -> bool:
    """Whether `text` has the shape of an API token: "hsmgw_" + 43 base64url characters."""
    return (
        len(text) == API_TOKEN_LENGTH
        and text.startswith(API_TOKEN_PREFIX)
        and all(c in _BASE64URL for c in text[len(API_TOKEN_PREFIX) :])
    )


class Client:
    """One connection to a gateway.

    `call()` sends a request and waits for its answer; `start()` and `result()` let several
    requests be in flight at once, answered in any order.
    """

    def __init__(self, sock: socket.socket, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        self._sock = sock
        self._decoder = FrameDecoder(max_frame_bytes)
        self.max_frame_bytes = max_frame_bytes
        self.max_requests_in_flight = 0  # unknown until Hello
        self._next_request_id = 1
        self._in_flight: Dict[int, int] = {}  # request id -> method number
        self._deadlines: Dict[int, int] = {}  # request id -> deadline_ms it was sent with
        self._answered: Dict[int, Frame] = {}
        self._pongs: Dict[int, bytes] = {}
        self._closed = False
        self.goaway: Optional[GatewayError] = None
        self.hello_response: Optional[pb.HelloResponse] = None
        self.pings_answered = 0

    # -- connecting ---------------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        *,
        ca_file: Optional[str] = None,
        server_hostname: Optional[str] = None,
        cert_file: Optional[str] = None,
        key_file: Optional[str] = None,
        timeout: float = 10.0,
    ) -> "Client":
        """Opens a connection: TLS (1.2 or 1.3, server verified against `ca_file`) when a CA
        file is given, plaintext otherwise (the server allows that on loopback only)."""
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ca_file:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.set_alpn_protocols(["hsmgw/1"])
            if cert_file:
                context.load_cert_chain(cert_file, key_file)
            sock = context.wrap_socket(sock, server_hostname=server_hostname or host)
        return cls(sock)

    @classmethod
    def connect_address(cls, address: str, **kwargs) -> "Client":
        """`host:port` or `[v6]:port`."""
        host, port = parse_address(address)
        return cls.connect(host, port, **kwargs)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._sock.close()
            except OSError:
                pass

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the handshake ------------------------------------------------------------------------

    def hello(self, api_token: str = "", client_name: str = "hsmgw-python-interop", deadline_ms: int = 5000):
        """Method 1. Must be the first request; on success the server's limits apply."""
        request = pb.HelloRequest(api_token=api_token, client_name=client_name)
        response = self.call("Hello", request, deadline_ms=deadline_ms)
        self.hello_response = response
        if response.max_frame_bytes:
            self.max_frame_bytes = response.max_frame_bytes
            self._decoder.max_frame_bytes = max(response.max_frame_bytes, DEFAULT_MAX_FRAME_BYTES)
        self.max_requests_in_flight = response.max_requests_in_flight
        return response

    # -- requests -----------------------------------------------------------------------------

    def call(self, method: MethodRef, request=b"", deadline_ms: int = 30000, timeout: Optional[float] = None):
        """Sends one request and returns its decoded response; raises `GatewayError` otherwise.

        `request` is a message or raw payload bytes; for a method this client does not know,
        the OK payload is returned as bytes.
        """
        request_id = self.start(method, request, deadline_ms)
        return self.result(request_id, timeout=timeout)

    def start(self, method: MethodRef, request=b"", deadline_ms: int = 30000) -> int:
        """Sends a request without waiting; returns its request id."""
        number = method_number(method)
        payload = request if isinstance(request, (bytes, bytearray)) else request.SerializeToString()
        if self.goaway is not None:
            raise GatewayError(
                Code.UNAVAILABLE, "the server sent a goaway; open a new connection", self.goaway.reason, number
            )
        request_id = self._allocate_request_id()
        frame = Frame(
            Kind.REQUEST, method=number, request_id=request_id, deadline_ms=deadline_ms, payload=bytes(payload)
        )
        self._send(frame)
        self._in_flight[request_id] = number
        self._deadlines[request_id] = deadline_ms
        return request_id

    def wait(self, request_id: int, timeout: Optional[float] = None) -> Frame:
        """Reads until the response to `request_id` arrives; returns the raw response frame.

        `timeout` defaults to the request's deadline plus a grace period (no limit without a
        deadline). On a local timeout a cancel is sent and `LocalDeadlineExceeded` is raised.
        """
        if request_id in self._answered:
            return self._answered.pop(request_id)
        if request_id not in self._in_flight:
            raise KeyError("request %d is not in flight" % request_id)
        if timeout is None:
            deadline_ms = self._deadlines.get(request_id, 0)
            timeout = deadline_ms / 1000.0 + DEADLINE_GRACE_SECONDS if deadline_ms else None
        until = None if timeout is None else time.monotonic() + timeout
        while request_id not in self._answered:
            if self._closed:
                self._in_flight.pop(request_id, None)
                raise self._closed_error(request_id)
            if until is not None and time.monotonic() >= until:
                self.cancel(request_id)
                raise LocalDeadlineExceeded(
                    Code.DEADLINE_EXCEEDED,
                    "no answer within %.1f s; cancel sent" % timeout,
                    method=self._in_flight.get(request_id, 0),
                    request_id=request_id,
                )
            self._read_and_dispatch(until)
        return self._answered.pop(request_id)

    def result(self, request_id: int, timeout: Optional[float] = None):
        """Waits for `request_id` and decodes its response, or raises its `GatewayError`."""
        frame = self.wait(request_id, timeout)
        if frame.status != Code.OK:
            raise status_error(frame)
        cls = response_class(frame.method)
        if cls is None:
            return frame.payload
        message = cls()
        message.ParseFromString(frame.payload)
        return message

    def cancel(self, request_id: int) -> None:
        """Asks the server to stop a request (section 5.2); its answer is then CANCELLED."""
        if not self._closed:
            self._send(Frame(Kind.CANCEL, request_id=request_id))

    def ping(self, payload: bytes = b"", timeout: float = 5.0) -> bytes:
        """Sends a ping and waits for its pong; returns the pong's payload."""
        if len(payload) > MAX_PING_PAYLOAD_BYTES:
            raise ValueError("ping payloads are at most %d bytes" % MAX_PING_PAYLOAD_BYTES)
        ping_id = int.from_bytes(os.urandom(4), "big")
        self._send(Frame(Kind.PING, request_id=ping_id, payload=payload))
        until = time.monotonic() + timeout
        while ping_id not in self._pongs:
            if self._closed:
                raise self._closed_error(0)
            if time.monotonic() >= until:
                raise LocalDeadlineExceeded(Code.DEADLINE_EXCEEDED, "no pong within %.1f s" % timeout)
            self._read_and_dispatch(until)
        return self._pongs.pop(ping_id)

    def poll(self, timeout: float = 0.0) -> None:
        """Handles whatever the server sent (answers pings) for up to `timeout` seconds."""
        until = time.monotonic() + timeout
        while not self._closed:
            self._read_and_dispatch(until)
            if time.monotonic() >= until:
                return

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # -- internals ----------------------------------------------------------------------------

    def _allocate_request_id(self) -> int:
        # A counter from 1 that wraps to 1 and skips 0 and ids in flight (section 4.2).
        for _ in range(1 << 16):
            candidate = self._next_request_id
            self._next_request_id = 1 if candidate >= 0xFFFFFFFF else candidate + 1
            if candidate not in self._in_flight and candidate not in self._answered:
                return candidate
        raise RuntimeError("no free request id")

    def send_raw(self, data: bytes) -> None:
        """Writes bytes as they are, for tests of the server's checks of malformed input."""
        self._sock.sendall(data)

    def _send(self, frame: Frame) -> None:
        data = frame.encode(self.max_frame_bytes)
        try:
            self._sock.sendall(data)
        except OSError as error:
            self.close()
            raise ConnectionClosed(Code.UNAVAILABLE, "send failed: %s" % error.strerror) from None

    def _closed_error(self, request_id: int) -> ConnectionClosed:
        if self.goaway is not None:
            return ConnectionClosed(
                self.goaway.code, self.goaway.message, self.goaway.reason, request_id=request_id
            )
        return ConnectionClosed(Code.UNAVAILABLE, "the connection closed", request_id=request_id)

    def _read_and_dispatch(self, until: Optional[float]) -> None:
        """Reads once (up to `until`) and handles every complete frame."""
        remaining = None if until is None else max(0.0, until - time.monotonic())
        try:
            self._sock.settimeout(remaining if remaining is None or remaining > 0 else 0.000001)
            data = self._sock.recv(65536)
        except (socket.timeout, ssl.SSLWantReadError, BlockingIOError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        try:
            frames = self._decoder.feed(data)
        except ProtocolViolation:
            self.close()
            raise
        for frame in frames:
            self._dispatch(frame)

    def _dispatch(self, frame: Frame) -> None:
        if frame.kind not in _SERVER_KINDS:
            self.close()
            raise ProtocolViolation("UNEXPECTED_FRAME", "a server sent a %s frame" % _kind_name(frame.kind))
        if frame.kind == Kind.PING:
            if len(frame.payload) > MAX_PING_PAYLOAD_BYTES:
                self.close()
                raise ProtocolViolation("PING_PAYLOAD_TOO_LARGE", "ping payload over 64 bytes")
            self._send(Frame(Kind.PONG, request_id=frame.request_id, payload=frame.payload))
            self.pings_answered += 1
        elif frame.kind == Kind.PONG:
            self._pongs[frame.request_id] = frame.payload
        elif frame.kind == Kind.GOAWAY:
            self.goaway = status_error(frame)
        else:  # response
            if frame.request_id not in self._in_flight:
                self.close()
                raise ProtocolViolation("UNEXPECTED_FRAME", "response to request %d, not in flight" % frame.request_id)
            del self._in_flight[frame.request_id]
            self._deadlines.pop(frame.request_id, None)
            self._answered[frame.request_id] = frame


def parse_address(address: str) -> Tuple[str, int]:
    """`host:port`, `[v6]:port` -> (host, port)."""
    if address.startswith("["):
        host, _, port = address[1:].partition("]:")
    else:
        host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError("address must be HOST:PORT, not %r" % address)
    return host, int(port)
