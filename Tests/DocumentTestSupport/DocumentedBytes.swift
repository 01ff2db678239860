import Foundation

/// The hex blocks of the repository's documents, so golden-byte tests compare what the code
/// builds with what the documentation shows, and neither can change without the other.
///
/// A block is a fenced `hex` code block right after a marker line `<!-- example: NAME -->` or
/// `<!-- vector: NAME -->`; its bytes are the hex digit pairs of the block, whitespace ignored.
public enum DocumentedBytes {
    /// A document read from the repository.
    public struct Document: Sendable {
        /// `docs/protocol.md`, for example.
        public let path: String
        public let text: String

        /// The bytes of the block marked `<!-- kind: name -->`.
        public func bytes(_ kind: String, _ name: String) throws -> [UInt8] {
            let marker = "<!-- \(kind): \(name) -->\n```hex\n"
            guard let start = text.range(of: marker) else {
                throw DocumentedBytesError("\(path) has no block `<!-- \(kind): \(name) -->`")
            }
            guard let end = text.range(of: "```", range: start.upperBound..<text.endIndex) else {
                throw DocumentedBytesError("\(path): the block \(name) is not closed")
            }
            let digits = text[start.upperBound..<end.lowerBound].filter { !$0.isWhitespace }
            return try DocumentedBytes.bytes(hex: String(digits))
        }

        /// The names of every block of `kind` (`example`, `vector`), in document order.
        public func names(_ kind: String) -> [String] {
            let prefix = "<!-- \(kind): "
            return text.split(separator: "\n").compactMap { line in
                guard line.hasPrefix(prefix), line.hasSuffix(" -->") else { return nil }
                return String(line.dropFirst(prefix.count).dropLast(4))
            }
        }
    }

    /// The repository root: the directory above this file holding `Package.swift`.
    public static let repositoryRoot: URL = {
        var directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        while directory.path != "/" {
            if FileManager.default.fileExists(atPath: directory.appendingPathComponent("Package.swift").path) {
                return directory
            }
            directory.deleteLastPathComponent()
        }
        return URL(fileURLWithPath: FileManager.default.currentDirectoryPath)
    }()

    /// Reads `relativePath` (e.g. `docs/protocol.md`) from the repository.
    public static func document(_ relativePath: String) throws -> Document {
        let url = repositoryRoot.appendingPathComponent(relativePath)
        return Document(path: relativePath, text: try String(contentsOf: url, encoding: .utf8))
    }

    /// Parses hex digits (an even number, no separators).
    public static func bytes(hex: String) throws -> [UInt8] {
        let digits = Array(hex.utf8)
        guard digits.count % 2 == 0 else { throw DocumentedBytesError("odd number of hex digits") }
        var out: [UInt8] = []
        out.reserveCapacity(digits.count / 2)
        for index in stride(from: 0, to: digits.count, by: 2) {
            guard let high = nibble(digits[index]), let low = nibble(digits[index + 1]) else {
                throw DocumentedBytesError("not a hex digit near offset \(index)")
            }
            out.append(high << 4 | low)
        }
        return out
    }

    /// Lowercase hex of `bytes`, for messages.
    public static func hex(_ bytes: some Sequence<UInt8>) -> String {
        bytes.map { String(format: "%02x", $0) }.joined()
    }

    private static func nibble(_ digit: UInt8) -> UInt8? {
        switch digit {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return digit - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return digit - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return digit - UInt8(ascii: "A") + 10
        default: return nil
        }
    }
}

/// A document lacks a block, or a block is not hex.
public struct DocumentedBytesError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
