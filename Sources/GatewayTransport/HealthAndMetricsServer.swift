import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus
import ServiceLifecycle
import Synchronization

/// Plain HTTP on its own address (default port 7701) for probes and scrapers:
///
/// - `GET /livez`: 200 while the process serves.
/// - `GET /readyz`: 200 when every check of the owner's readiness closure passes, else 503; the
///   body is a short JSON object of the checks.
/// - `GET /metrics`: the Prometheus text exposition of the registry passed in.
/// - Anything else: 404.
///
/// Requests are bounded (headers, body, connections, idle time); a `Service` like the transport.
public final class HealthAndMetricsServer: Service, Sendable {
    /// One readiness check's result.
    public struct ReadinessCheck: Sendable, Hashable {
        /// A short stable name, e.g. `hsm`, `database`, `unsealed`.
        public var name: String
        /// Whether this part is ready.
        public var isReady: Bool
        /// A short safe explanation for the JSON body (no secrets, no SQL, no CK_RV).
        public var detail: String?

        /// A check result.
        public init(name: String, isReady: Bool, detail: String? = nil) {
            self.name = name
            self.isReady = isReady
            self.detail = detail
        }
    }

    /// Bounds on what one client of this endpoint can make the server hold.
    public struct Limits: Sendable, Hashable {
        /// Bytes of request headers: probes and scrapers send a few hundred.
        public var maxHeaderBytes: Int = 8 * 1024
        /// Bytes of request body: no endpoint takes a body.
        public var maxBodyBytes: Int = 1024
        /// Connections at once: probes and scrapers need a handful.
        public var maxConnections: Int = 64
        /// A connection with no request for this long is closed.
        public var idleTimeout: Duration = .seconds(60)
        /// A readiness closure that takes longer is reported not ready (`timeout`).
        public var readinessTimeout: Duration = .seconds(5)

        /// The defaults.
        public init() {}
    }

    private let host: String
    private let port: Int
    private let registry: PrometheusCollectorRegistry
    private let readiness: @Sendable () async -> [ReadinessCheck]
    private let limits: Limits
    private let group: any EventLoopGroup
    private let logger: Logger
    private let listening = OneShotResult<SocketAddress>()
    private let connections = Mutex(0)

    /// A health and metrics server; nothing is bound until ``run()``.
    ///
    /// - Parameters:
    ///   - host: the address to listen on (e.g. `127.0.0.1`, `0.0.0.0`).
    ///   - port: the port (7701 by default in the gateway; 0 picks a free one).
    ///   - registry: the Prometheus registry `/metrics` serves; the global `MetricsSystem` is
    ///     never touched.
    ///   - readiness: the checks `/readyz` reports (HSM, database, seal state...).
    public init(
        host: String,
        port: Int,
        registry: PrometheusCollectorRegistry,
        limits: Limits = Limits(),
        eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        logger: Logger,
        readiness: @escaping @Sendable () async -> [ReadinessCheck]
    ) {
        self.host = host
        self.port = port
        self.registry = registry
        self.limits = limits
        self.group = eventLoopGroup
        self.logger = logger
        self.readiness = readiness
    }

    /// The bound address, once ``run()`` has bound it.
    public func listeningAddress() async throws -> SocketAddress {
        try await listening.get()
    }

    /// Binds and serves until graceful shutdown or cancellation.
    public func run() async throws {
        let channel: any Channel
        do {
            channel = try await ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 64)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture { try self.initialize(channel) }
                }
                .bind(host: host, port: port)
                .get()
        } catch {
            let failure = GatewayTransportError(.bindFailed, "cannot listen on \(host):\(port) for health: \(error)")
            listening.set(.failure(failure))
            throw failure
        }
        if let address = channel.localAddress {
            listening.set(.success(address))
            logger.info("health and metrics listening", metadata: ["address": "\(address)"])
        }
        await withTaskCancellationOrGracefulShutdownHandler {
            try? await channel.closeFuture.get()
        } onCancelOrGracefulShutdown: {
            channel.close(promise: nil)
        }
    }

    private func initialize(_ channel: any Channel) throws {
        let admitted = connections.withLock { count -> Bool in
            guard count < limits.maxConnections else { return false }
            count += 1
            return true
        }
        guard admitted else {
            channel.close(promise: nil)
            return
        }
        channel.closeFuture.whenComplete { _ in self.connections.withLock { $0 -= 1 } }
        var decoderLimits = NIOHTTPDecoderLimitConfiguration()
        decoderLimits.maxHeaderListSize = limits.maxHeaderBytes
        decoderLimits.maxHeaderFieldSize = limits.maxHeaderBytes
        decoderLimits.maxHeaderFieldCount = 64
        let pipeline = channel.pipeline.syncOperations
        try pipeline.configureHTTPServerPipeline(
            withEncoderConfiguration: .init(),
            withDecoderLimitConfiguration: decoderLimits
        )
        try pipeline.addHandler(
            HealthRequestHandler(
                registry: registry,
                readiness: readiness,
                limits: limits
            )
        )
    }
}

/// Serves one HTTP connection, one request at a time (reads pause while a response is pending).
private final class HealthRequestHandler: ChannelDuplexHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    private let registry: PrometheusCollectorRegistry
    private let readiness: @Sendable () async -> ReadinessChecks
    private let limits: HealthAndMetricsServer.Limits
    private var head: HTTPRequestHead?
    /// Whether the request being answered lets the connection stay open.
    private var keepAlive = true
    private var bodyBytes = 0
    private var responding = false
    private var readPending = false
    private var idleTimer: Scheduled<Void>?
    private var context: ChannelHandlerContext?

    init(
        registry: PrometheusCollectorRegistry,
        readiness: @escaping @Sendable () async -> ReadinessChecks,
        limits: HealthAndMetricsServer.Limits
    ) {
        self.registry = registry
        self.readiness = readiness
        self.limits = limits
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        armIdleTimer(context: context)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        idleTimer?.cancel()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            self.head = head
            bodyBytes = 0
            idleTimer?.cancel()
        case .body(let body):
            bodyBytes += body.readableBytes
            if bodyBytes > limits.maxBodyBytes, head != nil {
                head = nil
                keepAlive = false
                respond(context: context, status: .payloadTooLarge, contentType: "text/plain", body: "too large\n")
            }
        case .end:
            guard let head else { return }
            self.head = nil
            keepAlive = head.isKeepAlive
            route(head, context: context)
        }
    }

    func read(context: ChannelHandlerContext) {
        if responding {
            readPending = true
        } else {
            context.read()
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    private func route(_ head: HTTPRequestHead, context: ChannelHandlerContext) {
        let path = head.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? head.uri
        guard head.method == .GET else {
            respond(context: context, status: .notFound, contentType: "text/plain", body: "not found\n")
            return
        }
        switch path {
        case "/livez":
            respond(context: context, status: .ok, contentType: "application/json", body: #"{"status":"live"}"#)
        case "/metrics":
            var buffer = context.channel.allocator.buffer(capacity: 4096)
            buffer.writeBytes(registry.emitToBuffer())
            respond(
                context: context,
                status: .ok,
                contentType: "text/plain; version=0.0.4; charset=utf-8",
                body: buffer
            )
        case "/readyz":
            responding = true
            let eventLoop = context.eventLoop
            let this = NIOLoopBound(self, eventLoop: eventLoop)
            let readiness = self.readiness
            let timeout = limits.readinessTimeout
            Task {
                let checks = await ReadinessBody.runChecks(readiness, timeout: timeout)
                eventLoop.execute {
                    guard let context = this.value.context else { return }
                    let ready = !checks.isEmpty && checks.allSatisfy(\.isReady)
                    this.value.respond(
                        context: context,
                        status: ready ? .ok : .serviceUnavailable,
                        contentType: "application/json",
                        body: ReadinessBody.json(ready: ready, checks: checks)
                    )
                }
            }
        default:
            respond(context: context, status: .notFound, contentType: "text/plain", body: "not found\n")
        }
    }

    private func respond(context: ChannelHandlerContext, status: HTTPResponseStatus, contentType: String, body: String)
    {
        var buffer = context.channel.allocator.buffer(capacity: body.utf8.count)
        buffer.writeString(body)
        respond(context: context, status: status, contentType: contentType, body: buffer)
    }

    private func respond(
        context: ChannelHandlerContext,
        status: HTTPResponseStatus,
        contentType: String,
        body: ByteBuffer
    ) {
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: contentType)
        headers.add(name: "Content-Length", value: "\(body.readableBytes)")
        headers.add(name: "Cache-Control", value: "no-store")
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        let head = HTTPResponseHead(version: .http1_1, status: status, headers: headers)
        context.write(wrapOutboundOut(.head(head)), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
        responding = false
        guard keepAlive else {
            let channel = context.channel
            context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in channel.close(promise: nil) }
            return
        }
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        armIdleTimer(context: context)
        if readPending {
            readPending = false
            context.read()
        }
    }

    private func armIdleTimer(context: ChannelHandlerContext) {
        idleTimer?.cancel()
        let channel = context.channel
        idleTimer = context.eventLoop.scheduleTask(in: TimeAmount(limits.idleTimeout)) { channel.close(promise: nil) }
    }
}

typealias ReadinessChecks = [HealthAndMetricsServer.ReadinessCheck]

/// The `/readyz` body: `{"status":"ready","checks":{"hsm":{"ready":true},...}}`.
enum ReadinessBody {
    /// Runs the owner's checks, reporting a `readiness` check failed when they take too long.
    static func runChecks(
        _ readiness: @escaping @Sendable () async -> ReadinessChecks,
        timeout: Duration
    ) async -> ReadinessChecks {
        await withTaskGroup(of: ReadinessChecks?.self) { group in
            group.addTask { await readiness() }
            group.addTask {
                try? await Task.sleep(for: timeout)
                return nil
            }
            let first = await group.next() ?? nil
            group.cancelAll()
            return first ?? [.init(name: "readiness", isReady: false, detail: "timeout")]
        }
    }

    static func json(ready: Bool, checks: [HealthAndMetricsServer.ReadinessCheck]) -> String {
        var entries: [String] = []
        for check in checks {
            var fields = [#""ready":\#(check.isReady)"#]
            if let detail = check.detail { fields.append(#""detail":\#(quoted(detail))"#) }
            entries.append("\(quoted(check.name)):{\(fields.joined(separator: ","))}")
        }
        return #"{"status":"\#(ready ? "ready" : "not_ready")","checks":{\#(entries.joined(separator: ","))}}"#
    }

    /// A JSON string literal (RFC 8259 escapes).
    static func quoted(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20:
                let hex = String(scalar.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
}
