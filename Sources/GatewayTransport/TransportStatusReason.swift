/// `Status.reason` values the transport sends besides those of `GatewayWire.StatusReason`. Like
/// those, they are stable: a client may branch on them.
public enum TransportStatusReason {
    /// `UNAVAILABLE` (goaway): no request for the idle timeout.
    public static let idle = "IDLE"
    /// `UNAUTHENTICATED` (goaway): no successful Hello within the handshake timeout.
    public static let handshakeTimeout = "HANDSHAKE_TIMEOUT"
    /// `UNAVAILABLE` (goaway): the server's ping got no pong in time.
    public static let keepaliveTimeout = "KEEPALIVE_TIMEOUT"
    /// `INVALID_ARGUMENT` (goaway): a frame began but did not complete within the read timeout.
    public static let readTimeout = "READ_TIMEOUT"
    /// `INVALID_ARGUMENT` (goaway): a request carried request id 0.
    public static let invalidRequestID = "INVALID_REQUEST_ID"
    /// `INVALID_ARGUMENT` (goaway): a frame kind the client must not send (response, goaway).
    public static let unexpectedFrame = "UNEXPECTED_FRAME"
    /// `INVALID_ARGUMENT` (goaway): a ping payload over 64 bytes.
    public static let pingPayloadTooLarge = "PING_PAYLOAD_TOO_LARGE"
    /// `RESOURCE_EXHAUSTED` (goaway): a frame length over the frame limit.
    public static let frameTooLarge = "FRAME_TOO_LARGE"
    /// `RESOURCE_EXHAUSTED` (goaway): a frame length over the small limit that applies until the
    /// Hello succeeds (``ServerLimits/maxFrameBytesBeforeHello``).
    public static let frameTooLargeBeforeHello = "FRAME_TOO_LARGE_BEFORE_HELLO"
    /// `INVALID_ARGUMENT` (goaway): a frame length under the 16-byte header.
    public static let frameTooSmall = "FRAME_TOO_SMALL"
    /// `INVALID_ARGUMENT` (goaway): a protocol version this server does not speak.
    public static let unsupportedVersion = "UNSUPPORTED_VERSION"
    /// `INVALID_ARGUMENT` (goaway): a frame kind this version does not define.
    public static let unknownFrameKind = "UNKNOWN_FRAME_KIND"
    /// `INVALID_ARGUMENT` (goaway): reserved flag bits set.
    public static let reservedFlags = "RESERVED_FLAGS"
    /// `INVALID_ARGUMENT` (goaway): the stream ended inside a frame.
    public static let truncatedFrame = "TRUNCATED_FRAME"
    /// `RESOURCE_EXHAUSTED` (goaway): the server already serves its maximum of connections.
    public static let tooManyConnections = "TOO_MANY_CONNECTIONS"
    /// `RESOURCE_EXHAUSTED` (goaway): the server already serves its maximum of connections from
    /// the peer's source address (``ServerLimits/maxConnectionsPerAddress``).
    public static let tooManyConnectionsFromAddress = "TOO_MANY_CONNECTIONS_FROM_ADDRESS"
    /// `UNAVAILABLE`: the connection has sent a goaway for a protocol error and takes no new
    /// request; open a new connection.
    public static let connectionClosing = "CONNECTION_CLOSING"
    /// `RESOURCE_EXHAUSTED`: the handler's response would exceed the frame limit.
    public static let responseTooLarge = "RESPONSE_TOO_LARGE"
}
