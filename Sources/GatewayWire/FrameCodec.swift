import NIOCore

/// Reads frames from a byte stream: an I/O-free value, fed whatever bytes arrived, returning a
/// frame or nil ("need more"). The declared length is checked against the limit as soon as the
/// 4-byte prefix is there, so a peer announcing 4 GiB never makes the server allocate it; the
/// header is checked before the payload is waited for.
public struct FrameDecoder: NIOSingleStepByteToMessageDecoder {
    public typealias InboundOut = Frame

    public let limits: FrameLimits

    public init(limits: FrameLimits = FrameLimits()) {
        precondition(
            (FrameLimits.minimumFrameLimit...FrameLimits.maximumFrameLimit).contains(limits.maximumFrameByteCount),
            "frame limit out of range"
        )
        self.limits = limits
    }

    public mutating func decode(buffer: inout ByteBuffer) throws -> Frame? {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return nil }
        guard length >= Frame.headerByteCount else {
            throw FrameError(
                .lengthTooSmall,
                "frame length \(length) is shorter than the \(Frame.headerByteCount)-byte header"
            )
        }
        guard length <= limits.maximumFrameByteCount else {
            throw FrameError(
                .lengthTooLarge,
                "frame length \(length) is over the limit of \(limits.maximumFrameByteCount) bytes"
            )
        }
        // Check the header as soon as it is here, before waiting for the payload.
        let headerStart = buffer.readerIndex + Frame.lengthPrefixByteCount
        if let version = buffer.getInteger(at: headerStart, as: UInt8.self), version != Frame.currentVersion {
            throw FrameError(
                .unsupportedVersion,
                "protocol version \(version) is not supported; this gateway speaks version \(Frame.currentVersion)"
            )
        }
        if let rawKind = buffer.getInteger(at: headerStart + 1, as: UInt8.self),
            !Frame.Kind.known.contains(Frame.Kind(rawValue: rawKind))
        {
            throw FrameError(.unknownKind, "frame kind \(rawKind) is unknown")
        }
        if let flags = buffer.getInteger(at: headerStart + 2, as: UInt16.self), flags != 0 {
            throw FrameError(.reservedFlags, "reserved frame flags are set (0x\(String(flags, radix: 16)))")
        }
        guard buffer.readableBytes >= Frame.lengthPrefixByteCount + Int(length) else { return nil }

        buffer.moveReaderIndex(forwardBy: Frame.lengthPrefixByteCount)
        let version = buffer.readInteger(as: UInt8.self)!
        let kind = Frame.Kind(rawValue: buffer.readInteger(as: UInt8.self)!)
        let flags = buffer.readInteger(as: UInt16.self)!
        let method = buffer.readInteger(as: UInt16.self)!
        let status = buffer.readInteger(as: UInt16.self)!
        let requestID = buffer.readInteger(as: UInt32.self)!
        let deadline = buffer.readInteger(as: UInt32.self)!
        let payload = buffer.readSlice(length: Int(length) - Frame.headerByteCount)!
        return Frame(
            version: version,
            kind: kind,
            flags: flags,
            method: method,
            status: status,
            requestID: requestID,
            deadlineMilliseconds: deadline,
            payload: payload
        )
    }

    public mutating func decodeLast(buffer: inout ByteBuffer, seenEOF: Bool) throws -> Frame? {
        if let frame = try decode(buffer: &buffer) { return frame }
        guard buffer.readableBytes == 0 else {
            throw FrameError(
                .truncated,
                "the stream ended inside a frame (\(buffer.readableBytes) bytes of it had arrived)"
            )
        }
        return nil
    }
}

/// Writes frames: the length prefix, the header and the payload.
public struct FrameEncoder: MessageToByteEncoder {
    public typealias OutboundIn = Frame

    public let limits: FrameLimits

    public init(limits: FrameLimits = FrameLimits()) {
        self.limits = limits
    }

    /// Refuses (instead of sending) a frame the peer would refuse for its size.
    public func encode(data frame: Frame, out: inout ByteBuffer) throws {
        let length = Frame.headerByteCount + frame.payload.readableBytes
        guard length <= limits.maximumFrameByteCount else {
            throw FrameError(
                .lengthTooLarge,
                "frame length \(length) is over the limit of \(limits.maximumFrameByteCount) bytes"
            )
        }
        out.reserveCapacity(minimumWritableBytes: Frame.lengthPrefixByteCount + length)
        out.writeInteger(UInt32(length))
        out.writeInteger(frame.version)
        out.writeInteger(frame.kind.rawValue)
        out.writeInteger(frame.flags)
        out.writeInteger(frame.method)
        out.writeInteger(frame.status)
        out.writeInteger(frame.requestID)
        out.writeInteger(frame.deadlineMilliseconds)
        var payload = frame.payload
        out.writeBuffer(&payload)
    }
}
