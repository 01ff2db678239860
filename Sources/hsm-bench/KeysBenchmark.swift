import ArgumentParser
import Foundation
import KeyHierarchy
import Logging
import PKCS11
import PKCS11KeyToken
import PostgresKeyStore
import SQLiteKeyStore
import Synchronization

/// GenerateDataKey and DecryptDataKey through the key service, in-process, on a throwaway
/// SoftHSM2 token and a throwaway store: a SQLite file, or a PostgreSQL cluster started with
/// `scripts/throwaway-postgres.sh` (and stopped afterwards).
struct KeysBenchmark: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "keys",
        abstract: "GenerateDataKey / DecryptDataKey ops/s through the key service, in-process."
    )

    enum Store: String, ExpressibleByArgument, CaseIterable {
        case sqlite, postgres
    }

    @Option(help: "PKCS#11 module.")
    var module = "/usr/lib/softhsm/libsofthsm2.so"

    @Option(help: "Store: sqlite or postgres.")
    var store: Store = .sqlite

    @Option(help: "Seconds per measurement (1 to 600).")
    var seconds: Double = 5

    @Option(help: "Concurrent tasks (1 to 1024).")
    var tasks = 16

    @Option(help: "HSM sessions in the pool (1 to 64).")
    var sessions = 4

    @Option(help: "PostgreSQL connections in the pool (1 to 256).")
    var connections = 8

    @Option(help: "The throwaway-cluster script (for --store postgres).")
    var postgresScript = "scripts/throwaway-postgres.sh"

    func validate() throws {
        guard (1...600).contains(seconds) else { throw ValidationError("--seconds must be from 1 to 600") }
        guard (1...1024).contains(tasks) else { throw ValidationError("--tasks must be from 1 to 1024") }
        guard (1...64).contains(sessions) else { throw ValidationError("--sessions must be from 1 to 64") }
        guard (1...256).contains(connections) else { throw ValidationError("--connections must be from 1 to 256") }
    }

    func run() async throws {
        var logger = Logger(label: "hsm-bench")
        logger.logLevel = .warning
        let throwaway = try ThrowawayToken(module: module, label: "hsm-bench-keys")
        defer { throwaway.remove() }
        var poolConfiguration = SessionPoolConfiguration()
        poolConfiguration.maximumSessions = sessions
        let pool = try await SessionPool(
            module: throwaway.module,
            tokenLabel: throwaway.label,
            pin: throwaway.pin,
            configuration: poolConfiguration,
            logger: logger
        )
        let (repository, cleanup) = try await openStore(logger: logger)
        let service = try KeyService(token: PKCS11KeyToken(pool: pool), repository: repository, logger: logger)
        let tenant = try TenantID("bench")
        let request = RequestContext(principal: Principal("bench"))
        _ = try await service.createTenant(tenant, request: request)
        let context: EncryptionContext = ["service": "bench"]
        let duration = Duration.milliseconds(Int(seconds * 1000))
        print(
            "store: \(store.rawValue)   tasks: \(tasks)   HSM sessions: \(pool.maximumSessions)   \(seconds) s per figure"
        )

        let ids = Mutex<[DataKeyID]>([])
        let generate = try await LoadMeasurement.run(duration, tasks: tasks) {
            let key = try await service.generateDataKey(tenant, context: context, request: request)
            ids.withLock { if $0.count < 200_000 { $0.append(key.id) } }
        }
        generate.report("GenerateDataKey")
        let keys = ids.withLock { $0 }
        let decrypt = try await LoadMeasurement.run(duration, tasks: tasks) {
            let id = keys[Int.random(in: 0..<keys.count)]
            _ = try await service.decryptDataKey(tenant, id: id, context: context, request: request)
        }
        decrypt.report("DecryptDataKey")
        let verification = try await service.verifyAuditLog()
        if case .verified(let records, _) = verification.result {
            print("audit log verified: \(records) records")
        } else {
            print("audit log: \(verification)")
        }
        await repository.close()
        await pool.shutdown()
        try cleanup()
    }

    private func openStore(logger: Logger) async throws -> (any KeyRepository, () throws -> Void) {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent(
            "hsm-bench-store-\(getpid())"
        )
        switch store {
        case .sqlite:
            try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
            let repository = try await SQLiteKeyStore.open(
                path: directory.appendingPathComponent("keys.sqlite").path,
                logger: logger
            )
            return (repository, { try? FileManager.default.removeItem(at: directory) })
        case .postgres:
            let output = try Self.shell([postgresScript, "start", directory.path, "--watch-pid", "\(getpid())"])
            var port: Int?
            for line in output.split(separator: "\n") where line.hasPrefix("port=") {
                port = Int(line.dropFirst("port=".count))
            }
            guard let port else { throw ValidationError("the cluster script printed no port: \(output)") }
            let password = try String(
                contentsOfFile: directory.appendingPathComponent("password").path, encoding: .utf8)
            var configuration = PostgresKeyStoreConfiguration(
                port: port,
                username: "hsmgw",
                password: password,
                database: "postgres"
            )
            configuration.maximumConnections = connections
            let repository = try await PostgresKeyStore.open(configuration, logger: logger)
            let script = postgresScript
            return (repository, { _ = try Self.shell([script, "stop", directory.path]) })
        }
    }

    /// Runs a script and returns its output. `posix_spawn` and `waitpid` rather than
    /// Foundation's `Process` (whose `waitUntilExit` never returned here), and the output goes
    /// through a file: the cluster script leaves a watcher behind that would keep a pipe open.
    static func shell(_ arguments: [String]) throws -> String {
        let outputPath = FileManager.default.temporaryDirectory.appendingPathComponent(
            "hsm-bench-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).out"
        ).path
        defer { try? FileManager.default.removeItem(atPath: outputPath) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, outputPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        let argv: [UnsafeMutablePointer<CChar>?] = (["/bin/bash"] + arguments).map { strdup($0) } + [nil]
        defer { for pointer in argv { free(pointer) } }
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, "/bin/bash", &actions, nil, argv, environ)
        guard spawned == 0 else { throw ValidationError("cannot run /bin/bash: errno \(spawned)") }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) == -1 && errno == EINTR {}
        guard status == 0 else {
            throw ValidationError("\(arguments.joined(separator: " ")) failed (wait status \(status))")
        }
        return try String(contentsOfFile: outputPath, encoding: .utf8)
    }
}
