import GatewayWire
import NIOCore
import Testing

/// Counting repeated entries on the wire bytes, before a request is decoded.
@Suite("Repeated-field scan")
struct RepeatedFieldScanTests {
    static let context = RepeatedFieldScan.Rule(fieldNumber: 2, name: "encryption_context", maximum: 64)
    static let keys = RepeatedFieldScan.Rule(fieldNumber: 2, name: "keys", maximum: 1000, entryRules: [context])

    /// `DecryptDataKeysRequest{tenant: "acme", keys: count × DataKeyReference{}}`, written by hand:
    /// each empty entry is the two bytes `12 00`.
    static func emptyEntries(_ count: Int) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.writeBytes([0x0A, 0x04] + Array("acme".utf8))
        buffer.reserveCapacity(minimumWritableBytes: 2 * count)
        for _ in 0..<count { buffer.writeBytes([0x12, 0x00]) }
        return buffer
    }

    static func request(keys: Int, pairs: (Int) -> Int) -> ByteBuffer {
        var message = Hsmgw_V1_DecryptDataKeysRequest()
        message.tenant = "acme"
        for index in 0..<keys {
            var reference = Hsmgw_V1_DataKeyReference()
            reference.id = "00000000-0000-4000-8000-000000000000"
            for pair in 0..<pairs(index) { reference.encryptionContext["k\(pair)"] = "v" }
            message.keys.append(reference)
        }
        return message.wirePayload()
    }

    @Test("500,000 empty entries in a 1 MiB payload: refused after reading 1,001 of them")
    func floodOfEmptyEntries() {
        let payload = Self.emptyEntries(500_000)
        #expect(payload.readableBytes > 1_000_000)
        let (outcome, fieldsRead) = RepeatedFieldScan.scan(payload, rules: [Self.keys])
        #expect(outcome == .over(.init(path: "keys", maximum: 1000)))
        // The tenant, then entries up to the one that crossed the limit; none after it.
        #expect(fieldsRead == 1 + 1001)
    }

    @Test("a full batch within its limits passes and decodes; a context over 64 pairs is named by its entry")
    func withinAndOver() throws {
        let full = Self.request(keys: 1000, pairs: { $0 == 999 ? 64 : 1 })
        let (outcome, fieldsRead) = RepeatedFieldScan.scan(full, rules: [Self.keys])
        #expect(outcome == .withinLimits)
        // Tenant; per key: the entry, its id, its pairs.
        #expect(fieldsRead == 1 + 999 * 3 + (1 + 1 + 64))
        #expect(try Hsmgw_V1_DecryptDataKeysRequest(wirePayload: full).keys.count == 1000)

        let overContext = Self.request(keys: 5, pairs: { $0 == 3 ? 65 : 2 })
        #expect(
            RepeatedFieldScan.scan(overContext, rules: [Self.keys]).outcome
                == .over(.init(path: "keys[3].encryption_context", maximum: 64)))
        #expect(
            RepeatedFieldScan.scan(Self.request(keys: 1001, pairs: { _ in 0 }), rules: [Self.keys]).outcome
                == .over(.init(path: "keys", maximum: 1000)))
    }

    @Test("map entries are counted as sent, a key repeated included")
    func duplicatesCount() {
        var buffer = ByteBuffer()
        // 65 entries of encryption_context (field 2) all with key "a": a decoder keeps one.
        for _ in 0..<65 { buffer.writeBytes([0x12, 0x05, 0x0A, 0x01, 0x61, 0x12, 0x00]) }
        #expect(
            RepeatedFieldScan.scan(buffer, rules: [Self.context]).outcome
                == .over(.init(path: "encryption_context", maximum: 64)))
    }

    @Test("other fields and wire types are skipped; groups are skipped whole, their fields not counted")
    func skipping() {
        var buffer = ByteBuffer()
        buffer.writeBytes([0x08, 0x96, 0x01])  // field 1 varint 150
        buffer.writeBytes([0x19] + Array(repeating: 0, count: 8))  // field 3 fixed64
        buffer.writeBytes([0x25, 1, 2, 3, 4])  // field 4 fixed32
        // Field 5 as a group holding 70 fields numbered 2 and a nested group: not counted.
        buffer.writeBytes([0x2B])
        for _ in 0..<70 { buffer.writeBytes([0x12, 0x00]) }
        buffer.writeBytes([0x33, 0x12, 0x00, 0x34])  // group 6 inside, closed
        buffer.writeBytes([0x2C])
        buffer.writeBytes([0x12, 0x00])  // one real entry
        let (outcome, _) = RepeatedFieldScan.scan(buffer, rules: [Self.context])
        #expect(outcome == .withinLimits)
    }

    @Test(
        "malformed wire bytes are reported as such",
        arguments: [
            [0x12] as [UInt8],  // a tag without its length
            [0x12, 0x05, 0x00],  // a length beyond the end
            [0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],  // an 11-byte varint
            [0x0E],  // wire type 6
            [0x0F],  // wire type 7
            [0x0C],  // an end-group without its start
            [0x0B, 0x12, 0x00],  // a group never closed
            [0x0B, 0x14],  // a group closed by another field's end
            [0x00],  // field number 0
            [0x19, 0x00],  // a truncated fixed64
        ]
    )
    func malformed(bytes: [UInt8]) {
        #expect(RepeatedFieldScan.scan(ByteBuffer(bytes: bytes), rules: [Self.context]).outcome == .malformed)
    }

    @Test("groups nested deeper than 100 are malformed")
    func deepGroups() {
        let depth = RepeatedFieldScan.maximumGroupDepth
        let ok = Array(repeating: UInt8(0x0B), count: depth) + Array(repeating: UInt8(0x0C), count: depth)
        #expect(RepeatedFieldScan.scan(ByteBuffer(bytes: ok), rules: [Self.context]).outcome == .withinLimits)
        let deep = Array(repeating: UInt8(0x0B), count: depth + 1) + Array(repeating: UInt8(0x0C), count: depth + 1)
        #expect(RepeatedFieldScan.scan(ByteBuffer(bytes: deep), rules: [Self.context]).outcome == .malformed)
    }

    @Test("no rules: nothing is read")
    func noRules() {
        #expect(RepeatedFieldScan.scan(Self.emptyEntries(10), rules: []) == (.withinLimits, 0))
    }
}
