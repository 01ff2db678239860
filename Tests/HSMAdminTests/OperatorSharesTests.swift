import Foundation
import GatewayConfig
import HSMAdmin
import PKCS11
import ProcessTestSupport
import Sealing
import SecretMemory
import SoftHSMTestSupport
import Testing

/// `hsm-admin operator init` and `operator rekey` on real SoftHSM2 tokens.
@Suite("hsm-admin operator init and rekey", .serialized)
struct OperatorSharesTests {
    let fixture: SoftHSMFixture

    init() throws {
        fixture = try SoftHSMFixture.shared()
    }

    /// Whether `pin` logs in as the user on `token` (one attempt; SoftHSM2 does not lock).
    func logsIn(_ token: TestToken, _ pin: SecretBytes) -> Bool {
        do {
            try fixture.module.withSession(slot: token.slot) { session in
                try session.login(.user, pin: pin)
                try session.logout()
            }
            return true
        } catch {
            return false
        }
    }

    func share(_ path: String) throws -> SecretShare {
        try SecretShare(text: String(contentsOfFile: path, encoding: .utf8))
    }

    func mode(_ path: String) throws -> Int {
        let attributes = try FileManager.default.attributesOfItem(atPath: path)
        return (attributes[.posixPermissions] as? NSNumber)?.intValue ?? -1
    }

    @Test("init: a new random PIN, 5 share files of mode 0600; any 3 rebuild a PIN the token accepts")
    func initWithShareDirectory() throws {
        let token = try fixture.makeToken("operator-init")
        let directory = try makeTemporaryDirectory("operator-init")
        let checkFile = directory + "/seal-check.json"
        let shareDirectory = directory + "/shares"
        try FileManager.default.createDirectory(atPath: shareDirectory, withIntermediateDirectories: false)
        let captured = CapturedOutput()
        let outcome = try OperatorInitialization(
            options: .init(
                tokenLabel: token.label, currentPIN: .file(token.pinFile), checkFile: checkFile,
                shareDirectory: shareDirectory)
        ).run(module: fixture.module, output: captured.output)

        #expect(outcome.shareFiles.count == 5)
        #expect(try outcome.shareFiles.allSatisfy { try mode($0) == 0o600 })
        #expect(try mode(checkFile) == 0o600)
        // The old PIN no longer works; nothing printed a share.
        #expect(!logsIn(token, SecretBytes(utf8: token.userPIN)))
        #expect(captured.standardOutput.isEmpty)
        let shares = try outcome.shareFiles.map(share)
        let check = try SealCheck(encoded: Array(FileManager.default.contents(atPath: checkFile)!))
        #expect(check == outcome.check && check.threshold == 3 && check.shareCount == 5)
        for subset in [[0, 1, 2], [2, 3, 4], [0, 2, 4], [1, 3, 4]] {
            let pin = try SecretSharing.combine(subset.map { shares[$0] })
            #expect(check.verifies(pin))
            #expect(logsIn(token, pin))
            #expect(pin.count == OperatorInitialization.generatedPINLength)
        }
        // Two shares are refused.
        #expect(throws: SecretSharingError.self) { try SecretSharing.combine([shares[0], shares[1]]) }
        // The check file holds no share.
        let checkText = try String(contentsOfFile: checkFile, encoding: .utf8)
        for path in outcome.shareFiles {
            let text = try String(contentsOfFile: path, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(!checkText.contains(String(text.dropFirst(22).prefix(16))))
        }
    }

    @Test("init without --share-dir prints each share once, on standard output")
    func initPrinting() throws {
        let token = try fixture.makeToken("operator-print")
        let directory = try makeTemporaryDirectory("operator-print")
        let captured = CapturedOutput()
        _ = try OperatorInitialization(
            options: .init(
                tokenLabel: token.label, currentPIN: .file(token.pinFile), shareCount: 3, threshold: 2,
                checkFile: directory + "/check.json")
        ).run(module: fixture.module, output: captured.output)
        let lines = captured.standardOutput.split(separator: "\n")
        #expect(lines.count == 3)
        let shares = try lines.map { line in
            #expect(line.hasPrefix("share "))
            return try SecretShare(text: String(line.split(separator: ": ").last!))
        }
        #expect(logsIn(token, try SecretSharing.combine([shares[2], shares[0]])))
        #expect(!captured.standardError.contains(token.userPIN))
    }

    @Test("init refuses an existing check file or share file, and a wrong current PIN, changing nothing")
    func initRefusals() throws {
        let token = try fixture.makeToken("operator-refuse")
        let directory = try makeTemporaryDirectory("operator-refuse")
        let existing = directory + "/exists.json"
        _ = FileManager.default.createFile(atPath: existing, contents: Data("{}".utf8))
        let captured = CapturedOutput()
        var error = #expect(throws: AdminError.self) {
            try OperatorInitialization(
                options: .init(tokenLabel: token.label, currentPIN: .file(token.pinFile), checkFile: existing)
            ).run(module: fixture.module, output: captured.output)
        }
        #expect(error?.exitCode == AdminExitCode.usage)

        _ = FileManager.default.createFile(atPath: directory + "/share-4.txt", contents: Data())
        error = #expect(throws: AdminError.self) {
            try OperatorInitialization(
                options: .init(
                    tokenLabel: token.label, currentPIN: .file(token.pinFile), checkFile: directory + "/c1.json",
                    shareDirectory: directory)
            ).run(module: fixture.module, output: captured.output)
        }
        #expect(error?.message.contains("share-4.txt") == true)

        let wrongPIN = directory + "/wrong.pin"
        _ = FileManager.default.createFile(
            atPath: wrongPIN, contents: Data("not-the-pin".utf8), attributes: [.posixPermissions: 0o600])
        error = #expect(throws: AdminError.self) {
            try OperatorInitialization(
                options: .init(tokenLabel: token.label, currentPIN: .file(wrongPIN), checkFile: directory + "/c2.json")
            ).run(module: fixture.module, output: captured.output)
        }
        #expect(error?.exitCode == AdminExitCode.permissionDenied)
        #expect(!FileManager.default.fileExists(atPath: directory + "/c2.json"))

        for (shares, threshold) in [(1, 1), (256, 3), (5, 6), (5, 1)] {
            error = #expect(throws: AdminError.self) {
                try OperatorInitialization(
                    options: .init(
                        tokenLabel: token.label, currentPIN: .file(token.pinFile), shareCount: shares,
                        threshold: threshold, checkFile: directory + "/c3.json")
                ).run(module: fixture.module, output: captured.output)
            }
            #expect(error?.exitCode == AdminExitCode.usage)
        }
        // The PIN is what it was, and no share was printed.
        #expect(logsIn(token, SecretBytes(utf8: token.userPIN)))
        #expect(captured.standardOutput.isEmpty)
    }

    @Test("init --keep-pin splits the current PIN and leaves the token alone")
    func keepPIN() throws {
        let token = try fixture.makeToken("operator-keep")
        let directory = try makeTemporaryDirectory("operator-keep")
        let outcome = try OperatorInitialization(
            options: .init(
                tokenLabel: token.label, currentPIN: .file(token.pinFile), shareCount: 2, threshold: 2,
                checkFile: directory + "/check.json", shareDirectory: directory, keepPIN: true)
        ).run(module: fixture.module, output: CapturedOutput().output)
        let pin = try SecretSharing.combine(try outcome.shareFiles.map(share))
        #expect(pin.copyBytes() == Array(token.userPIN.utf8))
        #expect(logsIn(token, SecretBytes(utf8: token.userPIN)))
    }

    @Test("rekey: 3 old shares give 4 new ones (threshold 2) of the same PIN; old shares are foreign to the new check")
    func rekey() throws {
        let token = try fixture.makeToken("operator-rekey")
        let directory = try makeTemporaryDirectory("operator-rekey")
        let checkFile = directory + "/check.json"
        let oldDirectory = directory + "/old"
        let newDirectory = directory + "/new"
        for path in [oldDirectory, newDirectory] {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false)
        }
        let initial = try OperatorInitialization(
            options: .init(
                tokenLabel: token.label, currentPIN: .file(token.pinFile), checkFile: checkFile,
                shareDirectory: oldDirectory)
        ).run(module: fixture.module, output: CapturedOutput().output)
        let old = try initial.shareFiles.map(share)
        let pin = try SecretSharing.combine(old)

        // Too few, a duplicate, or a foreign share: refused, check file unchanged.
        let before = try String(contentsOfFile: checkFile, encoding: .utf8)
        let stranger = try SecretSharing.split(pin, shareCount: 5, threshold: 3)
        for shares in [[old[0], old[1]], [old[0], old[0], old[1]], [old[0], stranger[1], old[2]]] {
            #expect(throws: AdminError.self) {
                try OperatorRekey(options: .init(checkFile: checkFile, shareDirectory: newDirectory))
                    .run(oldShares: shares, output: CapturedOutput().output)
            }
        }
        #expect(try String(contentsOfFile: checkFile, encoding: .utf8) == before)
        #expect(try FileManager.default.contentsOfDirectory(atPath: newDirectory).isEmpty)

        let rekeyed = try OperatorRekey(
            options: .init(checkFile: checkFile, shareCount: 4, threshold: 2, shareDirectory: newDirectory)
        ).run(oldShares: [old[4], old[1], old[2]], output: CapturedOutput().output)
        #expect(rekeyed.shareFiles.count == 4)
        let new = try rekeyed.shareFiles.map(share)
        let check = try SealCheck(encoded: Array(FileManager.default.contents(atPath: checkFile)!))
        #expect(check.threshold == 2 && check.shareCount == 4)
        let rebuilt = try SecretSharing.combine([new[3], new[0]])
        #expect(check.verifies(rebuilt))
        #expect(rebuilt.copyBytes() == pin.copyBytes())
        #expect(logsIn(token, rebuilt))
        #expect(!old.contains(where: check.admits))
    }
}
