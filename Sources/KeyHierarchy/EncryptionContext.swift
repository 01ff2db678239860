import Crypto

/// The caller's encryption context: a string map that is authenticated (never encrypted, never
/// stored) with every data key and every ciphertext, as in AWS KMS. Decrypt needs the exact map.
///
/// Limits (each bounds what one request can make the token and the database process):
/// - at most `maximumPairs` (64) pairs;
/// - keys 1 to `maximumKeyLength` (256) UTF-8 bytes, values up to `maximumValueLength` (4,096);
/// - the canonical encoding at most `maximumEncodedLength` (8 KiB).
///
/// Only its SHA-256 over the canonical encoding is kept (in the data key's row, and in audit
/// records); the values never reach storage, logs or the audit log.
public struct EncryptionContext: Sendable, Hashable, ExpressibleByDictionaryLiteral {
    public static let maximumPairs = 64
    public static let maximumKeyLength = 256
    public static let maximumValueLength = 4096
    public static let maximumEncodedLength = 8 * 1024

    public let pairs: [String: String]

    /// The empty context.
    public static let empty = EncryptionContext(unchecked: [:])

    /// Validates `pairs` against the limits.
    public init(_ pairs: [String: String]) throws(KeyServiceError) {
        guard pairs.count <= Self.maximumPairs else {
            throw KeyServiceError(
                .invalidArgument,
                "encryption context has \(pairs.count) pairs; at most \(Self.maximumPairs) are allowed"
            )
        }
        for (key, value) in pairs {
            guard !key.isEmpty, key.utf8.count <= Self.maximumKeyLength else {
                throw KeyServiceError(
                    .invalidArgument,
                    "encryption context keys must be 1 to \(Self.maximumKeyLength) bytes"
                )
            }
            guard value.utf8.count <= Self.maximumValueLength else {
                throw KeyServiceError(
                    .invalidArgument,
                    "encryption context values must be at most \(Self.maximumValueLength) bytes"
                )
            }
        }
        let candidate = EncryptionContext(unchecked: pairs)
        guard candidate.canonicalEncoding.count <= Self.maximumEncodedLength else {
            throw KeyServiceError(
                .invalidArgument,
                "encryption context is over \(Self.maximumEncodedLength) bytes when encoded"
            )
        }
        self = candidate
    }

    private init(unchecked pairs: [String: String]) {
        self.pairs = pairs
    }

    /// For literals in code and tests; traps when a literal breaks a limit.
    public init(dictionaryLiteral elements: (String, String)...) {
        do {
            try self.init(Dictionary(uniqueKeysWithValues: elements))
        } catch {
            preconditionFailure("invalid encryption context literal: \(error)")
        }
    }

    /// Pairs sorted by the UTF-8 bytes of the key, each key and value as a 4-byte big-endian
    /// length and its UTF-8 bytes, after a 4-byte pair count. Independent of dictionary order.
    public var canonicalEncoding: [UInt8] {
        var writer = CanonicalWriter()
        let sorted = pairs.sorted { Array($0.key.utf8).lexicographicallyPrecedes(Array($1.key.utf8)) }
        writer.append(UInt32(sorted.count))
        for (key, value) in sorted {
            writer.append(key)
            writer.append(value)
        }
        return writer.bytes
    }

    /// SHA-256 of the canonical encoding: what is authenticated, stored and audited.
    public var hash: [UInt8] { Array(SHA256.hash(data: canonicalEncoding)) }
}

extension Array where Element == UInt8 {
    /// Lowercase hex, for audit details and logs (of hashes only).
    var hexString: String {
        map { String($0, radix: 16).leftPadded(to: 2) }.joined()
    }
}
