import DocumentTestSupport
import GatewayWire
import NIOCore
import Testing

/// The worked examples of docs/protocol.md §15 against the codec: each decodes to one frame and
/// encodes back to the same bytes, and every frame that carries a `Status` repeats its code in the
/// header (§3.2, §4.1).
@Suite("Documented frames: protocol.md §15 against the codec")
struct DocumentedFramesTests {
    static let document = Result { try DocumentedBytes.document("docs/protocol.md") }

    static func example(_ name: String) throws -> [UInt8] {
        try document.get().bytes("example", name)
    }

    static func decodeOne(_ bytes: [UInt8]) throws -> Frame {
        var buffer = ByteBuffer(bytes: bytes)
        var decoder = FrameDecoder()
        let frame = try #require(try decoder.decode(buffer: &buffer))
        #expect(buffer.readableBytes == 0, "bytes left over after one frame")
        return frame
    }

    static func encode(_ frame: Frame) throws -> [UInt8] {
        var out = ByteBuffer()
        try FrameEncoder().encode(data: frame, out: &out)
        return Array(out.readableBytesView)
    }

    @Test("every example is one frame that encodes back to its bytes")
    func examplesRoundTrip() throws {
        let names = try Self.document.get().names("example")
        #expect(names == ["hello-request", "hello-response", "error-response", "ping", "pong", "cancel", "goaway"])
        for name in names {
            let bytes = try Self.example(name)
            let frame = try Self.decodeOne(bytes)
            #expect(try Self.encode(frame) == bytes, "\(name)")
            if frame.kind == .goaway || (frame.kind == .response && frame.status != 0) {
                let status = try Hsmgw_V1_Status(wirePayload: frame.payload)
                #expect(UInt32(frame.status) == status.code, "\(name): header status and Status.code differ")
            }
        }
    }

    @Test("Frame.goaway puts the Status code in the header: the bytes of example 15.6")
    func goawayGoldenBytes() throws {
        let frame = Frame.goaway(
            Hsmgw_V1_Status(.unavailable, "the server is shutting down", reason: StatusReason.shuttingDown))
        #expect(frame.status == StatusCode.unavailable.rawValue)
        #expect(try Self.encode(frame) == Self.example("goaway"))
    }

    @Test("Frame.goaway's header status follows the Status code", arguments: [3, 8, 14, 16] as [UInt16])
    func goawayHeaderFollowsStatus(code: UInt16) throws {
        let frame = Frame.goaway(Hsmgw_V1_Status(StatusCode(rawValue: code), "m", reason: "R"))
        let bytes = try Self.encode(frame)
        #expect(bytes[4...9] == [1, 6, 0, 0, 0, 0])  // version, kind 6, flags, method 0
        #expect(bytes[10] == UInt8(code >> 8) && bytes[11] == UInt8(code & 0xFF))
        #expect(bytes[12..<20].allSatisfy { $0 == 0 })  // request id and deadline
    }
}
