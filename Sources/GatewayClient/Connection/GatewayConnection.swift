import GatewayWire
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import SwiftProtobuf
import Synchronization

/// One multiplexed connection to the gateway: many calls in flight at once, each under its own
/// request id, answered in any order.
///
/// `connect` opens TCP (or a Unix socket), TLS when configured, and runs the Hello handshake;
/// the connection then sends up to the server's `max_requests_in_flight` requests at once and
/// makes further calls wait locally. A call's deadline travels in the frame header and runs a
/// local timer (the deadline plus `localDeadlineGrace`) that fails the call with
/// `DEADLINE_EXCEEDED` and sends a cancel frame; a cancelled task does the same with `CANCELLED`. After a goaway the connection takes no new calls and
/// closes once the calls in flight are answered. If it breaks, calls in flight fail with
/// `UNAVAILABLE` (`CONNECTION_LOST`) and waiting calls with `UNAVAILABLE` (`NOT_SENT`).
///
/// Most code wants `GatewayClient`, which pools connections and retries; this type is public
/// for tools and tests that need one connection's exact behaviour.
public final class GatewayConnection: Sendable {
    /// The channel (for tests and diagnostics).
    public let channel: any Channel
    private let handler: NIOLoopBound<GatewayConnectionHandler>
    private let status: ConnectionStatus
    private let handshake = Mutex<Hsmgw_V1_HelloResponse?>(nil)
    private let maximumFrame = Atomic<Int>(FrameLimits().maximumFrameByteCount)
    private let nextCallID = Atomic<UInt64>(1)

    private init(channel: any Channel, handler: NIOLoopBound<GatewayConnectionHandler>, status: ConnectionStatus) {
        self.channel = channel
        self.handler = handler
        self.status = status
    }

    /// The server's answer to the handshake: its version, instance, the principal, the limits.
    public var helloResponse: Hsmgw_V1_HelloResponse? { handshake.withLock { $0 } }

    /// Whether new calls may go to this connection (no goaway, not closed).
    public var isAcceptingCalls: Bool { status.current.phase == .active }

    /// Requests the server counts in flight on this connection.
    public var requestsInFlight: Int { status.current.inFlight }

    /// Calls waiting locally for an in-flight slot.
    public var requestsQueued: Int { status.current.queued }

    /// The in-flight limit in force (the server's, or the configuration's cap if lower).
    public var maximumRequestsInFlight: Int { status.current.maximumInFlight }

    /// Whether a new call would be sent at once rather than wait.
    var hasFreeSlot: Bool {
        let snapshot = status.current
        return snapshot.phase == .active && snapshot.inFlight + snapshot.queued < snapshot.maximumInFlight
    }

    /// Calls in flight and waiting: how busy the connection is.
    var load: Int {
        let snapshot = status.current
        return snapshot.inFlight + snapshot.queued
    }

    /// Opens a connection and runs the Hello handshake, all within `configuration.connectTimeout`.
    ///
    /// Fails with `UNAVAILABLE` (`CONNECT_FAILED`, never sent) when the gateway cannot be reached,
    /// and with the server's error (such as `UNAUTHENTICATED`) when the handshake is refused.
    public static func connect(
        configuration: GatewayClientConfiguration,
        eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        logger: Logger = Logger(label: "hsm-gateway.client")
    ) async throws(GatewayError) -> GatewayConnection {
        do {
            try configuration.validate()
        } catch {
            throw .notSent(.invalidArgument, reason: GatewayError.LocalReason.invalidArgument, error.description)
        }
        let sslContext: NIOSSLContext?
        do {
            sslContext = try configuration.makeSSLContext()
        } catch {
            throw .notSent(.invalidArgument, reason: GatewayError.LocalReason.invalidArgument, error.description)
        }
        return try await connect(
            configuration: configuration,
            sslContext: sslContext,
            eventLoopGroup: eventLoopGroup,
            logger: logger
        )
    }

    static func connect(
        configuration: GatewayClientConfiguration,
        sslContext: NIOSSLContext?,
        eventLoopGroup: any EventLoopGroup,
        logger: Logger
    ) async throws(GatewayError) -> GatewayConnection {
        let start = ContinuousClock.now
        let status = ConnectionStatus()
        let hostname = configuration.tlsServerHostname
        let maximumQueued = configuration.maximumQueuedRequestsPerConnection
        let deadlineGrace = TimeAmount(configuration.localDeadlineGrace)
        var bootstrap = ClientBootstrap(group: eventLoopGroup)
            .connectTimeout(TimeAmount(configuration.connectTimeout))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    if let sslContext {
                        try sync.addHandler(NIOSSLClientHandler(context: sslContext, serverHostname: hostname))
                    }
                    // The client trusts the server more than the reverse, but still bounds what one
                    // frame can make it allocate: the largest frame limit a server may configure.
                    let limits = FrameLimits(maximumFrameByteCount: FrameLimits.maximumFrameLimit)
                    try sync.addHandler(ByteToMessageHandler(FrameDecoder(limits: limits)))
                    try sync.addHandler(MessageToByteHandler(FrameEncoder(limits: limits)))
                    try sync.addHandler(
                        GatewayConnectionHandler(
                            status: status,
                            maximumQueued: maximumQueued,
                            deadlineGrace: deadlineGrace,
                            logger: logger
                        )
                    )
                }
            }
        if case .host = configuration.target {
            bootstrap = bootstrap.channelOption(.socketOption(.tcp_nodelay), value: 1)
        }

        let channel: any Channel
        do {
            switch configuration.target {
            case .host(let host, let port):
                channel = try await bootstrap.connect(host: host, port: port).get()
            case .unixSocket(let path):
                channel = try await bootstrap.connect(unixDomainSocketPath: path).get()
            }
        } catch {
            throw .notSent(
                .unavailable,
                reason: GatewayError.LocalReason.connectFailed,
                "could not connect to \(configuration.target): \(String(describing: error))"
            )
        }

        let handler: NIOLoopBound<GatewayConnectionHandler>
        do {
            handler = try await channel.eventLoop.submit {
                NIOLoopBound(
                    try channel.pipeline.syncOperations.handler(type: GatewayConnectionHandler.self),
                    eventLoop: channel.eventLoop
                )
            }.get()
        } catch {
            channel.close(promise: nil)
            throw .notSent(
                .unavailable,
                reason: GatewayError.LocalReason.connectFailed,
                "the connection to \(configuration.target) closed while it was being set up"
            )
        }
        let connection = GatewayConnection(channel: channel, handler: handler, status: status)

        var hello = Hsmgw_V1_HelloRequest()
        hello.apiToken = configuration.apiToken?.value ?? ""
        hello.clientName = configuration.clientName
        let response: Hsmgw_V1_HelloResponse
        do {
            let payload = try await connection.call(
                method: .hello,
                payload: hello.wirePayload(),
                deadline: start + configuration.connectTimeout
            )
            response = try Self.decode(Hsmgw_V1_HelloResponse.self, from: payload, method: .hello)
        } catch {
            channel.close(promise: nil)
            throw Self.handshakeFailure(error, target: configuration.target)
        }

        // The limits this server enforces, with the protocol's defaults when it does not say.
        let serverMaximumInFlight = response.maxRequestsInFlight == 0 ? 128 : Int(response.maxRequestsInFlight)
        let maximumInFlight = min(
            serverMaximumInFlight,
            configuration.maximumRequestsInFlightPerConnection
                ?? GatewayClientConfiguration.maximumRequestsInFlightLimit,
            GatewayClientConfiguration.maximumRequestsInFlightLimit
        )
        let serverMaximumFrame =
            response.maxFrameBytes == 0 ? FrameLimits().maximumFrameByteCount : Int(response.maxFrameBytes)
        connection.maximumFrame.store(
            min(max(serverMaximumFrame, FrameLimits.minimumFrameLimit), FrameLimits.maximumFrameLimit),
            ordering: .relaxed
        )
        connection.handshake.withLock { $0 = response }
        // Applied before the connection is handed out, so its first callers see the real limit.
        try? await channel.eventLoop.submit {
            handler.value.setMaximumInFlight(maximumInFlight)
        }.get()
        logger.debug(
            "gateway connection ready",
            metadata: [
                "target": "\(configuration.target)",
                "principal": "\(response.principal)",
                "max_in_flight": "\(maximumInFlight)",
            ]
        )
        return connection
    }

    /// The handshake failed: nothing the caller asked for was sent on this connection.
    private static func handshakeFailure(_ error: GatewayError, target: GatewayClientConfiguration.Target)
        -> GatewayError
    {
        if error.origin == .client {
            return .notSent(
                .unavailable,
                reason: GatewayError.LocalReason.connectFailed,
                "the handshake with \(target) did not complete: \(error.message)"
            )
        }
        var refused = error
        // The gateway refused the Hello, not a request of the caller's.
        refused.transmission = .notSent
        return refused
    }

    /// Sends one request and waits for its response payload.
    ///
    /// - Parameters:
    ///   - method: The method number.
    ///   - payload: The request message, serialised.
    ///   - deadline: When the caller stops waiting; nil for never.
    /// - Returns: The response message's bytes (status OK).
    /// - Throws: `GatewayError`: the server's status, or a local one (deadline, cancellation,
    ///   connection lost or going away, request over the server's frame limit).
    public func call(
        method: Method,
        payload: ByteBuffer,
        deadline: ContinuousClock.Instant?
    ) async throws(GatewayError) -> ByteBuffer {
        let maximumFrame = self.maximumFrame.load(ordering: .relaxed)
        guard Frame.headerByteCount + payload.readableBytes <= maximumFrame else {
            throw .notSent(
                .resourceExhausted,
                reason: GatewayError.LocalReason.requestTooLarge,
                "the request is \(payload.readableBytes) bytes; the server's frame limit is \(maximumFrame)"
            )
        }
        let call = ConnectionStateMachine.CallID(rawValue: nextCallID.wrappingAdd(1, ordering: .relaxed).oldValue)
        let cancellation = CancellationFlag()
        let nioDeadline = deadline.map { NIODeadline.now() + TimeAmount($0 - ContinuousClock.now) }
        let handler = self.handler
        let eventLoop = channel.eventLoop
        let result = await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: GatewayConnectionHandler.Continuation) in
                eventLoop.execute {
                    handler.value.submit(
                        call,
                        method: method,
                        payload: payload,
                        deadline: nioDeadline,
                        cancellation: cancellation,
                        continuation: continuation
                    )
                }
            }
        } onCancel: {
            cancellation.set()
            eventLoop.execute {
                handler.value.abandon(call, because: .cancelled)
            }
        }
        return try result.get()
    }

    /// Sends `request` and decodes the response as `Response`.
    public func call<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message>(
        method: Method,
        request: Request,
        responseType: Response.Type = Response.self,
        deadline: ContinuousClock.Instant?
    ) async throws(GatewayError) -> Response {
        let payload = try await call(method: method, payload: request.wirePayload(), deadline: deadline)
        return try Self.decode(Response.self, from: payload, method: method)
    }

    /// Stops sending new calls on this connection and closes it once the calls in flight are
    /// answered (as after a goaway from the server).
    public func drain() {
        let handler = self.handler
        channel.eventLoop.execute {
            handler.value.drain(note: "client draining")
        }
    }

    /// Closes the connection now: calls in flight fail with `UNAVAILABLE`.
    public func close() async {
        try? await channel.close()
    }

    /// Waits until the channel has closed.
    public func waitUntilClosed() async {
        try? await channel.closeFuture.get()
    }

    static func decode<Response: SwiftProtobuf.Message>(
        _ type: Response.Type,
        from payload: ByteBuffer,
        method: Method
    ) throws(GatewayError) -> Response {
        do {
            return try Response(wirePayload: payload)
        } catch {
            throw GatewayError(
                local: .internalError,
                reason: GatewayError.LocalReason.malformedResponse,
                message: "the response to \(method) is not a valid \(Response.protoMessageName)",
                transmission: .maybeProcessed
            )
        }
    }
}
