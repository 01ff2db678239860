"""One multiplexed connection to the gateway (docs/protocol.md sections 2 to 7).

Thread-safe: any number of threads may call :meth:`Connection.call` at once; their requests are
in flight together and matched by request id. A background reader thread reads every frame,
answers the server's pings (so an idle connection stays open), and wakes the caller of each
response. Every operation on the socket (TLS included) is made under one lock, with the socket
non-blocking, so OpenSSL's connection object is never used by two threads at the same time.
"""

from __future__ import annotations

import math
import os
import select
import socket
import ssl
import threading
from typing import Dict, List, Optional

from . import _wire
from ._wire import Code, Frame, FrameDecoder, Kind, ProtocolViolation
from .config import Target
from .errors import GatewayError, LocalReason, Origin, local_error, make_error
from .v1 import gateway_pb2 as pb

#: How much longer than a request's deadline the client waits for the server's own
#: DEADLINE_EXCEEDED before giving up locally and sending a cancel (section 5.1).
DEADLINE_GRACE_SECONDS = 1.0
#: How long closing a TLS connection waits for the server's close_notify.
TLS_CLOSE_TIMEOUT_SECONDS = 0.2
#: Bytes asked of the socket per read.
READ_CHUNK_BYTES = 64 * 1024


def status_error(frame: Frame, *, origin: str = Origin.SERVER) -> GatewayError:
    """The error of a non-OK response frame or a goaway: the header's code (authoritative; a
    goaway from a gateway older than this revision has 0 there, then the payload's code), the
    payload ``Status``'s reason and message."""
    status = pb.Status()
    try:
        status.ParseFromString(frame.payload)
    except Exception:  # a malformed Status still has the header's code
        status = pb.Status(code=frame.status, message="undecodable Status payload")
    code = frame.status if frame.status != 0 else status.code
    return make_error(
        code,
        status.message,
        status.reason,
        origin=origin,
        method=frame.method,
        request_id=frame.request_id,
        status_payload_code=status.code,
    )


class _Pending:
    __slots__ = ("request_id", "method", "event", "frame", "error", "abandoned")

    def __init__(self, request_id: int, method: int) -> None:
        self.request_id = request_id
        self.method = method
        self.event = threading.Event()
        self.frame: Optional[Frame] = None
        self.error: Optional[GatewayError] = None
        self.abandoned = False


def deadline_ms(seconds: Optional[float]) -> int:
    """A deadline in whole milliseconds, rounded up so a positive one never becomes 0."""
    if seconds is None:
        return 0
    return max(1, min(_wire.MAX_DEADLINE_MS, math.ceil(seconds * 1000)))


class Connection:
    """A connection whose Hello succeeded (see :meth:`open`), or a raw one for tests."""

    def __init__(self, sock: socket.socket, *, max_frame_bytes: int = _wire.MAX_FRAME_BYTES_BEFORE_HELLO) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._io_lock = threading.Lock()  # every socket operation
        self._write_lock = threading.Lock()  # whole frames, one after another
        self._state_lock = threading.Lock()  # the fields below
        self._decoder = FrameDecoder(_wire.DEFAULT_MAX_FRAME_BYTES)
        #: The largest frame this client sends: 4 KiB before the Hello, then the server's limit.
        self.max_frame_bytes = max_frame_bytes
        self.max_requests_in_flight = 0  # unknown until Hello
        self._next_request_id = 1
        self._pending: Dict[int, _Pending] = {}  # in flight: sent, not answered
        self._answered: Dict[int, _Pending] = {}  # answered, not yet collected by wait()
        self._pongs: Dict[int, threading.Event] = {}
        self._pong_payloads: Dict[int, bytes] = {}
        self._closed = False
        self.goaway: Optional[GatewayError] = None
        self.hello_response: Optional[pb.HelloResponse] = None
        self.pings_answered = 0
        self.violation: Optional[ProtocolViolation] = None
        self._reader = threading.Thread(target=self._read_loop, name="hsmgw-reader", daemon=True)
        self._reader.start()

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        target: Target,
        *,
        ssl_context: Optional[ssl.SSLContext] = None,
        server_hostname: Optional[str] = None,
        timeout: float = 10.0,
    ) -> "Connection":
        """TCP (or a Unix socket) and, with ``ssl_context``, the TLS handshake; no Hello yet."""
        try:
            if target.unix_path:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                try:
                    sock.connect(target.unix_path)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection((target.host, target.port), timeout=timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ssl_context is not None:
                try:
                    sock = ssl_context.wrap_socket(sock, server_hostname=server_hostname or target.host or None)
                except BaseException:
                    sock.close()
                    raise
        except (OSError, ssl.SSLError) as error:
            raise local_error(
                Code.UNAVAILABLE,
                LocalReason.CONNECT_FAILED,
                "cannot connect to %s: %s" % (target, getattr(error, "strerror", None) or error),
                not_processed=True,
            ) from None
        return cls(sock)

    def hello(self, api_token: str = "", client_name: str = "", timeout: float = 10.0) -> pb.HelloResponse:
        """Method 1 (section 7.1). On success the server's limits apply to this connection; on a
        refusal the server closes the connection, and so does this."""
        request = pb.HelloRequest(api_token=api_token, client_name=client_name)
        frame = self.call(_wire.Method.HELLO, request.SerializeToString(), timeout)
        if frame.status != Code.OK:
            error = status_error(frame)
            self.close()
            raise error
        response = pb.HelloResponse.FromString(frame.payload)
        with self._state_lock:
            self.hello_response = response
            if response.max_frame_bytes:
                self.max_frame_bytes = min(response.max_frame_bytes, _wire.PROTOCOL_MAX_FRAME_BYTES)
                self._decoder.max_frame_bytes = max(self.max_frame_bytes, _wire.DEFAULT_MAX_FRAME_BYTES)
            else:
                self.max_frame_bytes = _wire.DEFAULT_MAX_FRAME_BYTES
            self.max_requests_in_flight = response.max_requests_in_flight
        return response

    # -- state --------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def usable(self) -> bool:
        """Open, and no goaway received: takes new requests."""
        return not self._closed and self.goaway is None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def has_room(self) -> bool:
        """Below the server's ``max_requests_in_flight`` (always, before it is known)."""
        return self.max_requests_in_flight == 0 or len(self._pending) < self.max_requests_in_flight

    def close(self) -> None:
        """Closes the socket; requests in flight fail with UNAVAILABLE (outcome unknown)."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        if isinstance(self._sock, ssl.SSLSocket) and self.violation is None:
            # A TLS close_notify first, so the server sees a clean end rather than a broken one.
            with self._io_lock:
                try:
                    self._sock.settimeout(TLS_CLOSE_TIMEOUT_SECONDS)
                    self._sock.unwrap()
                except (OSError, ValueError):
                    pass
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        with self._io_lock:
            try:
                self._sock.close()
            except OSError:
                pass
        self._fail_all()
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=5)

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests -----------------------------------------------------------------------------

    def start(self, method: int, payload: bytes, deadline_seconds: Optional[float]) -> int:
        """Sends a request without waiting; returns its request id."""
        with self._state_lock:
            if self._closed or self.goaway is not None:
                reason = self.goaway.reason if self.goaway is not None else LocalReason.NOT_SENT
                raise local_error(
                    Code.UNAVAILABLE,
                    reason or LocalReason.NOT_SENT,
                    "the connection is going away; not sent",
                    method=method,
                    not_processed=True,
                )
            if _wire.HEADER_SIZE + len(payload) > self.max_frame_bytes:
                raise local_error(
                    Code.INVALID_ARGUMENT,
                    LocalReason.REQUEST_TOO_LARGE,
                    "the request of %d bytes is over the frame limit of %d" % (len(payload), self.max_frame_bytes),
                    method=method,
                    not_processed=True,
                )
            request_id = self._allocate_request_id()
            self._pending[request_id] = _Pending(request_id, method)
        frame = Frame(
            Kind.REQUEST,
            method=method,
            request_id=request_id,
            deadline_ms=deadline_ms(deadline_seconds),
            payload=payload,
        )
        try:
            self._send(frame.encode(self.max_frame_bytes))
        except GatewayError:
            with self._state_lock:
                self._pending.pop(request_id, None)
            raise
        return request_id

    def wait(self, request_id: int, timeout: Optional[float]) -> Frame:
        """The response frame of ``request_id``. After ``timeout`` seconds (None: no limit) a
        cancel is sent and DEADLINE_EXCEEDED (``LOCAL_DEADLINE``) raised; the id stays in flight
        until the server answers (section 5.2)."""
        with self._state_lock:
            pending = self._answered.pop(request_id, None) or self._pending.get(request_id)
        if pending is None:
            raise KeyError("request %d is not in flight" % request_id)
        if not pending.event.wait(timeout):
            with self._state_lock:
                pending.abandoned = True
                self._answered.pop(request_id, None)
            self.cancel(request_id)
            raise local_error(
                Code.DEADLINE_EXCEEDED,
                LocalReason.DEADLINE,
                "no answer within %.3f s; cancel sent" % (timeout or 0),
                method=pending.method,
                not_processed=False,
            )
        with self._state_lock:
            self._answered.pop(request_id, None)
        if pending.error is not None:
            raise pending.error
        assert pending.frame is not None
        return pending.frame

    def call(self, method: int, payload: bytes, deadline_seconds: Optional[float]) -> Frame:
        """Sends a request with this deadline and waits for its answer (deadline plus a grace
        period, so the server's DEADLINE_EXCEEDED normally arrives first)."""
        request_id = self.start(method, payload, deadline_seconds)
        wait = None if deadline_seconds is None else deadline_seconds + DEADLINE_GRACE_SECONDS
        return self.wait(request_id, wait)

    def cancel(self, request_id: int) -> None:
        """Asks the server to stop a request (section 5.2); its answer is then CANCELLED."""
        if not self._closed:
            try:
                self._send(Frame(Kind.CANCEL, request_id=request_id).encode())
            except GatewayError:
                pass

    def ping(self, payload: bytes = b"", timeout: float = 5.0) -> bytes:
        """Sends a ping and waits for its pong; returns the pong's payload."""
        if len(payload) > _wire.MAX_PING_PAYLOAD_BYTES:
            raise ValueError("ping payloads are at most %d bytes" % _wire.MAX_PING_PAYLOAD_BYTES)
        ping_id = int.from_bytes(os.urandom(4), "big")
        event = threading.Event()
        with self._state_lock:
            self._pongs[ping_id] = event
        try:
            self._send(Frame(Kind.PING, request_id=ping_id, payload=payload).encode())
            if not event.wait(timeout):
                raise local_error(
                    Code.DEADLINE_EXCEEDED, LocalReason.DEADLINE, "no pong within %.1f s" % timeout, not_processed=False
                )
            if ping_id not in self._pong_payloads:
                raise self._closed_error(0)
            return self._pong_payloads.pop(ping_id)
        finally:
            with self._state_lock:
                self._pongs.pop(ping_id, None)

    def send_raw(self, data: bytes) -> None:
        """Writes bytes as they are, for tests of the server's checks of malformed input."""
        self._send(data)

    # -- internals ----------------------------------------------------------------------------

    def _allocate_request_id(self) -> int:
        # A counter from 1 that wraps to 1 and skips ids in flight (section 4.2).
        for _ in range(1 << 16):
            candidate = self._next_request_id
            self._next_request_id = 1 if candidate >= _wire.MAX_REQUEST_ID else candidate + 1
            if candidate not in self._pending and candidate not in self._answered:
                return candidate
        raise RuntimeError("no free request id")

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        with self._write_lock:
            while view:
                if self._closed:
                    raise self._closed_error(0, sent=False)
                sent = 0
                with self._io_lock:
                    try:
                        sent = self._sock.send(view)
                    except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                        sent = 0
                    except OSError as error:
                        sent = -1
                        reason = error.strerror or str(error)
                if sent < 0:
                    self.close()
                    raise local_error(
                        Code.UNAVAILABLE,
                        LocalReason.CONNECTION_LOST,
                        "send failed: %s" % reason,
                        not_processed=len(view) == len(data),
                    )
                if sent:
                    view = view[sent:]
                else:
                    try:
                        select.select([], [self._sock], [], 0.05)
                    except (OSError, ValueError):
                        pass

    def _read_loop(self) -> None:
        try:
            while not self._closed:
                try:
                    readable, _, _ = select.select([self._sock], [], [], 1.0)
                except (OSError, ValueError):
                    break
                if not readable and not (isinstance(self._sock, ssl.SSLSocket) and self._sock.pending()):
                    continue
                chunks: List[bytes] = []
                eof = False
                with self._io_lock:
                    if self._closed:
                        break
                    try:
                        data = self._sock.recv(READ_CHUNK_BYTES)
                        if not data:
                            eof = True
                        else:
                            chunks.append(data)
                            while isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
                                chunks.append(self._sock.recv(READ_CHUNK_BYTES))
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
                        pass
                    except (OSError, ssl.SSLError):
                        eof = True
                if chunks:
                    try:
                        frames = self._decoder.feed(b"".join(chunks))
                    except ProtocolViolation as violation:
                        self.violation = violation
                        break
                    for frame in frames:
                        if not self._dispatch(frame):
                            break
                if eof or self.violation is not None:
                    break
        finally:
            self.close()

    def _dispatch(self, frame: Frame) -> bool:
        """Handles one frame; False when it breaks the protocol (the connection then closes)."""
        if frame.kind not in _wire.SERVER_KINDS:
            self.violation = ProtocolViolation(
                "UNEXPECTED_FRAME", "a server sent a %s frame" % _wire.kind_name(frame.kind)
            )
            return False
        if frame.kind == Kind.PING:
            if len(frame.payload) > _wire.MAX_PING_PAYLOAD_BYTES:
                self.violation = ProtocolViolation("PING_PAYLOAD_TOO_LARGE", "ping payload over 64 bytes")
                return False
            try:
                self._send(Frame(Kind.PONG, request_id=frame.request_id, payload=frame.payload).encode())
            except GatewayError:
                return False
            self.pings_answered += 1
        elif frame.kind == Kind.PONG:
            with self._state_lock:
                event = self._pongs.get(frame.request_id)
                if event is not None:
                    self._pong_payloads[frame.request_id] = frame.payload
                    event.set()
        elif frame.kind == Kind.GOAWAY:
            self.goaway = status_error(frame)
        else:
            with self._state_lock:
                pending = self._pending.pop(frame.request_id, None)
                if pending is not None and not pending.abandoned:
                    self._answered[frame.request_id] = pending
            if pending is None:
                self.violation = ProtocolViolation(
                    "UNEXPECTED_FRAME", "response to request %d, not in flight" % frame.request_id
                )
                return False
            pending.frame = frame
            pending.event.set()
        return True

    def _closed_error(self, request_id: int, *, sent: bool = True, method: int = 0) -> GatewayError:
        if self.goaway is not None:
            goaway = self.goaway
            return make_error(
                goaway.code,
                goaway.message,
                goaway.reason,
                origin=Origin.SERVER,
                method=method,
                request_id=request_id,
                status_payload_code=goaway.status_payload_code,
                not_processed=not sent or goaway.not_processed,
            )
        if self.violation is not None:
            return local_error(
                Code.UNAVAILABLE,
                LocalReason.PROTOCOL_VIOLATION,
                "the server broke the protocol (%s); connection closed" % self.violation.reason,
                method=method,
                not_processed=not sent,
            )
        return local_error(
            Code.UNAVAILABLE,
            LocalReason.CONNECTION_LOST if sent else LocalReason.NOT_SENT,
            "the connection closed",
            method=method,
            not_processed=not sent,
        )

    def _fail_all(self) -> None:
        with self._state_lock:
            pending = list(self._pending.values())
            self._pending.clear()
            for call in pending:
                if not call.abandoned:
                    self._answered[call.request_id] = call
            pongs = list(self._pongs.values())
        for call in pending:
            error = self._closed_error(call.request_id, method=call.method)
            error.request_id = call.request_id
            call.error = error
            call.event.set()
        for event in pongs:
            event.set()
