import Foundation
import PKCS11
import ProcessTestSupport
import Synchronization

/// A network HSM on one machine: one token of the SoftHSM2 fixture served over p11-kit's remote
/// protocol by `p11-kit server` (Debian package `p11-kit`), in a process group of its own, so a
/// test can kill it (every per-connection process it forked included) and start it again on the
/// same socket. Clients load `P11KitServer.clientModulePath` (package `p11-kit-modules`) with
/// `P11_KIT_SERVER_ADDRESS` set to `address`.
///
/// p11-kit 0.24.1 (Debian 12) cannot carry `CK_GCM_PARAMS`: AES-GCM fails with
/// `CKR_MECHANISM_INVALID` through the client; sessions, login, key generation, search,
/// attributes and random work.
public final class P11KitServer: Sendable {
    /// p11-kit's client module: a PKCS#11 module that forwards every call to a server.
    public static let clientModulePath = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
    /// The command that starts a server (`p11-kit server`).
    public static let commandPath = "/usr/bin/p11-kit"
    /// How long a start may take before the test fails: the server is up in a few milliseconds.
    public static let startTimeout: Duration = .seconds(10)

    /// The server's Unix socket.
    public let socketPath: String
    /// The label of the token it serves.
    public let tokenLabel: String
    /// The value of `P11_KIT_SERVER_ADDRESS` for clients.
    public var address: String { "unix:path=\(socketPath)" }

    private let logPath: String
    private let process = Mutex<SpawnedProcess?>(nil)

    /// A server (not started) for the fixture's token `tokenLabel` on `socketPath`; its output
    /// goes to `logPath`.
    public init(socketPath: String, tokenLabel: String, logPath: String) {
        self.socketPath = socketPath
        self.tokenLabel = tokenLabel
        self.logPath = logPath
    }

    deinit {
        kill()
    }

    /// True when the Debian packages are installed.
    public static var isInstalled: Bool {
        FileManager.default.isExecutableFile(atPath: commandPath)
            && FileManager.default.fileExists(atPath: clientModulePath)
    }

    /// Starts the server (SoftHSM2 with this process's `SOFTHSM2_CONF`, so the fixture's tokens)
    /// and returns once it prints its address, that is once it listens.
    public func start() async throws {
        guard Self.isInstalled else {
            throw FixtureError("p11-kit server needs the Debian packages p11-kit and p11-kit-modules")
        }
        // setsid makes the server the leader of a new process group (it is not one when spawned,
        // so setsid execs it without forking: the pid is the group's id).
        let spawned = try SpawnedProcess(
            "/usr/bin/setsid",
            [
                Self.commandPath, "server", "-f", "--provider", SoftHSMFixture.modulePath, "-n", socketPath,
                "pkcs11:token=\(tokenLabel)",
            ],
            outputPath: logPath,
            append: true
        )
        process.withLock { $0 = spawned }
        let end = ContinuousClock.now + Self.startTimeout
        while ContinuousClock.now < end {
            if spawned.poll() != nil {
                throw FixtureError("p11-kit server exited at start: \(spawned.output())")
            }
            // Printed once the socket listens; the log is appended to, so count the lines.
            if spawned.output().components(separatedBy: "P11_KIT_SERVER_PID=\(spawned.pid);").count > 1 {
                return
            }
            try await Task.sleep(for: .milliseconds(10))
        }
        kill()
        throw FixtureError("p11-kit server did not start within \(Self.startTimeout): \(spawned.output())")
    }

    /// Kills the server's whole process group with SIGKILL (the HSM going away at once, its
    /// per-connection processes with it) and reaps it. Nothing happens when it is not running.
    public func kill() {
        guard
            let spawned = process.withLock({ value in
                defer { value = nil }
                return value
            })
        else { return }
        _ = Glibc.kill(-spawned.pid, SIGKILL)
        _ = spawned.wait()
    }

    /// What the server wrote so far.
    public func log() -> String {
        (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
    }
}

/// p11-kit's client module loaded once in this process, pointed at one socket for the whole
/// process (the address is read from the environment when the module initialises). Nothing
/// else in the process loads it, so this instance owns its initialisation and can re-initialise
/// it.
public final class P11KitClient: Sendable {
    /// The socket every `P11KitServer` of this process must listen on.
    public let socketPath: String
    /// The loaded client module.
    public let module: PKCS11Module

    /// The process-wide client; requires (and sets up) the SoftHSM2 fixture, whose directory
    /// holds the socket.
    public static func shared() throws -> P11KitClient {
        try sharedResult.get()
    }

    private static let sharedResult: Result<P11KitClient, any Error> = Result {
        try P11KitClient(fixture: SoftHSMFixture.shared())
    }

    private init(fixture: SoftHSMFixture) throws {
        guard P11KitServer.isInstalled else {
            throw FixtureError("p11-kit's client needs the Debian packages p11-kit and p11-kit-modules")
        }
        let directory = (fixture.directory as NSString).appendingPathComponent("p11-kit")
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        socketPath = (directory as NSString).appendingPathComponent("server.sock")
        // Writing to a socket whose server died raises SIGPIPE, which would kill the test process.
        signal(SIGPIPE, SIG_IGN)
        setenv("P11_KIT_SERVER_ADDRESS", "unix:path=\(socketPath)", 1)
        module = try PKCS11Module.load(path: P11KitServer.clientModulePath)
    }

    /// A server for `tokenLabel` on this client's socket, logging into the fixture's directory.
    public func server(tokenLabel: String) -> P11KitServer {
        P11KitServer(
            socketPath: socketPath, tokenLabel: tokenLabel,
            logPath: (socketPath as NSString).deletingLastPathComponent + "/server-\(tokenLabel).log")
    }
}
