import Foundation
import GatewayClient
import GatewayServer
import GatewayTransport
import GatewayWire
import KeyHierarchy
import Logging
import NIOCore
import PKCS11
import ProcessTestSupport
import SoftHSMTestSupport

/// One gateway in this process on 127.0.0.1 with a port the system picks, on a fresh SoftHSM2
/// token and a fresh store, with the first admin's token; and clients for it.
final class GatewayHarness: Sendable {
    enum Security: Sendable {
        /// Plaintext on loopback.
        case plaintext
        /// TLS with the test CA's server certificate.
        case tls
        /// TLS, and client certificates verified against the test CA.
        case mutualTLS(ServerConfiguration.TLS.ClientCertificates)
    }

    let app: GatewayServerApp
    let port: Int
    let metricsPort: Int?
    let adminToken: String
    let security: Security
    let directory: String
    let kind: StoreKind
    private let runTask: Task<Void, any Error>

    /// A configuration on a fresh token of the module under test and a fresh store of `kind`, listening on free
    /// loopback ports, with a bootstrap token file in a new private directory.
    static func makeConfiguration(
        _ kind: StoreKind,
        _ name: String,
        security: Security = .tls
    ) async throws -> (GatewayConfiguration, directory: String) {
        let fixture = try SoftHSMFixture.shared()
        let token = try fixture.makeToken(name)
        let directory = try makeTemporaryDirectory(name)
        var configuration = GatewayConfiguration(
            hsm: .init(
                modulePath: SoftHSMFixture.modulePath, tokenLabel: token.label, pin: .file(token.pinFile),
                initializeArguments: token.initializeArguments),
            store: try await kind.makeSettings(name, directory: directory)
        )
        configuration.listen = [.tcp(host: "127.0.0.1", port: 0)]
        configuration.metricsListen = .tcp(host: "127.0.0.1", port: 0)
        configuration.auth.bootstrapTokenFile = directory + "/bootstrap.token"
        configuration.instanceID = "test-\(name)"
        switch security {
        case .plaintext:
            break
        case .tls:
            let pki = try TestCertificates.shared()
            configuration.tls = .init(certificateChainPath: pki.serverCertificate, privateKeyPath: pki.serverKey)
        case .mutualTLS(let mode):
            let pki = try TestCertificates.shared()
            configuration.tls = .init(
                certificateChainPath: pki.serverCertificate,
                privateKeyPath: pki.serverKey,
                clientCAPath: pki.caCertificate,
                clientCertificates: mode
            )
        }
        return (configuration, directory)
    }

    static func start(
        _ kind: StoreKind,
        _ name: String,
        security: Security = .tls,
        module: PKCS11Module? = nil,
        wallClock: @escaping @Sendable () -> Timestamp = { .now() },
        configure: (inout GatewayConfiguration) -> Void = { _ in }
    ) async throws -> GatewayHarness {
        let fixture = try SoftHSMFixture.shared()
        var (configuration, directory) = try await makeConfiguration(kind, name, security: security)
        configure(&configuration)
        var logger = Logger(label: "test.gateway.\(name)")
        logger.logLevel = ProcessInfo.processInfo.environment["HSMGW_TEST_LOG"] == nil ? .critical : .debug
        var launch = GatewayLaunch(configuration: configuration, serverVersion: "test")
        launch.wallClock = wallClock
        let app = try await GatewayServerApp.open(
            launch,
            module: module ?? fixture.module,
            handleSignals: false,
            logger: logger
        )
        guard let adminToken = app.bootstrapAdminToken else {
            throw TestSetupError("the gateway made no admin token on an empty database")
        }
        let runTask = Task { try await app.run() }
        let addresses: [SocketAddress]
        do {
            addresses = try await app.listeningAddresses()
        } catch {
            runTask.cancel()
            _ = try? await runTask.value
            throw error
        }
        let metrics = try await app.metricsAddress()
        return GatewayHarness(
            app: app,
            port: addresses.first?.port ?? 0,
            metricsPort: metrics?.port,
            adminToken: adminToken,
            security: security,
            directory: directory,
            kind: kind,
            runTask: runTask
        )
    }

    private init(
        app: GatewayServerApp,
        port: Int,
        metricsPort: Int?,
        adminToken: String,
        security: Security,
        directory: String,
        kind: StoreKind,
        runTask: Task<Void, any Error>
    ) {
        self.app = app
        self.port = port
        self.metricsPort = metricsPort
        self.adminToken = adminToken
        self.security = security
        self.directory = directory
        self.kind = kind
        self.runTask = runTask
    }

    /// A client configuration for this gateway: TLS trusting the test CA (when the server has
    /// TLS), `token` in Hello, optionally a client certificate.
    func clientConfiguration(
        token: String?,
        certificate: (certificate: String, key: String)? = nil,
        poolSize: Int = 1
    ) throws -> GatewayClientConfiguration {
        let transportSecurity: GatewayClientConfiguration.TransportSecurity
        switch security {
        case .plaintext:
            transportSecurity = .plaintext
        case .tls, .mutualTLS:
            let pki = try TestCertificates.shared()
            transportSecurity = .tls(
                .init(
                    trustRoots: .pemFile(path: pki.caCertificate),
                    serverHostnameOverride: "localhost",
                    clientCertificateChainPath: certificate?.certificate,
                    clientPrivateKeyPath: certificate?.key
                )
            )
        }
        var configuration = GatewayClientConfiguration(
            target: .host("127.0.0.1", port: port),
            transportSecurity: transportSecurity,
            apiToken: token.map { APIToken($0) },
            clientName: "gateway-server-tests",
            poolSize: poolSize,
            defaultDeadline: .seconds(60)
        )
        configuration.retryPolicy = .none
        return configuration
    }

    /// A client; shut it down after use.
    func client(
        token: String?,
        certificate: (certificate: String, key: String)? = nil,
        poolSize: Int = 1
    ) throws -> GatewayClient {
        try GatewayClient(
            configuration: clientConfiguration(token: token, certificate: certificate, poolSize: poolSize))
    }

    /// One connection, for tests that speak to it directly (raw payloads, unknown methods).
    func connection(token: String?) async throws -> GatewayConnection {
        try await GatewayConnection.connect(configuration: clientConfiguration(token: token), logger: quietLogger)
    }

    /// Stops the server gracefully and waits for it.
    func stop() async {
        await app.shutdown()
        _ = try? await runTask.value
    }
}

/// Client logs stay quiet (refused connections are expected here) unless HSMGW_TEST_LOG is set.
let quietLogger: Logger = {
    var logger = Logger(label: "test.client")
    logger.logLevel = ProcessInfo.processInfo.environment["HSMGW_TEST_LOG"] == nil ? .critical : .debug
    return logger
}()

/// Runs `body` against a harness and stops it afterwards, even when `body` throws.
func withGateway<T>(
    _ kind: StoreKind,
    _ name: String,
    security: GatewayHarness.Security = .tls,
    module: PKCS11Module? = nil,
    wallClock: @escaping @Sendable () -> Timestamp = { .now() },
    configure: (inout GatewayConfiguration) -> Void = { _ in },
    _ body: (GatewayHarness) async throws -> T
) async throws -> T {
    let harness = try await GatewayHarness.start(
        kind, name, security: security, module: module, wallClock: wallClock, configure: configure)
    do {
        let result = try await body(harness)
        await harness.stop()
        return result
    } catch {
        await harness.stop()
        throw error
    }
}

extension GatewayClient {
    /// Creates principal `name`, authenticated by a client certificate with subject CN
    /// `commonName`, holding `role` on `tenant`.
    func createCertificatePrincipal(
        _ name: String, commonName: String, tenant: String, role: String = "key-user"
    ) async throws -> Hsmgw_V1_PrincipalResponse {
        var request = Hsmgw_V1_CreatePrincipalRequest()
        request.name = name
        request.certificateCommonName = commonName
        var binding = Hsmgw_V1_RoleBinding()
        binding.tenant = tenant
        binding.role = role
        request.roles = [binding]
        return try await call(method: .createPrincipal, request: request)
    }
}
