"""The client's pool, retries, deadlines and typed errors against a scripted server on loopback
(real sockets, real threads; the server's answers are scripted per test)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable, Iterator, List, Optional, Tuple

import pytest
from google.protobuf.message import Message

from hsmgw import (
    Client,
    Code,
    DataKeyRef,
    DeadlineExceeded,
    FailedPrecondition,
    GatewayError,
    InvalidArgument,
    NotFound,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
    pb,
)
from hsmgw._wire import Frame, FrameDecoder, Kind, Method
from hsmgw.errors import make_error
from hsmgw.retry import is_retryable

from .support import ScriptedTCPServer

TOKEN = "hsmgw_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"
FAST = RetryPolicy(max_attempts=5, initial_backoff=0.001, max_backoff=0.002)

# (connection index, request frame) -> response frame, or None for no answer at all.
Script = Callable[[int, Frame], Optional[Frame]]


def ok(request: Frame, message: Message) -> Frame:
    payload = message.SerializeToString()
    return Frame(Kind.RESPONSE, method=request.method, request_id=request.request_id, payload=payload)


def fail(request: Frame, code: int, reason: str = "", message: str = "refused") -> Frame:
    status = pb.Status(code=code, message=message, reason=reason).SerializeToString()
    return Frame(Kind.RESPONSE, method=request.method, status=code, request_id=request.request_id, payload=status)


class Gateway:
    """A scripted gateway: answers Hello, then each request as ``script`` says; records what
    it received."""

    def __init__(self, script: Script, *, hello_limits: Tuple[int, int] = (1 << 20, 128)) -> None:
        self.script = script
        self.hello_limits = hello_limits
        self.requests: List[Tuple[int, Frame]] = []
        self.lock = threading.Condition()
        self.server = ScriptedTCPServer(self._serve)
        self.address = self.server.address

    def _serve(self, sock: socket.socket, index: int) -> None:
        decoder = FrameDecoder()
        while True:
            data = sock.recv(65536)
            if not data:
                return
            for frame in decoder.feed(data):
                if frame.kind == Kind.CANCEL:
                    with self.lock:
                        self.requests.append((index, frame))
                        self.lock.notify_all()
                    continue
                if frame.kind != Kind.REQUEST:
                    continue
                if frame.method == Method.HELLO:
                    hello = pb.HelloRequest.FromString(frame.payload)
                    if hello.api_token != TOKEN:
                        sock.sendall(fail(frame, Code.UNAUTHENTICATED, "", "authentication failed").encode())
                        return
                    response = pb.HelloResponse(
                        principal="p", max_frame_bytes=self.hello_limits[0], max_requests_in_flight=self.hello_limits[1]
                    )
                    sock.sendall(ok(frame, response).encode())
                    continue
                with self.lock:
                    self.requests.append((index, frame))
                    self.lock.notify_all()
                answer = self.script(index, frame)
                if answer is None:
                    continue
                if answer.kind == Kind.GOAWAY:
                    sock.sendall(answer.encode())
                    sock.shutdown(socket.SHUT_RDWR)
                    return
                sock.sendall(answer.encode())

    def wait_for_frames(self, count: int, timeout: float = 10.0) -> List[Frame]:
        """The first ``count`` frames received (after Hello), once they have all arrived."""
        with self.lock:
            assert self.lock.wait_for(lambda: len(self.requests) >= count, timeout), self.requests
            return [f for _, f in self.requests]

    def calls(self, method: int) -> List[Frame]:
        with self.lock:
            return [f for _, f in self.requests if f.kind == Kind.REQUEST and f.method == method]

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def make_gateway() -> Iterator[Callable[..., Gateway]]:
    made: List[Gateway] = []

    def factory(script: Script, **kwargs: object) -> Gateway:
        gateway = Gateway(script, **kwargs)  # type: ignore[arg-type]
        made.append(gateway)
        return gateway

    yield factory
    for gateway in made:
        gateway.close()


def client_for(gateway: Gateway, **kwargs: object) -> Client:
    arguments: dict = {"token": TOKEN, "retry": FAST}  # type: ignore[type-arg]
    arguments.update(kwargs)
    return Client(gateway.address, **arguments)


def key_message(request: Frame) -> pb.GenerateDataKeyResponse:
    return pb.GenerateDataKeyResponse(
        key=pb.DataKey(id="k1", master_key_version=1, wrapped=b"w" * 83, plaintext=bytes(32))
    )


def test_generate_sends_the_request_and_returns_a_data_key_whose_repr_hides_the_plaintext(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = make_gateway(lambda i, f: ok(f, key_message(f)))
    with client_for(gateway) as client:
        key = client.generate_data_key("acme", {"purpose": "x"}, idempotency_key="id-1")
    assert (key.id, key.master_key_version, key.wrapped, key.plaintext) == ("k1", 1, b"w" * 83, bytes(32))
    assert "plaintext" not in repr(key) and "www" not in repr(key)
    (frame,) = gateway.calls(Method.GENERATE_DATA_KEY)
    request = pb.GenerateDataKeyRequest.FromString(frame.payload)
    assert (request.tenant, dict(request.encryption_context), request.include_plaintext, request.idempotency_key) == (
        "acme",
        {"purpose": "x"},
        True,
        "id-1",
    )
    # The default deadline (30 s) travels in the header.
    assert frame.deadline_ms == 30000


def test_errors_are_typed_with_code_and_reason(make_gateway: Callable[..., Gateway]) -> None:
    answers = {
        Method.DECRYPT_DATA_KEY: (Code.INVALID_ARGUMENT, "DECRYPTION_FAILED"),
        Method.GET_DATA_KEY: (Code.NOT_FOUND, ""),
        Method.ENCRYPT: (Code.FAILED_PRECONDITION, ""),
    }
    gateway = make_gateway(lambda i, f: fail(f, *answers[Method(f.method)]))
    with client_for(gateway) as client:
        with pytest.raises(InvalidArgument) as caught:
            client.decrypt_data_key("acme", "k", {"secret-context-value": "v"})
        assert caught.value.reason == "DECRYPTION_FAILED" and caught.value.origin == "server"
        assert "secret-context-value" not in str(caught.value)
        with pytest.raises(NotFound):
            client.get_data_key("acme", "k")
        with pytest.raises(FailedPrecondition):
            client.encrypt("acme", "k", b"payload-bytes")
    # None of these is retried.
    assert len(gateway.requests) == 3


def test_unavailable_is_retried_for_idempotent_methods_only(make_gateway: Callable[..., Gateway]) -> None:
    counts = {"n": 0}

    def script(index: int, frame: Frame) -> Frame:
        counts["n"] += 1
        if counts["n"] % 3 != 0:
            return fail(frame, Code.UNAVAILABLE, "")
        if frame.method == Method.DECRYPT:
            return ok(frame, pb.DecryptResponse(plaintext=b"p", data_key_id="k"))
        return ok(frame, pb.EncryptResponse(ciphertext=b"c"))

    gateway = make_gateway(script)
    with client_for(gateway) as client:
        assert client.decrypt("acme", b"c").plaintext == b"p"
        assert len(gateway.calls(Method.DECRYPT)) == 3
        with pytest.raises(Unavailable):
            client.encrypt("acme", "k", b"x")
        assert len(gateway.calls(Method.ENCRYPT)) == 1


def test_generate_is_retried_after_unavailable_only_with_an_idempotency_key(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = make_gateway(lambda i, f: fail(f, Code.UNAVAILABLE))
    with client_for(gateway) as client:
        with pytest.raises(Unavailable):
            client.generate_data_key("acme")
        assert len(gateway.calls(Method.GENERATE_DATA_KEY)) == 1
        with pytest.raises(Unavailable):
            client.generate_data_key("acme", idempotency_key="same")
        assert len(gateway.calls(Method.GENERATE_DATA_KEY)) == 1 + FAST.max_attempts


def test_overloaded_is_retried_for_every_method_and_other_exhaustion_is_not(
    make_gateway: Callable[..., Gateway],
) -> None:
    state = {"n": 0}

    def script(index: int, frame: Frame) -> Frame:
        state["n"] += 1
        if frame.method == Method.ENCRYPT and state["n"] == 1:
            return fail(frame, Code.RESOURCE_EXHAUSTED, "OVERLOADED")
        if frame.method == Method.ENCRYPT:
            return ok(frame, pb.EncryptResponse(ciphertext=b"c"))
        return fail(frame, Code.RESOURCE_EXHAUSTED, "")  # e.g. a data key's encryption limit

    gateway = make_gateway(script)
    with client_for(gateway) as client:
        assert client.encrypt("acme", "k", b"x") == b"c"
        assert len(gateway.calls(Method.ENCRYPT)) == 2
        with pytest.raises(GatewayError):
            client.decrypt("acme", b"c")
        assert len(gateway.calls(Method.DECRYPT)) == 1


def test_a_goaway_moves_calls_to_a_new_connection(make_gateway: Callable[..., Gateway]) -> None:
    def script(index: int, frame: Frame) -> Frame:
        if index == 0:
            status = pb.Status(code=14, message="the server is shutting down", reason="SHUTTING_DOWN")
            return Frame(Kind.GOAWAY, status=14, payload=status.SerializeToString())
        return ok(frame, pb.GetDataKeyResponse(key=pb.DataKeyInfo(id="k")))

    gateway = make_gateway(script)
    with client_for(gateway) as client:
        assert client.get_data_key("acme", "k").id == "k"
    assert gateway.server.accepted == 2


def test_server_side_deadline_exceeded_is_not_retried(make_gateway: Callable[..., Gateway]) -> None:
    gateway = make_gateway(lambda i, f: fail(f, Code.DEADLINE_EXCEEDED))
    with client_for(gateway) as client:
        with pytest.raises(DeadlineExceeded):
            client.get_data_key("acme", "k", timeout=2.0)
    (frame,) = gateway.calls(Method.GET_DATA_KEY)
    assert 1900 <= frame.deadline_ms <= 2000


def test_the_deadline_is_enforced_locally_with_a_cancel(make_gateway: Callable[..., Gateway]) -> None:
    gateway = make_gateway(lambda i, f: None)  # never answers
    with client_for(gateway, retry=RetryPolicy(max_attempts=1)) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as caught:
            client.get_data_key("acme", "k", timeout=0.2)
        elapsed = time.monotonic() - started
    assert caught.value.reason == "LOCAL_DEADLINE" and caught.value.origin == "client"
    # Deadline plus the grace period for the server's own answer (protocol 5.1).
    assert 1.1 <= elapsed < 3.0
    frames = gateway.wait_for_frames(2)
    assert [(f.kind, f.request_id) for f in frames] == [
        (Kind.REQUEST, frames[0].request_id),
        (Kind.CANCEL, frames[0].request_id),
    ]


def test_a_refused_hello_is_unauthenticated_and_not_retried(make_gateway: Callable[..., Gateway]) -> None:
    gateway = make_gateway(lambda i, f: ok(f, pb.ServerInfoResponse()))
    with Client(gateway.address, token=TOKEN[:-1] + "A", retry=FAST) as client:
        with pytest.raises(Unauthenticated) as caught:
            client.server_info()
    assert caught.value.method == Method.HELLO
    assert gateway.server.accepted == 1


def test_connect_failures_are_unavailable_and_retried() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    with Client("127.0.0.1:%d" % port, token=TOKEN, retry=FAST) as client:
        with pytest.raises(Unavailable) as caught:
            client.server_info()
    assert caught.value.reason == "CONNECT_FAILED" and caught.value.not_processed


def test_connections_are_reused_and_shared_by_threads(make_gateway: Callable[..., Gateway]) -> None:
    release = threading.Event()

    def script(index: int, frame: Frame) -> Frame:
        return ok(frame, pb.GetDataKeyResponse(key=pb.DataKeyInfo(id=str(frame.request_id))))

    gateway = make_gateway(script)
    results: List[str] = []
    errors: List[BaseException] = []
    with client_for(gateway, max_connections=2) as client:
        for _ in range(5):
            client.get_data_key("acme", "k")
        assert gateway.server.accepted == 1  # sequential calls reuse one connection

        def worker() -> None:
            try:
                release.wait()
                for _ in range(20):
                    results.append(client.get_data_key("acme", "k").id)
            except BaseException as error:  # pragma: no cover - reported below
                errors.append(error)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for thread in threads:
            thread.start()
        release.set()
        for thread in threads:
            thread.join()
        assert not errors and len(results) == 160
        assert 1 <= len(client.connections) <= 2
    assert gateway.server.accepted <= 2


def test_decrypt_data_keys_returns_keys_and_typed_errors_in_order(make_gateway: Callable[..., Gateway]) -> None:
    def script(index: int, frame: Frame) -> Frame:
        request = pb.DecryptDataKeysRequest.FromString(frame.payload)
        assert request.keys[1].wrapped == b"w" * 83 and request.keys[1].id == ""
        return ok(
            frame,
            pb.DecryptDataKeysResponse(
                results=[
                    pb.DecryptDataKeysResult(key=pb.DataKey(id="a", plaintext=bytes(32))),
                    pb.DecryptDataKeysResult(error=pb.Status(code=3, reason="DECRYPTION_FAILED", message="m")),
                ]
            ),
        )

    gateway = make_gateway(script)
    with client_for(gateway) as client:
        first, second = client.decrypt_data_keys("acme", [DataKeyRef("a"), DataKeyRef("", {"c": "d"}, b"w" * 83)])
    assert not isinstance(first, GatewayError) and first.id == "a"
    assert isinstance(second, InvalidArgument) and second.reason == "DECRYPTION_FAILED"


def test_envelope_through_the_client_fetches_the_key_by_the_header(make_gateway: Callable[..., Gateway]) -> None:
    key = bytes(range(32))

    def script(index: int, frame: Frame) -> Frame:
        if frame.method == Method.GENERATE_DATA_KEY:
            return ok(
                frame,
                pb.GenerateDataKeyResponse(
                    key=pb.DataKey(id="k9", master_key_version=1, wrapped=b"w" * 83, plaintext=key)
                ),
            )
        request = pb.DecryptDataKeyRequest.FromString(frame.payload)
        assert (request.tenant, request.id, dict(request.encryption_context), request.wrapped) == (
            "acme",
            "k9",
            {"a": "b"},
            b"w" * 83,
        )
        return ok(frame, pb.DecryptDataKeyResponse(key=pb.DataKey(id="k9", plaintext=key)))

    gateway = make_gateway(script)
    with client_for(gateway) as client:
        sealed = client.envelope_encrypt("acme", b"x" * 5000, {"a": "b"}, frame_size=1024)
        assert client.envelope_decrypt(sealed, wrapped_data_key=b"w" * 83, required_context={"a": "b"}) == b"x" * 5000


def test_retry_rules_match_the_swift_client() -> None:
    def err(code: int, reason: str = "", origin: str = "server", not_processed: Optional[bool] = None) -> GatewayError:
        return make_error(code, "", reason, origin=origin, not_processed=not_processed)

    assert is_retryable(err(Code.UNAVAILABLE), idempotent=True, has_idempotency_key=False)
    assert not is_retryable(err(Code.UNAVAILABLE), idempotent=False, has_idempotency_key=False)
    assert is_retryable(err(Code.UNAVAILABLE), idempotent=False, has_idempotency_key=True)
    assert is_retryable(err(Code.UNAVAILABLE, "NOT_SENT", "client", True), idempotent=False, has_idempotency_key=False)
    assert not is_retryable(
        err(Code.UNAVAILABLE, "CLIENT_SHUT_DOWN", "client", True), idempotent=True, has_idempotency_key=True
    )
    assert is_retryable(err(Code.ABORTED), idempotent=False, has_idempotency_key=False)
    for reason in (
        "OVERLOADED",
        "TOO_MANY_REQUESTS_IN_FLIGHT",
        "TOO_MANY_CONNECTIONS",
        "TOO_MANY_CONNECTIONS_FROM_ADDRESS",
    ):
        assert is_retryable(err(Code.RESOURCE_EXHAUSTED, reason), idempotent=False, has_idempotency_key=False)
    assert not is_retryable(
        err(Code.RESOURCE_EXHAUSTED, "RESPONSE_TOO_LARGE"), idempotent=True, has_idempotency_key=True
    )
    for code in (Code.DEADLINE_EXCEEDED, Code.CANCELLED, Code.INVALID_ARGUMENT, Code.INTERNAL, Code.UNAUTHENTICATED):
        assert not is_retryable(err(code), idempotent=True, has_idempotency_key=True)


def test_backoff_is_exponential_capped_with_full_jitter() -> None:
    policy = RetryPolicy()
    assert [policy.backoff_ceiling(n) for n in range(1, 8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0]
    assert policy.backoff(3, lambda: 0.5) == pytest.approx(0.2)
    assert policy.backoff(3, lambda: 0.0) == 0.0
    for wrong in (
        {"max_attempts": 0},
        {"max_attempts": 11},
        {"initial_backoff": 0},
        {"max_backoff": 61},
        {"multiplier": 0.5},
    ):
        with pytest.raises(ValueError):
            RetryPolicy(**wrong)


def test_idempotency_table_matches_the_protocol() -> None:
    idempotent = {m for m in Method if m.idempotent}
    data_plane = {m for m in Method if 10 <= m <= 21}
    assert idempotent & data_plane == {
        Method.DECRYPT_DATA_KEY,
        Method.DECRYPT_DATA_KEYS,
        Method.DECRYPT,
        Method.REWRAP_DATA_KEY,
        Method.GET_DATA_KEY,
        Method.LIST_DATA_KEYS,
    }
    assert Method.HELLO.idempotent and Method.SERVER_INFO.idempotent


def test_method_table_matches_protocol_md() -> None:
    import re

    from .support import PROTOCOL_MD

    rows = re.findall(
        r"^\| (\d+) \| (\w+) \| `(\w+)` → `(\w+)` \| [^|]+ \| (yes|no¹?) \|",
        PROTOCOL_MD.read_text(encoding="utf-8"),
        re.M,
    )
    assert len(rows) == len(Method)
    for number, name, request, response, idempotent in rows:
        method = Method(int(number))
        assert (method.protocol_name, method.request_message, method.response_message) == (name, request, response)
        assert method.idempotent == (idempotent == "yes"), name
        assert hasattr(pb, request) and hasattr(pb, response)
