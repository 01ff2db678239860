import Crypto
import Testing

@testable import GatewayClient

@Suite("Envelope round trips")
struct EnvelopeRoundTripTests {
    static let context = ["purpose": "round-trip", "app": "tests"]

    /// The exact envelope length for `count` bytes: the header, n−1 regular frames, a final one.
    static func expectedLength(plaintext count: Int, frameSize: Int, headerByteCount: Int) -> Int {
        let frames = max(1, (count + frameSize - 1) / frameSize)
        let finalLength = count - (frames - 1) * frameSize
        return headerByteCount + (frames - 1) * (5 + frameSize + 16) + 9 + finalLength + 16
    }

    @Test(
        "whole messages round-trip at the frame boundaries",
        arguments: [1024, EnvelopeFormat.defaultFrameSize]
    )
    func blobRoundTrips(frameSize: Int) async throws {
        let provider = InMemoryDataKeyProvider()
        let encryptor = try EnvelopeEncryptor(provider: provider, frameSize: frameSize)
        let decryptor = EnvelopeDecryptor(provider: provider)
        for count in [0, 1, frameSize - 1, frameSize, frameSize + 1, 3 * frameSize + 5] {
            let plaintext = patternBytes(count, seed: count)
            let envelope = try await encryptor.encrypt(plaintext, tenant: "acme", context: Self.context)
            let header = try EnvelopeHeader(parsing: envelope)
            #expect(header.tenant == "acme")
            #expect(header.context == Self.context)
            #expect(header.frameSize == frameSize)
            #expect(
                envelope.count
                    == Self.expectedLength(
                        plaintext: count, frameSize: frameSize, headerByteCount: header.encoded.count),
                "\(count) bytes"
            )
            let opened = try await decryptor.decrypt(envelope, requiredContext: ["purpose": "round-trip"])
            #expect(opened.plaintext == plaintext, "\(count) bytes")
            #expect(opened.header == header)

            // The streaming paths agree with the whole-message ones, for odd chunk sizes.
            for chunkSize in [1, 7, frameSize + 3] where count < 5_000 || chunkSize > 1 {
                let streamed = try await collect(
                    encryptor.encryptStream(ArrayChunks(bytes: plaintext, size: chunkSize), tenant: "acme")
                )
                let back = try await collect(
                    decryptor.decryptStream(ArrayChunks(bytes: streamed, size: chunkSize))
                )
                #expect(back == plaintext, "\(count) bytes in chunks of \(chunkSize)")
            }
        }
    }

    @Test("the streaming path holds about one frame whatever the length (50 MiB)")
    func streamingMemoryIsBounded() async throws {
        let frameSize = EnvelopeFormat.defaultFrameSize
        let total = 50 << 20
        // Chunks that do not line up with frames.
        let input = PatternChunks(totalByteCount: total, chunkByteCount: 10_007)
        let provider = InMemoryDataKeyProvider()
        let encryptor = try EnvelopeEncryptor(provider: provider)
        let frameOverhead = 9 + EnvelopeFormat.tagByteCount
        // "About one frame": one sealed frame, plus what the allocator rounds a buffer up by.
        let oneFrame = frameSize + frameOverhead + 256

        var inputHash = SHA256()
        for await chunk in input {
            inputHash.update(data: chunk)
        }
        let expectedDigest = Array(inputHash.finalize())

        // Encrypt: every output chunk after the header is one frame; the buffers stay near one frame.
        var encryption = encryptor.encryptStream(input, tenant: "acme").makeAsyncIterator()
        var ciphertextByteCount = 0
        var largestChunk = 0
        var chunkCount = 0
        while let chunk = try await encryption.next() {
            ciphertextByteCount += chunk.count
            if chunkCount > 0 { largestChunk = max(largestChunk, chunk.count) }
            chunkCount += 1
        }
        #expect(largestChunk <= frameSize + frameOverhead)
        #expect(encryption.largestBufferByteCount <= oneFrame)
        #expect(encryption.largestBufferByteCount >= frameSize)
        #expect(chunkCount == 1 + total / frameSize)

        // Decrypt a fresh encryption of the same stream, chunk by chunk, hashing as it goes.
        let decryptor = EnvelopeDecryptor(provider: provider)
        var decryption = decryptor.decryptStream(encryptor.encryptStream(input, tenant: "acme"))
            .makeAsyncIterator()
        var outputHash = SHA256()
        var plaintextByteCount = 0
        var largestPlaintextChunk = 0
        while let chunk = try await decryption.next() {
            outputHash.update(data: chunk)
            plaintextByteCount += chunk.count
            largestPlaintextChunk = max(largestPlaintextChunk, chunk.count)
        }
        #expect(plaintextByteCount == total)
        #expect(Array(outputHash.finalize()) == expectedDigest)
        #expect(largestPlaintextChunk == frameSize)
        #expect(decryption.largestBufferByteCount <= oneFrame)
        #expect(ciphertextByteCount > total)
    }

    @Test("a cached data key seals many messages, each under its own message id and key")
    func cachedDataKey() async throws {
        let provider = InMemoryDataKeyProvider()
        let dataKey = try await provider.generateEnvelopeDataKey(tenant: "acme", context: Self.context)
        let plaintext = patternBytes(3000)
        let first = try EnvelopeEncryptor.encrypt(plaintext, with: dataKey, tenant: "acme", context: Self.context)
        let second = try EnvelopeEncryptor.encrypt(plaintext, with: dataKey, tenant: "acme", context: Self.context)
        let firstHeader = try EnvelopeHeader(parsing: first)
        let secondHeader = try EnvelopeHeader(parsing: second)
        #expect(firstHeader.dataKeyID == secondHeader.dataKeyID)
        #expect(firstHeader.messageID != secondHeader.messageID)
        #expect(firstHeader.commitment != secondHeader.commitment)
        // Same plaintext, same nonces, different derived keys: different ciphertexts.
        #expect(first.suffix(100) != second.suffix(100))
        let decryptor = EnvelopeDecryptor(provider: provider)
        #expect(try await decryptor.decrypt(first).plaintext == plaintext)
        #expect(try await decryptor.decrypt(second).plaintext == plaintext)
        #expect(provider.generatedCount == 1)

        let streamed = try await collect(
            EnvelopeEncryptor.encryptStream(
                ArrayChunks(bytes: plaintext, size: 100),
                with: dataKey,
                tenant: "acme",
                context: Self.context,
                frameSize: 1024
            )
        )
        #expect(try await decryptor.decrypt(streamed).plaintext == plaintext)
    }

    @Test("a required context pair that the header lacks is refused before the provider is asked")
    func requiredContext() async throws {
        let provider = InMemoryDataKeyProvider()
        let envelope = try await EnvelopeEncryptor(provider: provider).encrypt(
            [1, 2, 3], tenant: "acme", context: Self.context)
        let decryptor = EnvelopeDecryptor(provider: provider)
        let error = await #expect(throws: EnvelopeError.self) {
            try await decryptor.decrypt(envelope, requiredContext: ["purpose": "something-else"])
        }
        #expect(error?.code == .contextMismatch)
        #expect(error?.description.contains("something-else") == false)
        #expect(error?.description.contains("round-trip") == false)
        await #expect(throws: EnvelopeError.self) {
            try await decryptor.decrypt(envelope, requiredContext: ["tenant-id": "acme"])
        }
        #expect(provider.decryptedCount == 0)
        #expect(try await decryptor.decrypt(envelope, requiredContext: Self.context).plaintext == [1, 2, 3])
    }

    @Test("the provider refuses a context other than the key's: the envelope does not open")
    func wrongContextRefusedByProvider() async throws {
        let provider = InMemoryDataKeyProvider()
        let envelope = try await EnvelopeEncryptor(provider: provider, frameSize: 1024)
            .encrypt(patternBytes(2000), tenant: "acme", context: ["purpose": "invoices"])
        // The same header with another value of the same length, as an attacker could write it.
        let original = Array("invoices".utf8)
        let replacement = Array("payments".utf8)
        var altered = envelope
        let range = try #require(firstRange(of: original, in: envelope))
        altered.replaceSubrange(range, with: replacement)
        let header = try EnvelopeHeader(parsing: altered)
        #expect(header.context == ["purpose": "payments"])
        let error = await #expect(throws: InMemoryDataKeyProvider.Failure.self) {
            try await EnvelopeDecryptor(provider: provider).decrypt(altered)
        }
        #expect(error?.reason == "DECRYPTION_FAILED")
    }

    @Test("a provider that returns another key is caught by the key commitment, before any frame")
    func keyCommitment() async throws {
        let provider = InMemoryDataKeyProvider()
        let envelope = try await EnvelopeEncryptor(provider: provider).encrypt(patternBytes(100), tenant: "acme")
        let header = try EnvelopeHeader(parsing: envelope)
        provider.replaceKey(of: header.dataKeyID, with: [UInt8](repeating: 0x42, count: 32))
        let error = await #expect(throws: EnvelopeError.self) {
            try await EnvelopeDecryptor(provider: provider).decrypt(envelope)
        }
        #expect(error?.code == .authenticationFailed)
        #expect(error?.message.contains("commitment") == true)
    }
}

/// The first occurrence of `needle` in `haystack`.
func firstRange(of needle: [UInt8], in haystack: [UInt8]) -> Range<Int>? {
    guard needle.count <= haystack.count else { return nil }
    for start in 0...(haystack.count - needle.count) where haystack[start..<start + needle.count].elementsEqual(needle)
    {
        return start..<start + needle.count
    }
    return nil
}
