import Foundation
import Synchronization

/// Runs built executables for the end-to-end tests: `posix_spawn` and `waitpid` (Foundation's
/// `Process.waitUntilExit` was seen hanging inside the swift-testing runner), stdout and stderr
/// on separate pipes, an optional working directory, an explicit environment and a time limit.
enum ChildProcess {
    /// What a finished child left.
    struct Result: CustomStringConvertible {
        var status: Int32
        var output: String
        var error: String

        var description: String { "exit \(status)\nstdout:\n\(output)\nstderr:\n\(error)" }
    }

    /// Runs `executable` to completion (killed after `timeout`) and returns its exit status
    /// (128 + signal when killed), stdout and stderr.
    static func run(
        _ executable: String,
        _ arguments: [String],
        environment: [String: String],
        directory: String? = nil,
        timeout: Duration = .seconds(120)
    ) throws -> Result {
        var outputPipe: [Int32] = [-1, -1]
        var errorPipe: [Int32] = [-1, -1]
        guard pipe(&outputPipe) == 0, pipe(&errorPipe) == 0 else {
            throw ChildProcessError("pipe failed: errno \(errno)")
        }
        for descriptor in outputPipe + errorPipe { _ = fcntl(descriptor, F_SETFD, FD_CLOEXEC) }
        for descriptor in [outputPipe[0], errorPipe[0]] { _ = fcntl(descriptor, F_SETFL, O_NONBLOCK) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, outputPipe[1], 1)
        posix_spawn_file_actions_adddup2(&actions, errorPipe[1], 2)
        // posix_spawn_file_actions_addchdir_np is not visible from Swift here: a shell changes
        // directory and then execs the executable.
        let (program, programArguments) =
            directory.map { ("/bin/sh", ["-c", "cd \"$0\" && exec \"$@\"", $0, executable] + arguments) }
            ?? (executable, arguments)
        let pid: pid_t
        do {
            pid = try spawn(program, programArguments, environment: environment, actions: &actions)
        } catch {
            for descriptor in outputPipe + errorPipe { close(descriptor) }
            throw error
        }
        close(outputPipe[1])
        close(errorPipe[1])
        defer {
            close(outputPipe[0])
            close(errorPipe[0])
        }

        var output: [UInt8] = []
        var errorOutput: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 16_384)
        /// Reads what the pipe holds now; false at end-of-file.
        func drain(_ descriptor: Int32, into bytes: inout [UInt8]) -> Bool {
            while true {
                let count = buffer.withUnsafeMutableBytes { read(descriptor, $0.baseAddress, $0.count) }
                if count > 0 {
                    bytes += buffer[0..<count]
                } else if count == 0 {
                    return false
                } else if errno != EINTR {
                    return true
                }
            }
        }
        let deadline = ContinuousClock.now + timeout
        var status: Int32 = 0
        var open = (output: true, error: true)
        var killed = false
        while true {
            if open.output || open.error {
                var descriptors = [
                    pollfd(fd: open.output ? outputPipe[0] : -1, events: Int16(POLLIN), revents: 0),
                    pollfd(fd: open.error ? errorPipe[0] : -1, events: Int16(POLLIN), revents: 0),
                ]
                _ = poll(&descriptors, 2, 50)
                if open.output { open.output = drain(outputPipe[0], into: &output) }
                if open.error { open.error = drain(errorPipe[0], into: &errorOutput) }
            }
            // Stop at exit, not at end-of-file: a child spawned elsewhere may hold the pipes.
            let waited = waitpid(pid, &status, (open.output || open.error) ? WNOHANG : 0)
            if waited == pid {
                _ = drain(outputPipe[0], into: &output)
                _ = drain(errorPipe[0], into: &errorOutput)
                break
            }
            if waited == -1, errno != EINTR {
                throw ChildProcessError("waitpid failed: errno \(errno)")
            }
            if !killed, ContinuousClock.now > deadline {
                kill(pid, SIGKILL)
                killed = true
            }
        }
        return Result(
            status: exitStatus(status),
            output: String(decoding: output, as: UTF8.self),
            error: String(decoding: errorOutput, as: UTF8.self)
        )
    }

    /// Starts `executable` in the background with stdout and stderr appended to `logFile`.
    static func start(
        _ executable: String,
        _ arguments: [String],
        environment: [String: String],
        logFile: String
    ) throws -> pid_t {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, logFile, O_WRONLY | O_CREAT | O_APPEND, 0o600)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        return try spawn(executable, arguments, environment: environment, actions: &actions)
    }

    /// Whether `pid` still runs; reaps it (and returns false) when it has exited.
    static func isRunning(_ pid: pid_t) -> Bool {
        var status: Int32 = 0
        return waitpid(pid, &status, WNOHANG) == 0
    }

    /// Sends SIGTERM, waits up to `grace`, then SIGKILL.
    static func stop(_ pid: pid_t, grace: Duration = .seconds(10)) {
        kill(pid, SIGTERM)
        let deadline = ContinuousClock.now + grace
        var status: Int32 = 0
        while ContinuousClock.now < deadline {
            if waitpid(pid, &status, WNOHANG) != 0 { return }
            usleep(50_000)
        }
        kill(pid, SIGKILL)
        _ = waitpid(pid, &status, 0)
    }

    private static func spawn(
        _ executable: String,
        _ arguments: [String],
        environment: [String: String],
        actions: inout posix_spawn_file_actions_t
    ) throws -> pid_t {
        let argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp: [UnsafeMutablePointer<CChar>?] = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            for pointer in argv { free(pointer) }
            for pointer in envp { free(pointer) }
        }
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, executable, &actions, nil, argv, envp)
        guard spawned == 0 else { throw ChildProcessError("cannot run \(executable): errno \(spawned)") }
        return pid
    }

    /// WIFEXITED / WEXITSTATUS by hand: exited normally when the low 7 bits are 0; else 128 + signal.
    private static func exitStatus(_ status: Int32) -> Int32 {
        status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    }
}

struct ChildProcessError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// One `hsm-gateway --dev` per test process, on a free loopback port in a temporary directory
/// (its data directory is `<root>/.hsm-dev`, as next to an operator's checkout), started on
/// first use and stopped at process exit. The executables are copied first so that a rebuild
/// by someone else during the run does not swap them underneath.
final class DevGatewayProcess: Sendable {
    /// The shared gateway; throws for every test that asks when it cannot start.
    static func shared() throws -> DevGatewayProcess { try sharedResult.get() }
    private static let sharedResult: Result<DevGatewayProcess, any Error> = Result { try DevGatewayProcess() }

    /// How long the first start may take: a SoftHSM2 token, the SQLite schema and the first
    /// admin, on a machine shared with parallel builds.
    static let startTimeout: Duration = .seconds(120)

    /// The temporary directory: `.hsm-dev/`, `home/`, the executables, `gateway.log`.
    let root: String
    /// The gateway's TCP port on 127.0.0.1.
    let port: Int
    /// The gateway's process.
    let pid: pid_t
    /// The copied `hsm-admin`.
    let adminExecutable: String

    var dataDirectory: String { root + "/.hsm-dev" }
    var adminTokenFile: String { dataDirectory + "/admin.token" }
    var home: String { root + "/home" }
    var logFile: String { root + "/gateway.log" }
    var server: String { "127.0.0.1:\(port)" }

    private init() throws {
        let root = "/tmp/hsmadm-e2e-\(getpid())-\(String(UInt32.random(in: 0...UInt32.max), radix: 36))"
        self.root = root
        try FileManager.default.createDirectory(
            atPath: root + "/home",
            withIntermediateDirectories: true,
            attributes: [.posixPermissions: 0o700]
        )
        // The built binaries in place: a copy made here could be executed while another test
        // thread's posix_spawn child still holds its write descriptor (ETXTBSY).
        let gateway = try Self.builtExecutable("hsm-gateway")
        adminExecutable = try Self.builtExecutable("hsm-admin")

        var environment = ["PATH": "/usr/bin:/bin", "HOME": root + "/home"]
        if let module = ProcessInfo.processInfo.environment["HSMGW_TEST_PKCS11_MODULE"] {
            environment["HSMGW_DEV_PKCS11_MODULE"] = module
        }
        var attempt = 0
        while true {
            attempt += 1
            let port = try Self.freePort()
            let pid = try ChildProcess.start(
                gateway,
                [
                    "--dev", "--data-dir", root + "/.hsm-dev", "--listen", "127.0.0.1:\(port)",
                    "--metrics-listen", "off",
                ],
                environment: environment,
                logFile: root + "/gateway.log"
            )
            Self.running.withLock { $0 = (pid, root) }
            if try Self.waitUntilServing(pid: pid, port: port, tokenFile: root + "/.hsm-dev/admin.token") {
                self.port = port
                self.pid = pid
                break
            }
            // It exited: a lost race for the port is worth another try, anything else is not.
            let log = (try? String(contentsOfFile: root + "/gateway.log", encoding: .utf8)) ?? ""
            guard attempt < 3, log.localizedCaseInsensitiveContains("address already in use") else {
                throw ChildProcessError("hsm-gateway --dev did not start:\n\(log)")
            }
        }
        atexit {
            if let (pid, root) = DevGatewayProcess.running.withLock({ $0 }) {
                ChildProcess.stop(pid)
                try? FileManager.default.removeItem(atPath: root)
            }
        }
    }

    /// What `atexit` needs, outside the instance so the C callback captures nothing.
    private static let running = Mutex<(pid_t, String)?>(nil)

    /// Waits until the gateway wrote its admin token and accepts connections; false when it
    /// exited; throws when it takes longer than `startTimeout`.
    private static func waitUntilServing(pid: pid_t, port: Int, tokenFile: String) throws -> Bool {
        let deadline = ContinuousClock.now + startTimeout
        while ContinuousClock.now < deadline {
            guard ChildProcess.isRunning(pid) else { return false }
            if FileManager.default.fileExists(atPath: tokenFile), canConnect(port: port) { return true }
            usleep(100_000)
        }
        ChildProcess.stop(pid)
        throw ChildProcessError("hsm-gateway --dev did not serve within \(startTimeout)")
    }

    private static func canConnect(port: Int) -> Bool {
        let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard descriptor >= 0 else { return false }
        defer { close(descriptor) }
        var address = loopback(port: port)
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0
            }
        }
    }

    /// A loopback port that was free a moment ago (bound to port 0, read, closed).
    static func freePort() throws -> Int {
        let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard descriptor >= 0 else { throw ChildProcessError("socket failed: errno \(errno)") }
        defer { close(descriptor) }
        var address = loopback(port: 0)
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(descriptor, $0, length) }
        }
        let named = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(descriptor, $0, &length) }
        }
        guard bound == 0, named == 0 else { throw ChildProcessError("cannot find a free port: errno \(errno)") }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    private static func loopback(port: Int) -> sockaddr_in {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        address.sin_port = UInt16(port).bigEndian
        return address
    }

    /// A built executable: next to the test bundle (where SwiftPM puts executables), else in the
    /// package's `.build/debug` (when the bundle was copied elsewhere to run).
    static func builtExecutable(_ name: String, file: String = #filePath) throws -> String {
        let bundle = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? ""
        var candidates = [URL(fileURLWithPath: bundle).deletingLastPathComponent().appendingPathComponent(name).path]
        var directory = URL(fileURLWithPath: file).deletingLastPathComponent()
        while directory.path != "/" {
            if FileManager.default.fileExists(atPath: directory.appendingPathComponent("Package.swift").path) {
                candidates.append(directory.appendingPathComponent(".build/debug/\(name)").path)
                break
            }
            directory.deleteLastPathComponent()
        }
        guard let found = candidates.first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
            throw ChildProcessError(
                "build \(name) first (`swift build`); looked at \(candidates.joined(separator: ", "))")
        }
        return found
    }
}
