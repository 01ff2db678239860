"""The gateway client: a small thread-safe pool of multiplexed connections, deadlines, retries
with backoff for the calls that may be retried, and one method per data-plane method of
docs/protocol.md (section 9.1, methods 1, 2 and 10 to 21), plus envelope encryption.

Synchronous only (no asyncio API): every method blocks the calling thread, and any number of
threads may share one client.
"""

from __future__ import annotations

import io
import os
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from typing import (
    Any,
    BinaryIO,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Type,
    TypeVar,
    Union,
)

from google.protobuf.message import DecodeError, Message

from . import __version__, envelope
from ._wire import Code, Method
from .config import APIToken, Target, TLSConfig
from .connection import Connection, status_error
from .errors import ConfigurationError, GatewayError, LocalReason, Unauthenticated, local_error, make_error
from .retry import RetryPolicy, is_retryable
from .v1 import gateway_pb2 as pb

M = TypeVar("M", bound=Message)
Context = Mapping[str, str]

#: The deadline of a call when none is given, in seconds.
DEFAULT_TIMEOUT = 30.0
#: The time allowed to open a connection (TCP, TLS and the Hello), in seconds.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Connections per client: one connection carries up to the server's max_requests_in_flight
#: concurrent requests, so a few are enough (protocol section 2).
DEFAULT_MAX_CONNECTIONS = 2
#: The most connections one client may open.
MAX_CONNECTIONS_LIMIT = 64
#: The largest ``client_name`` the protocol accepts, in bytes (section 7.1).
MAX_CLIENT_NAME_BYTES = 128


@dataclass(frozen=True)
class DataKey:
    """A data key: its id, master-key version, wrapped copy (83 bytes, to keep or ignore) and,
    when asked for, its 32-byte plaintext. The repr never shows the plaintext."""

    id: str
    master_key_version: int
    wrapped: bytes = field(repr=False)
    plaintext: Optional[bytes] = field(default=None, repr=False)

    @classmethod
    def from_message(cls, message: pb.DataKey) -> "DataKey":
        return cls(
            id=message.id,
            master_key_version=message.master_key_version,
            wrapped=bytes(message.wrapped),
            plaintext=bytes(message.plaintext) if message.plaintext else None,
        )


@dataclass(frozen=True)
class DataKeyRef:
    """One entry of :meth:`Client.decrypt_data_keys`: a key id (may be empty with ``wrapped``),
    its context, and optionally the wrapped copy the caller kept."""

    id: str
    context: Mapping[str, str] = field(default_factory=dict)
    wrapped: Optional[bytes] = field(default=None, repr=False)


@dataclass(frozen=True)
class Decrypted:
    """What Decrypt returns: the plaintext (never in the repr) and the data key's id."""

    plaintext: bytes = field(repr=False)
    data_key_id: str


def _normalize_client_name(name: str) -> str:
    if len(name.encode("utf-8")) > MAX_CLIENT_NAME_BYTES:
        raise ConfigurationError("client_name is at most %d bytes" % MAX_CLIENT_NAME_BYTES)
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        raise ConfigurationError("client_name must not hold control, format or separator characters")
    return name


class _Pool:
    """Up to ``size`` connections; a call takes the least loaded usable one and a new one is
    opened when none is usable or all have calls in flight. Thread-safe."""

    def __init__(self, client: "Client", size: int) -> None:
        self._client = client
        self._size = size
        self._lock = threading.Lock()
        self._connections: List[Connection] = []
        self._closed = False

    def connection(self, timeout: float) -> Connection:
        with self._lock:
            if self._closed:
                raise local_error(
                    Code.UNAVAILABLE, LocalReason.CLIENT_CLOSED, "the client is closed", not_processed=True
                )
            alive = [c for c in self._connections if c.usable]
            for gone in self._connections:
                if gone not in alive and gone.in_flight == 0:
                    gone.close()
            self._connections = [c for c in self._connections if c.usable or not c.closed]
            candidates = sorted((c for c in alive if c.has_room), key=lambda c: c.in_flight)
            if candidates and (candidates[0].in_flight == 0 or len(self._connections) >= self._size):
                return candidates[0]
            if len(self._connections) >= self._size:
                # Every connection is full: take the least loaded; the server answers
                # TOO_MANY_REQUESTS_IN_FLIGHT, which is retried with backoff.
                if alive:
                    return min(alive, key=lambda c: c.in_flight)
                # Connections going away, with calls in flight: one more may open.
            connection = self._client._open_connection(timeout)
            self._connections.append(connection)
            return connection

    def discard(self, connection: Connection) -> None:
        with self._lock:
            if connection in self._connections:
                self._connections.remove(connection)
        connection.close()

    @property
    def connections(self) -> List[Connection]:
        with self._lock:
            return list(self._connections)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()


class Client:
    """A client of one gateway.

    ``address``: ``host:port``, ``[v6]:port`` or ``unix:/path`` (default ``127.0.0.1:7700``).
    Credentials: ``token`` (a string or :class:`APIToken`) or ``token_file`` (mode 0600, as the
    Swift tools require), and/or a client certificate in ``tls`` (mutual TLS).
    ``tls``: a :class:`TLSConfig` for TLS; without it the connection is plaintext, which is
    allowed only to loopback addresses and Unix sockets unless ``allow_insecure_plaintext``.
    ``timeout``: the default deadline of a call in seconds (``None``: no deadline); each method
    takes its own ``timeout`` too (``None`` there: this default). ``retry``: the :class:`RetryPolicy`.
    ``max_connections``: the size of the connection pool.

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        address: str = "127.0.0.1:7700",
        *,
        token: Union[str, APIToken, None] = None,
        token_file: Optional[str] = None,
        tls: Optional[TLSConfig] = None,
        allow_insecure_plaintext: bool = False,
        client_name: str = "hsmgw-python/" + __version__,
        timeout: Optional[float] = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        retry: RetryPolicy = RetryPolicy(),
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.target = Target.parse(address)
        if token is not None and token_file is not None:
            raise ConfigurationError("give token or token_file, not both")
        if token_file is not None:
            self._token: Optional[APIToken] = APIToken.from_file(token_file)
        elif isinstance(token, str):
            self._token = APIToken(token)
        else:
            self._token = token
        if self._token is None and (tls is None or tls.cert_file is None):
            raise ConfigurationError("no credentials: give token, token_file or a client certificate (tls.cert_file)")
        if tls is None and not self.target.is_local and not allow_insecure_plaintext:
            raise ConfigurationError(
                "plaintext to %s would send the token in clear: use tls=TLSConfig(...), "
                "or allow_insecure_plaintext=True behind a trusted network" % self.target
            )
        if tls is not None and self.target.unix_path:
            raise ConfigurationError("the gateway serves Unix sockets without TLS: leave tls unset for unix: addresses")
        if timeout is not None and timeout <= 0:
            raise ConfigurationError("timeout must be positive (or None for no deadline)")
        if not 1 <= max_connections <= MAX_CONNECTIONS_LIMIT:
            raise ConfigurationError("max_connections must be 1 to %d" % MAX_CONNECTIONS_LIMIT)
        self.tls = tls
        self._ssl_context = tls.ssl_context() if tls is not None else None
        self.client_name = _normalize_client_name(client_name)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retry = retry
        self._pool = _Pool(self, max_connections)

    def __repr__(self) -> str:
        return "Client(%s, tls=%s, token=%s)" % (
            self.target,
            self.tls is not None,
            "<redacted>" if self._token else None,
        )

    def close(self) -> None:
        """Closes every connection; calls in flight fail with UNAVAILABLE."""
        self._pool.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connections(self) -> List[Connection]:
        """The pool's connections (for diagnostics and tests)."""
        return self._pool.connections

    def _open_connection(self, timeout: float) -> Connection:
        timeout = min(timeout, self.connect_timeout)
        started = time.monotonic()
        server_name = self.tls.server_name if self.tls is not None else None
        connection = Connection.connect(
            self.target, ssl_context=self._ssl_context, server_hostname=server_name, timeout=timeout
        )
        remaining = max(0.001, timeout - (time.monotonic() - started))
        try:
            connection.hello(self._token.secret if self._token else "", self.client_name, remaining)
        except GatewayError as error:
            connection.close()
            if error.method == 0:
                error.method = Method.HELLO
            # A Hello that never reached the server did no work.
            raise
        return connection

    # -- the generic call ---------------------------------------------------------------------

    def call(
        self,
        method: Union[Method, int],
        request: Message,
        response_type: Type[M],
        *,
        timeout: Optional[float] = None,
        idempotency_key: bool = False,
    ) -> M:
        """Calls any method (administration included) with this client's deadlines and
        retries. ``idempotency_key`` says whether ``request`` carries one (which makes a retry
        after UNAVAILABLE safe). ``timeout``: this call's deadline in seconds, across its retries
        (None: the client's ``timeout``)."""
        number = int(method)
        idempotent = Method(number).idempotent if number in Method._value2member_map_ else False
        payload = request.SerializeToString()
        if timeout is not None and timeout <= 0:
            raise ConfigurationError("timeout must be positive")
        seconds = self.timeout if timeout is None else timeout
        deadline = None if seconds is None else time.monotonic() + seconds
        attempt = 1
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise local_error(
                    Code.DEADLINE_EXCEEDED,
                    LocalReason.DEADLINE,
                    "the call's deadline passed before it could be sent",
                    method=number,
                    not_processed=True,
                )
            connection: Optional[Connection] = None
            try:
                connection = self._pool.connection(self.connect_timeout if remaining is None else remaining)
                frame = connection.call(number, payload, remaining)
                if frame.status != Code.OK:
                    raise status_error(frame)
                try:
                    return response_type.FromString(frame.payload)
                except DecodeError:
                    raise local_error(
                        Code.INTERNAL,
                        LocalReason.MALFORMED_RESPONSE,
                        "the answer is not a %s" % response_type.__name__,
                        method=number,
                        not_processed=False,
                    ) from None
            except GatewayError as error:
                if error.method == 0:
                    error.method = number
                if isinstance(error, Unauthenticated) and connection is not None:
                    # Credentials revoked or expired since the Hello: this connection is done
                    # (section 7.4); the next call reconnects.
                    self._pool.discard(connection)
                if attempt >= self.retry.max_attempts or not is_retryable(
                    error, idempotent=idempotent, has_idempotency_key=idempotency_key
                ):
                    raise
                pause = self.retry.backoff(attempt)
                if deadline is not None and time.monotonic() + pause >= deadline:
                    raise
                time.sleep(pause)
                attempt += 1

    # -- connection methods -------------------------------------------------------------------

    def hello(self) -> pb.HelloResponse:
        """The HelloResponse of a pool connection (opened if needed): the principal, its role
        bindings and the server's limits."""
        connection = self._pool.connection(self.connect_timeout)
        assert connection.hello_response is not None
        return connection.hello_response

    def server_info(self, *, timeout: Optional[float] = None) -> pb.ServerInfoResponse:
        """Method 2: the instance's health and identity."""
        return self.call(Method.SERVER_INFO, pb.ServerInfoRequest(), pb.ServerInfoResponse, timeout=timeout)

    # -- data keys ----------------------------------------------------------------------------

    def generate_data_key(
        self,
        tenant: str,
        context: Optional[Context] = None,
        *,
        include_plaintext: bool = True,
        idempotency_key: str = "",
        timeout: Optional[float] = None,
    ) -> DataKey:
        """Method 10: a new data key. With ``idempotency_key`` (1-128 bytes) a retry returns the
        first call's key, and the client retries after UNAVAILABLE; without it, only calls that
        provably did not reach the server are retried."""
        request = pb.GenerateDataKeyRequest(
            tenant=tenant,
            encryption_context=dict(context or {}),
            include_plaintext=include_plaintext,
            idempotency_key=idempotency_key,
        )
        response = self.call(
            Method.GENERATE_DATA_KEY,
            request,
            pb.GenerateDataKeyResponse,
            timeout=timeout,
            idempotency_key=bool(idempotency_key),
        )
        return DataKey.from_message(response.key)

    def generate_data_keys(
        self,
        tenant: str,
        count: int,
        context: Optional[Context] = None,
        *,
        include_plaintext: bool = True,
        idempotency_key: str = "",
        timeout: Optional[float] = None,
    ) -> List[DataKey]:
        """Method 11: ``count`` (1-1,000) data keys with one context, all or none."""
        request = pb.GenerateDataKeysRequest(
            tenant=tenant,
            count=count,
            encryption_context=dict(context or {}),
            include_plaintext=include_plaintext,
            idempotency_key=idempotency_key,
        )
        response = self.call(
            Method.GENERATE_DATA_KEYS,
            request,
            pb.GenerateDataKeysResponse,
            timeout=timeout,
            idempotency_key=bool(idempotency_key),
        )
        return [DataKey.from_message(key) for key in response.keys]

    def decrypt_data_key(
        self,
        tenant: str,
        id: str,
        context: Optional[Context] = None,
        *,
        wrapped: Optional[bytes] = None,
        timeout: Optional[float] = None,
    ) -> DataKey:
        """Method 12: the data key's plaintext, for the exact context it was generated with.
        ``wrapped`` is the 83-byte copy the caller kept (``DataKey.wrapped``), used by the gateway
        only when it has no row for the key (protocol section 9.3); ``id`` may then be empty."""
        request = pb.DecryptDataKeyRequest(
            tenant=tenant, id=id, encryption_context=dict(context or {}), wrapped=wrapped or b""
        )
        response = self.call(Method.DECRYPT_DATA_KEY, request, pb.DecryptDataKeyResponse, timeout=timeout)
        return DataKey.from_message(response.key)

    def decrypt_data_keys(
        self, tenant: str, keys: Sequence[DataKeyRef], *, timeout: Optional[float] = None
    ) -> List[Union[DataKey, GatewayError]]:
        """Method 13: 1-1,000 keys; each entry is a :class:`DataKey` or the
        :class:`GatewayError` that entry alone failed with, in request order."""
        request = pb.DecryptDataKeysRequest(
            tenant=tenant,
            keys=[
                pb.DataKeyReference(id=k.id, encryption_context=dict(k.context), wrapped=k.wrapped or b"") for k in keys
            ],
        )
        response = self.call(Method.DECRYPT_DATA_KEYS, request, pb.DecryptDataKeysResponse, timeout=timeout)
        results: List[Union[DataKey, GatewayError]] = []
        for result in response.results:
            if result.WhichOneof("result") == "key":
                results.append(DataKey.from_message(result.key))
            else:
                results.append(
                    make_error(
                        result.error.code,
                        result.error.message,
                        result.error.reason,
                        method=Method.DECRYPT_DATA_KEYS,
                    )
                )
        return results

    def encrypt(
        self,
        tenant: str,
        data_key_id: str,
        plaintext: bytes,
        context: Optional[Context] = None,
        *,
        timeout: Optional[float] = None,
    ) -> bytes:
        """Method 14: seals up to 64 KiB inside the gateway under a stored data key (the context
        must be the key's). Not idempotent: retried only when it provably was not sent."""
        request = pb.EncryptRequest(
            tenant=tenant, data_key_id=data_key_id, plaintext=plaintext, encryption_context=dict(context or {})
        )
        return bytes(self.call(Method.ENCRYPT, request, pb.EncryptResponse, timeout=timeout).ciphertext)

    def decrypt(
        self, tenant: str, ciphertext: bytes, context: Optional[Context] = None, *, timeout: Optional[float] = None
    ) -> Decrypted:
        """Method 15: opens what :meth:`encrypt` returned."""
        request = pb.DecryptRequest(tenant=tenant, ciphertext=ciphertext, encryption_context=dict(context or {}))
        response = self.call(Method.DECRYPT, request, pb.DecryptResponse, timeout=timeout)
        return Decrypted(plaintext=bytes(response.plaintext), data_key_id=response.data_key_id)

    def rewrap_data_key(
        self, tenant: str, id: str, context: Optional[Context] = None, *, timeout: Optional[float] = None
    ) -> pb.DataKeyInfo:
        """Method 16: wraps the key again under the tenant's primary master key."""
        request = pb.RewrapDataKeyRequest(tenant=tenant, id=id, encryption_context=dict(context or {}))
        return self.call(Method.REWRAP_DATA_KEY, request, pb.RewrapDataKeyResponse, timeout=timeout).key

    def get_data_key(self, tenant: str, id: str, *, timeout: Optional[float] = None) -> pb.DataKeyInfo:
        """Method 17: a data key's metadata (never the key)."""
        request = pb.GetDataKeyRequest(tenant=tenant, id=id)
        return self.call(Method.GET_DATA_KEY, request, pb.GetDataKeyResponse, timeout=timeout).key

    def list_data_keys(
        self,
        tenant: str,
        *,
        state: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: Optional[float] = None,
    ) -> pb.ListDataKeysResponse:
        """Method 18: one page of a tenant's data keys (``next_page_token`` empty on the last)."""
        request = pb.ListDataKeysRequest(tenant=tenant, state=state, page_size=page_size, page_token=page_token)
        return self.call(Method.LIST_DATA_KEYS, request, pb.ListDataKeysResponse, timeout=timeout)

    def iter_data_keys(self, tenant: str, *, state: str = "", page_size: int = 0) -> Iterator[pb.DataKeyInfo]:
        """Every data key of a tenant, page after page."""
        token = ""
        while True:
            page = self.list_data_keys(tenant, state=state, page_size=page_size, page_token=token)
            yield from page.keys
            token = page.next_page_token
            if not token:
                return

    def disable_data_key(self, tenant: str, id: str, *, timeout: Optional[float] = None) -> pb.DataKeyInfo:
        """Method 19 (role admin on the tenant)."""
        return self._key_state(Method.DISABLE_DATA_KEY, tenant, id, timeout)

    def enable_data_key(self, tenant: str, id: str, *, timeout: Optional[float] = None) -> pb.DataKeyInfo:
        """Method 20 (role admin on the tenant)."""
        return self._key_state(Method.ENABLE_DATA_KEY, tenant, id, timeout)

    def destroy_data_key(self, tenant: str, id: str, *, timeout: Optional[float] = None) -> pb.DataKeyInfo:
        """Method 21 (role admin on the tenant): deletes the wrapped copy; irreversible."""
        return self._key_state(Method.DESTROY_DATA_KEY, tenant, id, timeout)

    def _key_state(self, method: Method, tenant: str, id: str, timeout: Optional[float]) -> pb.DataKeyInfo:
        request = pb.DataKeyStateRequest(tenant=tenant, id=id)
        return self.call(method, request, pb.DataKeyStateResponse, timeout=timeout).key

    # -- envelopes ----------------------------------------------------------------------------

    def envelope_encrypt_stream(
        self,
        tenant: str,
        source: BinaryIO,
        sink: BinaryIO,
        context: Optional[Context] = None,
        *,
        frame_size: int = envelope.DEFAULT_FRAME_SIZE,
        data_key: Optional[DataKey] = None,
    ) -> DataKey:
        """Seals ``source`` into ``sink`` in the envelope format under a new data key
        (GenerateDataKey with the plaintext), or ``data_key`` (one generated earlier for this
        tenant and context, with its plaintext). Returns the key without its plaintext: keep its
        ``wrapped`` copy to open the envelope after the gateway's database was lost."""
        context = dict(context or {})
        key = data_key if data_key is not None else self.generate_data_key(tenant, context)
        if key.plaintext is None:
            raise ConfigurationError("the data key has no plaintext: generate it with include_plaintext")
        envelope.encrypt_stream(
            source,
            sink,
            data_key=key.plaintext,
            data_key_id=key.id,
            tenant=tenant,
            context=context,
            frame_size=frame_size,
        )
        return DataKey(id=key.id, master_key_version=key.master_key_version, wrapped=key.wrapped)

    def envelope_encrypt(
        self,
        tenant: str,
        plaintext: bytes,
        context: Optional[Context] = None,
        *,
        frame_size: int = envelope.DEFAULT_FRAME_SIZE,
        data_key: Optional[DataKey] = None,
    ) -> bytes:
        """The envelope of ``plaintext`` (in memory)."""
        out = io.BytesIO()
        self.envelope_encrypt_stream(
            tenant, io.BytesIO(plaintext), out, context, frame_size=frame_size, data_key=data_key
        )
        return out.getvalue()

    def envelope_decrypt_stream(
        self,
        source: BinaryIO,
        sink: BinaryIO,
        *,
        required_context: Optional[Context] = None,
        wrapped_data_key: Optional[bytes] = None,
    ) -> envelope.EnvelopeHeader:
        """Opens an envelope: DecryptDataKey with the header's tenant, key id and context (and
        ``wrapped_data_key`` when the caller kept it), then the frames. ``required_context``:
        pairs the header's context must hold. On an error, discard what was written to ``sink``."""

        def fetch(header: envelope.EnvelopeHeader) -> bytes:
            key = self.decrypt_data_key(header.tenant, header.data_key_id, header.context, wrapped=wrapped_data_key)
            assert key.plaintext is not None
            return key.plaintext

        return envelope.decrypt_stream(source, sink, fetch, required_context=required_context)

    def envelope_decrypt(
        self,
        data: bytes,
        *,
        required_context: Optional[Context] = None,
        wrapped_data_key: Optional[bytes] = None,
    ) -> bytes:
        """The plaintext of an in-memory envelope."""
        out = io.BytesIO()
        self.envelope_decrypt_stream(
            io.BytesIO(data), out, required_context=required_context, wrapped_data_key=wrapped_data_key
        )
        return out.getvalue()


def client_from_environment(environ: Optional[Mapping[str, str]] = None, **overrides: Any) -> Client:
    """A client from the ``HSMGW_*`` variables the Swift tools read: ``HSMGW_SERVER`` (or
    ``HSMGW_SOCKET``), ``HSMGW_TOKEN_FILE`` or ``HSMGW_TOKEN``, ``HSMGW_CA_FILE``,
    ``HSMGW_SERVER_NAME``, ``HSMGW_CERT_FILE``, ``HSMGW_KEY_FILE``."""
    env: Mapping[str, str] = os.environ if environ is None else environ

    def get(name: str) -> Optional[str]:
        value = env.get("HSMGW_" + name, "")
        return value or None

    unix_socket = get("SOCKET")
    address = get("SERVER") or ("unix:" + unix_socket if unix_socket else "127.0.0.1:7700")
    tls: Optional[TLSConfig] = None
    if get("CA_FILE") or get("CERT_FILE") or get("TLS"):
        tls = TLSConfig(
            ca_file=get("CA_FILE"), server_name=get("SERVER_NAME"), cert_file=get("CERT_FILE"), key_file=get("KEY_FILE")
        )
    token_file = get("TOKEN_FILE")
    token = None if token_file else get("TOKEN")
    return Client(address, token=token, token_file=token_file, tls=tls, **overrides)
