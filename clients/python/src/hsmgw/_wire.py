"""Framing of the hsm-gateway wire protocol, version 1 (docs/protocol.md, sections 3, 9.1, 10).

Pure data and byte handling, no I/O: frames, the incremental decoder with the checks of section
3.3, the method table with each method's idempotency, and the status codes.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional

PROTOCOL_VERSION = 1
#: Bytes of the length prefix.
LENGTH_PREFIX_SIZE = 4
#: Bytes of the header that follows the prefix.
HEADER_SIZE = 16
# u32 length, u8 version, u8 kind, u16 flags, u16 method, u16 status, u32 request id, u32 deadline
_PREFIX_AND_HEADER = struct.Struct(">IBBHHHII")

#: The frame limit before the Hello response announces the server's (section 11).
DEFAULT_MAX_FRAME_BYTES = 1 << 20
#: The largest frame limit a server may be configured with (section 11).
PROTOCOL_MAX_FRAME_BYTES = 16 << 20
#: The largest frame a client may send before its Hello has succeeded (section 7.1).
MAX_FRAME_BYTES_BEFORE_HELLO = 4 << 10
#: The largest ping payload (section 6.1).
MAX_PING_PAYLOAD_BYTES = 64
#: The largest request id; ids wrap from here to 1 (section 4.2).
MAX_REQUEST_ID = 0xFFFFFFFF
#: The largest deadline a header can carry, in milliseconds (u32).
MAX_DEADLINE_MS = 0xFFFFFFFF


class Kind(enum.IntEnum):
    """Frame kinds (section 3.2)."""

    REQUEST = 1
    RESPONSE = 2
    CANCEL = 3
    PING = 4
    PONG = 5
    GOAWAY = 6


#: Kinds a client may receive; anything else from a server is a connection error.
SERVER_KINDS = frozenset({Kind.RESPONSE, Kind.PING, Kind.PONG, Kind.GOAWAY})


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

    @classmethod
    def of(cls, number: int) -> "Code":
        """The code of a number; numbers this version does not know read as UNKNOWN (10.1)."""
        try:
            return cls(number)
        except ValueError:
            return cls.UNKNOWN


class Method(enum.IntEnum):
    """Method numbers (section 9.1)."""

    HELLO = 1
    SERVER_INFO = 2
    GENERATE_DATA_KEY = 10
    GENERATE_DATA_KEYS = 11
    DECRYPT_DATA_KEY = 12
    DECRYPT_DATA_KEYS = 13
    ENCRYPT = 14
    DECRYPT = 15
    REWRAP_DATA_KEY = 16
    GET_DATA_KEY = 17
    LIST_DATA_KEYS = 18
    DISABLE_DATA_KEY = 19
    ENABLE_DATA_KEY = 20
    DESTROY_DATA_KEY = 21
    CREATE_TENANT = 30
    GET_TENANT = 31
    LIST_TENANTS = 32
    DISABLE_TENANT = 33
    ENABLE_TENANT = 34
    SHRED_TENANT = 35
    LIST_MASTER_KEYS = 40
    ROTATE_MASTER_KEY = 41
    ACTIVATE_MASTER_KEY = 42
    SET_MASTER_KEY_STATE = 43
    SCHEDULE_MASTER_KEY_DESTRUCTION = 44
    CANCEL_MASTER_KEY_DESTRUCTION = 45
    START_REWRAP_JOB = 50
    GET_REWRAP_JOB = 51
    CREATE_PRINCIPAL = 60
    LIST_PRINCIPALS = 61
    GRANT_ROLE = 62
    REVOKE_ROLE = 63
    CREATE_API_TOKEN = 64
    LIST_API_TOKENS = 65
    REVOKE_API_TOKEN = 66
    LIST_AUDIT_RECORDS = 70
    VERIFY_AUDIT_LOG = 71
    UNSEAL_SUBMIT_SHARE = 80
    UNSEAL_RESET = 81
    SEAL = 82

    @property
    def protocol_name(self) -> str:
        """The name as the protocol document writes it, e.g. ``GenerateDataKey``."""
        return _TABLE[self].name

    @property
    def request_message(self) -> str:
        """The name of the request message in gateway.proto."""
        return _TABLE[self].request

    @property
    def response_message(self) -> str:
        """The name of the response message in gateway.proto."""
        return _TABLE[self].response

    @property
    def idempotent(self) -> bool:
        """Whether a retry of a call that may have reached the server cannot do anything twice
        (table 9.1; the same as the Swift client's ``Method.isIdempotent``). Generate calls
        become safe to retry with an idempotency key, decided per call."""
        return _TABLE[self].idempotent


class _Entry(NamedTuple):
    name: str
    request: str
    response: str
    idempotent: bool


_TABLE: Dict[int, _Entry] = {
    1: _Entry("Hello", "HelloRequest", "HelloResponse", True),
    2: _Entry("ServerInfo", "ServerInfoRequest", "ServerInfoResponse", True),
    10: _Entry("GenerateDataKey", "GenerateDataKeyRequest", "GenerateDataKeyResponse", False),
    11: _Entry("GenerateDataKeys", "GenerateDataKeysRequest", "GenerateDataKeysResponse", False),
    12: _Entry("DecryptDataKey", "DecryptDataKeyRequest", "DecryptDataKeyResponse", True),
    13: _Entry("DecryptDataKeys", "DecryptDataKeysRequest", "DecryptDataKeysResponse", True),
    # Encrypt counts an invocation and returns a new ciphertext each time.
    14: _Entry("Encrypt", "EncryptRequest", "EncryptResponse", False),
    15: _Entry("Decrypt", "DecryptRequest", "DecryptResponse", True),
    16: _Entry("RewrapDataKey", "RewrapDataKeyRequest", "RewrapDataKeyResponse", True),
    17: _Entry("GetDataKey", "GetDataKeyRequest", "GetDataKeyResponse", True),
    18: _Entry("ListDataKeys", "ListDataKeysRequest", "ListDataKeysResponse", True),
    19: _Entry("DisableDataKey", "DataKeyStateRequest", "DataKeyStateResponse", False),
    20: _Entry("EnableDataKey", "DataKeyStateRequest", "DataKeyStateResponse", False),
    21: _Entry("DestroyDataKey", "DataKeyStateRequest", "DataKeyStateResponse", False),
    30: _Entry("CreateTenant", "CreateTenantRequest", "CreateTenantResponse", False),
    31: _Entry("GetTenant", "GetTenantRequest", "GetTenantResponse", True),
    32: _Entry("ListTenants", "ListTenantsRequest", "ListTenantsResponse", True),
    33: _Entry("DisableTenant", "TenantStateRequest", "TenantStateResponse", False),
    34: _Entry("EnableTenant", "TenantStateRequest", "TenantStateResponse", False),
    35: _Entry("ShredTenant", "ShredTenantRequest", "ShredTenantResponse", False),
    40: _Entry("ListMasterKeys", "ListMasterKeysRequest", "ListMasterKeysResponse", True),
    41: _Entry("RotateMasterKey", "RotateMasterKeyRequest", "MasterKeyResponse", False),
    42: _Entry("ActivateMasterKey", "MasterKeyVersionRequest", "MasterKeyResponse", False),
    43: _Entry("SetMasterKeyState", "MasterKeyVersionRequest", "MasterKeyResponse", False),
    44: _Entry("ScheduleMasterKeyDestruction", "MasterKeyVersionRequest", "MasterKeyResponse", False),
    45: _Entry("CancelMasterKeyDestruction", "MasterKeyVersionRequest", "MasterKeyResponse", False),
    50: _Entry("StartRewrapJob", "RewrapJobRequest", "RewrapJobResponse", False),
    51: _Entry("GetRewrapJob", "RewrapJobRequest", "RewrapJobResponse", True),
    60: _Entry("CreatePrincipal", "CreatePrincipalRequest", "PrincipalResponse", False),
    61: _Entry("ListPrincipals", "ListPrincipalsRequest", "ListPrincipalsResponse", True),
    62: _Entry("GrantRole", "RoleRequest", "PrincipalResponse", True),
    63: _Entry("RevokeRole", "RoleRequest", "PrincipalResponse", True),
    64: _Entry("CreateAPIToken", "CreateAPITokenRequest", "CreateAPITokenResponse", False),
    65: _Entry("ListAPITokens", "ListAPITokensRequest", "ListAPITokensResponse", True),
    66: _Entry("RevokeAPIToken", "RevokeAPITokenRequest", "RevokeAPITokenResponse", True),
    70: _Entry("ListAuditRecords", "ListAuditRecordsRequest", "ListAuditRecordsResponse", True),
    71: _Entry("VerifyAuditLog", "VerifyAuditLogRequest", "VerifyAuditLogResponse", True),
    # A share given twice is refused as a duplicate: a retry could only fail.
    80: _Entry("UnsealSubmitShare", "UnsealSubmitShareRequest", "UnsealSubmitShareResponse", False),
    81: _Entry("UnsealReset", "UnsealResetRequest", "UnsealResetResponse", True),
    82: _Entry("Seal", "SealRequest", "SealResponse", True),
}


def method_name(number: int) -> str:
    """The protocol name of a method number, or ``method(N)`` for one this version lacks."""
    entry = _TABLE.get(number)
    return entry.name if entry else "method(%d)" % number


def kind_name(kind: int) -> str:
    try:
        return Kind(kind).name.lower()
    except ValueError:
        return "kind(%d)" % kind


@dataclass(frozen=True)
class Frame:
    """One frame, without its length prefix (section 3.1)."""

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
        header = _PREFIX_AND_HEADER.pack(
            length,
            self.version,
            self.kind,
            self.flags,
            self.method,
            self.status,
            self.request_id,
            self.deadline_ms,
        )
        return header + self.payload

    def __repr__(self) -> str:  # payloads may hold secrets: show their size only
        return "Frame(kind=%s, method=%d, status=%d, request_id=%d, deadline_ms=%d, payload=<%d bytes>)" % (
            kind_name(self.kind),
            self.method,
            self.status,
            self.request_id,
            self.deadline_ms,
            len(self.payload),
        )


class ProtocolViolation(Exception):
    """The peer broke the framing rules; ``reason`` is the goaway reason the spec gives for it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__("%s: %s" % (reason, message))
        self.reason = reason
        self.message = message


class FrameDecoder:
    """Turns a byte stream into frames: fed whatever arrived, returns the complete frames.

    Checks as soon as the bytes are there (section 3.3): the declared length from the 4-byte
    prefix alone, then version, kind and flags, before waiting for the payload.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
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
