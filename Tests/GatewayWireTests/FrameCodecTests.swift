import GatewayWire
import NIOCore
import NIOTestUtils
import Testing

@Suite("Frame codec: framing, limits, malformed input")
struct FrameCodecTests {
    static func encoded(_ frame: Frame, limits: FrameLimits = FrameLimits()) throws -> ByteBuffer {
        var out = ByteBuffer()
        try FrameEncoder(limits: limits).encode(data: frame, out: &out)
        return out
    }

    static func sample(_ kind: Frame.Kind, payloadBytes: Int) -> Frame {
        Frame(
            kind: kind,
            method: 0x0102,
            status: kind == .response ? 5 : 0,
            requestID: 0xDEAD_BEEF,
            deadlineMilliseconds: 2500,
            payload: ByteBuffer(bytes: (0..<payloadBytes).map { UInt8(truncatingIfNeeded: $0) })
        )
    }

    @Test("the header layout is as documented, big-endian")
    func headerLayout() throws {
        let buffer = try Self.encoded(Self.sample(.request, payloadBytes: 3))
        let expected: [UInt8] = [
            0, 0, 0, 19,  // length: 16-byte header + 3
            1, 1,  // version, kind
            0, 0,  // flags
            0x01, 0x02,  // method
            0, 0,  // status
            0xDE, 0xAD, 0xBE, 0xEF,  // request id
            0, 0, 0x09, 0xC4,  // deadline 2500 ms
            0, 1, 2,  // payload
        ]
        #expect(Array(buffer.readableBytesView) == expected)
    }

    static let roundTrips: [(Frame.Kind, Int)] = [
        (.request, 0), (.request, 1), (.response, 1000), (.cancel, 0), (.ping, 8), (.pong, 8), (.goaway, 40),
        (.request, (1 << 20) - Frame.headerByteCount),
    ]

    @Test("every kind round-trips, fed whole and byte by byte", arguments: roundTrips)
    func roundTrip(kind: Frame.Kind, payloadBytes: Int) throws {
        let frame = Self.sample(kind, payloadBytes: payloadBytes)
        let buffer = try Self.encoded(frame)
        var decoder = FrameDecoder()
        var whole = buffer
        #expect(try decoder.decode(buffer: &whole) == frame)
        #expect(whole.readableBytes == 0)
        if payloadBytes <= 1000 {
            // NIO's verifier feeds the bytes in every split it tries, including one at a time.
            try ByteToMessageDecoderVerifier.verifyDecoder(inputOutputPairs: [(buffer, [frame])]) { FrameDecoder() }
        }
    }

    @Test("two frames in one read come out as two")
    func twoFramesInOneRead() throws {
        var buffer = try Self.encoded(Self.sample(.request, payloadBytes: 5))
        var second = try Self.encoded(Self.sample(.ping, payloadBytes: 0))
        buffer.writeBuffer(&second)
        var decoder = FrameDecoder()
        #expect(try decoder.decode(buffer: &buffer)?.kind == .request)
        #expect(try decoder.decode(buffer: &buffer)?.kind == .ping)
        #expect(try decoder.decode(buffer: &buffer) == nil)
    }

    static let badLengths: [(UInt32, FrameError.Kind)] = [
        (0, .lengthTooSmall),
        (15, .lengthTooSmall),
        (UInt32(1 << 20) + 1, .lengthTooLarge),
        (0xFFFF_FFFF, .lengthTooLarge),
    ]

    /// Only the 4-byte prefix has arrived: the decoder refuses at once, so no buffer of the
    /// declared size is ever waited for or allocated.
    @Test("a bad length is refused from the prefix alone", arguments: badLengths)
    func badLengthRefusedFromPrefix(length: UInt32, expected: FrameError.Kind) {
        var buffer = ByteBuffer()
        buffer.writeInteger(length)
        var decoder = FrameDecoder()
        let error = #expect(throws: FrameError.self) { try decoder.decode(buffer: &buffer) }
        #expect(error?.kind == expected)
        #expect(error?.message.contains("\(length)") == true)
    }

    @Test("just at the limit is accepted, and the limit is configurable")
    func configurableLimit() throws {
        let limits = FrameLimits(maximumFrameByteCount: 4096)
        let atLimit = Self.sample(.request, payloadBytes: 4096 - Frame.headerByteCount)
        var buffer = try Self.encoded(atLimit, limits: limits)
        var decoder = FrameDecoder(limits: limits)
        #expect(try decoder.decode(buffer: &buffer) == atLimit)

        let over = Self.sample(.request, payloadBytes: 4096 - Frame.headerByteCount + 1)
        #expect(throws: FrameError.self) { try Self.encoded(over, limits: limits) }
        var overBuffer = try Self.encoded(over)
        var strict = FrameDecoder(limits: limits)
        let error = #expect(throws: FrameError.self) { try strict.decode(buffer: &overBuffer) }
        #expect(error?.kind == .lengthTooLarge)
    }

    @Test("an unknown version, kind or flag is refused as soon as the header byte arrives")
    func badHeaderFields() {
        let cases: [(offset: Int, value: UInt8, expected: FrameError.Kind)] = [
            (4, 2, .unsupportedVersion),
            (4, 0, .unsupportedVersion),
            (5, 0, .unknownKind),
            (5, 7, .unknownKind),
            (6, 0x80, .reservedFlags),
            (7, 0x01, .reservedFlags),
        ]
        for (offset, value, expected) in cases {
            var bytes = Array(try! Self.encoded(Self.sample(.request, payloadBytes: 100)).readableBytesView)
            bytes[offset] = value
            // Only up to the bad byte has arrived; the payload is still on its way.
            var buffer = ByteBuffer(bytes: bytes.prefix(offset + 1 + (offset == 6 ? 1 : 0)))
            var decoder = FrameDecoder()
            let error = #expect(throws: FrameError.self) { try decoder.decode(buffer: &buffer) }
            #expect(error?.kind == expected, "byte \(offset) = \(value)")
        }
    }

    @Test("a stream that ends inside a frame is reported as truncated")
    func truncatedThenClosed() throws {
        let bytes = Array(try Self.encoded(Self.sample(.request, payloadBytes: 50)).readableBytesView)
        for cut in [1, 3, 4, 10, 19, 20, bytes.count - 1] {
            var buffer = ByteBuffer(bytes: bytes.prefix(cut))
            var decoder = FrameDecoder()
            #expect(try decoder.decode(buffer: &buffer) == nil)
            let error = #expect(throws: FrameError.self) { try decoder.decodeLast(buffer: &buffer, seenEOF: true) }
            #expect(error?.kind == .truncated)
        }
        var empty = ByteBuffer()
        var decoder = FrameDecoder()
        #expect(try decoder.decodeLast(buffer: &empty, seenEOF: true) == nil)
    }
}
