import Foundation
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

    private static let sharedResult: Result<PostgresTestCluster, any Error> = Result { try PostgresTestCluster() }

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

    private init() throws {
        let script = try Self.scriptPath()
        let directory = "/tmp/hsmgw-pg-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let result = try Self.run(script, ["start", directory, "--watch-pid", "\(getpid())"])
        guard result.status == 0 else {
            _ = try? Self.run(script, ["stop", directory])
            throw PostgresTestClusterError("throwaway-postgres.sh start failed (\(result.status)): \(result.output)")
        }
        var values: [String: String] = [:]
        for line in result.output.split(separator: "\n") {
            guard let equals = line.firstIndex(of: "=") else { continue }
            values[String(line[..<equals])] = String(line[line.index(after: equals)...])
        }
        guard let portText = values["port"], let port = Int(portText), let socket = values["socket"],
            let bin = values["bin"]
        else {
            _ = try? Self.run(script, ["stop", directory])
            throw PostgresTestClusterError("throwaway-postgres.sh printed no port/socket/bin: \(result.output)")
        }
        self.port = port
        self.socketDirectory = socket
        self.binDirectory = bin
        self.directory = directory
        self.username = "hsmgw"
        self.password = try String(contentsOfFile: "\(directory)/password", encoding: .utf8)
        Self.scriptForExit.withLock { $0 = (script, directory) }
        atexit {
            if let (script, directory) = PostgresTestCluster.scriptForExit.withLock({ $0 }) {
                _ = try? PostgresTestCluster.run(script, ["stop", directory])
            }
        }
    }

    /// What `atexit` needs, kept outside the instance so the C callback captures nothing.
    private static let scriptForExit = Mutex<(String, String)?>(nil)

    /// Creates a fresh empty database (unique name) and returns its name, so suites do not share
    /// state.
    public func createDatabase(_ prefix: String) throws -> String {
        let counter = databaseCounter.withLock { value in
            value += 1
            return value
        }
        let cleaned = prefix.lowercased().unicodeScalars.map { scalar in
            ("a"..."z").contains(scalar) || ("0"..."9").contains(scalar) ? Character(scalar) : "_"
        }
        let suffix = "_\(counter)_\(String(UInt32.random(in: 0...UInt32.max), radix: 36))"
        let name = String(String(cleaned).prefix(Self.maximumDatabaseNameLength - suffix.count)) + suffix
        _ = try psql("postgres", "CREATE DATABASE \"\(name)\"")
        return name
    }

    /// Runs `sql` (one or more statements) with `psql` in `database` over TCP and returns what it
    /// printed, unaligned and tuples only (`-XAt`). Throws when psql fails.
    public func psql(_ database: String, _ sql: String) throws -> String {
        let result = try Self.run(
            "\(binDirectory)/psql",
            [
                "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", "\(port)", "-U", username,
                "-d", database, "-c", sql,
            ],
            environment: ["PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"]
        )
        guard result.status == 0 else {
            throw PostgresTestClusterError("psql failed (\(result.status)): \(result.output)")
        }
        return result.output
    }

    // MARK: Processes

    /// Runs `executable` and returns its exit status and its stdout and stderr, interleaved.
    ///
    /// `posix_spawn` and `waitpid` rather than Foundation's `Process`, whose `waitUntilExit` was
    /// seen never returning inside the swift-testing runner (the child's exit went unnoticed).
    /// Reading stops when the child has exited and the pipe is drained, not at end-of-file: a
    /// child that another thread spawns at the same moment may inherit the pipe and hold it open.
    private static func run(
        _ executable: String,
        _ arguments: [String],
        environment: [String: String] = [:]
    ) throws -> (status: Int32, output: String) {
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else {
            throw PostgresTestClusterError("pipe failed: errno \(errno)")
        }
        let (readEnd, writeEnd) = (fds[0], fds[1])
        _ = fcntl(readEnd, F_SETFD, FD_CLOEXEC)
        _ = fcntl(writeEnd, F_SETFD, FD_CLOEXEC)
        _ = fcntl(readEnd, F_SETFL, O_NONBLOCK)
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, writeEnd, 1)
        posix_spawn_file_actions_adddup2(&actions, writeEnd, 2)

        let merged = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        let argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp: [UnsafeMutablePointer<CChar>?] = merged.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            for pointer in argv { free(pointer) }
            for pointer in envp { free(pointer) }
        }
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, executable, &actions, nil, argv, envp)
        close(writeEnd)
        guard spawned == 0 else {
            close(readEnd)
            throw PostgresTestClusterError("cannot run \(executable): errno \(spawned)")
        }
        defer { close(readEnd) }

        var output: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        /// Reads what the pipe holds now; false at end-of-file.
        func drain() -> Bool {
            while true {
                let count = buffer.withUnsafeMutableBytes { read(readEnd, $0.baseAddress, $0.count) }
                if count > 0 {
                    output += buffer[0..<count]
                } else if count == 0 {
                    return false
                } else if errno != EINTR {
                    return true  // EAGAIN: nothing more for now
                }
            }
        }
        var status: Int32 = 0
        var open = true
        while true {
            if open {
                var descriptor = pollfd(fd: readEnd, events: Int16(POLLIN), revents: 0)
                _ = poll(&descriptor, 1, 100)
                open = drain()
            }
            let waited = waitpid(pid, &status, open ? WNOHANG : 0)
            if waited == pid {
                _ = drain()
                break
            }
            if waited == -1 && errno != EINTR {
                throw PostgresTestClusterError("waitpid failed: errno \(errno)")
            }
        }
        // WIFEXITED / WEXITSTATUS: exited normally when the low 7 bits are 0; else 128 + signal.
        let exitStatus = status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        return (exitStatus, String(decoding: output, as: UTF8.self))
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
