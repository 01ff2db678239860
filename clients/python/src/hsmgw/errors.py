"""Errors of the SDK: typed exceptions that carry the gRPC code and the stable reason.

Every error a call raises is a :class:`GatewayError` (or a subclass chosen by its code), so a
caller can write ``except hsmgw.NotFound`` or ``except GatewayError as e: if e.reason == ...``.
Messages and reprs never hold an API token, key material, a payload or an encryption-context
value: the server's messages are safe by protocol rule (section 14), and the SDK writes its own
without any of them.
"""

from __future__ import annotations

from typing import Dict, Optional, Type

from ._wire import Code, method_name


class Origin:
    """Who decided an error: the gateway (a response or a goaway) or this client."""

    SERVER = "server"
    CLIENT = "client"


class LocalReason:
    """Stable ``reason`` values of errors the client makes itself (the Swift client's set)."""

    #: The connection (TCP, TLS or the handshake's transport) could not be opened.
    CONNECT_FAILED = "CONNECT_FAILED"
    #: The connection closed or broke while the request was in flight: it may have run.
    CONNECTION_LOST = "CONNECTION_LOST"
    #: The connection was going away or closed before the request was written: it did not run.
    NOT_SENT = "NOT_SENT"
    #: The call's deadline passed on the client; a cancel frame was sent if it was in flight.
    DEADLINE = "LOCAL_DEADLINE"
    #: The client was closed.
    CLIENT_CLOSED = "CLIENT_SHUT_DOWN"
    #: The request is larger than the server's maximum frame.
    REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"
    #: The server's answer could not be read as the method's response message.
    MALFORMED_RESPONSE = "MALFORMED_RESPONSE"
    #: An argument breaks a protocol limit, found before sending.
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    #: The server broke the framing rules; the connection was closed.
    PROTOCOL_VIOLATION = "PROTOCOL_VIOLATION"


#: Reasons with which the gateway refuses a request before doing any of its work (section 13).
NOT_PROCESSED_REASONS = frozenset(
    {"TOO_MANY_REQUESTS_IN_FLIGHT", "OVERLOADED", "TOO_MANY_CONNECTIONS", "TOO_MANY_CONNECTIONS_FROM_ADDRESS"}
)


class HsmgwError(Exception):
    """The base of every exception this package raises on purpose."""


class ConfigurationError(HsmgwError, ValueError):
    """A client setting is invalid, or a certificate, key or token file cannot be used."""


class GatewayError(HsmgwError):
    """A call failed: a gRPC ``code``, a stable ``reason`` (may be empty), a ``message`` for
    people, whether the gateway or the client decided it (``origin``), and whether the request
    provably never ran (``not_processed``), which decides what may be retried.

    Raised as the subclass of its code (:class:`NotFound`, :class:`Unavailable`, ...).
    """

    #: The code a subclass stands for (UNKNOWN for the base).
    default_code: Code = Code.UNKNOWN

    def __init__(
        self,
        code: int,
        message: str = "",
        reason: str = "",
        *,
        origin: str = Origin.SERVER,
        method: int = 0,
        request_id: int = 0,
        not_processed: Optional[bool] = None,
        status_payload_code: Optional[int] = None,
    ) -> None:
        self.code: Code = Code.of(code)
        self.reason = reason
        self.message = message
        self.origin = origin
        self.method = method
        self.request_id = request_id
        if not_processed is None:
            # ABORTED means nothing was stored; the reasons above mean the work never started.
            not_processed = origin == Origin.SERVER and (
                self.code == Code.ABORTED or (self.code == Code.RESOURCE_EXHAUSTED and reason in NOT_PROCESSED_REASONS)
            )
        self.not_processed = not_processed
        #: The code inside the ``Status`` payload; the spec says it equals the header's.
        self.status_payload_code = int(self.code) if status_payload_code is None else status_payload_code
        super().__init__(str(self))

    @property
    def code_name(self) -> str:
        return self.code.name

    def __str__(self) -> str:
        text = self.code.name
        if self.reason:
            text += " [%s]" % self.reason
        text += " (%s" % self.origin
        if self.method:
            text += ", %s" % method_name(self.method)
        text += ")"
        if self.message:
            text += ": " + self.message
        return text

    def __repr__(self) -> str:
        return "%s(code=%s, reason=%r, origin=%r, method=%d, request_id=%d)" % (
            type(self).__name__,
            self.code.name,
            self.reason,
            self.origin,
            self.method,
            self.request_id,
        )


class Cancelled(GatewayError):
    default_code = Code.CANCELLED


class Unknown(GatewayError):
    default_code = Code.UNKNOWN


class InvalidArgument(GatewayError):
    default_code = Code.INVALID_ARGUMENT


class DeadlineExceeded(GatewayError):
    default_code = Code.DEADLINE_EXCEEDED


class NotFound(GatewayError):
    default_code = Code.NOT_FOUND


class AlreadyExists(GatewayError):
    default_code = Code.ALREADY_EXISTS


class PermissionDenied(GatewayError):
    default_code = Code.PERMISSION_DENIED


class ResourceExhausted(GatewayError):
    default_code = Code.RESOURCE_EXHAUSTED


class FailedPrecondition(GatewayError):
    default_code = Code.FAILED_PRECONDITION


class Aborted(GatewayError):
    default_code = Code.ABORTED


class OutOfRange(GatewayError):
    default_code = Code.OUT_OF_RANGE


class Unimplemented(GatewayError):
    default_code = Code.UNIMPLEMENTED


class Internal(GatewayError):
    default_code = Code.INTERNAL


class Unavailable(GatewayError):
    default_code = Code.UNAVAILABLE


class DataLoss(GatewayError):
    default_code = Code.DATA_LOSS


class Unauthenticated(GatewayError):
    default_code = Code.UNAUTHENTICATED


_BY_CODE: Dict[Code, Type[GatewayError]] = {
    cls.default_code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def error_class(code: int) -> Type[GatewayError]:
    """The exception class of a code (UNKNOWN's for numbers this version does not know)."""
    return _BY_CODE.get(Code.of(code), Unknown)


def make_error(
    code: int,
    message: str = "",
    reason: str = "",
    *,
    origin: str = Origin.SERVER,
    method: int = 0,
    request_id: int = 0,
    not_processed: Optional[bool] = None,
    status_payload_code: Optional[int] = None,
) -> GatewayError:
    """An error of the class its code selects."""
    return error_class(code)(
        code,
        message,
        reason,
        origin=origin,
        method=method,
        request_id=request_id,
        not_processed=not_processed,
        status_payload_code=status_payload_code,
    )


def local_error(code: int, reason: str, message: str, *, method: int = 0, not_processed: bool) -> GatewayError:
    """An error the client decided itself."""
    return make_error(code, message, reason, origin=Origin.CLIENT, method=method, not_processed=not_processed)
