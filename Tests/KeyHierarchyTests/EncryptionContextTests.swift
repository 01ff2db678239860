import KeyHierarchy
import Testing

@Suite("Encryption context: canonical encoding, hash and limits")
struct EncryptionContextTests {
    /// Length of the canonical encoding of `pairs`: a 4-byte count, then 4-byte lengths and bytes.
    static func encodedLength(_ pairs: [String: String]) -> Int {
        4 + pairs.reduce(0) { $0 + 8 + $1.key.utf8.count + $1.value.utf8.count }
    }

    static func hex(_ bytes: [UInt8]) -> String {
        bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
    }

    // MARK: Encoding

    @Test("the empty context encodes as a zero count")
    func empty() throws {
        #expect(EncryptionContext.empty.canonicalEncoding == [0, 0, 0, 0])
        #expect(try EncryptionContext([:]) == .empty)
        // SHA-256 of four zero bytes.
        #expect(
            Self.hex(EncryptionContext.empty.hash) == "df3f619804a92fdb4057192dc43dd748ea778adc52bc498ce80524c014b81119"
        )
    }

    @Test("known answer: {b: 2, a: 1}, written out byte by byte")
    func knownAnswer() throws {
        let context = try EncryptionContext(["b": "2", "a": "1"])
        let expected: [UInt8] = [
            0, 0, 0, 2,  // pair count
            0, 0, 0, 1, 0x61,  // "a"
            0, 0, 0, 1, 0x31,  // "1"
            0, 0, 0, 1, 0x62,  // "b"
            0, 0, 0, 1, 0x32,  // "2"
        ]
        #expect(context.canonicalEncoding == expected)
        #expect(Self.hex(context.hash) == "f5439c09a6567f5fcebf073d96272762e26687151c034ce5609d2132d134bc78")
    }

    @Test("known answer: non-ASCII key and value are UTF-8, lengths in bytes")
    func knownAnswerUTF8() throws {
        let context = try EncryptionContext(["\u{e9}": "\u{fc}"])
        let expected: [UInt8] = [0, 0, 0, 1, 0, 0, 0, 2, 0xC3, 0xA9, 0, 0, 0, 2, 0xC3, 0xBC]
        #expect(context.canonicalEncoding == expected)
    }

    @Test("known answer: empty value, long value length is big-endian")
    func knownAnswerLengths() throws {
        let value = String(repeating: "v", count: 0x0102)
        let context = try EncryptionContext(["k": value, "e": ""])
        let expected: [UInt8] =
            [0, 0, 0, 2, 0, 0, 0, 1, 0x65, 0, 0, 0, 0, 0, 0, 0, 1, 0x6B, 0, 0, 0x01, 0x02]
            + [UInt8](repeating: 0x76, count: 0x0102)
        #expect(context.canonicalEncoding == expected)
    }

    @Test("keys are sorted by their UTF-8 bytes, not by String comparison")
    func sortedByBytes() throws {
        // "B" (0x42) < "a" (0x61) < "ab" < "z" (0x7A) < "é" (0xC3 0xA9). And "e\u{301}" (0x65 ...)
        // sorts before "f" (0x66) by bytes, though as a String it equals "é", which is after "f".
        let context = try EncryptionContext([
            "z": "1", "\u{e9}": "2", "ab": "3", "a": "4", "B": "5", "f": "6",
        ])
        let decomposed = try EncryptionContext(["f": "1", "e\u{301}": "2"])
        #expect(Self.keyOrder(context.canonicalEncoding) == ["B", "a", "ab", "f", "z", "\u{e9}"])
        #expect(Self.keyOrder(decomposed.canonicalEncoding) == ["e\u{301}", "f"])
    }

    /// Reads the keys back out of a canonical encoding, in order.
    static func keyOrder(_ bytes: [UInt8]) -> [String] {
        func length(at offset: Int) -> Int {
            bytes[offset..<offset + 4].reduce(0) { $0 << 8 | Int($1) }
        }
        var keys: [String] = []
        var offset = 4
        for _ in 0..<length(at: 0) {
            let keyLength = length(at: offset)
            keys.append(String(decoding: bytes[offset + 4..<offset + 4 + keyLength], as: UTF8.self))
            offset += 4 + keyLength
            offset += 4 + length(at: offset)
        }
        #expect(offset == bytes.count)
        return keys
    }

    @Test("the encoding does not depend on insertion order")
    func insertionOrder() throws {
        let pairs: [(String, String)] = (0..<40).map { ("key-\($0 * 7 % 40)", "value-\($0)") }
        var forward: [String: String] = [:]
        for (key, value) in pairs { forward[key] = value }
        var backward: [String: String] = [:]
        for (key, value) in pairs.reversed() { backward[key] = value }
        var grown: [String: String] = [:]
        grown.reserveCapacity(1000)
        for (key, value) in pairs.shuffled() { grown[key] = value }
        let reference = try EncryptionContext(forward)
        #expect(try EncryptionContext(backward).canonicalEncoding == reference.canonicalEncoding)
        #expect(try EncryptionContext(grown).canonicalEncoding == reference.canonicalEncoding)
        #expect(try EncryptionContext(grown).hash == reference.hash)
        #expect(reference.canonicalEncoding.count == Self.encodedLength(forward))
    }

    @Test("the hash is SHA-256: 32 bytes, stable across calls")
    func hashShape() throws {
        let context = try EncryptionContext(["purpose": "backup"])
        #expect(context.hash.count == 32)
        #expect(context.hash == context.hash)
    }

    typealias Pairs = [String: String]

    static let distinctMaps: [(Pairs, Pairs)] = [
        (["a": "bc"], ["ab": "c"]),
        (["a": "b", "c": "d"], ["a": "bcd"]),
        (["a": "b"], ["b": "a"]),
        (["a": "1", "b": "2"], ["a": "2", "b": "1"]),
        (["a": ""], [:]),
        (["a": ""], ["a": " "]),
        (["a": "b"], ["a": "b", "c": ""]),
        (["a": "\u{0}\u{0}\u{0}\u{1}b"], ["a": "", "b": ""]),
        (["\u{e9}": "x"], ["e\u{301}": "x"]),
        (["A": "x"], ["a": "x"]),
    ]

    @Test("different maps have different hashes", arguments: distinctMaps)
    func differentMapsDifferentHashes(lhs: Pairs, rhs: Pairs) throws {
        let left = try EncryptionContext(lhs)
        let right = try EncryptionContext(rhs)
        #expect(left.canonicalEncoding != right.canonicalEncoding)
        #expect(left.hash != right.hash)
    }

    @Test("all of the maps above hash apart from one another")
    func allDistinct() throws {
        let maps = Set(Self.distinctMaps.flatMap { [$0.0, $0.1] })
        let hashes = try maps.map { try EncryptionContext($0).hash }
        #expect(Set(hashes).count == maps.count)
    }

    @Test("a dictionary literal builds the same context")
    func literal() throws {
        let literal: EncryptionContext = ["tenant": "acme", "purpose": "backup"]
        #expect(literal == (try EncryptionContext(["purpose": "backup", "tenant": "acme"])))
    }

    // MARK: Limits

    struct LimitCase: Sendable, CustomTestStringConvertible {
        var name: String
        var pairs: [String: String]
        var accepted: Bool
        var testDescription: String { "\(name) → \(accepted ? "accepted" : "refused")" }
    }

    static func manyPairs(_ count: Int) -> [String: String] {
        Dictionary(uniqueKeysWithValues: (0..<count).map { ("k\($0)", "v") })
    }

    /// Three pairs whose encoding is `length` bytes long (each value within its own limit).
    static func encodedTo(_ length: Int) -> [String: String] {
        // 4 (count) + 3 × 8 (lengths) + 3 (one-byte keys) = 31 bytes of overhead.
        let valueBytes = length - 31
        return [
            "a": String(repeating: "x", count: 4096),
            "b": String(repeating: "y", count: 4000),
            "c": String(repeating: "z", count: valueBytes - 4096 - 4000),
        ]
    }

    static let limitCases: [LimitCase] = [
        LimitCase(name: "64 pairs", pairs: manyPairs(64), accepted: true),
        LimitCase(name: "65 pairs", pairs: manyPairs(65), accepted: false),
        LimitCase(name: "key of 1 byte", pairs: ["k": "v"], accepted: true),
        LimitCase(name: "empty key", pairs: ["": "v"], accepted: false),
        LimitCase(name: "empty key, empty value", pairs: ["": ""], accepted: false),
        LimitCase(name: "key of 256 bytes", pairs: [String(repeating: "k", count: 256): "v"], accepted: true),
        LimitCase(name: "key of 257 bytes", pairs: [String(repeating: "k", count: 257): "v"], accepted: false),
        LimitCase(
            name: "key of 128 two-byte characters (256 bytes)",
            pairs: [String(repeating: "\u{e9}", count: 128): "v"], accepted: true),
        LimitCase(
            name: "key of 86 three-byte characters (258 bytes)",
            pairs: [String(repeating: "\u{20ac}", count: 86): "v"], accepted: false),
        LimitCase(name: "empty value", pairs: ["k": ""], accepted: true),
        LimitCase(name: "value of 4096 bytes", pairs: ["k": String(repeating: "v", count: 4096)], accepted: true),
        LimitCase(name: "value of 4097 bytes", pairs: ["k": String(repeating: "v", count: 4097)], accepted: false),
        LimitCase(
            name: "value of 2049 two-byte characters (4098 bytes)",
            pairs: ["k": String(repeating: "\u{e9}", count: 2049)], accepted: false),
        LimitCase(name: "encoding of 8192 bytes", pairs: encodedTo(8192), accepted: true),
        LimitCase(name: "encoding of 8193 bytes", pairs: encodedTo(8193), accepted: false),
    ]

    @Test("limits, at and just over", arguments: limitCases)
    func limits(_ limit: LimitCase) throws {
        if limit.accepted {
            let context = try EncryptionContext(limit.pairs)
            #expect(context.pairs == limit.pairs)
            #expect(context.canonicalEncoding.count == Self.encodedLength(limit.pairs))
            #expect(context.canonicalEncoding.count <= EncryptionContext.maximumEncodedLength)
        } else {
            let error = #expect(throws: KeyServiceError.self) { try EncryptionContext(limit.pairs) }
            #expect(error?.code == .invalidArgument)
        }
    }

    @Test("the encoded-length cases are exactly at the limit and one over it")
    func encodedLengthCases() {
        #expect(Self.encodedLength(Self.encodedTo(8192)) == EncryptionContext.maximumEncodedLength)
        #expect(Self.encodedLength(Self.encodedTo(8193)) == EncryptionContext.maximumEncodedLength + 1)
        #expect(EncryptionContext.maximumEncodedLength == 8 * 1024)
        #expect(EncryptionContext.maximumPairs == 64)
        #expect(EncryptionContext.maximumKeyLength == 256)
        #expect(EncryptionContext.maximumValueLength == 4096)
    }

    @Test("error messages name the limit that was broken")
    func messagesNameTheLimit() {
        let pairs = #expect(throws: KeyServiceError.self) { try EncryptionContext(Self.manyPairs(65)) }
        #expect(pairs?.message.contains("65") == true)
        #expect(pairs?.message.contains("64") == true)
        let key = #expect(throws: KeyServiceError.self) { try EncryptionContext(["": "v"]) }
        #expect(key?.message.contains("256") == true)
        let value = #expect(throws: KeyServiceError.self) {
            try EncryptionContext(["k": String(repeating: "v", count: 4097)])
        }
        #expect(value?.message.contains("4096") == true)
        let total = #expect(throws: KeyServiceError.self) { try EncryptionContext(Self.encodedTo(8193)) }
        #expect(total?.message.contains("8192") == true)
    }
}
