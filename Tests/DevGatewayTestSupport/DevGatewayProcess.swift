import Foundation
import ProcessTestSupport
import Synchronization

/// One `hsm-gateway --dev` per test process (shared by HSMAdminTests and DataPlaneCLITests), on a free loopback port in a temporary directory
/// (its data directory is `<root>/.hsm-dev`, as next to an operator's checkout), started on
/// first use and stopped at process exit. The built executables run in place.
public final class DevGatewayProcess: Sendable {
    /// The shared gateway; throws for every test that asks when it cannot start.
    public static func shared() throws -> DevGatewayProcess { try sharedResult.get() }
    private static let sharedResult: Result<DevGatewayProcess, any Error> = Result { try DevGatewayProcess() }

    /// How long the first start may take: a SoftHSM2 token, the SQLite schema and the first
    /// admin, on a machine shared with parallel builds.
    public static let startTimeout: Duration = .seconds(120)

    /// The temporary directory: `.hsm-dev/`, `home/`, `gateway.log`.
    public let root: String
    /// The gateway's TCP port on 127.0.0.1.
    public let port: Int
    /// The gateway's process.
    public let pid: pid_t
    /// The built `hsm-admin`.
    public let adminExecutable: String

    public var dataDirectory: String { root + "/.hsm-dev" }
    public var adminTokenFile: String { dataDirectory + "/admin.token" }
    public var home: String { root + "/home" }
    public var logFile: String { root + "/gateway.log" }
    public var server: String { "127.0.0.1:\(port)" }

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
            let pid = try SpawnedProcess(
                gateway,
                [
                    "--dev", "--data-dir", root + "/.hsm-dev", "--listen", "127.0.0.1:\(port)",
                    "--metrics-listen", "off",
                ],
                environment: environment,
                inheritEnvironment: false,
                outputPath: root + "/gateway.log",
                append: true
            ).pid
            Self.running.withLock { $0 = (pid, root) }
            if try Self.waitUntilServing(pid: pid, port: port, tokenFile: root + "/.hsm-dev/admin.token") {
                self.port = port
                self.pid = pid
                break
            }
            // It exited: a lost race for the port is worth another try, anything else is not.
            let log = (try? String(contentsOfFile: root + "/gateway.log", encoding: .utf8)) ?? ""
            guard attempt < 3, log.localizedCaseInsensitiveContains("address already in use") else {
                throw TestSetupError("hsm-gateway --dev did not start:\n\(log)")
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
        throw TestSetupError("hsm-gateway --dev did not serve within \(startTimeout)")
    }

    public static func canConnect(port: Int) -> Bool {
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
    public static func freePort() throws -> Int {
        let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard descriptor >= 0 else { throw TestSetupError("socket failed: errno \(errno)") }
        defer { close(descriptor) }
        var address = loopback(port: 0)
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(descriptor, $0, length) }
        }
        let named = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(descriptor, $0, &length) }
        }
        guard bound == 0, named == 0 else { throw TestSetupError("cannot find a free port: errno \(errno)") }
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
    public static func builtExecutable(_ name: String, file: String = #filePath) throws -> String {
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
            throw TestSetupError(
                "build \(name) first (`swift build`); looked at \(candidates.joined(separator: ", "))")
        }
        return found
    }
}
