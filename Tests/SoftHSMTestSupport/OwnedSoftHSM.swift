import Foundation
import PKCS11
import ProcessTestSupport

/// A second SoftHSM2 in this process, initialised by the tests themselves, so a `SessionPool`
/// over it owns the module and may re-initialise it (`PKCS11Module.reinitialize()`), as the
/// gateway does with its own module. The fixture's SoftHSM2 cannot serve for that: it belongs to
/// the whole test process.
///
/// The dynamic loader loads a library once per file, so this is a copy of SoftHSM2's library
/// under another path: a separate instance with its own globals, reading the same
/// `SOFTHSM2_CONF`, so the fixture's token directory. Its tokens are made with `softhsm2-util` (a
/// child process) after the fixture's instance started and before this one does: SoftHSM2 reads
/// its token directory only in `C_Initialize`, so the fixture's instance never sees them, and
/// moving one away (`OwnedSoftHSMToken.directory`) disturbs no other test.
///
/// SoftHSM2 2.6.1 looks for a token's directory only when a call needs it. Once it found it gone,
/// it answers `C_GetTokenInfo` and `C_Login` with `CKR_GENERAL_ERROR` and old key handles with
/// `CKR_OBJECT_HANDLE_INVALID` (a search finds nothing, random still works), and keeps doing so
/// after the directory is back, until `C_Finalize` and `C_Initialize`. A directory moved away and
/// back with no call in between goes unnoticed.
public final class OwnedSoftHSM: Sendable {
    /// The labels of the tokens made for the tests: one to take away, one that stays.
    public static let tokenLabels = ["owned-outage", "owned-bystander"]

    /// The copy of SoftHSM2's library.
    public let libraryPath: String
    /// The copy, loaded and initialised by this instance (`ownsInitialization`).
    public let module: PKCS11Module
    /// The tokens, by label (`tokenLabels`).
    public let tokens: [String: OwnedSoftHSMToken]

    /// The process-wide instance; requires (and sets up) the SoftHSM2 fixture first.
    public static func shared() throws -> OwnedSoftHSM {
        try sharedResult.get()
    }

    private static let sharedResult: Result<OwnedSoftHSM, any Error> = Result {
        try OwnedSoftHSM(fixture: SoftHSMFixture.shared())
    }

    private init(fixture: SoftHSMFixture) throws {
        let directory = (fixture.directory as NSString).appendingPathComponent("owned-softhsm")
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        libraryPath = (directory as NSString).appendingPathComponent("libsofthsm2-owned.so")
        // The file itself: a copy of a symbolic link would lead the loader back to the same file.
        let source = URL(fileURLWithPath: SoftHSMFixture.modulePath).resolvingSymlinksInPath().path
        try FileManager.default.copyItem(atPath: source, toPath: libraryPath)

        let tokenDirectory = (fixture.directory as NSString).appendingPathComponent("tokens")
        // Outside the token directory, or SoftHSM2 would find the token there as well.
        let awayDirectory = (directory as NSString).appendingPathComponent("away")
        try FileManager.default.createDirectory(atPath: awayDirectory, withIntermediateDirectories: true)
        var made: [(label: String, userPIN: String)] = []
        for label in Self.tokenLabels {
            let userPIN = Self.randomPIN()
            let result = try ChildProcess.run(
                "/usr/bin/softhsm2-util",
                ["--init-token", "--free", "--label", label, "--pin", userPIN, "--so-pin", Self.randomPIN()],
                timeout: .seconds(60))
            guard result.status == 0 else { throw FixtureError("softhsm2-util --init-token failed: \(result)") }
            made.append((label, userPIN))
        }

        module = try PKCS11Module.load(path: libraryPath)
        guard module.ownsInitialization else {
            throw FixtureError("\(libraryPath) was initialised already: the copy is not a separate instance")
        }
        let names = try FileManager.default.contentsOfDirectory(atPath: tokenDirectory)
        var tokens: [String: OwnedSoftHSMToken] = [:]
        for (label, userPIN) in made {
            let info = try module.tokenInfo(module.slot(tokenLabel: label))
            // SoftHSM2 names a token's directory with a UUID whose last 16 hex digits are its serial.
            let serial = info.serialNumber.lowercased()
            let matches = names.filter { $0.replacingOccurrences(of: "-", with: "").lowercased().hasSuffix(serial) }
            guard matches.count == 1 else {
                throw FixtureError("no single directory in \(tokenDirectory) for serial \(serial): \(matches)")
            }
            tokens[label] = OwnedSoftHSMToken(
                label: label, userPIN: userPIN,
                directory: (tokenDirectory as NSString).appendingPathComponent(matches[0]),
                awayPath: (awayDirectory as NSString).appendingPathComponent(matches[0]))
        }
        self.tokens = tokens
    }

    private static func randomPIN() -> String {
        (0..<16).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined()
    }
}

/// A token of `OwnedSoftHSM`.
public struct OwnedSoftHSMToken: Sendable {
    public let label: String
    public let userPIN: String
    /// The token's directory under the fixture's token directory.
    public let directory: String
    /// Where `moveAway()` puts the directory: on the same file system, outside the token
    /// directory.
    public let awayPath: String

    /// The user PIN as secret bytes.
    public var pin: SecretBytes { SecretBytes(utf8: userPIN) }

    /// Takes the token away as a removed device would be: its directory is renamed (atomically).
    public func moveAway() throws {
        guard rename(directory, awayPath) == 0 else {
            throw FixtureError("cannot move \(directory) away: errno \(errno)")
        }
    }

    /// Brings the token back: the directory is renamed to its old name.
    public func moveBack() throws {
        guard rename(awayPath, directory) == 0 else {
            throw FixtureError("cannot move \(awayPath) back: errno \(errno)")
        }
    }

    /// True while the directory is in place.
    public var isInPlace: Bool { FileManager.default.fileExists(atPath: directory) }
}
