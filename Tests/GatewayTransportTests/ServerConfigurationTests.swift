import NIOCore
import Testing

@testable import GatewayTransport

@Suite("Server limits and configuration: validation")
struct ServerConfigurationTests {
    @Test("the defaults are those of docs/protocol-rules.md, and valid")
    func defaults() throws {
        let limits = ServerLimits()
        #expect(limits.maxFrameBytes == 1_048_576)
        #expect(limits.maxRequestsInFlightPerConnection == 128)
        #expect(limits.maxConnections == 1024)
        #expect(limits.handshakeTimeout == .seconds(10))
        #expect(limits.idleTimeout == .seconds(300))
        #expect(limits.readTimeout == .seconds(30))
        #expect(limits.keepaliveInterval == .seconds(30))
        #expect(limits.keepaliveTimeout == .seconds(10))
        #expect(limits.drainTimeout == .seconds(30))
        #expect(limits.maxQueuedRequestsPerTenant == 256)
        #expect(limits.maxTenantQueueWait == .seconds(5))
        try limits.validate()
    }

    /// One limit set out of its range.
    enum BadLimit: String, CaseIterable, Sendable {
        case frameTooSmall, frameTooLarge, inFlight, connections, handshake, idle, read, keepalive
        case keepaliveTimeout, drain, tenantQueue, tenantWait

        var limitName: String {
            switch self {
            case .frameTooSmall, .frameTooLarge: return "maxFrameBytes"
            case .inFlight: return "maxRequestsInFlightPerConnection"
            case .connections: return "maxConnections"
            case .handshake: return "handshakeTimeout"
            case .idle: return "idleTimeout"
            case .read: return "readTimeout"
            case .keepalive: return "keepaliveInterval"
            case .keepaliveTimeout: return "keepaliveTimeout"
            case .drain: return "drainTimeout"
            case .tenantQueue: return "maxQueuedRequestsPerTenant"
            case .tenantWait: return "maxTenantQueueWait"
            }
        }

        func apply(to limits: inout ServerLimits) {
            switch self {
            case .frameTooSmall: limits.maxFrameBytes = 1023
            case .frameTooLarge: limits.maxFrameBytes = (16 << 20) + 1
            case .inFlight: limits.maxRequestsInFlightPerConnection = 0
            case .connections: limits.maxConnections = 0
            case .handshake: limits.handshakeTimeout = .zero
            case .idle: limits.idleTimeout = .seconds(100_000)
            case .read: limits.readTimeout = .milliseconds(1)
            case .keepalive: limits.keepaliveInterval = .seconds(-1)
            case .keepaliveTimeout: limits.keepaliveTimeout = .zero
            case .drain: limits.drainTimeout = .seconds(-1)
            case .tenantQueue: limits.maxQueuedRequestsPerTenant = 0
            case .tenantWait: limits.maxTenantQueueWait = .zero
            }
        }
    }

    @Test("a limit out of range is refused with its name", arguments: BadLimit.allCases)
    func outOfRange(bad: BadLimit) {
        var limits = ServerLimits()
        bad.apply(to: &limits)
        let error = #expect(throws: GatewayTransportError.self) { try limits.validate() }
        #expect(error?.code == .limitOutOfRange)
        #expect(error?.message.hasPrefix(bad.limitName + " is ") == true, "\(error?.message ?? "")")
    }

    @Test("loopback detection trusts only loopback literals and localhost")
    func loopback() {
        for host in ["127.0.0.1", "127.9.8.7", "::1", "[::1]", "localhost", "::ffff:127.0.0.1"] {
            #expect(ServerConfiguration.isLoopback(host: host), "\(host)")
        }
        for host in ["0.0.0.0", "::", "10.1.2.3", "192.168.0.1", "example.com", "localhost.example.com", "::2"] {
            #expect(!ServerConfiguration.isLoopback(host: host), "\(host)")
        }
    }

    @Test("plaintext TCP on a non-loopback address is refused unless allowPlaintext; TLS or a Unix socket is fine")
    func plaintextRule() throws {
        let open = ServerConfiguration(listeners: [.tcp(host: "0.0.0.0", port: 7700)])
        let error = #expect(throws: GatewayTransportError.self) { try open.validate() }
        #expect(error?.code == .plaintextNotAllowed)
        #expect(error?.message.contains("0.0.0.0:7700") == true)

        try ServerConfiguration(listeners: [.tcp(host: "0.0.0.0", port: 7700)], allowPlaintext: true).validate()
        try ServerConfiguration(listeners: [.tcp(host: "::1", port: 7700), .unixDomainSocket(path: "/tmp/g.sock")])
            .validate()
        try ServerConfiguration(
            listeners: [.tcp(host: "0.0.0.0", port: 7700)],
            tls: .init(certificateChainPath: "/c.pem", privateKeyPath: "/k.pem")
        ).validate()
    }

    @Test("listeners and TLS settings that cannot work are refused with precise errors")
    func otherErrors() {
        let cases: [(ServerConfiguration, GatewayTransportError.Code)] = [
            (ServerConfiguration(listeners: []), .noListener),
            (ServerConfiguration(listeners: [.tcp(host: "127.0.0.1", port: 70_000)]), .invalidListener),
            (ServerConfiguration(listeners: [.tcp(host: "", port: 1)]), .invalidListener),
            (
                ServerConfiguration(listeners: [.unixDomainSocket(path: "/" + String(repeating: "x", count: 200))]),
                .invalidListener
            ),
            (
                ServerConfiguration(
                    listeners: [.tcp(host: "127.0.0.1", port: 1)],
                    tls: .init(certificateChainPath: "/c", privateKeyPath: "/k", clientCertificates: .required)
                ),
                .tlsConfigurationInvalid
            ),
            (
                ServerConfiguration(
                    listeners: [.tcp(host: "127.0.0.1", port: 1)],
                    tls: .init(certificateChainPath: "/c", privateKeyPath: "/k", clientCAPath: "/ca")
                ),
                .tlsConfigurationInvalid
            ),
        ]
        for (configuration, code) in cases {
            let error = #expect(throws: GatewayTransportError.self) { try configuration.validate() }
            #expect(error?.code == code, "\(configuration.listeners)")
        }
    }

    @Test("run() refuses plaintext on 0.0.0.0 at start, and listeningAddresses() reports it")
    func runRefusesPlaintext() async throws {
        let server = GatewayTransportServer(
            configuration: ServerConfiguration(listeners: [.tcp(host: "0.0.0.0", port: 0)]),
            handler: TestGatewayHandler(),
            logger: testLogger
        )
        let error = await #expect(throws: GatewayTransportError.self) { try await server.run() }
        #expect(error?.code == .plaintextNotAllowed)
        await #expect(throws: GatewayTransportError.self) { _ = try await server.listeningAddresses() }
    }

    @Test("run() names the TLS file it cannot load")
    func runReportsTLSFile() async throws {
        let server = GatewayTransportServer(
            configuration: ServerConfiguration(
                listeners: [.tcp(host: "127.0.0.1", port: 0)],
                tls: .init(certificateChainPath: "/nonexistent/server.pem", privateKeyPath: "/nonexistent/server.key")
            ),
            handler: TestGatewayHandler(),
            logger: testLogger
        )
        let error = await #expect(throws: GatewayTransportError.self) { try await server.run() }
        #expect(error?.code == .tlsConfigurationInvalid)
        #expect(error?.message.contains("/nonexistent/server.pem") == true)
    }

    @Test("allowPlaintext lets a plaintext listener bind a non-loopback address")
    func allowPlaintextBinds() async throws {
        try await withTestServer(listeners: [.tcp(host: "0.0.0.0", port: 0)], allowPlaintext: true) { address, _ in
            let loopback = try SocketAddress(ipAddress: "127.0.0.1", port: address.port!)
            let client = try await TestFrameClient.connect(to: loopback)
            #expect(try await client.hello().statusCode == .ok)
            await client.close()
        }
    }
}
