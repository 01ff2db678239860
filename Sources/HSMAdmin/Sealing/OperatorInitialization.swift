import Crypto
import Foundation
import GatewayConfig
import PKCS11
import Sealing
import SecretMemory

/// `hsm-admin operator init`: replaces the token's user PIN with a random one nobody sees
/// (`C_SetPIN`), splits it into Shamir shares, and writes the check file the gateway verifies a
/// reconstruction against. With `keepPIN` (tokens that refuse `C_SetPIN`) the current PIN is split
/// instead and the token is not changed.
///
/// Order matters, because a PIN whose shares were lost locks the keys away for good: the current
/// PIN is checked by a login first; the check file and share files are written and synced next;
/// only then does the PIN change, and a failed change removes what was written. Shares that go to
/// standard output are printed after the change succeeded.
public struct OperatorInitialization: Sendable {
    /// What to do.
    public struct Options: Sendable {
        /// The token, by label.
        public var tokenLabel: String
        /// Where the current user PIN comes from (file or environment; never a flag).
        public var currentPIN: PINSource
        /// Shares to make (`SecretSharing.shareCountLimit`).
        public var shareCount: Int
        /// Shares needed to unseal (`SecretSharing.thresholdLimit`).
        public var threshold: Int
        /// Where the check file goes; it must not exist yet.
        public var checkFile: String
        /// Each share to `share-<n>.txt` here (mode 0600), instead of standard output.
        public var shareDirectory: String?
        /// Split the current PIN instead of setting a new one.
        public var keepPIN: Bool
        /// Operators' public keys (PEM, P-256), one per share in order: share n is written to
        /// `share-<n>.hpke` encrypted to the n-th (needs `shareDirectory`). Empty: plain shares.
        public var recipients: [String] = []

        public init(
            tokenLabel: String,
            currentPIN: PINSource,
            shareCount: Int = SecretSharing.defaultShareCount,
            threshold: Int = SecretSharing.defaultThreshold,
            checkFile: String,
            shareDirectory: String? = nil,
            keepPIN: Bool = false,
            recipients: [String] = []
        ) {
            self.recipients = recipients
            self.tokenLabel = tokenLabel
            self.currentPIN = currentPIN
            self.shareCount = shareCount
            self.threshold = threshold
            self.checkFile = checkFile
            self.shareDirectory = shareDirectory
            self.keepPIN = keepPIN
        }
    }

    /// What was made.
    public struct Outcome: Sendable {
        /// The check file's contents.
        public let check: SealCheck
        /// The share files written, in share order (empty when printed).
        public let shareFiles: [String]
    }

    /// Characters of a generated PIN: letters and digits, which every token's PIN entry accepts.
    static let pinAlphabet: [UInt8] = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789".utf8)
    /// Length of a generated PIN: 32 of 62 characters is about 190 bits, beyond guessing even
    /// offline against the check file; shortened to the token's maximum when that is lower.
    public static let generatedPINLength = 32

    public let options: Options

    public init(options: Options) {
        self.options = options
    }

    /// Runs the initialisation on `module` (already loaded: `C_Initialize` is once per process).
    public func run(module: PKCS11Module, output: AdminOutput) throws(AdminError) -> Outcome {
        guard SecretSharing.shareCountLimit.contains(options.shareCount) else {
            throw AdminError(
                .usage,
                "--shares must be from \(SecretSharing.shareCountLimit.lowerBound) to "
                    + "\(SecretSharing.shareCountLimit.upperBound)")
        }
        guard SecretSharing.thresholdLimit(shareCount: options.shareCount).contains(options.threshold) else {
            throw AdminError(
                .usage, "--threshold must be from \(SecretSharing.minimumThreshold) to \(options.shareCount) (--shares)"
            )
        }
        guard !FileManager.default.fileExists(atPath: options.checkFile) else {
            throw AdminError(
                .usage,
                "check file \(options.checkFile) exists: the token was initialised already "
                    + "(use `operator rekey` for new shares; move the file away only to start over)")
        }
        let recipients = try Self.loadRecipients(
            options.recipients, shareCount: options.shareCount,
            shareDirectory: options.shareDirectory)
        let sharePaths = try plannedSharePaths()

        let slot: SlotID
        let token: TokenInfo
        let current: SecretBytes
        do {
            slot = try module.slot(tokenLabel: options.tokenLabel)
            token = try module.tokenInfo(slot)
        } catch {
            throw AdminError(.configuration, "token \(options.tokenLabel): \(error)")
        }
        do {
            current = try options.currentPIN.read()
        } catch {
            throw AdminError(.configuration, "\(error)")
        }
        let pin: SecretBytes
        if options.keepPIN {
            pin = current
        } else {
            let length = min(Self.generatedPINLength, token.maximumPINLength)
            guard length >= max(token.minimumPINLength, 16) else {
                throw AdminError(
                    .failed,
                    "the token allows PINs of at most \(token.maximumPINLength) characters: too short for a "
                        + "generated PIN; use --keep-pin with a long random PIN set by the security officer")
            }
            pin = Self.generatePIN(length: length)
        }
        let shares: [SecretShare]
        do {
            shares = try SecretSharing.split(pin, shareCount: options.shareCount, threshold: options.threshold)
        } catch {
            throw AdminError(.usage, error.message)
        }
        let check = SealCheck(secret: pin, shares: shares)

        // 1. The current PIN works (one login attempt, before anything is written).
        do {
            try module.withSession(slot: slot) { session in
                try session.login(.user, pin: current)
                try? session.logout()
            }
        } catch {
            throw AdminError(.credentials, "token \(options.tokenLabel) refused the current PIN: \(error)")
        }
        // 2. The check file and the share files, synced.
        var written: [String] = []
        func removeWritten() {
            for path in written { unlink(path) }
        }
        do {
            try ShareFiles.createExclusively(options.checkFile, contents: check.encoded())
            written.append(options.checkFile)
            for (index, (share, path)) in zip(shares, sharePaths).enumerated() {
                guard let path else { continue }
                try ShareFiles.writeShare(share, to: path, recipient: recipients.isEmpty ? nil : recipients[index])
                written.append(path)
            }
        } catch {
            removeWritten()
            throw error
        }
        // 3. The new PIN, confirmed by a login with it.
        if !options.keepPIN {
            do {
                try module.withSession(slot: slot) { session in
                    try session.login(.user, pin: current)
                    try session.setPIN(old: current, new: pin)
                    try? session.logout()
                }
            } catch {
                removeWritten()
                throw AdminError(
                    .failed,
                    "token \(options.tokenLabel) did not change the user PIN (\(error)); nothing was changed and "
                        + "the files written were removed. A token that refuses C_SetPIN: run again with "
                        + "--keep-pin, giving a long random PIN set by the security officer")
            }
            do {
                try module.withSession(slot: slot) { session in
                    try session.login(.user, pin: pin)
                    try? session.logout()
                }
            } catch {
                // The change was accepted but the new PIN does not log in: keep the shares, they
                // are the only way back to it.
                throw AdminError(
                    .internalError,
                    "token \(options.tokenLabel) accepted the new PIN but refused a login with it (\(error)); "
                        + "the shares and check file were kept")
            }
        }
        // 4. Shares shown once, when not written to files.
        if options.shareDirectory == nil {
            output.note(
                "Each share below is shown once. Give each to its own operator; \(options.threshold) of "
                    + "\(options.shareCount) unseal the gateway.")
            for share in shares {
                output.write("share \(share.x) of \(options.shareCount): ")
                share.text.withUnsafeBytes { output.line(String(decoding: $0, as: UTF8.self)) }
            }
        } else {
            for path in sharePaths.compactMap({ $0 }) {
                output.note("wrote \(path) (mode 0600)")
            }
        }
        output.note(
            options.keepPIN
                ? "split the current PIN of token \(options.tokenLabel) (unchanged); wrote \(options.checkFile)"
                : "set a new random user PIN on token \(options.tokenLabel); wrote \(options.checkFile)")
        return Outcome(check: check, shareFiles: sharePaths.compactMap { $0 })
    }

    /// One path per share (nil when printing), checked free before anything happens.
    private func plannedSharePaths() throws(AdminError) -> [String?] {
        guard let directory = options.shareDirectory else {
            return Array(repeating: nil, count: options.shareCount)
        }
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: directory, isDirectory: &isDirectory), isDirectory.boolValue
        else {
            throw AdminError(.usage, "--share-dir \(directory) is not a directory")
        }
        let paths = (1...options.shareCount).map {
            ShareFiles.sharePath(directory: directory, number: UInt8($0), encrypted: !options.recipients.isEmpty)
        }
        if let existing = paths.first(where: { FileManager.default.fileExists(atPath: $0) }) {
            throw AdminError(.usage, "\(existing) exists: share files are never overwritten; use an empty directory")
        }
        return paths
    }

    /// The recipients' keys, checked before anything happens: none, or one per share with a
    /// share directory.
    static func loadRecipients(_ paths: [String], shareCount: Int, shareDirectory: String?) throws(AdminError)
        -> [Crypto.P256.KeyAgreement.PublicKey]
    {
        guard !paths.isEmpty else { return [] }
        guard paths.count == shareCount else {
            throw AdminError(.usage, "give one --recipient per share: \(paths.count) for \(shareCount) shares")
        }
        guard shareDirectory != nil else {
            throw AdminError(.usage, "--recipient needs --share-dir (encrypted shares go to files)")
        }
        var keys: [Crypto.P256.KeyAgreement.PublicKey] = []
        for path in paths { keys.append(try ShareEncryption.recipient(path)) }
        return keys
    }

    /// A random PIN of `length` characters from `pinAlphabet`, from the system CSPRNG (rejection
    /// sampling, so every character is equally likely).
    static func generatePIN(length: Int) -> SecretBytes {
        var randomness = SystemRandomness()
        // The largest multiple of the alphabet's size below 256: bytes at or above it are drawn again.
        let limit = UInt8(256 - 256 % pinAlphabet.count)
        return SecretBytes(count: length) { output in
            var index = 0
            var byte: UInt8 = 0
            while index < length {
                withUnsafeMutableBytes(of: &byte) { randomness.fill($0) }
                guard byte < limit else { continue }
                output[index] = pinAlphabet[Int(byte) % pinAlphabet.count]
                index += 1
            }
            byte = 0
        }
    }
}
