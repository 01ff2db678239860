"""Unit tests of the Python client's framing against the worked examples of docs/protocol.md.

The examples are copied here byte for byte (section 15 of the document); one test checks that
the document still holds exactly these bytes, so the two cannot drift apart silently. The
client is driven over a real socket pair whose other end plays the server with scripted bytes.

Run: python -m unittest test_framing   (with hsmgw.v1.gateway_pb2 importable)
"""

from __future__ import annotations

import os
import re
import socket
import struct
import unittest

import hsmgw_client as hc
from hsmgw_client import Code, Frame, FrameDecoder, Kind, ProtocolViolation, pb

# docs/protocol.md section 15, "<!-- example: NAME -->" blocks.
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

PROTOCOL_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "docs", "protocol.md")


def decode_one(data: bytes) -> Frame:
    frames = FrameDecoder().feed(data)
    assert len(frames) == 1, frames
    return frames[0]


class ScriptedServer:
    """The server end of a socket pair: bytes written before the client reads, bytes read after."""

    def __init__(self):
        self.server, client_sock = socket.socketpair()
        self.client = hc.Client(client_sock)

    def send(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.server.sendall(chunk)

    def received(self) -> bytes:
        self.server.settimeout(0.2)
        data = b""
        try:
            while True:
                chunk = self.server.recv(65536)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            pass
        return data

    def close(self) -> None:
        self.client.close()
        self.server.close()


class DocumentAgreementTests(unittest.TestCase):
    def test_protocol_md_holds_exactly_these_examples(self):
        with open(PROTOCOL_MD, encoding="utf-8") as f:
            text = f.read()
        found = {
            match.group(1): bytes.fromhex(match.group(2))
            for match in re.finditer(r"<!-- example: ([a-z-]+) -->\n```hex\n(.*?)```", text, re.S)
        }
        self.assertEqual(sorted(found), sorted(EXAMPLES))
        for name, data in EXAMPLES.items():
            self.assertEqual(found[name].hex(), data.hex(), name)

    def test_each_example_declares_its_own_length(self):
        for name, data in EXAMPLES.items():
            (length,) = struct.unpack(">I", data[:4])
            self.assertEqual(length, len(data) - 4, name)

    def test_example_token_has_the_documented_shape(self):
        self.assertTrue(hc.is_api_token(EXAMPLE_TOKEN))
        self.assertFalse(hc.is_api_token(EXAMPLE_TOKEN[:-1]))
        self.assertFalse(hc.is_api_token(EXAMPLE_TOKEN + "A"))
        self.assertFalse(hc.is_api_token("hsmgx_" + EXAMPLE_TOKEN[6:]))
        self.assertFalse(hc.is_api_token(EXAMPLE_TOKEN[:-1] + "="))


def document_vectors() -> dict:
    """The `<!-- vector: NAME -->` hex blocks of docs/protocol.md section 16."""
    with open(PROTOCOL_MD, encoding="utf-8") as f:
        text = f.read()
    return {
        match.group(1): bytes.fromhex(match.group(2))
        for match in re.finditer(r"<!-- vector: ([a-z-]+) -->\n```hex\n(.*?)```", text, re.S)
    }


class DocumentedEncodingTests(unittest.TestCase):
    """Section 16 computed by this client from the document's rules, against the document's hex."""

    TENANT = "acme"
    KEY_ID = "5f0c1a9e-3b7d-4c2a-9e8f-0123456789ab"
    CONTEXT = {"purpose": "known-answer", "app": "billing"}

    @classmethod
    def setUpClass(cls):
        cls.vectors = document_vectors()

    def test_the_document_holds_these_vectors(self):
        self.assertEqual(
            sorted(self.vectors),
            sorted(["context", "context-hash", "payload-aad", "payload-ciphertext", "wrapped-aad", "audit-record",
                    "audit-hash", "audit-checkpoint"]),
        )

    def test_context_and_its_hash(self):
        self.assertEqual(hc.canonical_context(self.CONTEXT), self.vectors["context"])
        self.assertEqual(hc.context_hash(self.CONTEXT), self.vectors["context-hash"])
        self.assertEqual(hc.canonical_context({}), b"\x00\x00\x00\x00")
        self.assertEqual(
            hc.context_hash({}).hex(), "df3f619804a92fdb4057192dc43dd748ea778adc52bc498ce80524c014b81119"
        )

    def test_payload_and_wrapped_aads(self):
        self.assertEqual(hc.payload_aad(self.TENANT, self.KEY_ID, self.CONTEXT), self.vectors["payload-aad"])
        self.assertEqual(hc.wrapped_aad(self.TENANT, self.KEY_ID, 1, self.CONTEXT), self.vectors["wrapped-aad"])

    def test_payload_ciphertext_layout(self):
        ciphertext = self.vectors["payload-ciphertext"]
        self.assertEqual(ciphertext[:3], b"hc\x01")
        self.assertEqual(ciphertext[3:19], hc.uuid_bytes(self.KEY_ID))
        self.assertEqual(ciphertext[19:31], bytes(range(0xC0, 0xCC)))
        self.assertEqual(len(ciphertext), 31 + len(b"hello, gateway") + 16)

    def test_audit_record_hash_and_checkpoint(self):
        record = pb.AuditRecordInfo(
            sequence=1,
            time_ms=1_767_225_600_000,
            principal="admin",
            tenant="acme",
            operation="data-key.generate",
            key_ids=[self.KEY_ID],
            outcome="ok",
            request_id="1-2",
            detail="version=1 count=1 plaintext=true context-sha256=" + hc.context_hash(self.CONTEXT).hex(),
        )
        self.assertEqual(hc.audit_record_encoding(record), self.vectors["audit-record"])
        self.assertEqual(hc.audit_record_hash(record, bytes(32)), self.vectors["audit-hash"])
        self.assertEqual(hc.checkpoint_message(1, self.vectors["audit-hash"]), self.vectors["audit-checkpoint"])


class DecodeExampleTests(unittest.TestCase):
    def test_hello_request_header_and_payload(self):
        frame = decode_one(EXAMPLES["hello-request"])
        self.assertEqual(
            (frame.version, frame.kind, frame.flags, frame.method, frame.status, frame.request_id, frame.deadline_ms),
            (1, Kind.REQUEST, 0, 1, 0, 1, 5000),
        )
        hello = pb.HelloRequest.FromString(frame.payload)
        self.assertEqual(hello.api_token, EXAMPLE_TOKEN)
        self.assertEqual(hello.client_name, "example/1.0")

    def test_hello_response_header_and_payload(self):
        frame = decode_one(EXAMPLES["hello-response"])
        self.assertEqual((frame.kind, frame.method, frame.status, frame.request_id), (Kind.RESPONSE, 1, 0, 1))
        response = pb.HelloResponse.FromString(frame.payload)
        self.assertEqual(response.server_version, "0.2.0")
        self.assertEqual(response.instance_id, "gw-7f3c")
        self.assertEqual(response.principal, "admin")
        self.assertEqual(response.max_frame_bytes, 1048576)
        self.assertEqual(response.max_requests_in_flight, 128)
        self.assertEqual(response.keepalive_seconds, 30)
        self.assertEqual([(r.tenant, r.role) for r in response.roles], [("*", "admin")])

    def test_error_response_becomes_an_error_with_code_reason_and_message(self):
        error = hc.status_error(decode_one(EXAMPLES["error-response"]))
        self.assertEqual(error.code, Code.INVALID_ARGUMENT)
        self.assertEqual(error.status_payload_code, 3)
        self.assertEqual(error.reason, "DECRYPTION_FAILED")
        self.assertEqual(error.message, "decryption failed")
        self.assertEqual((error.method, error.request_id), (12, 7))
        self.assertEqual(str(error), "INVALID_ARGUMENT (DECRYPTION_FAILED): decryption failed")

    def test_goaway(self):
        frame = decode_one(EXAMPLES["goaway"])
        self.assertEqual((frame.kind, frame.method, frame.status, frame.request_id), (Kind.GOAWAY, 0, 14, 0))
        error = hc.status_error(frame)
        self.assertEqual((error.code, error.reason), (Code.UNAVAILABLE, "SHUTTING_DOWN"))

    def test_ping_pong_cancel_headers(self):
        ping, pong, cancel = (decode_one(EXAMPLES[n]) for n in ("ping", "pong", "cancel"))
        self.assertEqual((ping.kind, ping.request_id, len(ping.payload)), (Kind.PING, 0x2A, 8))
        self.assertEqual((pong.kind, pong.request_id, pong.payload), (Kind.PONG, 0x2A, ping.payload))
        self.assertEqual((cancel.kind, cancel.method, cancel.request_id, cancel.payload), (Kind.CANCEL, 0, 7, b""))


class EncodeExampleTests(unittest.TestCase):
    def test_frames_encode_to_the_examples(self):
        ping = decode_one(EXAMPLES["ping"])
        self.assertEqual(Frame(Kind.PONG, request_id=0x2A, payload=ping.payload).encode(), EXAMPLES["pong"])
        self.assertEqual(Frame(Kind.CANCEL, request_id=7).encode(), EXAMPLES["cancel"])
        for name, data in EXAMPLES.items():
            self.assertEqual(decode_one(data).encode(), data, name)

    def test_encoder_refuses_a_frame_over_the_limit(self):
        Frame(Kind.REQUEST, method=14, request_id=1, payload=b"x" * (1024 - 16)).encode(1024)
        with self.assertRaises(ValueError):
            Frame(Kind.REQUEST, method=14, request_id=1, payload=b"x" * (1024 - 15)).encode(1024)


class DecoderTests(unittest.TestCase):
    SERVER_STREAM = EXAMPLES["ping"] + EXAMPLES["hello-response"] + EXAMPLES["error-response"] + EXAMPLES["goaway"]

    def test_byte_by_byte_gives_the_same_frames_as_whole(self):
        whole = FrameDecoder().feed(self.SERVER_STREAM)
        self.assertEqual([f.kind for f in whole], [Kind.PING, Kind.RESPONSE, Kind.RESPONSE, Kind.GOAWAY])
        decoder = FrameDecoder()
        one_by_one = []
        for i in range(len(self.SERVER_STREAM)):
            one_by_one += decoder.feed(self.SERVER_STREAM[i : i + 1])
        self.assertEqual(one_by_one, whole)
        self.assertEqual(decoder.buffered, 0)

    def test_partial_frame_waits(self):
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(EXAMPLES["hello-response"][:-1]), [])
        self.assertEqual(len(decoder.feed(EXAMPLES["hello-response"][-1:])), 1)

    def assert_violation(self, data: bytes, reason: str, max_frame: int = hc.DEFAULT_MAX_FRAME_BYTES):
        with self.assertRaises(ProtocolViolation) as caught:
            FrameDecoder(max_frame).feed(data)
        self.assertEqual(caught.exception.reason, reason)

    def test_length_under_the_header_is_refused_from_the_prefix(self):
        self.assert_violation(struct.pack(">I", 15), "FRAME_TOO_SMALL")

    def test_length_over_the_limit_is_refused_from_the_prefix_alone(self):
        self.assert_violation(struct.pack(">I", (1 << 20) + 1), "FRAME_TOO_LARGE")
        self.assert_violation(struct.pack(">I", 0xFFFFFFFF), "FRAME_TOO_LARGE")
        # Exactly at the limit is fine: the decoder waits for the rest.
        self.assertEqual(FrameDecoder().feed(struct.pack(">I", 1 << 20) + b"\x01\x02\x00\x00"), [])

    def test_bad_header_bytes_are_refused_as_soon_as_they_arrive(self):
        good = bytearray(EXAMPLES["hello-response"])
        version = bytes(good[:4]) + b"\x02"
        self.assert_violation(version, "UNSUPPORTED_VERSION")
        for kind in (0, 7, 255):
            self.assert_violation(bytes(good[:5]) + bytes([kind]), "UNKNOWN_FRAME_KIND")
        self.assert_violation(bytes(good[:6]) + b"\x00\x01", "RESERVED_FLAGS")
        self.assert_violation(bytes(good[:6]) + b"\x80\x00", "RESERVED_FLAGS")


class ClientOverSocketTests(unittest.TestCase):
    def setUp(self):
        self.peer = ScriptedServer()
        self.client = self.peer.client

    def tearDown(self):
        self.peer.close()

    def test_hello_sends_the_example_request_and_reads_the_example_response(self):
        self.peer.send(EXAMPLES["hello-response"])
        response = self.client.hello(EXAMPLE_TOKEN, "example/1.0", deadline_ms=5000)
        self.assertEqual(self.peer.received(), EXAMPLES["hello-request"])
        self.assertEqual(response.principal, "admin")
        self.assertEqual(self.client.max_frame_bytes, 1048576)
        self.assertEqual(self.client.max_requests_in_flight, 128)
        self.assertEqual(self.client.in_flight, 0)

    def test_a_ping_that_arrives_first_is_answered_with_the_example_pong(self):
        self.peer.send(EXAMPLES["ping"], EXAMPLES["hello-response"])
        self.client.hello(EXAMPLE_TOKEN, "example/1.0", deadline_ms=5000)
        self.assertEqual(self.peer.received(), EXAMPLES["hello-request"] + EXAMPLES["pong"])
        self.assertEqual(self.client.pings_answered, 1)

    def test_ping_while_idle_is_answered_by_poll(self):
        self.peer.send(EXAMPLES["ping"])
        self.client.poll(0.2)
        self.assertEqual(self.peer.received(), EXAMPLES["pong"])

    def test_error_response_raises_and_cancel_encodes_as_the_example(self):
        self.client._next_request_id = 7  # where a counter stands after six requests
        request_id = self.client.start("DecryptDataKey", pb.DecryptDataKeyRequest(tenant="t", id="x"))
        self.assertEqual(request_id, 7)
        self.client.cancel(request_id)
        self.peer.send(EXAMPLES["error-response"])
        with self.assertRaises(hc.GatewayError) as caught:
            self.client.result(request_id)
        self.assertEqual((caught.exception.code, caught.exception.reason), (3, "DECRYPTION_FAILED"))
        sent = FrameDecoder().feed(self.peer.received())
        self.assertEqual([f.kind for f in sent], [Kind.REQUEST, Kind.CANCEL])
        self.assertEqual(sent[1].encode(), EXAMPLES["cancel"])

    def test_responses_out_of_order_are_matched_by_request_id(self):
        first = self.client.start("ServerInfo", pb.ServerInfoRequest())
        second = self.client.start("ServerInfo", pb.ServerInfoRequest())
        self.assertEqual((first, second), (1, 2))
        for request_id, principal in ((second, "second"), (first, "first")):
            payload = pb.ServerInfoResponse(principal=principal).SerializeToString()
            self.peer.send(Frame(Kind.RESPONSE, method=2, request_id=request_id, payload=payload).encode())
        self.assertEqual(self.client.result(first).principal, "first")
        self.assertEqual(self.client.result(second).principal, "second")

    def test_unknown_method_number_travels_and_unimplemented_is_raised(self):
        request_id = self.client.start(9999, b"")
        status = pb.Status(code=12, message="method 9999 is not implemented").SerializeToString()
        self.peer.send(Frame(Kind.RESPONSE, method=9999, status=12, request_id=request_id, payload=status).encode())
        with self.assertRaises(hc.GatewayError) as caught:
            self.client.result(request_id)
        self.assertEqual((caught.exception.code, caught.exception.method), (Code.UNIMPLEMENTED, 9999))
        sent = decode_one(self.peer.received())
        self.assertEqual((sent.kind, sent.method, sent.payload), (Kind.REQUEST, 9999, b""))

    def test_goaway_then_close_fails_the_request_in_flight_with_the_goaway_status(self):
        request_id = self.client.start("ServerInfo", pb.ServerInfoRequest())
        self.peer.send(EXAMPLES["goaway"])
        self.peer.server.shutdown(socket.SHUT_WR)
        with self.assertRaises(hc.ConnectionClosed) as caught:
            self.client.result(request_id, timeout=2)
        self.assertEqual((caught.exception.code, caught.exception.reason), (Code.UNAVAILABLE, "SHUTTING_DOWN"))
        with self.assertRaises(hc.GatewayError) as caught:
            self.client.start("ServerInfo", pb.ServerInfoRequest())
        self.assertEqual(caught.exception.code, Code.UNAVAILABLE)

    def test_a_request_frame_from_the_server_is_a_protocol_violation(self):
        request_id = self.client.start("ServerInfo", pb.ServerInfoRequest())
        self.peer.send(Frame(Kind.REQUEST, method=2, request_id=5).encode())
        with self.assertRaises(ProtocolViolation) as caught:
            self.client.result(request_id, timeout=2)
        self.assertEqual(caught.exception.reason, "UNEXPECTED_FRAME")

    def test_local_deadline_sends_a_cancel(self):
        request_id = self.client.start("ServerInfo", pb.ServerInfoRequest(), deadline_ms=50)
        with self.assertRaises(hc.LocalDeadlineExceeded):
            self.client.result(request_id, timeout=0.1)
        sent = FrameDecoder().feed(self.peer.received())
        self.assertEqual([(f.kind, f.request_id) for f in sent], [(Kind.REQUEST, 1), (Kind.CANCEL, 1)])
        self.assertEqual(sent[0].deadline_ms, 50)


class RequestIdTests(unittest.TestCase):
    def test_ids_wrap_to_one_and_skip_ids_in_flight(self):
        peer = ScriptedServer()
        try:
            client = peer.client
            first = client.start("ServerInfo", pb.ServerInfoRequest())
            client._next_request_id = 0xFFFFFFFF
            self.assertEqual(client.start("ServerInfo", pb.ServerInfoRequest()), 0xFFFFFFFF)
            self.assertEqual(first, 1)
            self.assertEqual(client.start("ServerInfo", pb.ServerInfoRequest()), 2)  # skips 0 and 1
        finally:
            peer.close()

    def test_addresses(self):
        self.assertEqual(hc.parse_address("127.0.0.1:7700"), ("127.0.0.1", 7700))
        self.assertEqual(hc.parse_address("[::1]:7700"), ("::1", 7700))
        with self.assertRaises(ValueError):
            hc.parse_address("localhost")


if __name__ == "__main__":
    unittest.main()
