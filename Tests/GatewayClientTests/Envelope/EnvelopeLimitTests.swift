import Testing

@testable import GatewayClient

@Suite("Envelope header limits")
struct EnvelopeLimitTests {
    static let key = EnvelopeDataKey(id: "key-1", plaintext: SensitiveBytes(copying: [UInt8](repeating: 1, count: 32)))

    static func seal(
        tenant: String = "acme",
        keyID: String = "key-1",
        context: [String: String] = [:],
        frameSize: Int = 1024
    ) throws(EnvelopeError) -> [UInt8] {
        let key = EnvelopeDataKey(id: keyID, plaintext: Self.key.plaintext)
        return try EnvelopeEncryptor.encrypt(
            [1, 2, 3], with: key, tenant: tenant, context: context, frameSize: frameSize)
    }

    static func expectInvalid(_ body: () throws(EnvelopeError) -> [UInt8], _ note: Comment) {
        do {
            _ = try body()
            Issue.record("accepted: \(note)")
        } catch {
            #expect(error.code == .invalidArgument, note)
        }
    }

    @Test("the named limits have the gateway's values")
    func limitValues() {
        #expect(EnvelopeFormat.maximumTenantByteCount == 63)
        #expect(EnvelopeFormat.maximumEncodedContextByteCount == 8192)
        #expect(EnvelopeFormat.maximumContextPairs == 64)
        #expect(EnvelopeFormat.defaultFrameSize == 65_536)
        #expect(EnvelopeFormat.maximumHeaderByteCount == 8397)
    }

    @Test("tenant ids: 1 to 63 bytes of [a-z0-9][a-z0-9_-]*")
    func tenants() throws {
        _ = try Self.seal(tenant: String(repeating: "a", count: 63))
        _ = try Self.seal(tenant: "0tenant_with-dashes")
        for bad in ["", String(repeating: "a", count: 64), "Acme", "-acme", "_acme", "ac me", "acmé", "acme/1"] {
            Self.expectInvalid(
                { () throws(EnvelopeError) in try Self.seal(tenant: bad) }, "tenant \(bad.debugDescription)")
        }
    }

    @Test("data key ids: 1 to 64 printable ASCII bytes")
    func dataKeyIDs() throws {
        _ = try Self.seal(keyID: String(repeating: "k", count: 64))
        for bad in ["", String(repeating: "k", count: 65), "key 1", "ключ"] {
            Self.expectInvalid(
                { () throws(EnvelopeError) in try Self.seal(keyID: bad) }, "key id \(bad.debugDescription)")
        }
    }

    @Test("encryption contexts: the gateway's pair, key, value and size limits")
    func contexts() throws {
        let sixtyFour = Dictionary(uniqueKeysWithValues: (0..<64).map { ("k\($0)", "v") })
        _ = try Self.seal(context: sixtyFour)
        var sixtyFive = sixtyFour
        sixtyFive["k64"] = "v"
        Self.expectInvalid({ () throws(EnvelopeError) in try Self.seal(context: sixtyFive) }, "65 pairs")
        Self.expectInvalid({ () throws(EnvelopeError) in try Self.seal(context: ["": "v"]) }, "empty key")
        let longKey = String(repeating: "k", count: 257)
        Self.expectInvalid({ () throws(EnvelopeError) in try Self.seal(context: [longKey: "v"]) }, "257-byte key")
        _ = try Self.seal(context: [String(repeating: "k", count: 256): String(repeating: "v", count: 4096)])
        let longValue = String(repeating: "v", count: 4097)
        Self.expectInvalid({ () throws(EnvelopeError) in try Self.seal(context: ["k": longValue]) }, "4,097-byte value")
        // Three values of 4,000 bytes: each allowed, together over 8 KiB encoded.
        let big = ["a": String(repeating: "v", count: 4000), "b": String(repeating: "v", count: 4000)]
        let exactly = 4 + 2 * (4 + 1 + 4 + 4000)
        #expect(exactly <= 8192)
        _ = try Self.seal(context: big)
        var over = big
        over["c"] = String(repeating: "v", count: 4000)
        Self.expectInvalid({ () throws(EnvelopeError) in try Self.seal(context: over) }, "over 8 KiB encoded")
    }

    @Test("frame sizes: 1 KiB to 4 MiB")
    func frameSizes() throws {
        _ = try Self.seal(frameSize: 1024)
        _ = try Self.seal(frameSize: 4 << 20)
        Self.expectInvalid({ () throws(EnvelopeError) in try Self.seal(frameSize: 1023) }, "1,023")
        Self.expectInvalid({ () throws(EnvelopeError) in try Self.seal(frameSize: (4 << 20) + 1) }, "4 MiB + 1")
        #expect(throws: EnvelopeError.self) {
            try EnvelopeEncryptor(provider: InMemoryDataKeyProvider(), frameSize: 512)
        }
    }

    @Test("a data key that is not 32 bytes is refused")
    func dataKeyLength() {
        let short = EnvelopeDataKey(id: "k", plaintext: SensitiveBytes(copying: [UInt8](repeating: 1, count: 16)))
        #expect(throws: EnvelopeError.self) { try EnvelopeEncryptor.encrypt([1], with: short, tenant: "acme") }
    }

    @Test("bad arguments are refused before the provider is asked for a key")
    func argumentsCheckedFirst() async throws {
        let provider = InMemoryDataKeyProvider()
        let encryptor = try EnvelopeEncryptor(provider: provider)
        await #expect(throws: EnvelopeError.self) { try await encryptor.encrypt([1], tenant: "Not-Valid") }
        await #expect(throws: EnvelopeError.self) {
            try await encryptor.encrypt([1], tenant: "acme", context: ["k": String(repeating: "v", count: 5000)])
        }
        await #expect(throws: EnvelopeError.self) {
            try await collect(encryptor.encryptStream(ArrayChunks(bytes: [1], size: 1), tenant: "UPPER"))
        }
        #expect(provider.generatedCount == 0)
    }

    /// A header with chosen raw fields (no commitment check reached).
    static func rawHeader(
        magic: [UInt8] = EnvelopeFormat.magic,
        version: UInt8 = 1,
        suite: UInt8 = 1,
        frameSize: UInt32 = 1024,
        tenant: [UInt8] = Array("acme".utf8),
        keyID: [UInt8] = Array("key-1".utf8),
        context: [UInt8] = [0, 0, 0, 0],
        declaredContextLength: Int? = nil
    ) -> [UInt8] {
        var bytes = magic + [version, suite] + [UInt8](repeating: 0xAA, count: 32)
        bytes.appendBigEndian(frameSize)
        bytes.append(UInt8(truncatingIfNeeded: tenant.count))
        bytes += tenant
        bytes.append(UInt8(truncatingIfNeeded: keyID.count))
        bytes += keyID
        bytes.appendBigEndian(UInt16(truncatingIfNeeded: declaredContextLength ?? context.count))
        bytes += context
        bytes += [UInt8](repeating: 0xBB, count: 32)
        return bytes
    }

    static func expectParseError(_ bytes: [UInt8], _ code: EnvelopeError.Code, _ note: Comment) {
        do {
            _ = try EnvelopeHeader(parsing: bytes)
            Issue.record("parsed: \(note)")
        } catch {
            #expect(error.code == code, note)
        }
    }

    @Test("the reader checks every header field against its limit")
    func parsingLimits() throws {
        _ = try EnvelopeHeader(parsing: Self.rawHeader())
        Self.expectParseError(Self.rawHeader(magic: Array("HGWF".utf8)), .malformed, "magic")
        Self.expectParseError(Self.rawHeader(version: 2), .unsupported, "version 2")
        Self.expectParseError(Self.rawHeader(suite: 2), .unsupported, "suite 2")
        Self.expectParseError(Self.rawHeader(frameSize: 1023), .malformed, "frame size 1,023")
        Self.expectParseError(Self.rawHeader(frameSize: UInt32.max), .malformed, "frame size 2^32-1")
        Self.expectParseError(Self.rawHeader(tenant: []), .malformed, "empty tenant")
        Self.expectParseError(Self.rawHeader(tenant: [UInt8](repeating: 0x61, count: 64)), .malformed, "64-byte tenant")
        Self.expectParseError(Self.rawHeader(tenant: Array("ACME".utf8)), .malformed, "upper-case tenant")
        Self.expectParseError(Self.rawHeader(keyID: []), .malformed, "empty key id")
        Self.expectParseError(Self.rawHeader(keyID: [UInt8](repeating: 0x6B, count: 65)), .malformed, "65-byte key id")
        Self.expectParseError(Self.rawHeader(context: [0, 0, 0]), .malformed, "3-byte context")
        Self.expectParseError(
            Self.rawHeader(context: [0, 0, 0, 0], declaredContextLength: 8193),
            .malformed,
            "context length 8,193"
        )
        // 65 pairs announced.
        Self.expectParseError(Self.rawHeader(context: [0, 0, 0, 65]), .malformed, "65 pairs")
        // One pair announced, none there.
        Self.expectParseError(Self.rawHeader(context: [0, 0, 0, 1]), .malformed, "missing pair")
        // Keys out of canonical order: "b" before "a".
        let unordered: [UInt8] = [0, 0, 0, 2, 0, 0, 0, 1, 0x62, 0, 0, 0, 0, 0, 0, 0, 1, 0x61, 0, 0, 0, 0]
        Self.expectParseError(Self.rawHeader(context: unordered), .malformed, "keys out of order")
        let repeated: [UInt8] = [0, 0, 0, 2, 0, 0, 0, 1, 0x61, 0, 0, 0, 0, 0, 0, 0, 1, 0x61, 0, 0, 0, 0]
        Self.expectParseError(Self.rawHeader(context: repeated), .malformed, "key repeated")
        let ordered: [UInt8] = [0, 0, 0, 2, 0, 0, 0, 1, 0x61, 0, 0, 0, 0, 0, 0, 0, 1, 0x62, 0, 0, 0, 0]
        #expect(try EnvelopeHeader(parsing: Self.rawHeader(context: ordered)).context == ["a": "", "b": ""])
        let extra: [UInt8] = [0, 0, 0, 0, 0xFF]
        Self.expectParseError(Self.rawHeader(context: extra), .malformed, "bytes after the last pair")
        Self.expectParseError(Array(Self.rawHeader().dropLast()), .truncated, "one byte short")
    }

    @Test("a hostile length is refused before the bytes it announces are awaited")
    func earlyRefusal() throws {
        // Only the fixed part has arrived: a bad frame size or tenant length is already an error.
        var reader = EnvelopeReader()
        var input = Self.rawHeader(frameSize: 1 << 30).prefix(43)[...]
        #expect(throws: EnvelopeError.self) { _ = try reader.read(from: &input) }
        var partial = EnvelopeReader()
        var short = Self.rawHeader().prefix(20)[...]
        let event = try partial.read(from: &short)
        #expect(event == nil)
    }
}
