import NIOCore
import SwiftProtobuf

extension SwiftProtobuf.Message {
    /// Decodes a frame's payload. Unknown fields are kept and ignored (compatibility rule);
    /// malformed bytes throw, and the caller answers `INVALID_ARGUMENT`.
    public init(wirePayload buffer: ByteBuffer) throws {
        var bytes = buffer
        var data = bytes.readBytes(length: bytes.readableBytes) ?? []
        // Payloads may hold key material: zero the temporary copy whatever happens.
        defer { _ = data.withUnsafeMutableBytes { $0.initializeMemory(as: UInt8.self, repeating: 0) } }
        try self.init(serializedBytes: data)
    }

    /// The message as a frame payload.
    public func wirePayload(allocator: ByteBufferAllocator = ByteBufferAllocator()) -> ByteBuffer {
        // Serialising a message with only valid field values cannot fail; the fallback keeps a
        // broken invariant from crashing the server.
        let bytes: [UInt8] = (try? serializedBytes()) ?? []
        var buffer = allocator.buffer(capacity: bytes.count)
        buffer.writeBytes(bytes)
        return buffer
    }
}

extension Hsmgw_V1_Status {
    /// A status message for a failed response or a goaway.
    public init(_ code: StatusCode, _ message: String, reason: String = "") {
        self.init()
        self.code = UInt32(code.rawValue)
        self.message = message
        self.reason = reason
    }

    /// The code as a `StatusCode`.
    public var statusCode: StatusCode { StatusCode(rawValue: UInt16(truncatingIfNeeded: code)) }
}

extension Frame {
    /// A goaway carrying `status`: the header's `status` field holds the same code as the
    /// payload's `Status.code` (docs/protocol.md §3.2), so a peer that reads only the header
    /// learns why the connection is going away.
    public static func goaway(_ status: Hsmgw_V1_Status) -> Frame {
        Frame(kind: .goaway, status: UInt16(truncatingIfNeeded: status.code), payload: status.wirePayload())
    }
}

/// Stable `Status.reason` values. A client may branch on these; they never change meaning.
public enum StatusReason {
    /// `INVALID_ARGUMENT`: a ciphertext, wrapped key or encryption context does not authenticate.
    public static let decryptionFailed = "DECRYPTION_FAILED"
    /// `RESOURCE_EXHAUSTED`: the connection already has its maximum of requests in flight.
    public static let tooManyRequestsInFlight = "TOO_MANY_REQUESTS_IN_FLIGHT"
    /// `RESOURCE_EXHAUSTED`: the tenant's queue is full, or the request waited its bound.
    public static let overloaded = "OVERLOADED"
    /// RESOURCE_EXHAUSTED on Hello: too many refused authentications from the caller's address.
    public static let authThrottled = "AUTH_THROTTLED"
    /// `INVALID_ARGUMENT` (goaway): a request reused the id of a request still in flight.
    public static let requestIDInUse = "REQUEST_ID_IN_USE"
    /// `INVALID_ARGUMENT`: the payload is not a valid message for the method.
    public static let malformedPayload = "MALFORMED_PAYLOAD"
    /// `INVALID_ARGUMENT` on Hello: `client_name` breaks ``ClientNameRule`` (too long, or a
    /// control, format, line or paragraph separator character).
    public static let invalidClientName = "INVALID_CLIENT_NAME"
    /// `UNAVAILABLE` (goaway): the server is shutting down.
    public static let shuttingDown = "SHUTTING_DOWN"
    /// `UNAUTHENTICATED`: a request other than Hello before the handshake.
    public static let handshakeRequired = "HANDSHAKE_REQUIRED"
    /// `UNAUTHENTICATED`: the API token has expired.
    public static let tokenExpired = "TOKEN_EXPIRED"
    /// `UNAUTHENTICATED`: the API token was revoked.
    public static let tokenRevoked = "TOKEN_REVOKED"
    /// `UNAVAILABLE`: the gateway is sealed; only Hello, ServerInfo and the seal methods are served
    /// until enough operators have given their shares (docs/sealing.md).
    public static let sealed = "SEALED"
    /// `INVALID_ARGUMENT` on UnsealSubmitShare: the share is malformed, of another split, a
    /// duplicate, or (with the threshold reached) the shares did not rebuild the PIN.
    public static let shareRefused = "SHARE_REFUSED"
}
