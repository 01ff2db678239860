"""Framing against the worked examples of docs/protocol.md section 15 (kept here byte for byte;
one test checks that the document still holds exactly these bytes), and the connection driven
over a real socket pair whose other end plays the server with scripted bytes."""

from __future__ import annotations

import socket
import struct
import threading
from typing import Dict, Iterator

import pytest

from hsmgw import Code, GatewayError, Unavailable, pb
from hsmgw._wire import DEFAULT_MAX_FRAME_BYTES, Frame, FrameDecoder, Kind, Method, ProtocolViolation
from hsmgw.config import APIToken
from hsmgw.connection import Connection, status_error

from .support import PROTOCOL_MD, ScriptedPeer, hex_blocks

EXAMPLES_HEX = {
    "hello-request": """
        00 00 00 50 01 01 00 00 00 01 00 00 00 00 00 01
        00 00 13 88 0a 31 68 73 6d 67 77 5f 41 41 45 43
        41 77 51 46 42 67 63 49 43 51 6f 4c 44 41 30 4f
        44 78 41 52 45 68 4d 55 46 52 59 58 47 42 6b 61
        47 78 77 64 48 68 38 12 0b 65 78 61 6d 70 6c 65
        2f 31 2e 30""",
    "hello-response": """
        00 00 00 3c 01 02 00 00 00 01 00 00 00 00 00 01
        00 00 00 00 0a 05 30 2e 32 2e 30 12 07 67 77 2d
        37 66 33 63 1a 05 61 64 6d 69 6e 20 80 80 40 28
        80 01 30 1e 3a 0a 0a 01 2a 12 05 61 64 6d 69 6e""",
    "error-response": """
        00 00 00 38 01 02 00 00 00 0c 00 03 00 00 00 07
        00 00 00 00 08 03 12 11 64 65 63 72 79 70 74 69
        6f 6e 20 66 61 69 6c 65 64 1a 11 44 45 43 52 59
        50 54 49 4f 4e 5f 46 41 49 4c 45 44""",
    "ping": """
        00 00 00 18 01 04 00 00 00 00 00 00 00 00 00 2a
        00 00 00 00 00 00 01 9a 5c 3e 1b 00""",
    "pong": """
        00 00 00 18 01 05 00 00 00 00 00 00 00 00 00 2a
        00 00 00 00 00 00 01 9a 5c 3e 1b 00""",
    "cancel": """
        00 00 00 10 01 03 00 00 00 00 00 00 00 00 00 07
        00 00 00 00""",
    "goaway": """
        00 00 00 3e 01 06 00 00 00 00 00 0e 00 00 00 00
        00 00 00 00 08 0e 12 1b 74 68 65 20 73 65 72 76
        65 72 20 69 73 20 73 68 75 74 74 69 6e 67 20 64
        6f 77 6e 1a 0d 53 48 55 54 54 49 4e 47 5f 44 4f
        57 4e""",
}
EXAMPLES = {name: bytes.fromhex(text) for name, text in EXAMPLES_HEX.items()}

# The example token of section 15.1: "hsmgw_" + base64url of the bytes 00..1f.
EXAMPLE_TOKEN = "hsmgw_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"


def decode_one(data: bytes) -> Frame:
    frames = FrameDecoder().feed(data)
    assert len(frames) == 1, frames
    return frames[0]


# -- the document ------------------------------------------------------------------------------


def test_protocol_md_holds_exactly_these_examples() -> None:
    found = hex_blocks(PROTOCOL_MD, "example")
    assert sorted(found) == sorted(EXAMPLES)
    for name, data in EXAMPLES.items():
        assert found[name].hex() == data.hex(), name


def test_each_example_declares_its_own_length() -> None:
    for name, data in EXAMPLES.items():
        (length,) = struct.unpack(">I", data[:4])
        assert length == len(data) - 4, name


def test_example_token_has_the_documented_shape() -> None:
    assert APIToken(EXAMPLE_TOKEN).has_gateway_shape
    for wrong in (EXAMPLE_TOKEN[:-1], EXAMPLE_TOKEN + "A", "hsmgx_" + EXAMPLE_TOKEN[6:], EXAMPLE_TOKEN[:-1] + "="):
        assert not APIToken(wrong).has_gateway_shape


# -- decoding and encoding the examples --------------------------------------------------------


def test_hello_request_header_and_payload() -> None:
    frame = decode_one(EXAMPLES["hello-request"])
    assert (
        frame.version,
        frame.kind,
        frame.flags,
        frame.method,
        frame.status,
        frame.request_id,
        frame.deadline_ms,
    ) == (
        1,
        Kind.REQUEST,
        0,
        1,
        0,
        1,
        5000,
    )
    hello = pb.HelloRequest.FromString(frame.payload)
    assert (hello.api_token, hello.client_name) == (EXAMPLE_TOKEN, "example/1.0")


def test_hello_response_header_and_payload() -> None:
    frame = decode_one(EXAMPLES["hello-response"])
    assert (frame.kind, frame.method, frame.status, frame.request_id) == (Kind.RESPONSE, 1, 0, 1)
    response = pb.HelloResponse.FromString(frame.payload)
    assert (response.server_version, response.instance_id, response.principal) == ("0.2.0", "gw-7f3c", "admin")
    assert (response.max_frame_bytes, response.max_requests_in_flight, response.keepalive_seconds) == (1048576, 128, 30)
    assert [(r.tenant, r.role) for r in response.roles] == [("*", "admin")]


def test_error_response_becomes_a_typed_error_with_code_reason_and_message() -> None:
    error = status_error(decode_one(EXAMPLES["error-response"]))
    assert type(error).__name__ == "InvalidArgument"
    assert (error.code, error.status_payload_code, error.reason, error.message) == (
        Code.INVALID_ARGUMENT,
        3,
        "DECRYPTION_FAILED",
        "decryption failed",
    )
    assert (error.method, error.request_id) == (12, 7)
    assert str(error) == "INVALID_ARGUMENT [DECRYPTION_FAILED] (server, DecryptDataKey): decryption failed"


def test_goaway() -> None:
    frame = decode_one(EXAMPLES["goaway"])
    assert (frame.kind, frame.method, frame.status, frame.request_id) == (Kind.GOAWAY, 0, 14, 0)
    error = status_error(frame)
    assert isinstance(error, Unavailable)
    assert (error.code, error.reason) == (Code.UNAVAILABLE, "SHUTTING_DOWN")


def test_a_goaway_with_status_0_in_its_header_falls_back_to_the_payload_code() -> None:
    # Gateways before the current revision sent 0 in a goaway's header (Changes in this revision).
    status = pb.Status(code=8, message="m", reason="TOO_MANY_CONNECTIONS").SerializeToString()
    error = status_error(Frame(Kind.GOAWAY, payload=status))
    assert (error.code, error.reason, error.not_processed) == (Code.RESOURCE_EXHAUSTED, "TOO_MANY_CONNECTIONS", True)


def test_ping_pong_cancel_headers() -> None:
    ping, pong, cancel = (decode_one(EXAMPLES[n]) for n in ("ping", "pong", "cancel"))
    assert (ping.kind, ping.request_id, len(ping.payload)) == (Kind.PING, 0x2A, 8)
    assert (pong.kind, pong.request_id, pong.payload) == (Kind.PONG, 0x2A, ping.payload)
    assert (cancel.kind, cancel.method, cancel.request_id, cancel.payload) == (Kind.CANCEL, 0, 7, b"")


def test_frames_encode_to_the_examples() -> None:
    ping = decode_one(EXAMPLES["ping"])
    assert Frame(Kind.PONG, request_id=0x2A, payload=ping.payload).encode() == EXAMPLES["pong"]
    assert Frame(Kind.CANCEL, request_id=7).encode() == EXAMPLES["cancel"]
    for name, data in EXAMPLES.items():
        assert decode_one(data).encode() == data, name


def test_encoder_refuses_a_frame_over_the_limit() -> None:
    Frame(Kind.REQUEST, method=14, request_id=1, payload=b"x" * (1024 - 16)).encode(1024)
    with pytest.raises(ValueError):
        Frame(Kind.REQUEST, method=14, request_id=1, payload=b"x" * (1024 - 15)).encode(1024)


def test_frame_repr_shows_the_payload_size_only() -> None:
    text = repr(Frame(Kind.REQUEST, method=1, request_id=1, payload=EXAMPLE_TOKEN.encode()))
    assert EXAMPLE_TOKEN not in text and "49 bytes" in text


# -- the decoder -------------------------------------------------------------------------------

SERVER_STREAM = EXAMPLES["ping"] + EXAMPLES["hello-response"] + EXAMPLES["error-response"] + EXAMPLES["goaway"]


def test_byte_by_byte_gives_the_same_frames_as_whole() -> None:
    whole = FrameDecoder().feed(SERVER_STREAM)
    assert [f.kind for f in whole] == [Kind.PING, Kind.RESPONSE, Kind.RESPONSE, Kind.GOAWAY]
    decoder = FrameDecoder()
    one_by_one = []
    for i in range(len(SERVER_STREAM)):
        one_by_one += decoder.feed(SERVER_STREAM[i : i + 1])
    assert one_by_one == whole
    assert decoder.buffered == 0


def test_partial_frame_waits() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(EXAMPLES["hello-response"][:-1]) == []
    assert len(decoder.feed(EXAMPLES["hello-response"][-1:])) == 1


def assert_violation(data: bytes, reason: str, max_frame: int = DEFAULT_MAX_FRAME_BYTES) -> None:
    with pytest.raises(ProtocolViolation) as caught:
        FrameDecoder(max_frame).feed(data)
    assert caught.value.reason == reason


def test_length_under_the_header_is_refused_from_the_prefix() -> None:
    assert_violation(struct.pack(">I", 15), "FRAME_TOO_SMALL")


def test_length_over_the_limit_is_refused_from_the_prefix_alone() -> None:
    assert_violation(struct.pack(">I", (1 << 20) + 1), "FRAME_TOO_LARGE")
    assert_violation(struct.pack(">I", 0xFFFFFFFF), "FRAME_TOO_LARGE")
    # Exactly at the limit is fine: the decoder waits for the rest.
    assert FrameDecoder().feed(struct.pack(">I", 1 << 20) + b"\x01\x02\x00\x00") == []


def test_bad_header_bytes_are_refused_as_soon_as_they_arrive() -> None:
    good = EXAMPLES["hello-response"]
    assert_violation(good[:4] + b"\x02", "UNSUPPORTED_VERSION")
    for kind in (0, 7, 255):
        assert_violation(good[:5] + bytes([kind]), "UNKNOWN_FRAME_KIND")
    assert_violation(good[:6] + b"\x00\x01", "RESERVED_FLAGS")
    assert_violation(good[:6] + b"\x80\x00", "RESERVED_FLAGS")


# -- a connection over a socket pair -----------------------------------------------------------


@pytest.fixture
def peer() -> Iterator[ScriptedPeer]:
    scripted = ScriptedPeer()
    yield scripted
    scripted.close()


@pytest.fixture
def connection(peer: ScriptedPeer) -> Iterator[Connection]:
    conn = Connection(peer.client_socket)
    yield conn
    conn.close()


def hello_in_thread(connection: Connection) -> "tuple[threading.Thread, Dict[str, pb.HelloResponse]]":
    """Calls Hello with the example's token, name and deadline in a thread: the scripted server
    answers only once the request has arrived, as a real one does."""
    result: Dict[str, pb.HelloResponse] = {}
    thread = threading.Thread(target=lambda: result.update(r=connection.hello(EXAMPLE_TOKEN, "example/1.0", 5.0)))
    thread.start()
    return thread, result


def test_hello_sends_the_example_request_and_reads_the_example_response(
    peer: ScriptedPeer, connection: Connection
) -> None:
    thread, result = hello_in_thread(connection)
    assert peer.receive(len(EXAMPLES["hello-request"])) == EXAMPLES["hello-request"]
    peer.send(EXAMPLES["hello-response"])
    thread.join(timeout=10)
    assert result["r"].principal == "admin"
    assert (connection.max_frame_bytes, connection.max_requests_in_flight, connection.in_flight) == (1048576, 128, 0)


def test_before_the_hello_no_frame_over_4_kib_is_sent(connection: Connection) -> None:
    with pytest.raises(GatewayError) as caught:
        connection.start(Method.SERVER_INFO, b"x" * 4096, 1.0)
    assert (caught.value.code, caught.value.reason, caught.value.not_processed) == (
        Code.INVALID_ARGUMENT,
        "REQUEST_TOO_LARGE",
        True,
    )


def test_a_ping_that_arrives_first_is_answered_with_the_example_pong(
    peer: ScriptedPeer, connection: Connection
) -> None:
    peer.send(EXAMPLES["ping"])
    thread, result = hello_in_thread(connection)
    sent = peer.receive(len(EXAMPLES["hello-request"]) + len(EXAMPLES["pong"]))
    frames = FrameDecoder().feed(sent)
    assert sorted(f.encode() for f in frames) == sorted([EXAMPLES["hello-request"], EXAMPLES["pong"]])
    peer.send(EXAMPLES["hello-response"])
    thread.join(timeout=10)
    assert result["r"].principal == "admin"
    assert connection.pings_answered == 1


def test_ping_while_idle_is_answered_by_the_reader(peer: ScriptedPeer, connection: Connection) -> None:
    peer.send(EXAMPLES["ping"])
    assert peer.receive(len(EXAMPLES["pong"])) == EXAMPLES["pong"]


def test_error_response_raises_and_cancel_encodes_as_the_example(peer: ScriptedPeer, connection: Connection) -> None:
    connection._next_request_id = 7  # where a counter stands after six requests
    payload = pb.DecryptDataKeyRequest(tenant="t", id="x").SerializeToString()
    request_id = connection.start(Method.DECRYPT_DATA_KEY, payload, None)
    assert request_id == 7
    connection.cancel(request_id)
    request = peer.receive(20 + len(payload))
    assert peer.receive(len(EXAMPLES["cancel"])) == EXAMPLES["cancel"]
    assert decode_one(request).method == 12
    peer.send(EXAMPLES["error-response"])
    frame = connection.wait(request_id, 5.0)
    error = status_error(frame)
    assert (error.code, error.reason) == (3, "DECRYPTION_FAILED")


def test_responses_out_of_order_are_matched_by_request_id(peer: ScriptedPeer, connection: Connection) -> None:
    first = connection.start(Method.SERVER_INFO, b"", None)
    second = connection.start(Method.SERVER_INFO, b"", None)
    assert (first, second) == (1, 2)
    for request_id, principal in ((second, "second"), (first, "first")):
        payload = pb.ServerInfoResponse(principal=principal).SerializeToString()
        peer.send(Frame(Kind.RESPONSE, method=2, request_id=request_id, payload=payload).encode())
    assert pb.ServerInfoResponse.FromString(connection.wait(first, 5.0).payload).principal == "first"
    assert pb.ServerInfoResponse.FromString(connection.wait(second, 5.0).payload).principal == "second"


def test_unknown_method_number_travels_and_unimplemented_is_raised(peer: ScriptedPeer, connection: Connection) -> None:
    request_id = connection.start(9999, b"", None)
    status = pb.Status(code=12, message="method 9999 is not implemented").SerializeToString()
    peer.send(Frame(Kind.RESPONSE, method=9999, status=12, request_id=request_id, payload=status).encode())
    error = status_error(connection.wait(request_id, 5.0))
    assert (error.code, error.method) == (Code.UNIMPLEMENTED, 9999)
    sent = decode_one(peer.receive(20))
    assert (sent.kind, sent.method, sent.payload) == (Kind.REQUEST, 9999, b"")


def test_goaway_then_close_fails_the_request_in_flight_with_the_goaway_status(
    peer: ScriptedPeer, connection: Connection
) -> None:
    request_id = connection.start(Method.SERVER_INFO, b"", None)
    peer.send(EXAMPLES["goaway"])
    peer.server.shutdown(socket.SHUT_WR)
    with pytest.raises(Unavailable) as caught:
        connection.wait(request_id, 5.0)
    assert (caught.value.code, caught.value.reason, caught.value.not_processed) == (
        Code.UNAVAILABLE,
        "SHUTTING_DOWN",
        False,
    )
    with pytest.raises(Unavailable) as refused:
        connection.start(Method.SERVER_INFO, b"", None)
    assert refused.value.not_processed


def test_a_request_frame_from_the_server_is_a_protocol_violation(peer: ScriptedPeer, connection: Connection) -> None:
    request_id = connection.start(Method.SERVER_INFO, b"", None)
    peer.send(Frame(Kind.REQUEST, method=2, request_id=5).encode())
    with pytest.raises(Unavailable) as caught:
        connection.wait(request_id, 5.0)
    assert caught.value.reason == "PROTOCOL_VIOLATION"
    assert connection.violation is not None and connection.violation.reason == "UNEXPECTED_FRAME"


def test_local_deadline_sends_a_cancel(peer: ScriptedPeer, connection: Connection) -> None:
    request_id = connection.start(Method.SERVER_INFO, b"", 0.05)
    with pytest.raises(GatewayError) as caught:
        connection.wait(request_id, 0.1)
    assert (caught.value.code, caught.value.reason) == (Code.DEADLINE_EXCEEDED, "LOCAL_DEADLINE")
    sent = FrameDecoder().feed(peer.receive(20 + 20))
    assert [(f.kind, f.request_id) for f in sent] == [(Kind.REQUEST, 1), (Kind.CANCEL, 1)]
    assert sent[0].deadline_ms == 50
    # The id stays in flight until the server answers it (section 5.2).
    assert connection.in_flight == 1


def test_ids_wrap_to_one_and_skip_ids_in_flight(connection: Connection) -> None:
    first = connection.start(Method.SERVER_INFO, b"", None)
    connection._next_request_id = 0xFFFFFFFF
    assert connection.start(Method.SERVER_INFO, b"", None) == 0xFFFFFFFF
    assert first == 1
    assert connection.start(Method.SERVER_INFO, b"", None) == 2  # skips 0 and 1
