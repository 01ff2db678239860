import Foundation
import ProcessTestSupport
import Synchronization

/// One real, throwaway PostgreSQL server per test process, made by `scripts/throwaway-postgres.sh`:
/// a temporary data directory, loopback only, a Unix socket, a free port, a random
/// scram-sha-256 password for the superuser `hsmgw`. Stopped and removed at process exit (and by
/// the script's watcher if the process dies without running `atexit`).
///
/// Each suite asks for its own database (`createDatabase`) so suites running in parallel never
/// share state.
public final class PostgresTestCluster: Sendable {
    /// One cluster per test process, started on first use via scripts/throwaway-postgres.sh,
    /// stopped and removed at process exit (atexit).
    public static func shared() throws -> PostgresTestCluster {
        try sharedResult.get()
    }

    private static let sharedResult: Result<PostgresTestCluster, any Error> = Result {
        let cluster = try PostgresTestCluster(tls: nil)
        scriptForExit.withLock { $0 = (cluster.script, cluster.directory) }
        atexit {
            if let (script, directory) = PostgresTestCluster.scriptForExit.withLock({ $0 }) {
                _ = try? ChildProcess.run(script, ["stop", directory])
            }
        }
        return cluster
    }

    /// A cluster of the caller's own, for a test that stops it or needs other settings; `stop()`
    /// it when done (its watcher removes it if this process dies first). With `tls`, the server
    /// serves TLS with that certificate and key and refuses TCP logins without TLS.
    public static func startOwn(tls: (certificate: String, key: String)? = nil) throws -> PostgresTestCluster {
        try PostgresTestCluster(tls: tls)
    }

    /// Stops the server and removes its directory.
    public func stop() {
        _ = try? ChildProcess.run(script, ["stop", directory])
    }

    /// The longest database name PostgreSQL keeps (`NAMEDATALEN - 1`).
    public static let maximumDatabaseNameLength = 63

    /// The TCP port on 127.0.0.1.
    public let port: Int
    /// The directory holding the server's Unix socket.
    public let socketDirectory: String
    /// The superuser to log in as.
    public let username: String
    /// Its password.
    public let password: String
    /// The cluster's directory (data, socket, log, password file).
    public let directory: String
    /// The PostgreSQL binaries the cluster runs (for `psql`).
    public let binDirectory: String

    /// The Unix socket file, for `PostgresKeyStoreConfiguration.unixSocketPath`.
    public var unixSocketPath: String { "\(socketDirectory)/.s.PGSQL.\(port)" }

    private let databaseCounter = Mutex(0)

    /// `scripts/throwaway-postgres.sh`.
    private let script: String

    private convenience init(tls: (certificate: String, key: String)?) throws {
        // Directly under /tmp: as root the server runs as `postgres`, which must reach it.
        let directory = "/tmp/hsmgw-pg-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let tlsArguments = tls.map { ["--tls", $0.certificate, $0.key] } ?? []
        try self.init(directory: directory, ["start", directory, "--watch-pid", "\(getpid())"] + tlsArguments)
    }

    /// A streaming standby of this cluster (`throwaway-postgres.sh standby`), a cluster of its
    /// own with the same superuser and password; with `synchronous`, this cluster waits for it at
    /// every commit. `stop()` it when done.
    public func startStandby(synchronous: Bool) throws -> PostgresTestCluster {
        let standby = "/tmp/hsmgw-pg-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        return try PostgresTestCluster(
            directory: standby,
            ["standby", directory, standby, "--watch-pid", "\(getpid())"] + (synchronous ? ["--synchronous"] : []))
    }

    /// Promotes this standby (`pg_ctl promote`) and returns once it accepts writes.
    public func promote() async throws {
        let (script, directory) = (self.script, self.directory)
        let result = try await runBlocking {
            try ChildProcess.run(script, ["promote", directory], timeout: .seconds(120))
        }
        guard result.status == 0 else { throw PostgresTestClusterError("promote failed: \(result)") }
    }

    private init(directory: String, _ arguments: [String]) throws {
        let script = try Self.scriptPath()
        let result = try ChildProcess.run(script, arguments, timeout: .seconds(600))
        guard result.status == 0 else {
            _ = try? ChildProcess.run(script, ["stop", directory])
            throw PostgresTestClusterError("throwaway-postgres.sh \(arguments[0]) failed: \(result)")
        }
        var values: [String: String] = [:]
        for line in result.output.split(separator: "\n") {
            guard let equals = line.firstIndex(of: "=") else { continue }
            values[String(line[..<equals])] = String(line[line.index(after: equals)...])
        }
        guard let portText = values["port"], let port = Int(portText), let socket = values["socket"],
            let bin = values["bin"]
        else {
            _ = try? ChildProcess.run(script, ["stop", directory])
            throw PostgresTestClusterError("throwaway-postgres.sh printed no port/socket/bin: \(result)")
        }
        self.port = port
        self.socketDirectory = socket
        self.binDirectory = bin
        self.directory = directory
        self.username = "hsmgw"
        self.password = try String(contentsOfFile: "\(directory)/password", encoding: .utf8)
        self.script = script
    }

    /// What `atexit` needs, kept outside the instance so the C callback captures nothing.
    private static let scriptForExit = Mutex<(String, String)?>(nil)

    /// Creates a fresh empty database (unique name) and returns its name, so suites do not share
    /// state.
    public func createDatabase(_ prefix: String) async throws -> String {
        try await runBlocking { [self] in try createDatabaseBlocking(prefix) }
    }

    private func createDatabaseBlocking(_ prefix: String) throws -> String {
        let counter = databaseCounter.withLock { value in
            value += 1
            return value
        }
        let cleaned = prefix.lowercased().unicodeScalars.map { scalar in
            ("a"..."z").contains(scalar) || ("0"..."9").contains(scalar) ? Character(scalar) : "_"
        }
        let suffix = "_\(counter)_\(String(UInt32.random(in: 0...UInt32.max), radix: 36))"
        let name = String(String(cleaned).prefix(Self.maximumDatabaseNameLength - suffix.count)) + suffix
        _ = try psqlBlocking("postgres", "CREATE DATABASE \"\(name)\"")
        return name
    }

    /// Runs `sql` (one or more statements) with `psql` in `database` over TCP and returns what it
    /// printed, unaligned and tuples only (`-XAt`). Throws when psql fails.
    public func psql(_ database: String, _ sql: String) async throws -> String {
        try await runBlocking { [self] in try psqlBlocking(database, sql) }
    }

    private func psqlBlocking(_ database: String, _ sql: String) throws -> String {
        let result = try ChildProcess.run(
            "\(binDirectory)/psql",
            [
                "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", "\(port)", "-U", username,
                "-d", database, "-c", sql,
            ],
            environment: ["PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"]
        )
        guard result.status == 0 else {
            throw PostgresTestClusterError("psql failed: \(result)")
        }
        return result.output
    }

    /// Stops the server as an outage would (`immediate`: a crash, connections dropped at once;
    /// `fast`: a clean shutdown) and keeps its data; `resume()` starts it again on the same port.
    public func halt(mode: String = "immediate") async throws {
        let (script, directory) = (self.script, self.directory)
        let result = try await runBlocking { try ChildProcess.run(script, ["halt", directory, mode]) }
        guard result.status == 0 else { throw PostgresTestClusterError("halt failed: \(result)") }
    }

    /// Starts a halted server again and waits until it accepts logins.
    public func resume() async throws {
        let (script, directory) = (self.script, self.directory)
        let result = try await runBlocking {
            try ChildProcess.run(script, ["resume", directory], timeout: .seconds(120))
        }
        guard result.status == 0 else { throw PostgresTestClusterError("resume failed: \(result)") }
    }

    /// Freezes the server (SIGSTOP to the postmaster and every backend): it keeps its sockets open
    /// and answers nothing, as behind a partition that drops packets. `thaw()` undoes it.
    public func freeze() async throws {
        try await runBlocking { [self] in try signalServer("STOP") }
    }

    /// Resumes a frozen server (SIGCONT).
    public func thaw() async throws {
        try await runBlocking { [self] in try signalServer("CONT") }
    }

    /// `thaw()` for a `defer` (blocks its thread briefly; errors ignored).
    public func thawSynchronously() {
        try? signalServer("CONT")
    }

    private func signalServer(_ signal: String) throws {
        let pidFile = try String(contentsOfFile: "\(directory)/data/postmaster.pid", encoding: .utf8)
        guard let pid = pidFile.split(separator: "\n").first.flatMap({ Int32($0) }) else {
            throw PostgresTestClusterError("no postmaster pid in \(directory)/data/postmaster.pid")
        }
        // The postmaster last on STOP (so it forks nothing new meanwhile), first on CONT.
        if signal == "CONT" { _ = try ChildProcess.run("/bin/kill", ["-\(signal)", "\(pid)"]) }
        _ = try ChildProcess.run("/usr/bin/pkill", ["-\(signal)", "-P", "\(pid)"])
        if signal == "STOP" { _ = try ChildProcess.run("/bin/kill", ["-\(signal)", "\(pid)"]) }
    }

    /// Terminates every backend connected to `database` (`pg_terminate_backend`), as an operator
    /// or a crashing backend would; returns how many.
    @discardableResult
    public func terminateBackends(_ database: String) async throws -> Int {
        let output = try await psql(
            "postgres",
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                + "WHERE datname = '\(database)' AND pid <> pg_backend_pid()"
        )
        return Int(output.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
    }

    /// `pg_dump` of `database` in the custom format to `file`: a consistent snapshot, taken while
    /// the database is in use, as an operator's backup is.
    public func dump(_ database: String, to file: String) async throws {
        let result = try await runBlocking { [self] in
            try ChildProcess.run(
                "\(binDirectory)/pg_dump",
                ["-h", "127.0.0.1", "-p", "\(port)", "-U", username, "-Fc", "-f", file, database],
                environment: ["PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"]
            )
        }
        guard result.status == 0 else { throw PostgresTestClusterError("pg_dump failed: \(result)") }
    }

    /// Replaces `database` with the contents of a `dump(_:to:)` file: drops it (closing whatever
    /// is still connected), creates it again and runs `pg_restore`, as restoring a backup does.
    public func restore(_ database: String, from file: String) async throws {
        _ = try await psql("postgres", "DROP DATABASE \"\(database)\" WITH (FORCE)")
        _ = try await psql("postgres", "CREATE DATABASE \"\(database)\"")
        let result = try await runBlocking { [self] in
            try ChildProcess.run(
                "\(binDirectory)/pg_restore",
                ["-h", "127.0.0.1", "-p", "\(port)", "-U", username, "--exit-on-error", "-d", database, file],
                environment: ["PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"]
            )
        }
        guard result.status == 0 else { throw PostgresTestClusterError("pg_restore failed: \(result)") }
    }

    /// `scripts/throwaway-postgres.sh`, found by walking up from this file to the package root.
    private static func scriptPath(file: String = #filePath) throws -> String {
        var directory = URL(fileURLWithPath: file).deletingLastPathComponent()
        while directory.path != "/" {
            if FileManager.default.fileExists(atPath: directory.appendingPathComponent("Package.swift").path) {
                let script = directory.appendingPathComponent("scripts/throwaway-postgres.sh").path
                guard FileManager.default.isExecutableFile(atPath: script) else {
                    throw PostgresTestClusterError("\(script) is missing or not executable")
                }
                return script
            }
            directory.deleteLastPathComponent()
        }
        throw PostgresTestClusterError("no Package.swift above \(file)")
    }
}

/// A cluster set-up failure.
public struct PostgresTestClusterError: Error, CustomStringConvertible {
    /// What failed, with the script's or psql's output.
    public let description: String
    /// An error saying `description`.
    public init(_ description: String) { self.description = description }
}
