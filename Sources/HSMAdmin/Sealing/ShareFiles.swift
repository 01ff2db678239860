import Crypto
import Foundation
import Sealing
import SecretMemory

/// Files and prompts for shares and the seal check: created exclusively (never overwriting a
/// share or a check another operator relies on), owner-only, synced before the token's PIN
/// changes; read with a bound and refused when others may read them.
enum ShareFiles {
    /// Mode of share and check files: owner only (a share is a secret; the check file lets
    /// whoever reads it test guesses of a weak PIN, see `SealCheck`).
    static let fileMode: mode_t = 0o600

    /// The path of share `number` in `directory` (`.hpke` when encrypted to an operator's key).
    static func sharePath(directory: String, number: UInt8, encrypted: Bool = false) -> String {
        (directory as NSString).appendingPathComponent("share-\(number).\(encrypted ? "hpke" : "txt")")
    }

    /// Writes share `share` to `path`: its text form, or encrypted to `recipient`.
    static func writeShare(_ share: SecretShare, to path: String, recipient: P256.KeyAgreement.PublicKey?)
        throws(AdminError)
    {
        guard let recipient else { return try writeShare(share, to: path) }
        try createExclusively(path, contents: ShareEncryption.seal(share, to: recipient))
    }

    /// Writes `contents` to a new file at `path` (refusing an existing one), mode 0600, and syncs
    /// it and its directory, so a share is on disk before the PIN it rebuilds replaces the old.
    static func createExclusively(_ path: String, contents: UnsafeRawBufferPointer) throws(AdminError) {
        let descriptor = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, fileMode)
        guard descriptor >= 0 else {
            throw AdminError(.cannotCreate, "cannot create \(path): \(String(cString: strerror(errno)))")
        }
        var failure: String?
        var written = 0
        while written < contents.count {
            let count = write(descriptor, contents.baseAddress! + written, contents.count - written)
            if count < 0 {
                if errno == EINTR { continue }
                failure = String(cString: strerror(errno))
                break
            }
            written += count
        }
        if failure == nil, fsync(descriptor) != 0 { failure = String(cString: strerror(errno)) }
        close(descriptor)
        if let failure {
            unlink(path)
            throw AdminError(.cannotCreate, "cannot write \(path): \(failure)")
        }
        syncDirectory(of: path)
    }

    /// `createExclusively` for bytes held in an array (not secret: the check file).
    static func createExclusively(_ path: String, contents: [UInt8]) throws(AdminError) {
        // Array's withUnsafeBytes is untyped `rethrows`: carry the typed error out in a Result.
        let result = contents.withUnsafeBytes { bytes in
            Result { () throws(AdminError) in try createExclusively(path, contents: bytes) }
        }
        try result.get()
    }

    /// Writes a share's text form and a newline to a new file.
    static func writeShare(_ share: SecretShare, to path: String) throws(AdminError) {
        let text = share.text
        let withNewline = text.withUnsafeBytes { bytes in
            SecretBytes(count: bytes.count + 1) { output in
                output.copyMemory(from: bytes)
                output[bytes.count] = UInt8(ascii: "\n")
            }
        }
        try withNewline.withUnsafeBytes { (bytes) throws(AdminError) in try createExclusively(path, contents: bytes) }
    }

    /// Replaces the check file at `path` atomically (rekey): a temporary file beside it, synced,
    /// then renamed over it.
    static func replaceCheck(_ check: SealCheck, at path: String) throws(AdminError) {
        let temporary = path + ".new"
        unlink(temporary)
        try createExclusively(temporary, contents: check.encoded())
        guard rename(temporary, path) == 0 else {
            let reason = String(cString: strerror(errno))
            unlink(temporary)
            throw AdminError(.cannotCreate, "cannot replace \(path): \(reason)")
        }
        syncDirectory(of: path)
    }

    /// Reads the check file.
    static func readCheck(_ path: String) throws(AdminError) -> SealCheck {
        let bytes = try readBounded(path, limit: SealCheck.maximumFileSize, what: "check file", ownerOnly: false)
        do {
            return try bytes.withUnsafeBytes { try SealCheck(encoded: Array($0)) }
        } catch let error as SecretSharingError {
            throw AdminError(.configuration, "check file \(path): \(error.message)")
        } catch {
            throw AdminError(.configuration, "check file \(path): \(error)")
        }
    }

    /// Reads a small text file (a PEM key) with a bound.
    static func readText(_ path: String, limit: Int, what: String, ownerOnly: Bool) throws(AdminError) -> String {
        let bytes = try readBounded(path, limit: limit, what: what, ownerOnly: ownerOnly)
        return bytes.withUnsafeBytes { String(decoding: $0, as: UTF8.self) }
    }

    /// Reads a share file: a regular file, owner-only, at most `SecretShare.maximumTextLength`
    /// (or `ShareEncryption.maximumFileSize` for a share encrypted to an operator's key, opened
    /// with the first of `identities` that can).
    static func readShare(_ path: String, identities: [P256.KeyAgreement.PrivateKey] = []) throws(AdminError)
        -> SecretShare
    {
        let bytes = try readBounded(path, limit: ShareEncryption.maximumFileSize, what: "share file", ownerOnly: true)
        let encrypted = bytes.withUnsafeBytes { ShareEncryption.isEncrypted($0) }
        if encrypted {
            return try bytes.withUnsafeBytes { (contents) throws(AdminError) in
                try ShareEncryption.open(contents, identities: identities, path: path)
            }
        }
        guard bytes.count <= SecretShare.maximumTextLength else {
            throw AdminError(.usage, "share file \(path) is longer than a share")
        }
        do {
            return try bytes.withUnsafeBytes { (text) throws(SecretSharingError) in try SecretShare(text: text) }
        } catch {
            throw AdminError(.usage, "share file \(path): \(error.message)")
        }
    }

    /// Reads one share from the terminal without echo. Never from a flag (visible in `ps` and
    /// shell history) and never from a pipe that is not a terminal unless given as a file.
    static func promptShare(_ prompt: String) throws(AdminError) -> SecretShare {
        let descriptor = open("/dev/tty", O_RDWR | O_CLOEXEC)
        guard descriptor >= 0 else {
            throw AdminError(.usage, "no terminal to read a share from: give --share-file")
        }
        defer { close(descriptor) }
        _ = prompt.withCString { write(descriptor, $0, strlen($0)) }
        var saved = termios()
        let haveTerminal = tcgetattr(descriptor, &saved) == 0
        if haveTerminal {
            var quiet = saved
            quiet.c_lflag &= ~tcflag_t(ECHO)
            tcsetattr(descriptor, TCSAFLUSH, &quiet)
        }
        defer {
            if haveTerminal { tcsetattr(descriptor, TCSAFLUSH, &saved) }
            _ = write(descriptor, "\n", 1)
        }
        // The initializer never reports more than the capacity, so it cannot throw.
        let line = try! SecretBytes(capacity: SecretShare.maximumTextLength) { buffer in
            var count = 0
            var byte: UInt8 = 0
            while count < buffer.count {
                let got = read(descriptor, &byte, 1)
                if got < 0, errno == EINTR { continue }
                if got <= 0 || byte == UInt8(ascii: "\n") { break }
                buffer[count] = byte
                count += 1
            }
            byte = 0
            return count
        }
        do {
            return try line.withUnsafeBytes { (text) throws(SecretSharingError) in try SecretShare(text: text) }
        } catch {
            throw AdminError(.usage, "that share was not accepted: \(error.message)")
        }
    }

    private static func readBounded(_ path: String, limit: Int, what: String, ownerOnly: Bool) throws(AdminError)
        -> SecretBytes
    {
        let descriptor = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard descriptor >= 0 else {
            throw AdminError(.configuration, "cannot open \(what) \(path): \(String(cString: strerror(errno)))")
        }
        defer { close(descriptor) }
        var status = stat()
        guard fstat(descriptor, &status) == 0, (status.st_mode & S_IFMT) == S_IFREG else {
            throw AdminError(.configuration, "\(what) \(path) is not a regular file")
        }
        if ownerOnly, status.st_mode & 0o077 != 0 {
            throw AdminError(
                .configuration,
                "\(what) \(path) has mode \(String(status.st_mode & 0o777, radix: 8)): "
                    + "group and others must have no access (chmod 600)"
            )
        }
        // One byte past the limit tells "too long" from "exactly full".
        let contents: SecretBytes
        do {
            contents = try SecretBytes(capacity: limit + 1) { buffer in
                var total = 0
                while total < buffer.count {
                    let count = read(descriptor, buffer.baseAddress! + total, buffer.count - total)
                    if count < 0 {
                        if errno == EINTR { continue }
                        throw AdminError(.configuration, "cannot read \(what) \(path)")
                    }
                    if count == 0 { break }
                    total += count
                }
                return total
            }
        } catch let error as AdminError {
            throw error
        } catch {
            throw AdminError(.configuration, "cannot read \(what) \(path)")
        }
        guard contents.count <= limit else {
            throw AdminError(.configuration, "\(what) \(path) is larger than \(limit) bytes")
        }
        return contents
    }

    private static func syncDirectory(of path: String) {
        let directory = (path as NSString).deletingLastPathComponent
        let descriptor = open(directory.isEmpty ? "." : directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard descriptor >= 0 else { return }
        fsync(descriptor)
        close(descriptor)
    }
}
