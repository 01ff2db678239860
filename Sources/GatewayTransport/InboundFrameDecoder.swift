import GatewayWire
import NIOCore

/// The frame limit one connection applies now. Shared by its handler, which raises it once the
/// Hello succeeds, and its decoder; both live on the connection's event loop.
final class InboundFrameLimit {
    /// The largest frame (header + payload) the peer may send now.
    var bytes: Int

    init(bytes: Int) {
        self.bytes = bytes
    }
}

/// ``FrameDecoder`` (built with the connection's full frame limit) with a lower limit in front of
/// it while the connection has not authenticated: a declared length over ``InboundFrameLimit``
/// is refused from its 4-byte prefix, before anything of that size is buffered or waited for.
struct InboundFrameDecoder: NIOSingleStepByteToMessageDecoder {
    typealias InboundOut = Frame

    private var decoder: FrameDecoder
    private let limit: InboundFrameLimit

    init(limits: FrameLimits, current limit: InboundFrameLimit) {
        self.decoder = FrameDecoder(limits: limits)
        self.limit = limit
    }

    mutating func decode(buffer: inout ByteBuffer) throws -> Frame? {
        try checkLength(buffer)
        return try decoder.decode(buffer: &buffer)
    }

    mutating func decodeLast(buffer: inout ByteBuffer, seenEOF: Bool) throws -> Frame? {
        try checkLength(buffer)
        return try decoder.decodeLast(buffer: &buffer, seenEOF: seenEOF)
    }

    private func checkLength(_ buffer: ByteBuffer) throws {
        guard limit.bytes < decoder.limits.maximumFrameByteCount,
            let length = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self),
            length >= Frame.headerByteCount, Int(length) > limit.bytes
        else { return }
        throw FrameError(
            .lengthTooLarge,
            "frame length \(length) is over the limit of \(limit.bytes) bytes that applies until the Hello succeeds"
        )
    }
}
