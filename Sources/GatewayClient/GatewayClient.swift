import GatewayWire
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import SwiftProtobuf

/// The gateway's Swift client: a small pool of multiplexed connections, retries with
/// exponential backoff and jitter, deadlines, cancellation, and one async method per protocol
/// method (the typed methods are in the `GatewayClient+*.swift` files).
///
/// ```swift
/// let client = try GatewayClient(configuration: .init(
///     target: .host("gateway.internal", port: 7700),
///     transportSecurity: .tls(.init(trustRoots: .pemFile(path: "/etc/hsmgw/ca.pem"))),
///     apiToken: APIToken(token)))
/// let key = try await client.generateDataKey(tenant: "acme", context: ["purpose": "invoices"])
/// await client.shutdown()
/// ```
///
/// Every method throws `GatewayError`. Call `shutdown()` before dropping the client.
public final class GatewayClient: Sendable {
    /// The configuration the client was made with (its description hides the token).
    public let configuration: GatewayClientConfiguration
    private let pool: ConnectionPool
    private let logger: Logger

    /// How many times one call may move to another connection because the one it was given went
    /// away before sending it (a goaway racing the call). These moves are free of backoff and do
    /// not count as attempts; the bound stops a storm of goaways from looping a call forever.
    static let maximumRedispatches = 8

    /// A client for the gateway `configuration` names. No connection is opened until the first
    /// call.
    ///
    /// - Throws: `GatewayClientConfigurationError` when a setting is invalid or a certificate or
    ///   key file cannot be read.
    public init(
        configuration: GatewayClientConfiguration,
        eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        logger: Logger = Logger(label: "hsm-gateway.client")
    ) throws(GatewayClientConfigurationError) {
        try configuration.validate()
        let sslContext = try configuration.makeSSLContext()
        self.configuration = configuration
        self.logger = logger
        self.pool = ConnectionPool(
            configuration: configuration,
            sslContext: sslContext,
            eventLoopGroup: eventLoopGroup,
            logger: logger
        )
    }

    /// How long `shutdown` lets calls in flight finish before it closes their connections: the
    /// server's own drain timeout, and longer than the default deadline.
    public static let shutdownDrainLimit: Duration = .seconds(30)

    /// Refuses new calls with `UNAVAILABLE` (`CLIENT_SHUT_DOWN`), lets calls in flight finish (for
    /// at most `drainLimit`), and closes every connection.
    public func shutdown(drainLimit: Duration = GatewayClient.shutdownDrainLimit) async {
        await pool.shutdown(drainLimit: drainLimit)
    }

    /// The open connections that take calls (for diagnostics and tests).
    public var connections: [GatewayConnection] {
        get async { await pool.openConnections }
    }

    /// A connection from the pool, opened if needed.
    func poolConnection() async throws(GatewayError) -> GatewayConnection {
        try await pool.connection()
    }

    /// Calls `method` with `request` and decodes the response as `responseType`, with the
    /// client's retries and deadline.
    ///
    /// - Parameters:
    ///   - method: The method number (`Method.swift`).
    ///   - request: The method's request message.
    ///   - responseType: The method's response message type.
    ///   - hasIdempotencyKey: Whether the request carries an idempotency key, which makes a
    ///     retry after `UNAVAILABLE` safe even for a method that is not idempotent.
    ///   - deadline: How long the call, retries included, may take; nil for the configuration's
    ///     default deadline.
    public func call<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message>(
        method: Method,
        request: Request,
        responseType: Response.Type = Response.self,
        hasIdempotencyKey: Bool = false,
        deadline: Duration? = nil
    ) async throws(GatewayError) -> Response {
        let payload = try await callPayload(
            method: method,
            payload: request.wirePayload(),
            hasIdempotencyKey: hasIdempotencyKey,
            deadline: deadline
        )
        return try GatewayConnection.decode(Response.self, from: payload, method: method)
    }

    /// The retry loop around one call.
    func callPayload(
        method: Method,
        payload: ByteBuffer,
        hasIdempotencyKey: Bool,
        deadline: Duration?
    ) async throws(GatewayError) -> ByteBuffer {
        let timeout = deadline ?? configuration.defaultDeadline
        if let timeout, timeout <= .zero || timeout > GatewayClientConfiguration.maximumDeadline {
            throw .notSent(
                .invalidArgument,
                reason: GatewayError.LocalReason.invalidArgument,
                "the deadline must be greater than zero and at most \(GatewayClientConfiguration.maximumDeadline)"
            )
        }
        let end = timeout.map { ContinuousClock.now + $0 }
        let policy = configuration.retryPolicy
        var attempt = 1
        var redispatches = 0
        while true {
            if Task.isCancelled {
                throw GatewayConnectionHandler.cancelledError(sent: false)
            }
            if let end, ContinuousClock.now >= end {
                throw GatewayConnectionHandler.deadlineError(sent: false)
            }
            do throws(GatewayError) {
                let connection = try await pool.connection()
                return try await connection.call(method: method, payload: payload, deadline: end)
            } catch {
                if error.origin == .client, error.reason == GatewayError.LocalReason.notSent,
                    redispatches < Self.maximumRedispatches
                {
                    // The connection went away before the request left: use another one now.
                    redispatches += 1
                    continue
                }
                guard attempt < policy.maximumAttempts,
                    RetryPolicy.isRetryable(error, method: method, hasIdempotencyKey: hasIdempotencyKey)
                else {
                    throw error
                }
                let backoff = policy.backoff(beforeRetry: attempt)
                if let end, ContinuousClock.now + backoff >= end {
                    throw error  // No time is left for another attempt.
                }
                logger.debug(
                    "retrying gateway call",
                    metadata: ["method": "\(method)", "attempt": "\(attempt + 1)", "error": "\(error)"]
                )
                do {
                    try await Task.sleep(for: backoff)
                } catch {
                    throw GatewayConnectionHandler.cancelledError(sent: false)
                }
                attempt += 1
            }
        }
    }
}
