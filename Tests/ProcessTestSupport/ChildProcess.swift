import Foundation
import Synchronization

/// Child processes for tests: `posix_spawn` and `waitpid`, because Foundation's `Process` was
/// seen never noticing a child's exit inside the swift-testing runner.
public enum ChildProcess {
    /// What a finished child left.
    public struct Result: CustomStringConvertible, Sendable {
        /// The exit status, or 128 + signal when it was killed.
        public var status: Int32
        /// What it wrote to stdout.
        public var output: String
        /// What it wrote to stderr.
        public var error: String

        public var description: String { "exit \(status)\nstdout:\n\(output)\nstderr:\n\(error)" }
    }

    /// Runs `executable` to completion (killed after `timeout`) and returns its exit status,
    /// stdout and stderr (on separate pipes).
    ///
    /// The child's environment is `environment` alone, or this process's environment with
    /// `environment` over it when `inheritEnvironment`. `directory`, when given, is its working
    /// directory. Reading stops when the child has exited and the pipes are drained, not at
    /// end-of-file: a child that another thread spawns at the same moment may inherit the pipes
    /// and hold them open.
    public static func run(
        _ executable: String,
        _ arguments: [String],
        environment: [String: String] = [:],
        inheritEnvironment: Bool = true,
        directory: String? = nil,
        timeout: Duration = .seconds(120)
    ) throws -> Result {
        var outputPipe: [Int32] = [-1, -1]
        var errorPipe: [Int32] = [-1, -1]
        guard pipe(&outputPipe) == 0 else { throw TestSetupError("pipe failed: errno \(errno)") }
        guard pipe(&errorPipe) == 0 else {
            for descriptor in outputPipe { close(descriptor) }
            throw TestSetupError("pipe failed: errno \(errno)")
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
            pid = try spawn(
                program, programArguments, environment: environment, inheritEnvironment: inheritEnvironment,
                actions: &actions)
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
                    return true  // EAGAIN: nothing more for now
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
            let waited = waitpid(pid, &status, (open.output || open.error) ? WNOHANG : 0)
            if waited == pid {
                _ = drain(outputPipe[0], into: &output)
                _ = drain(errorPipe[0], into: &errorOutput)
                break
            }
            if waited == -1, errno != EINTR {
                throw TestSetupError("waitpid failed: errno \(errno)")
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

    /// Whether `pid` still runs; reaps it (and returns false) when it has exited.
    public static func isRunning(_ pid: pid_t) -> Bool {
        var status: Int32 = 0
        return waitpid(pid, &status, WNOHANG) == 0
    }

    /// Sends SIGTERM, waits up to `grace`, then SIGKILL.
    public static func stop(_ pid: pid_t, grace: Duration = .seconds(10)) {
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

    /// `posix_spawn` with `actions`; the environment as `run` describes it.
    static func spawn(
        _ executable: String,
        _ arguments: [String],
        environment: [String: String],
        inheritEnvironment: Bool,
        actions: inout posix_spawn_file_actions_t
    ) throws -> pid_t {
        let merged =
            inheritEnvironment ? ProcessInfo.processInfo.environment.merging(environment) { $1 } : environment
        let argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp: [UnsafeMutablePointer<CChar>?] = merged.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            for pointer in argv { free(pointer) }
            for pointer in envp { free(pointer) }
        }
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, executable, &actions, nil, argv, envp)
        guard spawned == 0 else { throw TestSetupError("cannot run \(executable): errno \(spawned)") }
        return pid
    }

    /// WIFEXITED / WEXITSTATUS by hand: exited normally when the low 7 bits are 0; else 128 + signal.
    static func exitStatus(_ status: Int32) -> Int32 {
        status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    }
}

/// A child running in the background whose stdout and stderr go to one file, for servers a test
/// starts, signals and reads the log of.
public final class SpawnedProcess: Sendable {
    /// The child's process id.
    public let pid: pid_t
    /// The file its stdout and stderr go to.
    public let outputPath: String
    private let exitStatus = Mutex<Int32?>(nil)

    /// Starts `executable`; the environment as `ChildProcess.run` describes it. The log file is
    /// truncated unless `append`.
    public init(
        _ executable: String,
        _ arguments: [String],
        environment: [String: String] = [:],
        inheritEnvironment: Bool = true,
        outputPath: String,
        append: Bool = false
    ) throws {
        self.outputPath = outputPath
        let flags = O_WRONLY | O_CREAT | O_CLOEXEC | (append ? O_APPEND : O_TRUNC)
        let descriptor = open(outputPath, flags, 0o600)
        guard descriptor >= 0 else { throw TestSetupError("cannot create \(outputPath): errno \(errno)") }
        defer { close(descriptor) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, descriptor, 1)
        posix_spawn_file_actions_adddup2(&actions, descriptor, 2)
        pid = try ChildProcess.spawn(
            executable, arguments, environment: environment, inheritEnvironment: inheritEnvironment,
            actions: &actions)
    }

    /// Sends `signal` to the child.
    public func send(_ signal: Int32) {
        kill(pid, signal)
    }

    /// The exit status (128 + signal when killed), or nil while it runs.
    public func poll() -> Int32? {
        exitStatus.withLock { saved in
            if let saved { return saved }
            var status: Int32 = 0
            guard waitpid(pid, &status, WNOHANG) == pid else { return nil }
            saved = ChildProcess.exitStatus(status)
            return saved
        }
    }

    /// Waits for the exit and returns its status.
    public func wait() -> Int32 {
        exitStatus.withLock { saved in
            if let saved { return saved }
            var status: Int32 = 0
            while waitpid(pid, &status, 0) == -1 && errno == EINTR {}
            let decoded = ChildProcess.exitStatus(status)
            saved = decoded
            return decoded
        }
    }

    /// Waits at most `timeout` for the exit; kills the child (SIGKILL) after it.
    public func wait(timeout: Duration) async -> Int32? {
        let end = ContinuousClock.now + timeout
        while ContinuousClock.now < end {
            if let status = poll() { return status }
            try? await Task.sleep(for: .milliseconds(50))
        }
        send(SIGKILL)
        _ = wait()
        return nil
    }

    /// SIGTERM, up to `grace` for the exit, then SIGKILL; the exit status.
    @discardableResult
    public func stop(grace: Duration = .seconds(10)) -> Int32 {
        if let status = poll() { return status }
        send(SIGTERM)
        let end = ContinuousClock.now + grace
        while ContinuousClock.now < end {
            if let status = poll() { return status }
            usleep(50_000)
        }
        send(SIGKILL)
        return wait()
    }

    /// Everything the child wrote so far.
    public func output() -> String {
        (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? ""
    }

    /// The first capture group (or the whole match) of `pattern`, a regular expression, in what
    /// the child wrote so far; nil when nothing matches yet.
    public func outputMatch(_ pattern: String) -> String? {
        let text = output()
        guard let regex = try? NSRegularExpression(pattern: pattern),
            let match = regex.firstMatch(in: text, range: NSRange(text.startIndex..., in: text))
        else { return nil }
        let range = match.numberOfRanges > 1 ? match.range(at: 1) : match.range
        return Range(range, in: text).map { String(text[$0]) }
    }

    /// Waits until the output matches `pattern` (see `outputMatch`) and returns the match; nil
    /// when the child exits or `timeout` passes first.
    public func waitForOutput(_ pattern: String, timeout: Duration) async -> String? {
        let end = ContinuousClock.now + timeout
        while ContinuousClock.now < end {
            if let found = outputMatch(pattern) { return found }
            if poll() != nil { return nil }
            try? await Task.sleep(for: .milliseconds(50))
        }
        return nil
    }
}

/// A test set-up failure (a child that would not start, a file that could not be written).
public struct TestSetupError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// A fresh private directory (mode 0700) under the system temporary directory, removed with
/// everything in it when the test process exits.
public func makeTemporaryDirectory(_ name: String) throws -> String {
    let path = FileManager.default.temporaryDirectory
        .appendingPathComponent("hsmgw-\(name)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
    try FileManager.default.createDirectory(
        atPath: path, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
    TemporaryDirectories.remember(path)
    return path
}

/// The directories `makeTemporaryDirectory` made, removed at exit: tests hand their paths to
/// gateways and child processes that may still use them until the end, so nothing is removed
/// earlier. (Without this a full `make test` left some 330 directories in /tmp.)
enum TemporaryDirectories {
    private static let paths = Mutex<[String]>([])
    private static let registered = Mutex(false)

    static func remember(_ path: String) {
        paths.withLock { $0.append(path) }
        let first = registered.withLock { registered in
            defer { registered = true }
            return !registered
        }
        if first { atexit { TemporaryDirectories.removeAll() } }
    }

    static func removeAll() {
        for path in paths.withLock({ $0 }) { try? FileManager.default.removeItem(atPath: path) }
    }
}

/// Runs blocking `body` (a child process waited for, a file copied) on a thread of its own and
/// returns its result. Swift concurrency runs every task on as many threads as there are cores
/// (two here): a test that blocks one of them for a `CREATE DATABASE` or an `initdb` stalls
/// every other task of the process, such as a transaction holding a lock that other tests wait
/// for.
public func runBlocking<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        Thread { continuation.resume(with: Result { try body() }) }.start()
    }
}
