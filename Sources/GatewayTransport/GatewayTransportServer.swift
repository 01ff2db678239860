import GatewayWire
import Logging
import Metrics
import NIOCore
import NIOPosix
import NIOSSL
import ServiceLifecycle
import Synchronization

/// The gateway's listeners: accepts connections on every configured address, runs the protocol
/// on each (``GatewayRequestHandler`` gets the requests), and shuts down gracefully.
///
/// As a ServiceLifecycle `Service`, ``run()`` binds, serves until graceful shutdown, then stops
/// accepting, sends a goaway (UNAVAILABLE, `SHUTTING_DOWN`) on every connection, lets the requests
/// already received finish within the drain timeout, answers the rest UNAVAILABLE, closes every
/// connection, and returns. Cancelling `run()` closes everything at once.
public final class GatewayTransportServer: Service, Sendable {
    private enum Phase {
        case created
        case starting
        case serving
        case stopping
        case stopped
    }

    private struct State {
        var phase: Phase = .created
        var serverChannels: [any Channel] = []
        var connections: [UInt64: any Channel] = [:]
        /// Connections served per source address (Unix socket peers are not counted).
        var connectionsPerAddress: [SourceAddressGroup: Int] = [:]
        var nextConnectionID: UInt64 = 1
        /// Completed when every listener and connection has closed after `stop`.
        var stopped: EventLoopPromise<Void>?
    }

    private enum Admission {
        case admitted(UInt64)
        case refused(Hsmgw_V1_Status, reason: String)
    }

    private let configuration: ServerConfiguration
    private let handler: any GatewayRequestHandler
    private let group: any EventLoopGroup
    private let logger: Logger
    private let metrics: TransportMetrics
    private let state = Mutex(State())
    private let listening = OneShotResult<[SocketAddress]>()

    /// A server; nothing is bound until ``run()``.
    ///
    /// - Parameters:
    ///   - configuration: listeners, TLS and limits; checked when `run()` starts.
    ///   - handler: the gateway's logic.
    ///   - eventLoopGroup: where connections run; the process-wide NIO group by default.
    ///   - metricsFactory: where the transport's metrics go (e.g. a `PrometheusMetricsFactory`
    ///     over the registry that `HealthAndMetricsServer` serves); nothing is recorded by default.
    ///   - logger: connection and request events, with `connection_id` and `request_id` metadata;
    ///     never payload bytes.
    public init(
        configuration: ServerConfiguration,
        handler: any GatewayRequestHandler,
        eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        metricsFactory: any MetricsFactory = NOOPMetricsHandler.instance,
        logger: Logger
    ) {
        self.configuration = configuration
        self.handler = handler
        self.group = eventLoopGroup
        self.logger = logger
        self.metrics = TransportMetrics(factory: metricsFactory)
    }

    /// The addresses the server listens on, once ``run()`` has bound them (a TCP port configured
    /// as 0 shows the port chosen). Throws the error `run()` fails with before listening.
    public func listeningAddresses() async throws -> [SocketAddress] {
        try await listening.get()
    }

    /// Connections served now (those refused over a limit are not counted).
    public var openConnections: Int { state.withLock { $0.connections.count } }

    /// Binds every listener, serves until graceful shutdown (or cancellation), drains and returns.
    /// Throws ``GatewayTransportError`` when the configuration is refused or a bind fails.
    public func run() async throws {
        let isFirstRun = state.withLock { state -> Bool in
            guard state.phase == .created else { return false }
            state.phase = .starting
            return true
        }
        guard isFirstRun else {
            throw GatewayTransportError(.alreadyRunning, "this server has already been started")
        }
        let tlsContext: NIOSSLContext?
        do {
            try configuration.validate()
            tlsContext = try configuration.makeTLSContext()
        } catch {
            state.withLock { $0.phase = .stopped }
            listening.set(.failure(error))
            throw error
        }

        var channels: [any Channel] = []
        do {
            for listener in configuration.listeners {
                channels.append(try await bind(listener, tlsContext: tlsContext))
            }
        } catch {
            for channel in channels { try? await channel.close() }
            state.withLock { $0.phase = .stopped }
            listening.set(.failure(error))
            throw error
        }
        let addresses = channels.compactMap(\.localAddress)
        let stopped = group.any().makePromise(of: Void.self)
        state.withLock {
            $0.serverChannels = channels
            $0.stopped = stopped
            $0.phase = .serving
        }
        logger.info(
            "gateway transport listening",
            metadata: [
                "addresses": "\(addresses.map { Self.describe($0) })",
                "tls": "\(tlsContext != nil)",
            ]
        )
        listening.set(.success(addresses))

        await withTaskCancellationHandler {
            await withGracefulShutdownHandler {
                try? await stopped.futureResult.get()
            } onGracefulShutdown: {
                self.stop(graceful: true)
            }
        } onCancel: {
            self.stop(graceful: false)
        }
        state.withLock { $0.phase = .stopped }
        logger.info("gateway transport stopped")
    }

    // MARK: Listeners

    private func bind(_ listener: ServerConfiguration.Listener, tlsContext: NIOSSLContext?) async throws -> any Channel
    {
        var bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.allowRemoteHalfClosure, value: true)
        let isTCP: Bool
        if case .tcp = listener.address { isTCP = true } else { isTCP = false }
        if isTCP { bootstrap = bootstrap.childChannelOption(.socketOption(.tcp_nodelay), value: 1) }
        let tls = isTCP ? tlsContext : nil
        bootstrap = bootstrap.childChannelInitializer { channel in
            channel.eventLoop.makeCompletedFuture {
                try self.initializeConnection(channel, tlsContext: tls)
            }
        }
        do {
            switch listener.address {
            case .tcp(let host, let port):
                return try await bootstrap.bind(host: host, port: port).get()
            case .unixDomainSocket(let path):
                return try await bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).get()
            }
        } catch {
            throw GatewayTransportError(.bindFailed, "cannot listen on \(listener): \(error)")
        }
    }

    /// Runs on the new channel's event loop, before it is active.
    private func initializeConnection(_ channel: any Channel, tlsContext: NIOSSLContext?) throws {
        let limits = configuration.limits
        let group = channel.remoteAddress.map { SourceAddressGroup($0) }
        let countedGroup = group.flatMap { $0.isUnixDomainSocket ? nil : $0 }
        let admission = state.withLock { state -> Admission in
            guard state.phase == .serving else {
                return .refused(
                    Hsmgw_V1_Status(.unavailable, "the server is shutting down", reason: StatusReason.shuttingDown),
                    reason: StatusReason.shuttingDown
                )
            }
            guard state.connections.count < limits.maxConnections else {
                return .refused(
                    Hsmgw_V1_Status(
                        .resourceExhausted,
                        "the server already serves its maximum of \(limits.maxConnections) connections",
                        reason: TransportStatusReason.tooManyConnections
                    ),
                    reason: TransportStatusReason.tooManyConnections
                )
            }
            if let countedGroup {
                guard state.connectionsPerAddress[countedGroup, default: 0] < limits.maxConnectionsPerAddress else {
                    return .refused(
                        Hsmgw_V1_Status(
                            .resourceExhausted,
                            "the server already serves its maximum of \(limits.maxConnectionsPerAddress) connections "
                                + "from this address",
                            reason: TransportStatusReason.tooManyConnectionsFromAddress
                        ),
                        reason: TransportStatusReason.tooManyConnectionsFromAddress
                    )
                }
                state.connectionsPerAddress[countedGroup, default: 0] += 1
            }
            let id = state.nextConnectionID
            state.nextConnectionID += 1
            state.connections[id] = channel
            return .admitted(id)
        }

        if case .admitted(let id) = admission {
            // Registered before anything below can throw, so a slot is never leaked.
            channel.closeFuture.whenComplete { _ in
                self.state.withLock { state in
                    state.connections.removeValue(forKey: id)
                    if let countedGroup {
                        let remaining = state.connectionsPerAddress[countedGroup, default: 1] - 1
                        state.connectionsPerAddress[countedGroup] = remaining > 0 ? remaining : nil
                    }
                }
            }
        }
        let pipeline = channel.pipeline.syncOperations
        let asksForClientCertificate =
            tlsContext != nil
            && configuration.tls?.clientCertificates != ServerConfiguration.TLS.ClientCertificates.none
        if let tlsContext {
            if asksForClientCertificate {
                // Runs once BoringSSL has verified the chain (and only when the client presented a
                // certificate), before the handshake is reported complete or any data is read: a
                // refusal fails the handshake and closes the connection.
                try pipeline.addHandler(
                    NIOSSLServerHandler._makeSSLServerHandler(
                        context: tlsContext,
                        additionalPeerCertificateVerificationCallback: Self.checkClientCertificate
                    )
                )
            } else {
                try pipeline.addHandler(NIOSSLServerHandler(context: tlsContext))
            }
        }
        try pipeline.addHandler(MessageToByteHandler(FrameEncoder(limits: limits.frameLimits)))
        switch admission {
        case .admitted(let id):
            let info = ConnectionInfo(
                id: id,
                remoteAddress: channel.remoteAddress.map { Self.describe($0) } ?? "unknown",
                isTLS: tlsContext != nil
            )
            try pipeline.addHandler(
                GatewayConnectionHandler(
                    connection: info,
                    limits: limits,
                    requestHandler: handler,
                    asksForClientCertificate: asksForClientCertificate,
                    metrics: metrics,
                    logger: logger
                )
            )
        case .refused(let status, let reason):
            metrics.frameRefused(reason: reason)
            logger.notice(
                "connection refused",
                metadata: [
                    "remote_address": "\(channel.remoteAddress.map { Self.describe($0) } ?? "unknown")",
                    "address_group": "\(group.map(\.description) ?? "unknown")",
                    "reason": "\(reason)",
                ]
            )
            try pipeline.addHandler(
                RefusedConnectionHandler(goaway: status, closeAfter: TimeAmount(limits.handshakeTimeout)))
        }
    }

    /// Refuses a verified client certificate without the `clientAuth` extended key usage
    /// (``ClientCertificateRefusal``). NIOSSL fires the error down the pipeline, where
    /// ``GatewayConnectionHandler`` logs and counts it, and closes the connection.
    private static func checkClientCertificate(_ certificate: NIOSSLCertificate, channel: any Channel)
        -> EventLoopFuture<Void>
    {
        let der = (try? certificate.toDERBytes()) ?? []
        if let refusal = ClientCertificateRefusal.check(certificateDER: der) {
            return channel.eventLoop.makeFailedFuture(refusal)
        }
        return channel.eventLoop.makeSucceededVoidFuture()
    }

    // MARK: Shutdown

    private func stop(graceful: Bool) {
        let (servers, connections, stopped) = state.withLock { state in
            let stopped = state.stopped
            state.stopped = nil  // only the first call waits for the close
            state.phase = .stopping
            return (state.serverChannels, Array(state.connections.values), stopped)
        }
        if let stopped {
            logger.info(
                graceful ? "gateway transport draining" : "gateway transport closing",
                metadata: ["connections": "\(connections.count)"]
            )
            for server in servers { server.close(promise: nil) }
            let futures = servers.map(\.closeFuture) + connections.map(\.closeFuture)
            EventLoopFuture.andAllComplete(futures, on: stopped.futureResult.eventLoop).whenComplete { _ in
                stopped.succeed()
            }
        }
        for connection in connections {
            if graceful {
                connection.pipeline.fireUserInboundEventTriggered(DrainConnectionEvent())
            } else {
                connection.close(promise: nil)
            }
        }
    }

    static func describe(_ address: SocketAddress) -> String {
        switch address {
        case .v4(let v4): return "\(address.ipAddress ?? "\(v4)"):\(address.port ?? 0)"
        case .v6: return "[\(address.ipAddress ?? "?")]:\(address.port ?? 0)"
        case .unixDomainSocket: return "unix"
        }
    }
}

/// A connection over a limit (or during shutdown): one goaway, then close.
private final class RefusedConnectionHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = Frame

    private let goaway: Hsmgw_V1_Status
    /// Bounds the wait for a TLS handshake that may never complete.
    private let closeAfter: TimeAmount
    private var sent = false

    init(goaway: Hsmgw_V1_Status, closeAfter: TimeAmount) {
        self.goaway = goaway
        self.closeAfter = closeAfter
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { sendGoaway(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        sendGoaway(context: context)
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}  // not served

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    private func sendGoaway(context: ChannelHandlerContext) {
        guard !sent else { return }
        sent = true
        let channel = context.channel
        let timeout = context.eventLoop.scheduleTask(in: closeAfter) { channel.close(promise: nil) }
        let frame = Frame.goaway(goaway)
        context.writeAndFlush(wrapOutboundOut(frame)).whenComplete { _ in
            timeout.cancel()
            channel.close(promise: nil)
        }
    }
}
