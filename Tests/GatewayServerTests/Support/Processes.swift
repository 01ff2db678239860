import Foundation
import Synchronization

/// Child processes for tests, with `posix_spawn` and `waitpid` (Foundation's `Process` was seen
/// never noticing a child's exit inside the test runner).
enum Processes {
    /// Runs `executable` to completion and returns its status and its output (stdout and stderr).
    static func run(
        _ executable: String,
        _ arguments: [String],
        environment: [String: String] = [:]
    ) throws -> (status: Int32, output: String) {
        let logPath = FileManager.default.temporaryDirectory
            .appendingPathComponent("hsmgw-run-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).log").path
        defer { unlink(logPath) }
        let child = try SpawnedProcess(
            executable, arguments, environment: environment, outputPath: logPath)
        let status = child.wait()
        return (status, child.output())
    }
}

/// A running child whose stdout and stderr go to one file.
final class SpawnedProcess: Sendable {
    let pid: pid_t
    let outputPath: String
    private let exitStatus = Mutex<Int32?>(nil)

    init(
        _ executable: String,
        _ arguments: [String],
        environment: [String: String] = [:],
        outputPath: String
    ) throws {
        self.outputPath = outputPath
        let descriptor = open(outputPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard descriptor >= 0 else { throw TestSetupError("cannot create \(outputPath): errno \(errno)") }
        defer { close(descriptor) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, descriptor, 1)
        posix_spawn_file_actions_adddup2(&actions, descriptor, 2)
        let merged = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        let argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp: [UnsafeMutablePointer<CChar>?] = merged.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            for pointer in argv { free(pointer) }
            for pointer in envp { free(pointer) }
        }
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, executable, &actions, nil, argv, envp)
        guard spawned == 0 else { throw TestSetupError("cannot run \(executable): errno \(spawned)") }
        self.pid = pid
    }

    /// Sends `signal` to the child.
    func send(_ signal: Int32) {
        kill(pid, signal)
    }

    /// The exit status (128 + signal when killed), or nil while it runs.
    func poll() -> Int32? {
        exitStatus.withLock { saved in
            if let saved { return saved }
            var status: Int32 = 0
            guard waitpid(pid, &status, WNOHANG) == pid else { return nil }
            saved = Self.decode(status)
            return saved
        }
    }

    /// Waits for the exit and returns its status.
    func wait() -> Int32 {
        exitStatus.withLock { saved in
            if let saved { return saved }
            var status: Int32 = 0
            while waitpid(pid, &status, 0) == -1 && errno == EINTR {}
            saved = Self.decode(status)
            return saved!
        }
    }

    /// Waits at most `timeout` for the exit; kills the child (SIGKILL) after it.
    func wait(timeout: Duration) async -> Int32? {
        let end = ContinuousClock.now + timeout
        while ContinuousClock.now < end {
            if let status = poll() { return status }
            try? await Task.sleep(for: .milliseconds(50))
        }
        send(SIGKILL)
        _ = wait()
        return nil
    }

    /// Everything the child wrote so far.
    func output() -> String {
        (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? ""
    }

    /// Waits until the output matches `pattern` (a regular expression) and returns the first
    /// capture group; nil when the child exits or `timeout` passes first.
    func waitForOutput(_ pattern: String, timeout: Duration) async -> String? {
        let end = ContinuousClock.now + timeout
        let regex = try? NSRegularExpression(pattern: pattern)
        while ContinuousClock.now < end {
            let text = output()
            if let regex,
                let match = regex.firstMatch(in: text, range: NSRange(text.startIndex..., in: text))
            {
                let range = match.numberOfRanges > 1 ? match.range(at: 1) : match.range
                return Range(range, in: text).map { String(text[$0]) }
            }
            if poll() != nil { return nil }
            try? await Task.sleep(for: .milliseconds(50))
        }
        return nil
    }

    private static func decode(_ status: Int32) -> Int32 {
        status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    }
}

/// A test set-up failure.
struct TestSetupError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Paths of the package.
enum PackagePaths {
    /// The package root, found from this file.
    static let root: String = {
        var directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        while directory.path != "/" {
            if FileManager.default.fileExists(atPath: directory.appendingPathComponent("Package.swift").path) {
                return directory.path
            }
            directory.deleteLastPathComponent()
        }
        return FileManager.default.currentDirectoryPath
    }()

    /// The `hsm-gateway` executable: `HSMGW_TEST_GATEWAY_BINARY`, else the debug build.
    static var gatewayBinary: String {
        if let path = ProcessInfo.processInfo.environment["HSMGW_TEST_GATEWAY_BINARY"] { return path }
        return root + "/.build/debug/hsm-gateway"
    }
}

/// A fresh private directory under the system temporary directory.
func makeTemporaryDirectory(_ name: String) throws -> String {
    let path = FileManager.default.temporaryDirectory
        .appendingPathComponent("hsmgw-\(name)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
    try FileManager.default.createDirectory(
        atPath: path, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
    return path
}
