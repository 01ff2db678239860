import ArgumentParser
import Foundation
import GatewayConfig
import PKCS11
import Sealing

/// `hsm-admin operator`: the sealed gateway's PIN split into Shamir shares (docs/sealing.md).
struct OperatorCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "operator",
        abstract: "Split the HSM user PIN into Shamir shares, and make new shares from old ones.",
        subcommands: [OperatorInitCommand.self, OperatorRekeyCommand.self]
    )
}

/// `hsm-admin operator init`.
struct OperatorInitCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "init",
        abstract: "Give the token a random user PIN nobody sees, split into shares.",
        discussion: """
            Logs in with the current user PIN (--pin-file or --pin-env, never a flag), changes it \
            with C_SetPIN to a random 32-character PIN, splits that PIN into --shares shares of \
            which --threshold rebuild it, and writes --check-file, which the gateway uses to \
            check a reconstruction (it holds no PIN and no share). Shares are printed once, or \
            written each to its own file of mode 0600 with --share-dir. The check file and share \
            files are written before the PIN changes; if the change fails they are removed. A \
            token that refuses C_SetPIN: give --keep-pin to split the current PIN instead (it \
            should be long and random). Works on the token directly; stop the gateway first.
            """
    )

    @Option(help: "Path of the PKCS#11 module (shared library).")
    var module: String

    @Option(help: "Label of the token.")
    var token: String

    @Option(help: "File holding the current user PIN (mode 0600 or 0400).")
    var pinFile: String?

    @Option(help: "Environment variable holding the current user PIN.")
    var pinEnv: String?

    @Option(help: "Shares to make (2...255).")
    var shares: Int = SecretSharing.defaultShareCount

    @Option(help: "Shares needed to unseal (\(SecretSharing.minimumThreshold)...--shares).")
    var threshold: Int = SecretSharing.defaultThreshold

    @Option(help: "Where to write the check file (hsm.unseal.check_file of the gateway); must not exist.")
    var checkFile: String

    @Option(help: "Write share <n> to DIR/share-<n>.txt (mode 0600) instead of printing the shares.")
    var shareDir: String?

    @Flag(help: "Split the current PIN instead of setting a new one (tokens that refuse C_SetPIN).")
    var keepPin = false

    init() {}

    func validate() throws {
        guard (pinFile == nil) != (pinEnv == nil) else {
            throw ValidationError("give exactly one of --pin-file or --pin-env")
        }
    }

    func run() throws {
        let output = AdminOutput.console
        let source: PINSource = pinFile.map { .file($0) } ?? .environment(pinEnv ?? "")
        let loaded: PKCS11Module
        do {
            loaded = try PKCS11Module.load(path: module)
        } catch {
            output.note("hsm-admin: cannot load \(module): \(error)")
            throw ExitCode(AdminExitCode.configuration)
        }
        defer { try? loaded.finalize() }
        let initialization = OperatorInitialization(
            options: .init(
                tokenLabel: token, currentPIN: source, shareCount: shares, threshold: threshold,
                checkFile: checkFile, shareDirectory: shareDir, keepPIN: keepPin))
        do {
            _ = try initialization.run(module: loaded, output: output)
        } catch {
            output.note("hsm-admin: \(error.message)")
            throw ExitCode(error.exitCode)
        }
    }
}

/// `hsm-admin operator rekey`.
struct OperatorRekeyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rekey",
        abstract: "Make new shares from enough old ones; the PIN and the HSM stay as they are.",
        discussion: """
            Reads the threshold's worth of current shares, from --share-file (repeat it) or, \
            without it, one prompt per share on the terminal (not echoed); a share is never a \
            flag value. Rebuilds the PIN, checks it against --check-file, splits it into new \
            shares, then replaces the check file: from then on only the new shares unseal. Shares \
            are printed once, or written with --share-dir (an empty directory). A gateway that is \
            running reads the new check file at its next unseal.
            """
    )

    @Option(help: "The current check file; replaced.")
    var checkFile: String

    @Option(help: "A file holding one current share (mode 0600); repeat for each share.")
    var shareFile: [String] = []

    @Option(help: "Shares to make (2...255).")
    var shares: Int = SecretSharing.defaultShareCount

    @Option(help: "Shares needed to unseal (\(SecretSharing.minimumThreshold)...--shares).")
    var threshold: Int = SecretSharing.defaultThreshold

    @Option(help: "Write new share <n> to DIR/share-<n>.txt (mode 0600) instead of printing.")
    var shareDir: String?

    init() {}

    func run() throws {
        let output = AdminOutput.console
        do {
            var old: [SecretShare] = []
            if shareFile.isEmpty {
                let check = try ShareFiles.readCheck(checkFile)
                for index in 1...check.threshold {
                    old.append(try ShareFiles.promptShare("current share \(index) of \(check.threshold): "))
                }
            } else {
                for path in shareFile { old.append(try ShareFiles.readShare(path)) }
            }
            let rekey = OperatorRekey(
                options: .init(checkFile: checkFile, shareCount: shares, threshold: threshold, shareDirectory: shareDir)
            )
            _ = try rekey.run(oldShares: old, output: output)
        } catch {
            output.note("hsm-admin: \(error.message)")
            throw ExitCode(error.exitCode)
        }
    }
}
