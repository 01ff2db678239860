import ArgumentParser
import Foundation
import GatewayClient
import GatewayConfig
import GatewayServer
import Logging

/// What a benchmark's gateway runs on (`wire`, `flood`).
struct BenchGatewayOptions: ParsableArguments {
    @Option(help: "PKCS#11 module.")
    var module = "/usr/lib/softhsm/libsofthsm2.so"

    @Option(help: "Store: sqlite or postgres.")
    var store: KeysBenchmark.Store = .sqlite

    @Option(help: "HSM sessions in the pool (1 to 64).")
    var sessions = 4

    @Option(help: "The throwaway-cluster script (for --store postgres).")
    var postgresScript = "scripts/throwaway-postgres.sh"

    @Flag(help: "Plaintext on loopback instead of TLS.")
    var plaintext = false

    /// The first words of a benchmark's heading.
    var summary: String {
        "store: \(store.rawValue)   \(plaintext ? "plaintext" : "TLS")   HSM sessions: \(sessions)"
    }

    func validate() throws {
        guard (1...64).contains(sessions) else { throw ValidationError("--sessions must be from 1 to 64") }
    }
}

/// A gateway run in this process for a benchmark: one `GatewayServerApp` on 127.0.0.1 (port
/// chosen by the system) on a throwaway SoftHSM2 token and a throwaway store (a SQLite file, or a
/// PostgreSQL cluster made by the project's script), TLS on unless asked otherwise. `stop()`
/// removes all of it.
final class BenchGateway: Sendable {
    let app: GatewayServerApp
    let adminToken: String
    let port: Int
    let trust: GatewayClientConfiguration.TransportSecurity
    /// The CA certificate that signed the gateway's (nil: plaintext).
    let caCertificatePath: String?
    /// The throwaway directory (the token, the store, the certificates).
    let directory: String
    /// The gateway's token, for measurements beside it on the same token (`compare`).
    let token: ThrowawayToken
    private let server: Task<Void, any Error>
    private let cleanup: @Sendable () -> Void

    private init(
        app: GatewayServerApp, adminToken: String, port: Int, trust: GatewayClientConfiguration.TransportSecurity,
        caCertificatePath: String?, directory: String, token: ThrowawayToken, server: Task<Void, any Error>,
        cleanup: @escaping @Sendable () -> Void
    ) {
        self.caCertificatePath = caCertificatePath
        self.directory = directory
        self.token = token
        self.app = app
        self.adminToken = adminToken
        self.port = port
        self.trust = trust
        self.server = server
        self.cleanup = cleanup
    }

    static func start(
        _ options: BenchGatewayOptions, label: String, adjust: (inout GatewayConfiguration) -> Void = { _ in }
    ) async throws -> BenchGateway {
        let (module, store, sessions, plaintext, postgresScript) = (
            options.module, options.store, options.sessions, options.plaintext, options.postgresScript
        )
        var logger = Logger(label: "hsm-bench")
        logger.logLevel = .error
        let throwaway = try ThrowawayToken(module: module, label: label)
        var cleanups: [@Sendable () -> Void] = [{ throwaway.remove() }]
        do {
            let directory = throwaway.directory.path
            let pinFile = directory + "/user.pin"
            try "bench-user-pin".write(toFile: pinFile, atomically: true, encoding: .utf8)
            chmod(pinFile, 0o600)

            let storeSettings: StoreSettings
            switch store {
            case .sqlite:
                storeSettings = .sqlite(path: directory + "/keys.sqlite")
            case .postgres:
                let cluster = directory + "/pg"
                let output = try KeysBenchmark.shell([postgresScript, "start", cluster, "--watch-pid", "\(getpid())"])
                let script = postgresScript
                cleanups.append({ _ = try? KeysBenchmark.shell([script, "stop", cluster]) })
                guard
                    let port = output.split(separator: "\n").first(where: { $0.hasPrefix("port=") }).flatMap({
                        Int($0.dropFirst("port=".count))
                    })
                else { throw ValidationError("the cluster script printed no port: \(output)") }
                storeSettings = .postgres(
                    PostgresSettings(
                        port: port, user: "hsmgw", database: "postgres", passwordFile: cluster + "/password",
                        maximumConnections: 8
                    )
                )
            }

            var hsm = HSMSettings(modulePath: module, tokenLabel: throwaway.label, pin: .file(pinFile))
            hsm.maximumSessions = sessions
            hsm.initializeArguments = throwaway.initializeArguments
            var configuration = GatewayConfiguration(hsm: hsm, store: storeSettings)
            configuration.listen = [.tcp(host: "127.0.0.1", port: 0)]
            configuration.metricsListen = nil
            configuration.auth.bootstrapTokenFile = directory + "/admin.token"
            var trust: GatewayClientConfiguration.TransportSecurity = .plaintext
            var caCertificatePath: String?
            if !plaintext {
                let pki = try BenchCertificates(directory: directory + "/pki")
                configuration.tls = .init(certificateChainPath: pki.serverCertificate, privateKeyPath: pki.serverKey)
                trust = .tls(.init(trustRoots: .pemFile(path: pki.caCertificate), serverHostnameOverride: "localhost"))
                caCertificatePath = pki.caCertificate
            }
            adjust(&configuration)
            let app = try await GatewayServerApp.open(
                GatewayLaunch(configuration: configuration, serverVersion: "bench"),
                module: throwaway.module,
                handleSignals: false,
                logger: logger
            )
            guard let adminToken = app.bootstrapAdminToken else { throw ValidationError("no admin token was made") }
            let server = Task { try await app.run() }
            let port = try await app.listeningAddresses().first?.port ?? 0
            return BenchGateway(
                app: app, adminToken: adminToken, port: port, trust: trust, caCertificatePath: caCertificatePath,
                directory: directory, token: throwaway, server: server,
                cleanup: { [cleanups] in for step in cleanups.reversed() { step() } })
        } catch {
            for step in cleanups.reversed() { step() }
            throw error
        }
    }

    /// A client of this gateway with the admin token.
    func client(
        connections: Int, retryPolicy: RetryPolicy = .default, name: String = "hsm-bench"
    ) throws -> GatewayClient {
        var configuration = GatewayClientConfiguration(
            target: .host("127.0.0.1", port: port),
            transportSecurity: trust,
            apiToken: APIToken(adminToken),
            clientName: name,
            poolSize: connections,
            defaultDeadline: .seconds(60)
        )
        configuration.retryPolicy = retryPolicy
        return try GatewayClient(configuration: configuration)
    }

    /// Drains and stops the gateway.
    func shutdown() async {
        await app.shutdown()
        _ = try? await server.value
    }

    /// Removes the token, the store and the cluster (after `shutdown`, or on an error path).
    func stop() {
        server.cancel()
        cleanup()
    }
}
