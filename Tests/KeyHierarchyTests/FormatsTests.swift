import KeyHierarchy
import Testing

@Suite("Formats: wrapped data keys, payload ciphertexts, token labels")
struct FormatsTests {
    static let knownID = DataKeyID(bytes: Array(0..<16))!

    static func tenant(_ raw: String) -> TenantID {
        // Test inputs are valid by construction.
        try! TenantID(raw)
    }

    static let knownIV: [UInt8] = [0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xC7, 0xC8, 0xC9, 0xCA, 0xCB]

    static func wrapped(version: MasterKeyVersionNumber = 7, iv: [UInt8] = knownIV) -> WrappedDataKey {
        WrappedDataKey(
            version: version,
            dataKeyID: knownID,
            iv: iv,
            ciphertextAndTag: (0..<48).map { UInt8(0xA0 + $0 % 16) }
        )
    }

    // MARK: WrappedDataKey

    @Test("WrappedDataKey is 83 bytes")
    func wrappedSize() {
        #expect(WrappedDataKey.encodedByteCount == 83)
        #expect(Self.wrapped().encoded.count == 83)
    }

    @Test("WrappedDataKey layout: magic, format, version, id, IV, ciphertext and tag")
    func wrappedLayout() {
        let key = Self.wrapped(version: 0x0102_0304)
        let bytes = key.encoded
        #expect(Array(bytes[0..<2]) == [0x68, 0x77])  // "hw"
        #expect(bytes[2] == 1)
        #expect(Array(bytes[3..<7]) == [0x01, 0x02, 0x03, 0x04])
        #expect(Array(bytes[7..<23]) == Array(0..<16))
        #expect(Array(bytes[23..<35]) == Self.knownIV)
        #expect(Array(bytes[35...]) == key.ciphertextAndTag)
    }

    @Test(
        "WrappedDataKey round-trips",
        arguments: [1, 2, 255, 256, 65_536, 0x7FFF_FFFF, Int(UInt32.max)],
        [
            knownIV, [UInt8](repeating: 0, count: 12), [UInt8](repeating: 0xFF, count: 12),
            // A blob written before IVs were random: fixed field 00000001 and a counter.
            [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0x05, 0x06],
        ]
    )
    func wrappedRoundTrip(version: MasterKeyVersionNumber, iv: [UInt8]) throws {
        let key = Self.wrapped(version: version, iv: iv)
        let parsed = try #require(WrappedDataKey(encoded: key.encoded))
        #expect(parsed == key)
        #expect(parsed.version == version)
        #expect(parsed.encoded == key.encoded)
    }

    @Test("WrappedDataKey round-trips random ids")
    func wrappedRoundTripRandomIDs() throws {
        for _ in 0..<50 {
            var key = Self.wrapped()
            key.dataKeyID = .random()
            #expect(WrappedDataKey(encoded: key.encoded) == key)
        }
    }

    struct Corruption: Sendable, CustomTestStringConvertible {
        var testDescription: String
        var change: @Sendable ([UInt8]) -> [UInt8]
    }

    static let corruptions: [Corruption] = [
        Corruption(testDescription: "wrong magic") { bytes in
            var bytes = bytes
            bytes[1] = 0x78
            return bytes
        },
        Corruption(testDescription: "payload magic hc") { bytes in
            var bytes = bytes
            bytes[1] = 0x63
            return bytes
        },
        Corruption(testDescription: "format version 0") { bytes in
            var bytes = bytes
            bytes[2] = 0
            return bytes
        },
        Corruption(testDescription: "format version 2") { bytes in
            var bytes = bytes
            bytes[2] = 2
            return bytes
        },
        Corruption(testDescription: "master-key version 0") { bytes in
            var bytes = bytes
            bytes.replaceSubrange(3..<7, with: [0, 0, 0, 0])
            return bytes
        },
        Corruption(testDescription: "one byte short") { Array($0.dropLast()) },
        Corruption(testDescription: "one byte long") { $0 + [0] },
        Corruption(testDescription: "empty") { _ in [] },
        Corruption(testDescription: "header only") { Array($0.prefix(35)) },
    ]

    @Test("WrappedDataKey refuses", arguments: corruptions)
    func wrappedRefused(corruption: Corruption) {
        let bytes = corruption.change(Self.wrapped().encoded)
        #expect(WrappedDataKey(encoded: bytes) == nil)
    }

    @Test("the data-key AAD differs when tenant, id, version or context hash differs")
    func wrappedAADBindsEverything() throws {
        let otherID = try #require(DataKeyID(bytes: Array(1...16)))
        let contextHash = EncryptionContext.empty.hash
        let otherContextHash = try EncryptionContext(["a": "b"]).hash
        func aad(_ tenant: String, _ id: DataKeyID, _ version: Int, _ hash: [UInt8]) -> [UInt8] {
            WrappedDataKey.aad(tenant: Self.tenant(tenant), dataKeyID: id, version: version, contextHash: hash)
        }
        let base = aad("a", Self.knownID, 1, contextHash)
        let variants: [[UInt8]] = [
            base,
            aad("b", Self.knownID, 1, contextHash),
            aad("ab", Self.knownID, 1, contextHash),
            aad("a", otherID, 1, contextHash),
            aad("a", Self.knownID, 2, contextHash),
            aad("a", Self.knownID, 256, contextHash),
            aad("a", Self.knownID, 1, otherContextHash),
        ]
        #expect(Set(variants).count == variants.count)
        #expect(aad("a", Self.knownID, 1, contextHash) == base)
    }

    @Test("the data-key AAD, byte by byte")
    func wrappedAADKnownAnswer() {
        let aad = WrappedDataKey.aad(
            tenant: Self.tenant("t"), dataKeyID: Self.knownID, version: 2, contextHash: [0xAA, 0xBB])
        var expected: [UInt8] = [0, 0, 0, 14] + Array("hsmgw-data-key".utf8)
        expected += [0, 0, 0, 1]  // format version
        expected += [0, 0, 0, 1, 0x74]  // "t"
        expected += [0, 0, 0, 16] + Array(0..<16)
        expected += [0, 0, 0, 2]  // master-key version
        expected += [0, 0, 0, 2, 0xAA, 0xBB]
        #expect(aad == expected)
    }

    @Test("data-key and payload AADs are domain-separated")
    func aadDomainSeparation() {
        let hash = EncryptionContext.empty.hash
        let dataKey = WrappedDataKey.aad(
            tenant: Self.tenant("a"), dataKeyID: Self.knownID, version: 1, contextHash: hash)
        let payload = PayloadCiphertext.aad(tenant: Self.tenant("a"), dataKeyID: Self.knownID, contextHash: hash)
        #expect(dataKey != payload)
    }

    // MARK: PayloadCiphertext

    @Test("PayloadCiphertext limits")
    func payloadConstants() {
        #expect(PayloadCiphertext.headerByteCount == 31)
        #expect(PayloadCiphertext.maximumPlaintextByteCount == 65_536)
        #expect(PayloadCiphertext.maximumCiphertextByteCount == 31 + 65_536 + 16)
    }

    @Test(
        "PayloadCiphertext round-trips",
        arguments: [16, 17, 100, PayloadCiphertext.maximumPlaintextByteCount + PayloadCiphertext.tagByteCount]
    )
    func payloadRoundTrip(ciphertextLength: Int) throws {
        let payload = PayloadCiphertext(
            dataKeyID: .random(),
            nonce: (0..<12).map { UInt8($0 * 3) },
            ciphertextAndTag: (0..<ciphertextLength).map { UInt8(truncatingIfNeeded: $0) }
        )
        let bytes = payload.encoded
        #expect(bytes.count == PayloadCiphertext.headerByteCount + ciphertextLength)
        #expect(Array(bytes[0..<2]) == [0x68, 0x63])  // "hc"
        #expect(bytes[2] == 1)
        #expect(Array(bytes[3..<19]) == payload.dataKeyID.bytes)
        #expect(Array(bytes[19..<31]) == payload.nonce)
        let parsed = try PayloadCiphertext(encoded: bytes)
        #expect(parsed == payload)
    }

    static func payloadBytes(totalLength: Int) -> [UInt8] {
        [0x68, 0x63, 1] + Array(0..<16) + [UInt8](repeating: 9, count: totalLength - 19)
    }

    @Test("PayloadCiphertext: the largest ciphertext is accepted, one byte more is refused naming the limit")
    func payloadTooLarge() throws {
        let maximum = PayloadCiphertext.maximumCiphertextByteCount
        _ = try PayloadCiphertext(encoded: Self.payloadBytes(totalLength: maximum))
        let error = #expect(throws: KeyServiceError.self) {
            try PayloadCiphertext(encoded: Self.payloadBytes(totalLength: maximum + 1))
        }
        #expect(error?.code == .invalidArgument)
        #expect(error?.message.contains("\(maximum)") == true)
        #expect(error?.message.contains("\(maximum + 1)") == true)
    }

    @Test("PayloadCiphertext: header and tag only is accepted, anything shorter is refused")
    func payloadTooShort() throws {
        let minimum = PayloadCiphertext.headerByteCount + PayloadCiphertext.tagByteCount
        let parsed = try PayloadCiphertext(encoded: Self.payloadBytes(totalLength: minimum))
        #expect(parsed.ciphertextAndTag.count == 16)
        for length in [0, 1, 2, 3, 19, 31, minimum - 1] {
            let bytes = Array(Self.payloadBytes(totalLength: max(length, 19)).prefix(length))
            let error = #expect(throws: KeyServiceError.self) { try PayloadCiphertext(encoded: bytes) }
            #expect(error?.code == .invalidArgument)
        }
    }

    @Test("PayloadCiphertext refuses a wrong magic, including a wrapped data key's")
    func payloadWrongMagic() {
        var bytes = Self.payloadBytes(totalLength: 100)
        bytes[1] = 0x77
        let error = #expect(throws: KeyServiceError.self) { try PayloadCiphertext(encoded: bytes) }
        #expect(error?.code == .invalidArgument)
        let wrapped = #expect(throws: KeyServiceError.self) { try PayloadCiphertext(encoded: Self.wrapped().encoded) }
        #expect(wrapped?.code == .invalidArgument)
    }

    @Test("PayloadCiphertext refuses unknown format versions", arguments: [UInt8(0), 2, 0xFF])
    func payloadUnknownVersion(version: UInt8) {
        var bytes = Self.payloadBytes(totalLength: 100)
        bytes[2] = version
        let error = #expect(throws: KeyServiceError.self) { try PayloadCiphertext(encoded: bytes) }
        #expect(error?.code == .invalidArgument)
        #expect(error?.message.contains("version \(version)") == true)
    }

    @Test("the payload AAD differs when tenant, id or context hash differs")
    func payloadAADBindsEverything() throws {
        let otherID = try #require(DataKeyID(bytes: Array(1...16)))
        let hash = EncryptionContext.empty.hash
        let otherHash = try EncryptionContext(["a": "b"]).hash
        let variants: [[UInt8]] = [
            PayloadCiphertext.aad(tenant: Self.tenant("a"), dataKeyID: Self.knownID, contextHash: hash),
            PayloadCiphertext.aad(tenant: Self.tenant("b"), dataKeyID: Self.knownID, contextHash: hash),
            PayloadCiphertext.aad(tenant: Self.tenant("a"), dataKeyID: otherID, contextHash: hash),
            PayloadCiphertext.aad(tenant: Self.tenant("a"), dataKeyID: Self.knownID, contextHash: otherHash),
        ]
        #expect(Set(variants).count == variants.count)
    }

    // MARK: MasterKeyLabel

    @Test("MasterKeyLabel label and prefix")
    func labels() {
        #expect(MasterKeyLabel.label(tenant: Self.tenant("a"), version: 3) == "hsmgw:mk:a:v3")
        #expect(MasterKeyLabel.label(tenant: Self.tenant("tenant-1"), version: 12) == "hsmgw:mk:tenant-1:v12")
        #expect(MasterKeyLabel.labelPrefix(for: Self.tenant("a")) == "hsmgw:mk:a:")
        for version in [1, 2, 10, 100] {
            let label = MasterKeyLabel.label(tenant: Self.tenant("a"), version: version)
            #expect(label.hasPrefix(MasterKeyLabel.labelPrefix(for: Self.tenant("a"))))
            #expect(label.hasPrefix(MasterKeyLabel.prefix))
        }
    }

    @Test(
        "the prefix of tenant a matches no label of another tenant", arguments: ["ab", "a-b", "a_b", "a0", "b", "aa"])
    func prefixIsolation(other: String) {
        let prefix = MasterKeyLabel.labelPrefix(for: Self.tenant("a"))
        for version in [1, 2, 10] {
            #expect(!MasterKeyLabel.label(tenant: Self.tenant(other), version: version).hasPrefix(prefix))
        }
        // And the other way round.
        let otherPrefix = MasterKeyLabel.labelPrefix(for: Self.tenant(other))
        #expect(!MasterKeyLabel.label(tenant: Self.tenant("a"), version: 1).hasPrefix(otherPrefix))
    }
}
