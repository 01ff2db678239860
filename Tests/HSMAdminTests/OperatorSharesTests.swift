import Crypto
import Foundation
import GatewayConfig
import PKCS11
import ProcessTestSupport
import Sealing
import SecretMemory
import SoftHSMTestSupport
import Testing

@testable import HSMAdmin

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

    /// P-256 key pairs as PEM files (private ones mode 0600), as `openssl ecparam` would make.
    func keyPairs(_ count: Int, in directory: String) throws -> [(publicKey: String, privateKey: String)] {
        try (1...count).map { number in
            let key = P256.KeyAgreement.PrivateKey()
            let publicPath = directory + "/operator-\(number).pub"
            let privatePath = directory + "/operator-\(number).key"
            try key.publicKey.pemRepresentation.write(toFile: publicPath, atomically: true, encoding: .utf8)
            _ = FileManager.default.createFile(
                atPath: privatePath, contents: Data(key.pemRepresentation.utf8), attributes: [.posixPermissions: 0o600])
            return (publicPath, privatePath)
        }
    }

    @Test("init --recipient: each share encrypted to its operator's key; only that key opens it; rekey reads them")
    func encryptedShares() throws {
        let token = try fixture.makeToken("operator-hpke")
        let directory = try makeTemporaryDirectory("operator-hpke")
        var keys = try keyPairs(2, in: directory)
        // The third operator's key pair from the openssl CLI, as docs/sealing.md tells operators
        // (SEC1 "EC PRIVATE KEY" and an SPKI public key).
        let opensslKey = directory + "/openssl.key"
        let opensslPublic = directory + "/openssl.pub"
        let generated = try ChildProcess.run(
            "/usr/bin/openssl", ["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", opensslKey])
        try #require(generated.status == 0, "\(generated)")
        let extracted = try ChildProcess.run(
            "/usr/bin/openssl", ["ec", "-in", opensslKey, "-pubout", "-out", opensslPublic])
        try #require(extracted.status == 0, "\(extracted)")
        chmod(opensslKey, 0o600)
        keys.append((opensslPublic, opensslKey))
        let shareDirectory = directory + "/shares"
        try FileManager.default.createDirectory(atPath: shareDirectory, withIntermediateDirectories: false)
        let outcome = try OperatorInitialization(
            options: .init(
                tokenLabel: token.label, currentPIN: .file(token.pinFile), shareCount: 3, threshold: 2,
                checkFile: directory + "/check.json", shareDirectory: shareDirectory,
                recipients: keys.map(\.publicKey))
        ).run(module: fixture.module, output: CapturedOutput().output)
        #expect(
            outcome.shareFiles.map { ($0 as NSString).lastPathComponent } == [
                "share-1.hpke", "share-2.hpke", "share-3.hpke",
            ])
        // Not a share in clear: the text parser refuses the file, and the other operators' keys
        // do not open it.
        let file = try String(contentsOfFile: outcome.shareFiles[0], encoding: .utf8)
        #expect(file.hasPrefix("hsmgw-share-hpke-v1\n"))
        #expect(throws: SecretSharingError.self) { try SecretShare(text: file) }
        let wrong = try #require(
            try? P256.KeyAgreement.PrivateKey(
                pemRepresentation:
                    String(contentsOfFile: keys[1].privateKey, encoding: .utf8)))
        #expect(throws: AdminError.self) {
            try ShareFiles.readShare(outcome.shareFiles[0], identities: [wrong])
        }
        #expect(throws: AdminError.self) { try ShareFiles.readShare(outcome.shareFiles[0]) }

        let opened = try (0..<3).map { index in
            try ShareFiles.readShare(
                outcome.shareFiles[index], identities: [try ShareEncryption.identity(keys[index].privateKey)])
        }
        #expect(logsIn(token, try SecretSharing.combine([opened[2], opened[0]])))

        // rekey with encrypted old shares, to new plain ones.
        let newDirectory = directory + "/new"
        try FileManager.default.createDirectory(atPath: newDirectory, withIntermediateDirectories: false)
        let identities = try keys.map { try ShareEncryption.identity($0.privateKey) }
        let old = try [outcome.shareFiles[1], outcome.shareFiles[2]].map {
            try ShareFiles.readShare($0, identities: identities)
        }
        let rekeyed = try OperatorRekey(
            options: .init(
                checkFile: directory + "/check.json", shareCount: 2, threshold: 2, shareDirectory: newDirectory)
        ).run(oldShares: old, output: CapturedOutput().output)
        #expect(logsIn(token, try SecretSharing.combine(try rekeyed.shareFiles.map(share))))
    }

    @Test("--recipient needs one key per share and a share directory")
    func recipientRules() throws {
        let token = try fixture.makeToken("operator-hpke-rules")
        let directory = try makeTemporaryDirectory("operator-hpke-rules")
        let keys = try keyPairs(2, in: directory)
        for (shareDirectory, recipients) in [(directory, [keys[0].publicKey]), (nil, keys.map(\.publicKey))] {
            let error = #expect(throws: AdminError.self) {
                try OperatorInitialization(
                    options: .init(
                        tokenLabel: token.label, currentPIN: .file(token.pinFile), shareCount: 2, threshold: 2,
                        checkFile: directory + "/check.json", shareDirectory: shareDirectory, recipients: recipients)
                ).run(module: fixture.module, output: CapturedOutput().output)
            }
            #expect(error?.exitCode == AdminExitCode.usage)
        }
        #expect(logsIn(token, SecretBytes(utf8: token.userPIN)))
    }
}
