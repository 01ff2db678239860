import Foundation
import PKCS11

/// Where the HSM user PIN comes from. Never a command-line flag (visible in `ps`) and never the
/// configuration file itself (DESIGN.md, invariant 7).
public enum PINSource: Sendable, Hashable, CustomStringConvertible {
    /// A file that only its owner can read (mode 0600 or 0400); one trailing newline is ignored.
    case file(String)
    /// An environment variable, by name.
    case environment(String)

    /// The longest PIN accepted. PKCS#11 tokens take far shorter ones; this bounds what a wrong
    /// file can make the gateway read.
    public static let maximumPINByteCount = 256

    /// Names the source, never the PIN.
    public var description: String {
        switch self {
        case .file(let path): "PIN file \(path)"
        case .environment(let name): "PIN environment variable \(name)"
        }
    }

    /// Reads the PIN into memory that is zeroed on release.
    ///
    /// - Throws: `ConfigurationError` when the file is missing, not a regular file, readable by
    ///   group or others, empty or too long, or the variable is unset or empty.
    public func read(environment: [String: String] = ProcessInfo.processInfo.environment) throws -> SecretBytes {
        switch self {
        case .file(let path): return try Self.readFile(path)
        case .environment(let name):
            guard let value = environment[name], !value.isEmpty else {
                throw ConfigurationError("\(self) is not set")
            }
            guard value.utf8.count <= Self.maximumPINByteCount else {
                throw ConfigurationError("\(self) is longer than \(Self.maximumPINByteCount) bytes")
            }
            return SecretBytes(utf8: value)
        }
    }

    private static func readFile(_ path: String) throws -> SecretBytes {
        let what = PINSource.file(path).description
        let descriptor = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard descriptor >= 0 else {
            throw ConfigurationError("cannot open \(what): \(String(cString: strerror(errno)))")
        }
        defer { close(descriptor) }
        var status = stat()
        guard fstat(descriptor, &status) == 0, (status.st_mode & S_IFMT) == S_IFREG else {
            throw ConfigurationError("\(what) is not a regular file")
        }
        guard status.st_mode & 0o077 == 0 else {
            throw ConfigurationError(
                "\(what) has mode \(String(status.st_mode & 0o777, radix: 8)): group and others must have no access (chmod 600)"
            )
        }
        // Read one byte more than allowed (plus a newline) to tell "too long" from "exactly full".
        let capacity = maximumPINByteCount + 3
        let contents = try SecretBytes(capacity: capacity) { buffer in
            var total = 0
            while total < buffer.count {
                let count = Foundation.read(descriptor, buffer.baseAddress! + total, buffer.count - total)
                if count < 0 {
                    if errno == EINTR { continue }
                    throw ConfigurationError("cannot read \(what): \(String(cString: strerror(errno)))")
                }
                if count == 0 { break }
                total += count
            }
            return total
        }
        // Drop one trailing "\n" or "\r\n" (editors add one); keep every other byte as written.
        let length = contents.withUnsafeBytes { bytes -> Int in
            var length = bytes.count
            if length > 0, bytes[length - 1] == UInt8(ascii: "\n") {
                length -= 1
                if length > 0, bytes[length - 1] == UInt8(ascii: "\r") { length -= 1 }
            }
            return length
        }
        guard length > 0 else { throw ConfigurationError("\(what) is empty") }
        guard length <= maximumPINByteCount else {
            throw ConfigurationError("\(what) is longer than \(maximumPINByteCount) bytes")
        }
        return contents.withUnsafeBytes { bytes in
            SecretBytes(count: length) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes.prefix(length))) }
        }
    }
}
