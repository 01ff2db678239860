import Foundation
import GatewayClient
import GatewayWire
import PostgresTestSupport
import ProcessTestSupport
import SoftHSMTestSupport
import Synchronization

/// Several `hsm-gateway` processes on loopback sharing one PostgreSQL database and one token of
/// the module under test (a SoftHSM2 token directory, or an NSS database, whose library
/// parameters go in `hsm.initialize_args`), as several production instances share one database
/// and one HSM. Each has
/// its own health and metrics port and its own log file under `directory`.
final class GatewayProcessCluster: Sendable {
    /// One running gateway process.
    struct Instance: Sendable {
        let name: String
        let process: SpawnedProcess
        let port: Int
        let metricsPort: Int

        /// A client of this instance with `token`, without retries (a refusal is what tests look
        /// for).
        func client(token: String, poolSize: Int = 1) throws -> GatewayClient {
            var configuration = GatewayClientConfiguration(
                target: .host("127.0.0.1", port: port), transportSecurity: .plaintext, apiToken: APIToken(token),
                poolSize: poolSize)
            configuration.retryPolicy = .none
            return try GatewayClient(configuration: configuration, logger: quietLogger)
        }

        /// The value of `name` (a counter or gauge, with its labels written as on `/metrics`, e.g.
        /// `hsmgw_cache_invalidations_total{kind="tenant"}`); 0 when absent.
        func metric(_ series: String) async throws -> Double {
            let body = try await HTTPProbe.get("127.0.0.1", metricsPort, "/metrics").body
            let line = body.split(separator: "\n").first { $0.hasPrefix(series + " ") }
            return line.flatMap { Double($0.split(separator: " ").last ?? "") } ?? 0
        }
    }

    let directory: String
    let database: String
    let postgres: PostgresTestCluster
    let token: TestToken
    let softHSMConfig: String
    /// The first admin's API token, made by the first instance on the empty database.
    let adminToken: String
    private let running = Mutex<[String: Instance]>([:])
    /// Each instance's gateway port, kept across restarts so clients find it again.
    private let ports = Mutex<[String: Int]>([:])
    /// Starts so far, so that each start has a log file of its own (`<name>-<start>.log`).
    private static let starts = Atomic(0)

    private init(
        directory: String, database: String, postgres: PostgresTestCluster, token: TestToken, softHSMConfig: String,
        adminToken: String
    ) {
        self.directory = directory
        self.database = database
        self.postgres = postgres
        self.token = token
        self.softHSMConfig = softHSMConfig
        self.adminToken = adminToken
    }

    /// A fresh database and token, and gateways named `names` started one after the other (the
    /// first creates the admin on the empty database).
    static func start(_ name: String, instances names: [String], extraSettings: [String] = []) async throws
        -> GatewayProcessCluster
    {
        let postgres = try PostgresTestCluster.shared()
        let fixture = try SoftHSMFixture.shared()
        let token = try fixture.makeToken(name)
        let directory = try makeTemporaryDirectory(name)
        let database = try await postgres.createDatabase(name)
        guard let first = names.first else { throw TestSetupError("no instance to start") }
        let bootstrapFile = directory + "/admin.token"
        let seed = try await launch(
            first, directory: directory, database: database, postgres: postgres, token: token,
            softHSMConfig: fixture.configPath, port: 0,
            extra: extraSettings + ["--bootstrap-token-file", bootstrapFile])
        let adminToken = try String(contentsOfFile: bootstrapFile, encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let cluster = GatewayProcessCluster(
            directory: directory, database: database, postgres: postgres, token: token,
            softHSMConfig: fixture.configPath, adminToken: adminToken)
        cluster.running.withLock { $0[first] = seed }
        cluster.ports.withLock { $0[first] = seed.port }
        for other in names.dropFirst() {
            _ = try await cluster.startInstance(other, extraSettings: extraSettings)
        }
        return cluster
    }

    /// Starts (or starts again) the instance `name`.
    func startInstance(_ name: String, extraSettings: [String] = []) async throws -> Instance {
        let port = ports.withLock { $0[name] } ?? 0
        let instance = try await Self.launch(
            name, directory: directory, database: database, postgres: postgres, token: token,
            softHSMConfig: softHSMConfig, port: port, extra: extraSettings)
        running.withLock { $0[name] = instance }
        ports.withLock { $0[name] = instance.port }
        return instance
    }

    /// The running instance `name`.
    func instance(_ name: String) throws -> Instance {
        guard let instance = running.withLock({ $0[name] }) else { throw TestSetupError("no instance \(name)") }
        return instance
    }

    /// SIGKILL, as a crash: no drain, no lease released.
    func kill(_ name: String) async throws {
        let instance = try instance(name)
        instance.process.send(SIGKILL)
        _ = await instance.process.wait(timeout: .seconds(30))
        running.withLock { _ = $0.removeValue(forKey: name) }
    }

    /// SIGTERM and the exit status (a graceful drain).
    func terminate(_ name: String) async throws -> Int32? {
        let instance = try instance(name)
        instance.process.send(SIGTERM)
        let status = await instance.process.wait(timeout: .seconds(60))
        running.withLock { _ = $0.removeValue(forKey: name) }
        return status
    }

    /// Stops every instance still running (SIGTERM, then SIGKILL after a grace period).
    func stopAll() {
        let instances = running.withLock { running in
            defer { running.removeAll() }
            return Array(running.values)
        }
        for instance in instances { _ = instance.process.stop(grace: .seconds(20)) }
    }

    /// The log of the running instance `name` so far.
    func log(_ name: String) -> String {
        (try? instance(name).process.output()) ?? ""
    }

    private static func launch(
        _ name: String, directory: String, database: String, postgres: PostgresTestCluster, token: TestToken,
        softHSMConfig: String, port requested: Int, extra: [String]
    ) async throws -> Instance {
        let metricsPort = try HSMFaultTests.freeLoopbackPort()
        let arguments =
            [
                "--hsm-module", SoftHSMFixture.modulePath, "--token-label", token.label, "--pin-file", token.pinFile,
                "--store", "postgres", "--set", "store.postgres.port=\(postgres.port)",
                "--set", "store.postgres.user=\(postgres.username)", "--set", "store.postgres.database=\(database)",
                "--set", "store.postgres.password_file=\(postgres.directory)/password",
                "--set", "instance_id=\(name)", "--listen", "127.0.0.1:\(requested)",
                "--metrics-listen", "127.0.0.1:\(metricsPort)",
            ] + (token.initializeArguments.map { ["--set", "hsm.initialize_args=\($0)"] } ?? []) + extra
        let process = try SpawnedProcess(
            PackagePaths.gatewayBinary, arguments, environment: ["SOFTHSM2_CONF": softHSMConfig],
            outputPath: directory + "/\(name)-\(starts.wrappingAdd(1, ordering: .relaxed).newValue).log")
        let port = try await process.servingPort(name: "hsm-gateway \(name)")
        return Instance(name: name, process: process, port: port, metricsPort: metricsPort)
    }
}
