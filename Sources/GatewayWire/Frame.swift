import NIOCore

/// One frame of the gateway's wire protocol, after its 4-byte length prefix:
///
/// ```
/// offset size  field
///  0      1    protocol version (1)
///  1      1    kind: 1 request, 2 response, 3 cancel, 4 ping, 5 pong, 6 goaway
///  2      2    flags (big-endian; none defined yet, must be 0)
///  4      2    method (big-endian; requests and responses)
///  6      2    status (big-endian; responses: gRPC canonical code, else 0)
///  8      4    request id (big-endian; 0 for connection-level frames)
/// 12      4    deadline: milliseconds the caller will wait, 0 for none (requests)
/// 16      …    payload (a protobuf message, or empty)
/// ```
///
/// The length prefix counts the header and the payload. Integers are big-endian.
public struct Frame: Sendable, Hashable {
    /// What a frame is for.
    public struct Kind: RawRepresentable, Sendable, Hashable, CustomStringConvertible {
        public let rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }

        public static let request = Kind(rawValue: 1)
        public static let response = Kind(rawValue: 2)
        public static let cancel = Kind(rawValue: 3)
        public static let ping = Kind(rawValue: 4)
        public static let pong = Kind(rawValue: 5)
        public static let goaway = Kind(rawValue: 6)

        /// The kinds this version of the protocol defines.
        public static let known: Set<Kind> = [.request, .response, .cancel, .ping, .pong, .goaway]

        public var description: String {
            switch self {
            case .request: return "request"
            case .response: return "response"
            case .cancel: return "cancel"
            case .ping: return "ping"
            case .pong: return "pong"
            case .goaway: return "goaway"
            default: return "kind(\(rawValue))"
            }
        }
    }

    /// The protocol version this build speaks.
    public static let currentVersion: UInt8 = 1
    /// Bytes of the fixed header after the length prefix.
    public static let headerByteCount = 16
    /// Bytes of the length prefix.
    public static let lengthPrefixByteCount = 4

    public var version: UInt8
    public var kind: Kind
    public var flags: UInt16
    public var method: UInt16
    public var status: UInt16
    public var requestID: UInt32
    public var deadlineMilliseconds: UInt32
    public var payload: ByteBuffer

    public init(
        version: UInt8 = Frame.currentVersion,
        kind: Kind,
        flags: UInt16 = 0,
        method: UInt16 = 0,
        status: UInt16 = 0,
        requestID: UInt32 = 0,
        deadlineMilliseconds: UInt32 = 0,
        payload: ByteBuffer = ByteBuffer()
    ) {
        self.version = version
        self.kind = kind
        self.flags = flags
        self.method = method
        self.status = status
        self.requestID = requestID
        self.deadlineMilliseconds = deadlineMilliseconds
        self.payload = payload
    }
}

/// The limits a frame reader enforces. Each protects the server from one peer.
public struct FrameLimits: Sendable, Hashable {
    /// The largest frame (header and payload, without the prefix): 1 MiB by default. A declared
    /// length above it is refused as soon as the 4-byte prefix has arrived, before any buffer of
    /// that size exists. Big enough for a batch of 1,000 wrapped data keys (~120 KB) or a 64 KiB
    /// Encrypt payload with room to spare; anything larger belongs in client-side envelope
    /// encryption.
    public var maximumFrameByteCount: Int = 1 << 20

    /// The smallest `maximumFrameByteCount` accepted (a header and a little payload).
    public static let minimumFrameLimit = 1024
    /// The largest `maximumFrameByteCount` accepted (16 MiB): a bound on one allocation per
    /// connection.
    public static let maximumFrameLimit = 16 << 20

    public init(maximumFrameByteCount: Int = 1 << 20) {
        self.maximumFrameByteCount = maximumFrameByteCount
    }
}

/// Why a byte stream is not a valid frame sequence. The connection that sent it is closed (after
/// a goaway naming the reason); other connections are not affected.
public struct FrameError: Error, Sendable, Hashable, CustomStringConvertible {
    public enum Kind: Sendable, Hashable {
        /// The length prefix is smaller than the fixed header.
        case lengthTooSmall
        /// The length prefix is larger than `FrameLimits.maximumFrameByteCount`.
        case lengthTooLarge
        /// The peer speaks a protocol version this build does not.
        case unsupportedVersion
        /// The frame kind is not one this version defines.
        case unknownKind
        /// Reserved flag bits are set.
        case reservedFlags
        /// The stream ended inside a frame.
        case truncated
    }

    public let kind: Kind
    public let message: String

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    public var description: String { message }
}
