import Foundation
import GatewayClient

/// Reads an API token from a file that only its owner can read. The token is never taken from a
/// flag (it would show in `ps` and in shell history).
public enum TokenFile {
    /// The most bytes read from a token file: gateway tokens are 49 bytes; a larger file is not
    /// a token file.
    public static let maximumByteCount = 4096

    /// The permission bits that must be clear: any access by group or others.
    static let groupAndOtherBits: mode_t = 0o077

    /// The token in the file at `path`.
    ///
    /// The file must be a regular file (symbolic links are followed) without any permission
    /// for group or others; its content is the token, surrounding whitespace ignored.
    public static func load(path: String) throws(AdminError) -> APIToken {
        let descriptor = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY)
        guard descriptor >= 0 else {
            let reason = String(cString: strerror(errno))
            throw AdminError(.configuration, "cannot open token file \(path): \(reason)")
        }
        defer { close(descriptor) }
        // fstat on the open descriptor: the checked file is the one read.
        var status = stat()
        guard fstat(descriptor, &status) == 0 else {
            throw AdminError(.configuration, "cannot inspect token file \(path): \(String(cString: strerror(errno)))")
        }
        guard status.st_mode & S_IFMT == S_IFREG else {
            throw AdminError(.configuration, "token file \(path) is not a regular file")
        }
        let mode = status.st_mode & 0o7777
        guard mode & groupAndOtherBits == 0 else {
            throw AdminError(
                .configuration,
                "token file \(path) has mode \(octal(mode)): it must not be readable or writable by group or "
                    + "others (the token is a password); run `chmod 600 \(path)`"
            )
        }
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 1024)
        defer {
            // The buffers held the token: clear them.
            for index in bytes.indices { bytes[index] = 0 }
            for index in buffer.indices { buffer[index] = 0 }
        }
        while bytes.count <= maximumByteCount {
            let count = buffer.withUnsafeMutableBytes { read(descriptor, $0.baseAddress, $0.count) }
            if count == 0 { break }
            if count < 0 {
                if errno == EINTR { continue }
                throw AdminError(.configuration, "cannot read token file \(path): \(String(cString: strerror(errno)))")
            }
            bytes += buffer[0..<count]
        }
        guard bytes.count <= maximumByteCount else {
            throw AdminError(.configuration, "token file \(path) is larger than \(maximumByteCount) bytes")
        }
        return try token(fromText: String(decoding: bytes, as: UTF8.self), source: "token file \(path)")
    }

    /// The token in `text`, surrounding whitespace removed; `source` names it in errors.
    public static func token(fromText text: String, source: String) throws(AdminError) -> APIToken {
        let trimmed = text.trimmingCharacters(in: .whitespacesAndNewlines)
        guard !trimmed.isEmpty else {
            throw AdminError(.configuration, "\(source) is empty")
        }
        // Printable ASCII without spaces, as tokens are; the token itself is never quoted.
        guard trimmed.utf8.count <= GatewayClientConfiguration.maximumAPITokenByteCount,
            trimmed.utf8.allSatisfy({ (0x21...0x7E).contains($0) })
        else {
            throw AdminError(
                .configuration,
                "\(source) does not hold one token (printable ASCII without spaces, at most "
                    + "\(GatewayClientConfiguration.maximumAPITokenByteCount) bytes)"
            )
        }
        return APIToken(trimmed)
    }

    static func octal(_ mode: mode_t) -> String {
        let digits = String(mode, radix: 8)
        return String(repeating: "0", count: max(4 - digits.count, 0)) + digits
    }
}
