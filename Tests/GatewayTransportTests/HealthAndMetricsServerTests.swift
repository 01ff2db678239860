import GatewayTransport
import GatewayWire
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Prometheus
import Testing

/// Sends raw bytes and returns everything the server sends until it closes.
private func rawHTTP(_ request: String, to address: SocketAddress) async throws -> (status: Int, body: String) {
    let received = NIOLockedValueBox(ByteBuffer())
    let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
        .channelInitializer { channel in
            channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandler(ByteCollector(received: received))
            }
        }
        .connect(to: address)
        .get()
    try await channel.writeAndFlush(ByteBuffer(string: request))
    try await channel.closeFuture.get()
    let text = received.withLockedValue { String(buffer: $0) }
    let statusLine = text.split(separator: "\r\n", maxSplits: 1).first ?? ""
    let status = Int(statusLine.split(separator: " ").dropFirst().first ?? "") ?? 0
    let body = text.components(separatedBy: "\r\n\r\n").dropFirst().joined(separator: "\r\n\r\n")
    return (status, body)
}

private final class ByteCollector: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    private let received: NIOLockedValueBox<ByteBuffer>

    init(received: NIOLockedValueBox<ByteBuffer>) { self.received = received }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        received.withLockedValue { _ = $0.writeBuffer(&buffer) }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
}

private func get(_ path: String, _ address: SocketAddress) async throws -> (status: Int, body: String) {
    try await rawHTTP("GET \(path) HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n", to: address)
}

/// Readiness with no checks.
private let noChecks: @Sendable () async -> [HealthAndMetricsServer.ReadinessCheck] = { [] }

private func withHealthServer(
    registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry(),
    limits: HealthAndMetricsServer.Limits = HealthAndMetricsServer.Limits(),
    readiness: @escaping @Sendable () async -> [HealthAndMetricsServer.ReadinessCheck],
    _ body: (SocketAddress) async throws -> Void
) async throws {
    let server = HealthAndMetricsServer(
        host: "127.0.0.1",
        port: 0,
        registry: registry,
        limits: limits,
        logger: testLogger,
        readiness: readiness
    )
    try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { try await server.run() }
        let address = try await server.listeningAddress()
        do {
            try await body(address)
        } catch {
            group.cancelAll()
            throw error
        }
        group.cancelAll()
        try await group.waitForAll()
    }
}

@Suite("Health and metrics endpoint over raw HTTP")
struct HealthAndMetricsServerTests {
    @Test("livez is 200; unknown paths and other methods are 404")
    func livez() async throws {
        try await withHealthServer(readiness: noChecks) { address in
            let live = try await get("/livez", address)
            #expect(live.status == 200)
            #expect(live.body == #"{"status":"live"}"#)
            #expect(try await get("/nope", address).status == 404)
            let post = try await rawHTTP(
                "POST /livez HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                to: address
            )
            #expect(post.status == 404)
        }
    }

    @Test("readyz reports the owner's checks: 200 when all pass, 503 with the failing one otherwise")
    func readyz() async throws {
        let hsmReady = NIOLockedValueBox(true)
        let readiness: @Sendable () async -> [HealthAndMetricsServer.ReadinessCheck] = {
            [
                .init(name: "database", isReady: true),
                .init(name: "hsm", isReady: hsmReady.withLockedValue { $0 }, detail: "token \"a\" absent"),
            ]
        }
        try await withHealthServer(readiness: readiness) { address in
            let ready = try await get("/readyz", address)
            #expect(ready.status == 200)
            #expect(ready.body.hasPrefix(#"{"status":"ready","checks":{"database":{"ready":true}"#))

            hsmReady.withLockedValue { $0 = false }
            let notReady = try await get("/readyz", address)
            #expect(notReady.status == 503)
            #expect(notReady.body.contains(#""hsm":{"ready":false,"detail":"token \"a\" absent"}"#))
            #expect(notReady.body.hasPrefix(#"{"status":"not_ready""#))
        }
    }

    @Test("readyz: checks that take longer than the readiness timeout are reported not ready")
    func readinessTimeout() async throws {
        var limits = HealthAndMetricsServer.Limits()
        limits.readinessTimeout = .milliseconds(100)
        let slow: @Sendable () async -> [HealthAndMetricsServer.ReadinessCheck] = {
            try? await Task.sleep(for: .seconds(10))
            return [.init(name: "slow", isReady: true)]
        }
        try await withHealthServer(limits: limits, readiness: slow) { address in
            let clock = ContinuousClock()
            let start = clock.now
            let response = try await get("/readyz", address)
            #expect(response.status == 503)
            #expect(response.body.contains(#""readiness":{"ready":false,"detail":"timeout"}"#))
            #expect(clock.now - start < .seconds(5))
        }
    }

    @Test("metrics serves the registry, including the transport's request and connection metrics")
    func metrics() async throws {
        let registry = PrometheusCollectorRegistry()
        let server = GatewayTransportServer(
            configuration: ServerConfiguration(listeners: [.tcp(host: "127.0.0.1", port: 0)]),
            handler: TestGatewayHandler(),
            metricsFactory: PrometheusMetricsFactory(registry: registry),
            logger: testLogger
        )
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await server.run() }
            let client = try await TestFrameClient.connect(to: try await server.listeningAddresses()[0])
            try await client.request(9, .listTenants)  // refused: no Hello yet
            _ = try await client.nextFrame()
            try await client.hello()
            try await client.request(10, .listTenants, payload: ByteBuffer(string: "x"))
            _ = try await client.nextFrame()
            #expect(server.openConnections == 1)

            try await withHealthServer(registry: registry, readiness: noChecks) { address in
                let response = try await get("/metrics", address)
                #expect(response.status == 200)
                let text = response.body
                #expect(text.contains(#"hsmgw_requests_total{method="Hello",status="OK"} 1"#), "\(text)")
                #expect(text.contains(#"hsmgw_requests_total{method="ListTenants",status="OK"} 1"#))
                #expect(text.contains(#"hsmgw_requests_total{method="ListTenants",status="UNAUTHENTICATED"} 1"#))
                #expect(text.contains(#"hsmgw_frames_refused_total{reason="HANDSHAKE_REQUIRED"} 1"#))
                #expect(text.contains("hsmgw_connections_open 1"))
                #expect(text.contains(#"hsmgw_request_duration_seconds_count{method="ListTenants"} 1"#))
            }
            await client.close()
            group.cancelAll()
            try await group.waitForAll()
        }
    }

    @Test("oversized headers and bodies are refused, and the server keeps serving")
    func boundedRequests() async throws {
        try await withHealthServer(readiness: noChecks) { address in
            let bigHeader = "X-Padding: " + String(repeating: "a", count: 20_000) + "\r\n"
            let headers = try await rawHTTP(
                "GET /livez HTTP/1.1\r\nHost: t\r\n\(bigHeader)Connection: close\r\n\r\n", to: address)
            #expect(headers.status != 200)
            let body = String(repeating: "b", count: 5000)
            let posted = try await rawHTTP(
                "GET /livez HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n\(body)",
                to: address
            )
            #expect(posted.status == 413)
            #expect(try await get("/livez", address).status == 200)
        }
    }
}
