import Crypto
import Testing

@testable import GatewayClient

/// The vectors of `docs/envelope-format.md`: a fixed data key, message id and plaintext must give
/// exactly these bytes, so the format cannot change unnoticed. They were also produced by the
/// independent Python reader/writer written from that page alone.
@Suite("Envelope known-answer vectors")
struct EnvelopeKnownAnswerTests {
    static let dataKey = EnvelopeDataKey(
        id: "5f0c1a9e-3b7d-4c2a-9e8f-0123456789ab",
        plaintext: SensitiveBytes(copying: (0..<32).map { UInt8($0) })
    )
    static let messageID: [UInt8] = (0xA0..<0xC0).map { UInt8($0) }
    static let context = ["purpose": "known-answer", "app": "billing"]

    static let header = hex(
        "484757450101a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9",
        "babbbcbdbebf000004000461636d652435663063316139652d336237642d3463",
        "32612d396538662d303132333435363738396162003100000002000000036170",
        "700000000762696c6c696e6700000007707572706f73650000000c6b6e6f776e",
        "2d616e737765727100a6650d8806e85be593de36c71557a5dc2692f2fde0e450",
        "e1c68331c3c618"
    )

    static let empty = hex(
        "484757450101a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9",
        "babbbcbdbebf000004000461636d652435663063316139652d336237642d3463",
        "32612d396538662d303132333435363738396162003100000002000000036170",
        "700000000762696c6c696e6700000007707572706f73650000000c6b6e6f776e",
        "2d616e737765727100a6650d8806e85be593de36c71557a5dc2692f2fde0e450",
        "e1c68331c3c618000000010100000000a89606931627c924c2c8dea8d84acfbe"
    )

    static let fox = hex(
        "484757450101a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9",
        "babbbcbdbebf000004000461636d652435663063316139652d336237642d3463",
        "32612d396538662d303132333435363738396162003100000002000000036170",
        "700000000762696c6c696e6700000007707572706f73650000000c6b6e6f776e",
        "2d616e737765727100a6650d8806e85be593de36c71557a5dc2692f2fde0e450",
        "e1c68331c3c61800000001010000002bef4ba613c8f5645a84c8b1d9418fa7f8",
        "99cdccceacf83c5a7c35800497edb97d503cd1d803a85a4739cdf4cf555fde74",
        "6de6dce0777dbe141bbf90"
    )

    static let multiFrameSHA256 = "b09ce4379e3703caa6645457f75b4e8e7235e7dad763ccf5ceb4f8baf101055d"

    static func seal(_ plaintext: [UInt8]) throws -> [UInt8] {
        try EnvelopeEncryptor.encrypt(
            plaintext,
            with: dataKey,
            tenant: "acme",
            context: context,
            frameSize: 1024,
            messageID: messageID
        )
    }

    @Test("the header")
    func headerBytes() throws {
        let envelope = try Self.seal([])
        #expect(Array(envelope.prefix(Self.header.count)) == Self.header)
        let parsed = try EnvelopeHeader(parsing: Self.header)
        #expect(parsed.encoded == Self.header)
        #expect(parsed.tenant == "acme")
        #expect(parsed.dataKeyID == Self.dataKey.id)
        #expect(parsed.context == Self.context)
        #expect(parsed.frameSize == 1024)
        #expect(parsed.messageID == Self.messageID)
    }

    @Test("the empty message")
    func emptyMessage() async throws {
        #expect(try Self.seal([]) == Self.empty)
        let opened = try await EnvelopeDecryptor(provider: FixedKeyProvider(key: Self.dataKey.plaintext.copyBytes()))
            .decrypt(Self.empty)
        #expect(opened.plaintext.isEmpty)
    }

    @Test("a short message")
    func shortMessage() async throws {
        let plaintext = Array("The quick brown fox jumps over the lazy dog".utf8)
        #expect(try Self.seal(plaintext) == Self.fox)
        let opened = try await EnvelopeDecryptor(provider: FixedKeyProvider(key: Self.dataKey.plaintext.copyBytes()))
            .decrypt(Self.fox)
        #expect(opened.plaintext == plaintext)
    }

    @Test("a message of three frames")
    func multiFrameMessage() async throws {
        let plaintext = (0..<2148).map { UInt8(truncatingIfNeeded: 7 * $0 + 3) }
        let envelope = try Self.seal(plaintext)
        #expect(envelope.count == 2382)
        #expect(SHA256.hash(data: envelope).map { String(format2: $0) }.joined() == Self.multiFrameSHA256)
        // The streaming encryptor, fed in odd chunks, writes the same frames.
        var writer = EnvelopeWriter(
            sealer: try EnvelopeFrameSealer(
                dataKey: Self.dataKey,
                tenant: "acme",
                context: Self.context,
                frameSize: 1024,
                messageID: Self.messageID
            )
        )
        var streamed = writer.header.encoded
        for start in stride(from: 0, to: plaintext.count, by: 333) {
            var input = plaintext[start..<min(start + 333, plaintext.count)]
            while let frame = try writer.write(from: &input) {
                streamed += frame
            }
        }
        streamed += try writer.finish()
        #expect(streamed == envelope)
    }

    @Test("the derived keys match HKDF-SHA256 as the document states it")
    func keyDerivation() throws {
        let keys = try EnvelopeFormat.deriveKeys(dataKey: Self.dataKey.plaintext, messageID: Self.messageID)
        let commitment = HKDF<SHA256>.deriveKey(
            inputKeyMaterial: SymmetricKey(data: Self.dataKey.plaintext.copyBytes()),
            salt: Self.messageID,
            info: Array("HGWE v1 key commitment".utf8),
            outputByteCount: 32
        )
        #expect(keys.commitment == commitment.withUnsafeBytes { Array($0) })
        #expect(Array(Self.header.suffix(32)) == keys.commitment)
    }
}

/// Bytes from hex text (whitespace ignored).
func hex(_ parts: String...) -> [UInt8] {
    let digits = Array(parts.joined().filter { !$0.isWhitespace }.utf8)
    return stride(from: 0, to: digits.count, by: 2).map { index in
        UInt8(String(decoding: digits[index..<index + 2], as: UTF8.self), radix: 16)!
    }
}

extension String {
    /// Two lowercase hex digits.
    init(format2 byte: UInt8) {
        let text = String(byte, radix: 16)
        self = text.count == 1 ? "0" + text : text
    }
}
