import Foundation
import Sealing
import SecretMemory

/// `hsm-admin operator rekey`: new shares (another count or threshold, or just fresh ones after a
/// share was exposed) from `threshold` old ones. The PIN stays as it is, so no key and no setting
/// in the HSM is touched; the old shares stop working because the new check file names the new
/// split.
public struct OperatorRekey: Sendable {
    /// What to do.
    public struct Options: Sendable {
        /// The current check file; replaced atomically.
        public var checkFile: String
        /// Shares to make.
        public var shareCount: Int
        /// Shares needed to unseal.
        public var threshold: Int
        /// Each new share to `share-<n>.txt` here, instead of standard output; no share file may
        /// exist there yet.
        public var shareDirectory: String?
        /// Operators' public keys, one per new share (see `OperatorInitialization.Options`).
        public var recipients: [String] = []

        public init(
            checkFile: String,
            shareCount: Int = SecretSharing.defaultShareCount,
            threshold: Int = SecretSharing.defaultThreshold,
            shareDirectory: String? = nil
        ) {
            self.checkFile = checkFile
            self.shareCount = shareCount
            self.threshold = threshold
            self.shareDirectory = shareDirectory
        }
    }

    public let options: Options

    public init(options: Options) {
        self.options = options
    }

    /// Rebuilds the PIN from `oldShares`, checks it, splits it anew and replaces the check file.
    public func run(oldShares: [SecretShare], output: AdminOutput) throws(AdminError) -> OperatorInitialization.Outcome
    {
        guard SecretSharing.shareCountLimit.contains(options.shareCount),
            SecretSharing.thresholdLimit(shareCount: options.shareCount).contains(options.threshold)
        else {
            throw AdminError(
                .usage,
                "--shares must be from \(SecretSharing.shareCountLimit.lowerBound) to "
                    + "\(SecretSharing.shareCountLimit.upperBound) and --threshold from "
                    + "\(SecretSharing.minimumThreshold) to --shares")
        }
        let recipients = try OperatorInitialization.loadRecipients(
            options.recipients, shareCount: options.shareCount, shareDirectory: options.shareDirectory)
        let check = try ShareFiles.readCheck(options.checkFile)
        var machine = SealStateMachine(check: check)
        var pin: SecretBytes?
        for share in oldShares {
            do {
                if case .logIn(let rebuilt) = try machine.submit(share) {
                    pin = rebuilt
                    break
                }
            } catch {
                throw AdminError(.usage, "share \(share.x): \(error.message)")
            }
        }
        guard let pin else {
            throw AdminError(
                .usage, "\(check.threshold) shares are needed, \(oldShares.count) were given")
        }
        let shares: [SecretShare]
        do {
            shares = try SecretSharing.split(pin, shareCount: options.shareCount, threshold: options.threshold)
        } catch {
            throw AdminError(.usage, error.message)
        }
        let newCheck = SealCheck(secret: pin, shares: shares)
        var paths: [String] = []
        if let directory = options.shareDirectory {
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: directory, isDirectory: &isDirectory), isDirectory.boolValue
            else {
                throw AdminError(.usage, "--share-dir \(directory) is not a directory")
            }
            paths = shares.map {
                ShareFiles.sharePath(directory: directory, number: $0.x, encrypted: !recipients.isEmpty)
            }
            if let existing = paths.first(where: { FileManager.default.fileExists(atPath: $0) }) {
                throw AdminError(
                    .usage, "\(existing) exists: share files are never overwritten; use an empty directory")
            }
            var written: [String] = []
            do {
                for (index, (share, path)) in zip(shares, paths).enumerated() {
                    try ShareFiles.writeShare(share, to: path, recipient: recipients.isEmpty ? nil : recipients[index])
                    written.append(path)
                }
            } catch {
                for path in written { unlink(path) }
                throw error
            }
        }
        // New shares are on disk or shown before the old ones stop working: if the check file
        // cannot be replaced, the old shares still unseal and nothing is lost.
        if options.shareDirectory == nil {
            output.note(
                "Each new share below is shown once. \(options.threshold) of \(options.shareCount) unseal the "
                    + "gateway once the check file is replaced; then the old shares no longer do.")
            for share in shares {
                output.write("share \(share.x) of \(options.shareCount): ")
                share.text.withUnsafeBytes { output.line(String(decoding: $0, as: UTF8.self)) }
            }
        } else {
            for path in paths { output.note("wrote \(path) (mode 0600)") }
        }
        do {
            try ShareFiles.replaceCheck(newCheck, at: options.checkFile)
        } catch {
            for path in paths { unlink(path) }
            throw AdminError(
                error.code, "\(error.message); the new shares are void (files removed), the old ones still work")
        }
        output.note("replaced \(options.checkFile); the PIN and the HSM are unchanged")
        return OperatorInitialization.Outcome(check: newCheck, shareFiles: paths)
    }
}
