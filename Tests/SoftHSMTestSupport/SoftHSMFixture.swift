import Foundation
import PKCS11
import Synchronization

/// The PKCS#11 implementation the tests run against, chosen by `HSMGW_TEST_PKCS11`: `softhsm2`
/// (the default) or `nss` (NSS's softoken, docs/hsm/nss-softoken.md). `make test` runs the
/// PKCS#11 suites and a set of end-to-end suites under both.
public enum TestPKCS11Implementation: String, Sendable {
    case softHSM2 = "softhsm2"
    case nss

    /// The implementation this test process uses. An unknown value stops the process: a typo
    /// must not quietly test SoftHSM2 again.
    public static let current: TestPKCS11Implementation = {
        let value = ProcessInfo.processInfo.environment["HSMGW_TEST_PKCS11"] ?? "softhsm2"
        guard let implementation = TestPKCS11Implementation(rawValue: value) else {
            fatalError("HSMGW_TEST_PKCS11=\(value): expected softhsm2 or nss")
        }
        return implementation
    }()

    /// True under SoftHSM2: the condition of suites that test SoftHSM2 itself (its token
    /// directory, the fault module that forwards to it, p11-kit's server in front of it).
    public static var isSoftHSM2: Bool { current == .softHSM2 }
}

/// One real PKCS#11 module per test process, loaded once (`C_Initialize` is process-wide), and
/// a fresh token for each suite that asks.
///
/// Under SoftHSM2: a temporary token directory and its own `softhsm2.conf` (SoftHSM2 reads
/// `SOFTHSM2_CONF` only in `C_Initialize`); each token is initialised on SoftHSM2's free slot.
/// Under NSS's softoken: the module is initialised over an empty base database, and each token
/// is a new database directory opened as another slot (`PKCS11Module.openNSSDatabaseSlot`),
/// whose user PIN is set through an empty security-officer login; `TestToken.initializeArguments`
/// is how another process (the gateway, hsm-admin) reaches the same token. NSS opens at most 97
/// databases per process (slot ids 4-100) and a pool keeps its sessions open until shut down, so
/// a test process under NSS makes at most 97 tokens: `make test-nss` runs chosen suites (a whole
/// `KeyStoreConformanceTests` run asks for about 150).
public final class SoftHSMFixture: Sendable {
    /// The implementation under test (`TestPKCS11Implementation.current`).
    public static var implementation: TestPKCS11Implementation { TestPKCS11Implementation.current }

    /// The module under test: `HSMGW_TEST_PKCS11_MODULE`, else Debian's SoftHSM2 or NSS softoken.
    public static let modulePath =
        ProcessInfo.processInfo.environment["HSMGW_TEST_PKCS11_MODULE"]
        ?? (implementation == .nss ? NSSSoftoken.defaultModulePath : "/usr/lib/softhsm/libsofthsm2.so")

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
        switch Self.implementation {
        case .softHSM2:
            module = try PKCS11Module.load(path: Self.modulePath)
        case .nss:
            // The base database only carries the module; every token is a database of its own.
            let databases = base.appendingPathComponent("nss")
            let baseDatabase = databases.appendingPathComponent("base")
            try FileManager.default.createDirectory(
                at: baseDatabase, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            module = try PKCS11Module.load(
                path: Self.modulePath,
                initializeArguments: NSSSoftoken.initializeArguments(
                    databaseDirectory: baseDatabase.path, tokenLabel: "hsmgw-nss-fixture-base"))
        }
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
            if Self.implementation == .nss {
                return try makeNSSToken(label: label, userPIN: userPIN)
            }
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
            return TestToken(
                label: label, slot: tokenSlot, userPIN: userPIN, soPIN: soPIN,
                pinFile: try writePINFile(label, userPIN),
                initializeArguments: nil)
        }
    }

    /// A new NSS database as a new slot, its user PIN set. NSS has no security-officer PIN: a new
    /// database accepts an empty one until the user PIN is set, and refuses security-officer
    /// logins afterwards (`CKR_USER_TYPE_INVALID`).
    private func makeNSSToken(label: String, userPIN: String) throws -> TestToken {
        let database = (directory as NSString).appendingPathComponent("nss/\(label)")
        try FileManager.default.createDirectory(
            atPath: database, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        let slot = try module.openNSSDatabaseSlot(directory: database, tokenLabel: label)
        try module.withSession(slot: slot) { session in
            try session.login(.securityOfficer, pin: SecretBytes(utf8: ""))
            try session.initPIN(SecretBytes(utf8: userPIN))
            try session.logout()
        }
        guard try module.slot(tokenLabel: label) == slot else {
            throw FixtureError("the NSS database \(database) is not found again by its label \(label)")
        }
        return TestToken(
            label: label, slot: slot, userPIN: userPIN, soPIN: "", pinFile: try writePINFile(label, userPIN),
            initializeArguments: try NSSSoftoken.initializeArguments(databaseDirectory: database, tokenLabel: label))
    }

    private func writePINFile(_ label: String, _ userPIN: String) throws -> String {
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
        return pinFile
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
    /// The security officer's PIN; empty under NSS, which has none.
    public let soPIN: String
    /// A file holding the user PIN, mode 0600, no newline.
    public let pinFile: String
    /// What another process passes to `C_Initialize` to reach this token (`hsm.initialize_args`,
    /// `--initialize-args`): nil under SoftHSM2 (`SOFTHSM2_CONF` does it), NSS's library
    /// parameters naming the token's database and label under NSS.
    public let initializeArguments: String?

    /// The user PIN as secret bytes.
    public var pin: SecretBytes { SecretBytes(utf8: userPIN) }
}

/// A fixture set-up failure.
public struct FixtureError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
