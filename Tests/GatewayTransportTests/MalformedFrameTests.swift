import GatewayTransport
import GatewayWire
import NIOCore
import Testing

/// One malformed input and the goaway the rules prescribe for it.
struct MalformedInput: Sendable, CustomTestStringConvertible {
    var name: String
    var bytes: [UInt8]
    var code: StatusCode
    var reason: String
    /// Close the client's sending side after the bytes (the stream ends inside a frame).
    var endStream = false

    var testDescription: String { name }

    /// A 4-byte big-endian length prefix.
    static func prefix(_ length: UInt32) -> [UInt8] {
        [UInt8(length >> 24), UInt8(length >> 16 & 0xFF), UInt8(length >> 8 & 0xFF), UInt8(length & 0xFF)]
    }

    /// A 16-byte frame (no payload) with the given header bytes.
    static func header(version: UInt8 = 1, kind: UInt8 = 1, flags: UInt16 = 0) -> [UInt8] {
        prefix(16) + [version, kind, UInt8(flags >> 8), UInt8(flags & 0xFF), 0, 2, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0]
    }

    static let all: [MalformedInput] = [
        MalformedInput(name: "length 0", bytes: prefix(0), code: .invalidArgument, reason: "FRAME_TOO_SMALL"),
        MalformedInput(name: "length 15", bytes: prefix(15), code: .invalidArgument, reason: "FRAME_TOO_SMALL"),
        MalformedInput(
            name: "length limit+1",
            bytes: prefix((1 << 20) + 1),
            code: .resourceExhausted,
            reason: "FRAME_TOO_LARGE"
        ),
        MalformedInput(
            name: "length 0xFFFFFFFF",
            bytes: prefix(0xFFFF_FFFF),
            code: .resourceExhausted,
            reason: "FRAME_TOO_LARGE"
        ),
        MalformedInput(
            name: "unknown version",
            bytes: header(version: 2),
            code: .invalidArgument,
            reason: "UNSUPPORTED_VERSION"
        ),
        MalformedInput(
            name: "unknown kind", bytes: header(kind: 9), code: .invalidArgument, reason: "UNKNOWN_FRAME_KIND"),
        MalformedInput(
            name: "reserved flags",
            bytes: header(flags: 0x0100),
            code: .invalidArgument,
            reason: "RESERVED_FLAGS"
        ),
        MalformedInput(
            name: "a response frame from the client",
            bytes: header(kind: 2),
            code: .invalidArgument,
            reason: "UNEXPECTED_FRAME"
        ),
        MalformedInput(
            name: "truncated frame, then end of stream",
            bytes: prefix(100) + Array(header().dropFirst(4)) + Array(repeating: 7, count: 10),
            code: .invalidArgument,
            reason: "TRUNCATED_FRAME",
            endStream: true
        ),
    ]
}

@Suite("Transport server over loopback: malformed frames")
struct MalformedFrameTests {
    @Test(
        "a malformed frame gets a goaway naming it and a close, while another connection keeps being served",
        arguments: MalformedInput.all
    )
    func malformed(input: MalformedInput) async throws {
        try await withTestServer { address, _ in
            let bystander = try await TestFrameClient.connect(to: address)
            try await bystander.hello()

            let client = try await TestFrameClient.connect(to: address)
            try await client.hello()
            // A request in flight on the bad connection is answered before the close.
            try await client.request(2, .getDataKey, payload: ByteBuffer(string: "wait|in flight"))
            try await Task.sleep(for: .milliseconds(50))
            try await client.sendRaw(input.bytes)
            if input.endStream { try await client.closeOutput() }
            let clock = ContinuousClock()
            let start = clock.now
            let frames = try await client.framesUntilClosed(timeout: .seconds(5))
            #expect(clock.now - start < .seconds(2), "the server waited for more bytes")
            #expect(frames.map(\.kind) == [.goaway, .response])
            let goaway = try #require(frames.first?.statusMessage)
            #expect(goaway.statusCode == input.code)
            #expect(frames.first?.statusCode == input.code, "the goaway's header status is not its code")
            #expect(goaway.reason == input.reason)
            #expect(!goaway.message.isEmpty)
            #expect(frames.last?.requestID == 2 && frames.last?.statusCode == .unavailable)

            try await bystander.request(3, .getDataKey, payload: ByteBuffer(string: "still served"))
            let answer = try await bystander.nextFrame()
            #expect(answer.requestID == 3 && answer.statusCode == .ok)
            await bystander.close()
        }
    }

    @Test("0xFFFFFFFF before any Hello: the goaway comes after only the 4 prefix bytes")
    func hugeLengthFirst() async throws {
        try await withTestServer { address, _ in
            let client = try await TestFrameClient.connect(to: address)
            try await client.sendRaw([0xFF, 0xFF, 0xFF, 0xFF])
            let frames = try await client.framesUntilClosed(timeout: .seconds(2))
            #expect(frames.map(\.kind) == [.goaway])
            #expect(frames.first?.statusMessage?.statusCode == .resourceExhausted)
            #expect(frames.first?.statusCode == .resourceExhausted)
            #expect(frames.first?.statusMessage?.reason == "FRAME_TOO_LARGE_BEFORE_HELLO")
        }
    }

    @Test("read timeout: a frame begun and never completed gets a goaway READ_TIMEOUT")
    func readTimeout() async throws {
        var limits = ServerLimits()
        limits.readTimeout = .milliseconds(200)
        try await withTestServer(limits: limits) { address, _ in
            let client = try await TestFrameClient.connect(to: address)
            try await client.hello()
            try await client.sendRaw(MalformedInput.prefix(40) + [1, 1, 0])
            let frames = try await client.framesUntilClosed()
            #expect(frames.map(\.kind) == [.goaway])
            #expect(frames.first?.statusMessage?.statusCode == .invalidArgument)
            #expect(frames.first?.statusCode == .invalidArgument)
            #expect(frames.first?.statusMessage?.reason == "READ_TIMEOUT")
        }
    }

    @Test("a stalled partial frame gets the READ_TIMEOUT goaway alone: no keepalive ping before it")
    func noKeepalivePingInsideAPartialFrame() async throws {
        var limits = ServerLimits()
        limits.keepaliveInterval = .milliseconds(100)
        limits.readTimeout = .milliseconds(800)
        try await withTestServer(limits: limits) { address, _ in
            let client = try await TestFrameClient.connect(to: address)
            // Hello and the start of the next frame in one write: from the Hello's answer on, the
            // partial frame has begun, so a ping after that answer could only be one sent in the
            // middle of it. (A ping may come first: the keepalive interval starts at accept, and
            // the write can come later than 100 ms on a loaded machine.)
            var hello = Hsmgw_V1_HelloRequest()
            hello.apiToken = TestGatewayHandler.goodToken
            var bytes = ByteBuffer()
            try FrameEncoder().encode(
                data: Frame(kind: .request, method: Method.hello.rawValue, requestID: 1, payload: hello.wirePayload()),
                out: &bytes
            )
            try await client.sendRaw(Array(bytes.readableBytesView) + MalformedInput.prefix(40) + [1, 1, 0])
            // Several keepalive intervals pass before the read timeout.
            let frames = try await client.framesUntilClosed().drop { $0.kind == .ping }
            #expect(frames.map(\.kind) == [.response, .goaway])
            #expect(frames.first?.statusCode == .ok)
            #expect(frames.last?.statusMessage?.reason == "READ_TIMEOUT")
        }
    }

    @Test("a ping payload over 64 bytes is a connection error")
    func pingTooLarge() async throws {
        try await withTestServer { address, _ in
            let client = try await TestFrameClient.connect(to: address)
            try await client.send(Frame(kind: .ping, requestID: 1, payload: ByteBuffer(repeating: 0, count: 65)))
            let frames = try await client.framesUntilClosed()
            #expect(frames.map(\.kind) == [.goaway])
            #expect(frames.first?.statusMessage?.reason == "PING_PAYLOAD_TOO_LARGE")
        }
    }
}
