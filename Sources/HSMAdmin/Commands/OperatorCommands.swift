import ArgumentParser
import Crypto
import Foundation
import GatewayClient
import GatewayConfig
import GatewayWire
import PKCS11
import Sealing

/// `hsm-admin operator`: the sealed gateway's PIN split into Shamir shares (docs/sealing.md).
struct OperatorCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "operator",
        abstract: "Split the HSM user PIN into Shamir shares; unseal and seal the gateway with them.",
        subcommands: [
            OperatorInitCommand.self, OperatorRekeyCommand.self, OperatorUnsealCommand.self, OperatorSealCommand.self,
        ]
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

    @Option(help: "C_Initialize arguments the module needs (hsm.initialize_args), e.g. NSS's library parameters.")
    var initializeArgs: String?

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

    @Option(help: "An operator's public key (PEM, P-256), one per share in order: share n is encrypted to the n-th.")
    var recipient: [String] = []

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
            loaded = try PKCS11Module.load(path: module, initializeArguments: initializeArgs)
        } catch {
            output.note("hsm-admin: cannot load \(module): \(error)")
            throw ExitCode(AdminExitCode.configuration)
        }
        defer { try? loaded.finalize() }
        let initialization = OperatorInitialization(
            options: .init(
                tokenLabel: token, currentPIN: source, shareCount: shares, threshold: threshold,
                checkFile: checkFile, shareDirectory: shareDir, keepPIN: keepPin, recipients: recipient))
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

    @Option(help: "An operator's public key (PEM, P-256) for each new share, in order.")
    var recipient: [String] = []

    @Option(help: "A private key (PEM, mode 0600) that opens encrypted share files; repeatable.")
    var identity: [String] = []

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
                var identities: [P256.KeyAgreement.PrivateKey] = []
                for path in identity { identities.append(try ShareEncryption.identity(path)) }
                for path in shareFile { old.append(try ShareFiles.readShare(path, identities: identities)) }
            }
            var options = OperatorRekey.Options(
                checkFile: checkFile, shareCount: shares, threshold: threshold, shareDirectory: shareDir)
            options.recipients = recipient
            let rekey = OperatorRekey(options: options)
            _ = try rekey.run(oldShares: old, output: output)
        } catch {
            output.note("hsm-admin: \(error.message)")
            throw ExitCode(error.exitCode)
        }
    }
}

/// The seal's state as `operator unseal`, `operator seal` and `status` show it.
struct SealProgressView: Codable, Sendable, Hashable {
    var mode: String
    var sealed: Bool
    var submitted: UInt32
    var threshold: UInt32
    var shareCount: UInt32

    init(_ progress: Hsmgw_V1_SealProgress) {
        mode = progress.mode
        sealed = progress.sealed
        submitted = progress.submitted
        threshold = progress.threshold
        shareCount = progress.shareCount
    }

    var text: String {
        if mode != "shamir" { return "no (hsm.unseal: \(mode.isEmpty ? "auto" : mode.sanitizedForTerminal))" }
        return sealed
            ? "YES: \(submitted) of \(threshold) shares given (\(shareCount) exist)"
            : "no (shamir, \(threshold) of \(shareCount))"
    }
}

/// `hsm-admin operator unseal [--share-file F | --reset]`.
struct OperatorUnsealCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "unseal",
        abstract: "Give one Shamir share to a sealed gateway (or --reset a half-finished unseal).",
        discussion: """
            Each operator runs it once with their own share, from any machine that reaches the \
            gateway: from --share-file (mode 0600) or, without it, a prompt on the terminal (not \
            echoed); never from a flag. The share that reaches the threshold unseals: the answer \
            comes once the gateway has logged in to the HSM. A refused share (mistyped, of \
            another split, already given) exits 65 and says why without telling anything about \
            the other shares. --reset discards the shares given so far.
            """
    )

    @Option(help: "A file holding this operator's share (mode 0600).")
    var shareFile: String?

    @Flag(help: "Discard the shares given so far instead of giving one.")
    var reset = false

    @Option(help: "Your private key (PEM, mode 0600), for a share file encrypted to you.")
    var identity: String?

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func validate() throws {
        if reset, shareFile != nil { throw ValidationError("give --reset or --share-file, not both") }
    }

    func execute(_ session: AdminSession) async throws {
        if reset {
            let response: Hsmgw_V1_UnsealResetResponse = try await session.client.call(
                method: .unsealReset, request: Hsmgw_V1_UnsealResetRequest())
            let view = SealProgressView(response.progress)
            session.print(view) { "sealed: \(view.text)\n" }
            if !session.json {
                session.output.note(
                    response.discarded
                        ? "hsm-admin: the shares given so far were discarded" : "hsm-admin: no share had been given")
            }
            return
        }
        // Read (and check) the share before connecting, so a typo costs no round trip.
        let share: SecretShare
        if let shareFile {
            let identities = try identity.map { [try ShareEncryption.identity($0)] } ?? []
            share = try ShareFiles.readShare(shareFile, identities: identities)
        } else {
            share = try ShareFiles.promptShare("share: ")
        }
        var request = Hsmgw_V1_UnsealSubmitShareRequest()
        request.share = share.text.withUnsafeBytes { Data($0) }
        let response: Hsmgw_V1_UnsealSubmitShareResponse = try await session.client.call(
            method: .unsealSubmitShare, request: request)
        let view = SealProgressView(response.progress)
        session.print(view) { "sealed: \(view.text)\n" }
        if !session.json, !view.sealed {
            session.output.note("hsm-admin: the gateway is unsealed and serves key operations")
        }
    }
}

/// `hsm-admin operator seal`.
struct OperatorSealCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "seal",
        abstract: "Seal a running gateway: key operations stop, the HSM login and the PIN are dropped.",
        discussion: """
            Key operations are refused at once (UNAVAILABLE, reason SEALED); those already holding \
            an HSM session finish; then every session closes and the PIN is forgotten. K \
            operators must run `operator unseal` again. Only with hsm.unseal: shamir.
            """
    )

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func execute(_ session: AdminSession) async throws {
        let response: Hsmgw_V1_SealResponse = try await session.client.call(
            method: .seal, request: Hsmgw_V1_SealRequest())
        let view = SealProgressView(response.progress)
        session.print(view) { "sealed: \(view.text)\n" }
    }
}
