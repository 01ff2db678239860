import Crypto
import Synchronization

@testable import GatewayClient

/// A stand-in for the gateway's data keys: random keys, each bound to its tenant and exact
/// encryption context as the gateway binds them; a decrypt under another tenant or context fails.
final class InMemoryDataKeyProvider: DataKeyProvider {
    struct Failure: Error, Equatable {
        var reason: String
    }

    private struct Entry {
        var tenant: String
        var context: [String: String]
        var key: [UInt8]
    }

    private let keys = Mutex<[String: Entry]>([:])
    private let counters = Mutex<(generated: Int, decrypted: Int)>((0, 0))

    var generatedCount: Int { counters.withLock { $0.generated } }
    var decryptedCount: Int { counters.withLock { $0.decrypted } }

    func generateEnvelopeDataKey(tenant: String, context: [String: String]) async throws -> EnvelopeDataKey {
        let key = SymmetricKey(size: .bits256).withUnsafeBytes { Array($0) }
        let number = counters.withLock { counters in
            counters.generated += 1
            return counters.generated
        }
        let id = "key-\(number)"
        keys.withLock { $0[id] = Entry(tenant: tenant, context: context, key: key) }
        return EnvelopeDataKey(id: id, plaintext: SensitiveBytes(copying: key))
    }

    func decryptEnvelopeDataKey(tenant: String, id: String, context: [String: String]) async throws -> SensitiveBytes {
        counters.withLock { $0.decrypted += 1 }
        guard let entry = keys.withLock({ $0[id] }), entry.tenant == tenant else {
            throw Failure(reason: "NOT_FOUND")
        }
        guard entry.context == context else { throw Failure(reason: "DECRYPTION_FAILED") }
        return SensitiveBytes(copying: entry.key)
    }

    /// Replaces the stored key of `id` (a provider that returns the wrong key).
    func replaceKey(of id: String, with key: [UInt8]) {
        keys.withLock { $0[id]?.key = key }
    }
}

/// A provider that hands out one fixed key whatever it is asked: lets a test alter the header's
/// tenant, key id or context and still reach the frames, to show the envelope itself catches it.
struct FixedKeyProvider: DataKeyProvider {
    var key: [UInt8]
    var id = "fixed-key"

    func generateEnvelopeDataKey(tenant: String, context: [String: String]) async throws -> EnvelopeDataKey {
        EnvelopeDataKey(id: id, plaintext: SensitiveBytes(copying: key))
    }

    func decryptEnvelopeDataKey(tenant: String, id: String, context: [String: String]) async throws -> SensitiveBytes {
        SensitiveBytes(copying: key)
    }
}

/// Plaintext chunks made on the fly: `totalByteCount` bytes in chunks of `chunkByteCount`, the
/// content depending on the position, so nothing of the size of the whole stream is ever held.
struct PatternChunks: AsyncSequence, Sendable {
    typealias Element = [UInt8]

    var totalByteCount: Int
    var chunkByteCount: Int

    func makeAsyncIterator() -> Iterator {
        Iterator(remaining: totalByteCount, chunkByteCount: chunkByteCount)
    }

    struct Iterator: AsyncIteratorProtocol {
        var remaining: Int
        let chunkByteCount: Int
        var index: UInt64 = 0
        let base: [UInt8]

        init(remaining: Int, chunkByteCount: Int) {
            self.remaining = remaining
            self.chunkByteCount = chunkByteCount
            self.base = (0..<chunkByteCount).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        }

        mutating func next() async -> [UInt8]? {
            guard remaining > 0 else { return nil }
            var chunk = Array(base.prefix(Swift.min(chunkByteCount, remaining)))
            // Stamp the chunk's number into its first bytes so chunks differ.
            withUnsafeBytes(of: index.bigEndian) { stamp in
                for (offset, byte) in stamp.enumerated() where offset < chunk.count {
                    chunk[offset] = byte
                }
            }
            index += 1
            remaining -= chunk.count
            return chunk
        }
    }
}

/// Chunks of a byte array, `size` bytes at a time.
struct ArrayChunks: AsyncSequence, Sendable {
    typealias Element = ArraySlice<UInt8>

    var bytes: [UInt8]
    var size: Int

    func makeAsyncIterator() -> Iterator { Iterator(bytes: bytes, size: size) }

    struct Iterator: AsyncIteratorProtocol {
        let bytes: [UInt8]
        let size: Int
        var offset = 0

        mutating func next() async -> ArraySlice<UInt8>? {
            guard offset < bytes.count else { return nil }
            let end = Swift.min(offset + size, bytes.count)
            defer { offset = end }
            return bytes[offset..<end]
        }
    }
}

/// Plaintext of `count` bytes with a simple pattern.
func patternBytes(_ count: Int, seed: Int = 0) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3 &+ seed) }
}

/// Collects an async sequence of chunks into one array.
func collect<S: AsyncSequence>(_ sequence: S) async throws -> [UInt8] where S.Element == [UInt8] {
    var bytes: [UInt8] = []
    for try await chunk in sequence {
        bytes.append(contentsOf: chunk)
    }
    return bytes
}

/// Byte offsets of an envelope's parts (for tampering).
struct EnvelopeLayout {
    var headerByteCount: Int
    /// Start offsets of the frames, in order.
    var frameStarts: [Int]
    var totalByteCount: Int

    init(_ envelope: [UInt8]) throws {
        let header = try EnvelopeHeader(parsing: envelope)
        headerByteCount = header.encoded.count
        totalByteCount = envelope.count
        var starts: [Int] = []
        var offset = headerByteCount
        while offset < envelope.count {
            starts.append(offset)
            let type = envelope[offset + 4]
            if type == 1 {
                let length =
                    Int(envelope[offset + 5]) << 24 | Int(envelope[offset + 6]) << 16
                    | Int(envelope[offset + 7]) << 8 | Int(envelope[offset + 8])
                offset += 9 + length + 16
            } else {
                offset += 5 + header.frameSize + 16
            }
        }
        frameStarts = starts
    }

    func frameRange(_ index: Int) -> Range<Int> {
        frameStarts[index]..<(index + 1 < frameStarts.count ? frameStarts[index + 1] : totalByteCount)
    }
}
