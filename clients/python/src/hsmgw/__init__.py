"""hsmgw: the Python SDK of hsm-gateway (docs/protocol.md, docs/envelope-format.md).

>>> import hsmgw
>>> with hsmgw.Client("127.0.0.1:7700", token_file=".hsm-dev/admin.token") as client:
...     key = client.generate_data_key("acme", {"purpose": "invoices"})
...     sealed = client.envelope_encrypt("acme", b"hello", {"purpose": "invoices"})
...     client.envelope_decrypt(sealed)
b'hello'
"""

__version__ = "0.1.0"

from ._wire import Code, Method  # noqa: E402
from .client import (  # noqa: E402
    Client,
    DataKey,
    DataKeyRef,
    Decrypted,
    client_from_environment,
)
from .config import APIToken, Target, TLSConfig  # noqa: E402
from .connection import Connection  # noqa: E402
from .envelope import EnvelopeError, EnvelopeHeader  # noqa: E402
from .errors import (  # noqa: E402
    Aborted,
    AlreadyExists,
    Cancelled,
    ConfigurationError,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    GatewayError,
    HsmgwError,
    Internal,
    InvalidArgument,
    LocalReason,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
)
from .retry import NO_RETRIES, RetryPolicy  # noqa: E402
from .v1 import gateway_pb2 as pb  # noqa: E402

__all__ = [
    "APIToken",
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "Client",
    "Code",
    "ConfigurationError",
    "Connection",
    "DataKey",
    "DataKeyRef",
    "DataLoss",
    "DeadlineExceeded",
    "Decrypted",
    "EnvelopeError",
    "EnvelopeHeader",
    "FailedPrecondition",
    "GatewayError",
    "HsmgwError",
    "Internal",
    "InvalidArgument",
    "LocalReason",
    "Method",
    "NO_RETRIES",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryPolicy",
    "TLSConfig",
    "Target",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "client_from_environment",
    "pb",
]
