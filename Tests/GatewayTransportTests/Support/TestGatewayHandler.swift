import Foundation
import GatewayTransport
import GatewayWire
import Logging
import NIOConcurrencyHelpers
import NIOCore
import Prometheus

/// A test double for the gateway's logic. Hello accepts `goodToken` (or, with no token, a
/// verified client certificate, whose CN becomes the principal) and refuses anything else.
/// Requests carry a text command as payload, echoed back in the OK response:
///
/// - `sleep:<ms>|<tag>`: sleeps, then answers; a cancellation during the sleep is recorded.
/// - `wait|<tag>`: runs until cancelled, and records the cancellation.
/// - anything else: answered at once.
///
/// Unknown method numbers are answered UNIMPLEMENTED, as the real handler does.
///
/// A Hello whose token is `slow:<ms>` takes that long, ignoring cancellation (as a credential
/// check waiting on the store may), then is refused.
final class TestGatewayHandler: GatewayRequestHandler {
    static let goodToken = "good-token"

    struct Log {
        var helloConnections: [ConnectionInfo] = []
        /// Hello calls running now, and the most that ever ran at once.
        var hellosRunning = 0
        var maximumHellosRunning = 0
        var handled: [(method: UInt16, requestID: UInt32)] = []
        var running: Set<UInt32> = []
        var cancelled: Set<UInt32> = []
    }

    let log = NIOLockedValueBox(Log())

    func hello(_ request: IncomingRequest) async -> HelloOutcome {
        log.withLockedValue { $0.helloConnections.append(request.connection) }
        let hello = (try? Hsmgw_V1_HelloRequest(wirePayload: request.payload)) ?? Hsmgw_V1_HelloRequest()
        log.withLockedValue {
            $0.hellosRunning += 1
            $0.maximumHellosRunning = max($0.maximumHellosRunning, $0.hellosRunning)
        }
        defer { log.withLockedValue { $0.hellosRunning -= 1 } }
        if hello.apiToken.hasPrefix("slow:"), let milliseconds = Int(hello.apiToken.dropFirst(5)) {
            let end = ContinuousClock.now + .milliseconds(milliseconds)
            while ContinuousClock.now < end { try? await Task.sleep(until: end) }
            return .refused(Self.failure(.unauthenticated, "unknown API token"))
        }
        let principal: String
        if hello.apiToken == Self.goodToken {
            principal = "token-user"
        } else if hello.apiToken.isEmpty, let commonName = request.connection.clientCertificateCommonName {
            principal = commonName
        } else {
            return .refused(Self.failure(.unauthenticated, "unknown API token"))
        }
        var response = Hsmgw_V1_HelloResponse()
        response.principal = principal
        return .accepted(
            AuthenticatedPeer(principal: principal, apiTokenID: nil, clientName: hello.clientName),
            response: OutgoingResponse(status: .ok, payload: response.wirePayload())
        )
    }

    func handle(_ request: IncomingRequest, peer: AuthenticatedPeer) async -> OutgoingResponse {
        log.withLockedValue { $0.handled.append((request.method.rawValue, request.requestID)) }
        guard request.method.name != nil else {
            return Self.failure(.unimplemented, "method \(request.method.rawValue) is not implemented")
        }
        let command = String(buffer: request.payload)
        if command.hasPrefix("sleep:") {
            let milliseconds = Int(command.dropFirst(6).prefix { $0.isNumber }) ?? 0
            do {
                try await Task.sleep(for: .milliseconds(milliseconds))
            } catch {
                log.withLockedValue { _ = $0.cancelled.insert(request.requestID) }
                return Self.failure(.cancelled, "cancelled")
            }
        } else if command.hasPrefix("wait") {
            log.withLockedValue { _ = $0.running.insert(request.requestID) }
            while !Task.isCancelled { try? await Task.sleep(for: .milliseconds(5)) }
            log.withLockedValue { _ = $0.cancelled.insert(request.requestID) }
            return Self.failure(.cancelled, "cancelled")
        }
        return OutgoingResponse(status: .ok, payload: ByteBuffer(string: command))
    }

    static func failure(_ code: StatusCode, _ message: String) -> OutgoingResponse {
        OutgoingResponse(status: code, payload: Hsmgw_V1_Status(code, message).wirePayload())
    }

    /// Waits until `condition` holds on the log.
    func waitUntil(timeout: Duration = .seconds(10), _ condition: (Log) -> Bool) async throws {
        let clock = ContinuousClock()
        let end = clock.now + timeout
        while !log.withLockedValue({ condition($0) }) {
            guard clock.now < end else { throw TestFrameClient.TimedOut(waitingFor: "the handler's log") }
            try await Task.sleep(for: .milliseconds(5))
        }
    }
}

/// A logger that prints only when `TRANSPORT_TEST_LOGS` is set.
let testLogger: Logger = {
    if ProcessInfo.processInfo.environment["TRANSPORT_TEST_LOGS"] != nil {
        var logger = Logger(label: "transport-tests", factory: { StreamLogHandler.standardError(label: $0) })
        logger.logLevel = .trace
        return logger
    }
    return Logger(label: "transport-tests", factory: { _ in SwiftLogNoOpLogHandler() })
}()

/// Runs a transport server (by default plaintext on loopback port 0) for the duration of `body`,
/// then cancels it. Its metrics go to `metrics` when given.
func withTestServer(
    limits: ServerLimits = ServerLimits(),
    listeners: [ServerConfiguration.Listener] = [.tcp(host: "127.0.0.1", port: 0)],
    tls: ServerConfiguration.TLS? = nil,
    allowPlaintext: Bool = false,
    handler: TestGatewayHandler = TestGatewayHandler(),
    metrics: PrometheusCollectorRegistry? = nil,
    _ body: (SocketAddress, TestGatewayHandler) async throws -> Void
) async throws {
    let configuration = ServerConfiguration(
        listeners: listeners,
        tls: tls,
        allowPlaintext: allowPlaintext,
        limits: limits
    )
    let server =
        if let metrics {
            GatewayTransportServer(
                configuration: configuration, handler: handler,
                metricsFactory: PrometheusMetricsFactory(registry: metrics), logger: testLogger)
        } else {
            GatewayTransportServer(configuration: configuration, handler: handler, logger: testLogger)
        }
    try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { try await server.run() }
        let address = try await server.listeningAddresses()[0]
        do {
            try await body(address, handler)
        } catch {
            group.cancelAll()
            throw error
        }
        group.cancelAll()
        try await group.waitForAll()
    }
}
