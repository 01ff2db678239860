import Foundation
import PKCS11
import Synchronization

/// One real SoftHSM2 installation per test process: a temporary token directory, its own
/// `softhsm2.conf`, and the module loaded once (`C_Initialize` is process-wide, and SoftHSM2
/// reads `SOFTHSM2_CONF` only then). Each suite asks for its own fresh token.
public final class SoftHSMFixture: Sendable {
    /// The module under test: `HSMGW_TEST_PKCS11_MODULE`, else Debian's SoftHSM2.
    public static let modulePath =
        ProcessInfo.processInfo.environment["HSMGW_TEST_PKCS11_MODULE"] ?? "/usr/lib/softhsm/libsofthsm2.so"

    /// The process-wide fixture. Throws (for every test that asks) when SoftHSM2 cannot be set up.
    public static func shared() throws -> SoftHSMFixture {
        try sharedResult.get()
    }

    private static let sharedResult: Result<SoftHSMFixture, any Error> = Result { try SoftHSMFixture() }

    /// The temporary directory holding the config and the tokens; removed at process exit.
    public let directory: String
    /// The `softhsm2.conf` this process uses (exported as `SOFTHSM2_CONF`).
    public let configPath: String
    /// The loaded module.
    public let module: PKCS11Module

    private let tokenCreation = Mutex(0)

    private init() throws {
        let base = FileManager.default.temporaryDirectory.appendingPathComponent(
            "hsmgw-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        )
        let tokens = base.appendingPathComponent("tokens")
        try FileManager.default.createDirectory(
            at: tokens,
            withIntermediateDirectories: true,
            attributes: [.posixPermissions: 0o700]
        )
        let config = base.appendingPathComponent("softhsm2.conf")
        try """
        directories.tokendir = \(tokens.path)
        objectstore.backend = file
        log.level = ERROR
        slots.removable = false

        """.write(to: config, atomically: true, encoding: .utf8)
        directory = base.path
        configPath = config.path
        setenv("SOFTHSM2_CONF", configPath, 1)
        // Subprocesses (hsm-admin) inherit the variable and so see the same tokens.
        module = try PKCS11Module.load(path: Self.modulePath)
        atexit {
            if case .success(let fixture) = SoftHSMFixture.sharedResult {
                try? FileManager.default.removeItem(atPath: fixture.directory)
            }
        }
    }

    /// Initialises a fresh token on the module's free slot, with random user and SO PINs and a
    /// user PIN file (mode 0600). Labels are unique per process: `name` plus a counter.
    public func makeToken(_ name: String) throws -> TestToken {
        try tokenCreation.withLock { counter in
            counter += 1
            let label = String("\(name)-\(counter)".prefix(32))
            let userPIN = Self.randomPIN()
            let soPIN = Self.randomPIN()
            let slot = try module.uninitializedTokenSlot()
            try module.initToken(slot: slot, securityOfficerPIN: SecretBytes(utf8: soPIN), label: label)
            // SoftHSM2 gives the initialised token a new slot id: find it again by label.
            let tokenSlot = try module.slot(tokenLabel: label)
            try module.withSession(slot: tokenSlot) { session in
                try session.login(.securityOfficer, pin: SecretBytes(utf8: soPIN))
                try session.initPIN(SecretBytes(utf8: userPIN))
                try session.logout()
            }
            let pinFile = (directory as NSString).appendingPathComponent("\(label).pin")
            guard
                FileManager.default.createFile(
                    atPath: pinFile,
                    contents: Data(userPIN.utf8),
                    attributes: [.posixPermissions: 0o600]
                )
            else {
                throw FixtureError("cannot write \(pinFile)")
            }
            return TestToken(label: label, slot: tokenSlot, userPIN: userPIN, soPIN: soPIN, pinFile: pinFile)
        }
    }

    private static func randomPIN() -> String {
        (0..<16).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined()
    }
}

/// A token made by `SoftHSMFixture.makeToken`.
public struct TestToken: Sendable {
    public let label: String
    public let slot: SlotID
    public let userPIN: String
    public let soPIN: String
    /// A file holding the user PIN, mode 0600, no newline.
    public let pinFile: String

    /// The user PIN as secret bytes.
    public var pin: SecretBytes { SecretBytes(utf8: userPIN) }
}

/// A fixture set-up failure.
public struct FixtureError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
