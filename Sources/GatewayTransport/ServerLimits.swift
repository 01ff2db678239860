import GatewayWire

/// Every limit of the wire protocol (docs/protocol-rules.md, "Limits"), with its default. Each one
/// protects the server, or the callers sharing it, from one peer; over a limit the caller gets a
/// clear error and everyone else keeps being served.
///
/// The configurable limits are instance properties, checked by ``validate()`` against the ranges
/// below; the field limits are fixed by the protocol and are static constants.
public struct ServerLimits: Sendable, Hashable {
    // MARK: Frames and connections

    /// The largest frame (header + payload) the server reads or writes: 1 MiB by default. A
    /// declared length above it is refused from the 4-byte prefix alone (goaway
    /// RESOURCE_EXHAUSTED). Big enough for a batch of 1,000 wrapped keys or a 64 KiB Encrypt
    /// payload; bounds the one buffer a connection may hold.
    public var maxFrameBytes: Int = 1 << 20
    /// Accepted range of ``maxFrameBytes``: the protocol's 1 KiB–16 MiB.
    public static let maxFrameBytesRange = FrameLimits.minimumFrameLimit...FrameLimits.maximumFrameLimit

    /// Requests one connection may have in flight (answered or not yet stopped): 128 by default.
    /// The one over it is answered RESOURCE_EXHAUSTED, reason `TOO_MANY_REQUESTS_IN_FLIGHT`, and
    /// the connection stays open. Bounds the tasks and buffered frames one client can hold.
    public var maxRequestsInFlightPerConnection: Int = 128
    /// Accepted range of ``maxRequestsInFlightPerConnection``.
    public static let maxRequestsInFlightPerConnectionRange = 1...4096

    /// Connections served at once over all listeners: 1,024 by default. One more is accepted,
    /// sent a goaway (RESOURCE_EXHAUSTED) and closed, so its client learns why. Bounds file
    /// descriptors and per-connection memory.
    public var maxConnections: Int = 1024
    /// Accepted range of ``maxConnections``.
    public static let maxConnectionsRange = 1...65_536

    /// Connections served at once from one source address (``SourceAddressGroup``: an IPv4
    /// address, an IPv6 /64): 64 by default. One more from that address is accepted, sent a
    /// goaway (RESOURCE_EXHAUSTED, reason `TOO_MANY_CONNECTIONS_FROM_ADDRESS`) and closed, while
    /// other addresses still connect. Without it one peer could take every slot of
    /// ``maxConnections``, each one held for the handshake timeout. 64 is a client library's
    /// largest pool; raise it for hosts running many clients, or behind a proxy or NAT. Unix
    /// socket peers are not counted here (the socket file's permissions admit them).
    public var maxConnectionsPerAddress: Int = 64
    /// Accepted range of ``maxConnectionsPerAddress``.
    public static let maxConnectionsPerAddressRange = 1...65_536

    // MARK: Timeouts

    /// Time from accepting a connection (TLS included) to a successful Hello: 10 s by default.
    /// A connection that never authenticates cannot hold a slot for long.
    public var handshakeTimeout: Duration = .seconds(10)
    /// A connection with no request in flight and no request or cancel frame for this long gets a
    /// goaway (UNAVAILABLE, reason `IDLE`) and is closed: 300 s by default. Frees slots held by
    /// clients that forgot a connection.
    public var idleTimeout: Duration = .seconds(300)
    /// A frame that has begun must be complete within this: 30 s by default. Stops a peer from
    /// holding a half-read frame (and its buffer) forever.
    public var readTimeout: Duration = .seconds(30)
    /// The server pings after this long without receiving any frame: 30 s by default. Finds dead
    /// peers (a vanished host sends no FIN) and keeps middleboxes from dropping the connection.
    public var keepaliveInterval: Duration = .seconds(30)
    /// How long the server waits for the pong before closing: 10 s by default.
    public var keepaliveTimeout: Duration = .seconds(10)
    /// On shutdown (or after a goaway for a protocol error), how long requests already received
    /// may run before they are answered UNAVAILABLE and the connection is closed: 30 s by default.
    public var drainTimeout: Duration = .seconds(30)
    /// Accepted range of every timeout above except ``drainTimeout``: short values serve tests;
    /// the upper bound catches a unit mistake (milliseconds given as seconds).
    public static let timeoutRange: ClosedRange<Duration> = .milliseconds(10)...(.seconds(86_400))
    /// Accepted range of ``drainTimeout`` (0 = answer UNAVAILABLE at once on shutdown).
    public static let drainTimeoutRange: ClosedRange<Duration> = .zero...(.seconds(3600))

    // MARK: Tenant queues

    /// Tenant-scoped requests waiting for admission, per tenant: 256 by default. The one over it is
    /// answered RESOURCE_EXHAUSTED, reason `OVERLOADED`, at once. A flood from one tenant queues
    /// behind itself without growing memory without bound.
    public var maxQueuedRequestsPerTenant: Int = 256
    /// Accepted range of ``maxQueuedRequestsPerTenant``.
    public static let maxQueuedRequestsPerTenantRange = 1...65_536

    /// How long a tenant-scoped request may wait for admission: 5 s by default; then it is
    /// answered RESOURCE_EXHAUSTED, reason `OVERLOADED`, so callers back off instead of piling up.
    public var maxTenantQueueWait: Duration = .seconds(5)
    /// Accepted range of ``maxTenantQueueWait``.
    public static let maxTenantQueueWaitRange: ClosedRange<Duration> = .milliseconds(1)...(.seconds(300))

    // MARK: Fixed by the protocol

    /// The largest frame (header + payload) a connection may send before its Hello has succeeded:
    /// 4 KiB (or ``maxFrameBytes`` when that is smaller). A declared length above it is refused
    /// from the 4-byte prefix alone (goaway RESOURCE_EXHAUSTED, reason
    /// `FRAME_TOO_LARGE_BEFORE_HELLO`). Nothing an unauthenticated peer may send needs more (a
    /// Hello holds a token of 49 bytes and a name of at most 128; a ping at most 64 bytes), and
    /// it bounds what each connection still in its handshake can make the server buffer to a few
    /// KiB instead of ``maxFrameBytes``.
    public static let maxFrameBytesBeforeHello = 4 * 1024

    /// Largest ping payload: the pong echoes it, so the server bounds what it must send back.
    public static let maxPingPayloadBytes = 64
    /// Tenant id: 1–63 bytes of `[a-z0-9][a-z0-9_-]*` (fits a DNS label, a token label and a
    /// metrics label).
    public static let tenantIDByteRange = 1...63
    /// Encryption context: at most 64 pairs, 8 KiB in all (it is authenticated as AAD on every
    /// use and stored beside each key).
    public static let maxEncryptionContextPairs = 64
    /// Encryption context: total bytes of its keys and values.
    public static let maxEncryptionContextBytes = 8 * 1024
    /// Idempotency key: at most 128 bytes (stored and indexed).
    public static let maxIdempotencyKeyBytes = 128
    /// Client name in Hello: at most 128 bytes (logged); ``ClientNameRule`` has the whole rule.
    public static let maxClientNameBytes = ClientNameRule.maximumByteCount
    /// Principal name: at most 128 bytes.
    public static let maxPrincipalNameBytes = 128
    /// API token description: at most 256 bytes.
    public static let maxTokenDescriptionBytes = 256
    /// Encrypt plaintext: at most 64 KiB (bigger data belongs in client-side envelope encryption).
    public static let maxEncryptPlaintextBytes = 64 * 1024
    /// Keys in one batch request (GenerateDataKeys, DecryptDataKeys): at most 1,000.
    public static let maxBatchKeys = 1000
    /// Items in one page of a list: at most 1,000.
    public static let maxPageSize = 1000

    /// The defaults of docs/protocol-rules.md.
    public init() {}

    /// The frame limits the codec enforces.
    public var frameLimits: FrameLimits { FrameLimits(maximumFrameByteCount: maxFrameBytes) }

    /// The frame limit until the Hello succeeds: ``maxFrameBytesBeforeHello``, or
    /// ``maxFrameBytes`` when that is smaller.
    public var frameBytesBeforeHello: Int { min(Self.maxFrameBytesBeforeHello, maxFrameBytes) }

    /// Throws ``GatewayTransportError`` (code `limitOutOfRange`) naming the first limit outside its
    /// accepted range.
    public func validate() throws(GatewayTransportError) {
        try Self.check("maxFrameBytes", maxFrameBytes, Self.maxFrameBytesRange)
        try Self.check(
            "maxRequestsInFlightPerConnection",
            maxRequestsInFlightPerConnection,
            Self.maxRequestsInFlightPerConnectionRange
        )
        try Self.check("maxConnections", maxConnections, Self.maxConnectionsRange)
        try Self.check("maxConnectionsPerAddress", maxConnectionsPerAddress, Self.maxConnectionsPerAddressRange)
        try Self.check("handshakeTimeout", handshakeTimeout, Self.timeoutRange)
        try Self.check("idleTimeout", idleTimeout, Self.timeoutRange)
        try Self.check("readTimeout", readTimeout, Self.timeoutRange)
        try Self.check("keepaliveInterval", keepaliveInterval, Self.timeoutRange)
        try Self.check("keepaliveTimeout", keepaliveTimeout, Self.timeoutRange)
        try Self.check("drainTimeout", drainTimeout, Self.drainTimeoutRange)
        try Self.check("maxQueuedRequestsPerTenant", maxQueuedRequestsPerTenant, Self.maxQueuedRequestsPerTenantRange)
        try Self.check("maxTenantQueueWait", maxTenantQueueWait, Self.maxTenantQueueWaitRange)
    }

    private static func check<Value: Comparable>(
        _ name: String,
        _ value: Value,
        _ range: ClosedRange<Value>
    ) throws(GatewayTransportError) {
        guard range.contains(value) else {
            throw GatewayTransportError(
                .limitOutOfRange,
                "\(name) is \(value); it must be between \(range.lowerBound) and \(range.upperBound)"
            )
        }
    }
}
