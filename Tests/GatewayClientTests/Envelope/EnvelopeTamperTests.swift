import Testing

@testable import GatewayClient

/// Every alteration of an envelope must fail to decrypt. The provider used here returns the same
/// key whatever the header asks for, so the envelope's own checks (header hash, sequence numbers,
/// final flag, commitment) are what catch each change, not the gateway.
@Suite("Envelope tampering")
struct EnvelopeTamperTests {
    static let frameSize = 1024
    static let key: [UInt8] = (0..<32).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) }
    static let plaintext = patternBytes(3 * 1024 + 5)

    static func envelope(_ plaintext: [UInt8] = plaintext) throws -> [UInt8] {
        try EnvelopeEncryptor.encrypt(
            plaintext,
            with: EnvelopeDataKey(id: "fixed-key", plaintext: SensitiveBytes(copying: key)),
            tenant: "acme",
            context: ["purpose": "tamper", "app": "tests"],
            frameSize: frameSize
        )
    }

    /// Decrypts whole and streamed (in 5-byte chunks); both must throw an `EnvelopeError`.
    static func expectRejected(_ envelope: [UInt8], _ note: Comment, sourceLocation: SourceLocation = #_sourceLocation)
        async -> [EnvelopeError.Code]
    {
        let decryptor = EnvelopeDecryptor(provider: FixedKeyProvider(key: key))
        var codes: [EnvelopeError.Code] = []
        do {
            _ = try await decryptor.decrypt(envelope)
            Issue.record("accepted: \(note)", sourceLocation: sourceLocation)
        } catch let error as EnvelopeError {
            codes.append(error.code)
        } catch {
            Issue.record("not an envelope error: \(error) (\(note))", sourceLocation: sourceLocation)
        }
        do {
            _ = try await collect(decryptor.decryptStream(ArrayChunks(bytes: envelope, size: 5)))
            Issue.record("stream accepted: \(note)", sourceLocation: sourceLocation)
        } catch let error as EnvelopeError {
            codes.append(error.code)
        } catch {
            Issue.record("stream: not an envelope error: \(error) (\(note))", sourceLocation: sourceLocation)
        }
        return codes
    }

    @Test("the untouched envelope decrypts (so the failures below are the tampering's)")
    func control() async throws {
        let envelope = try Self.envelope()
        let layout = try EnvelopeLayout(envelope)
        #expect(layout.frameStarts.count == 4)
        let opened = try await EnvelopeDecryptor(provider: FixedKeyProvider(key: Self.key)).decrypt(envelope)
        #expect(opened.plaintext == Self.plaintext)
    }

    @Test("flipping any bit of any header byte is detected")
    func headerEdits() async throws {
        let envelope = try Self.envelope()
        let layout = try EnvelopeLayout(envelope)
        for offset in 0..<layout.headerByteCount {
            for bit in [0, 7] {
                var altered = envelope
                altered[offset] ^= UInt8(1 << bit)
                _ = await Self.expectRejected(altered, "header byte \(offset), bit \(bit)")
            }
        }
    }

    @Test("flipping a byte anywhere in any frame is detected")
    func frameEdits() async throws {
        let envelope = try Self.envelope()
        let layout = try EnvelopeLayout(envelope)
        for index in layout.frameStarts.indices {
            let range = layout.frameRange(index)
            // Sequence number, type, final length, first/middle/last ciphertext byte, tag.
            var offsets = [range.lowerBound, range.lowerBound + 3, range.lowerBound + 4, range.lowerBound + 6]
            offsets += [range.lowerBound + 9, (range.lowerBound + range.upperBound) / 2, range.upperBound - 17]
            offsets += [range.upperBound - 16, range.upperBound - 1]
            for offset in offsets {
                var altered = envelope
                altered[offset] ^= 0x01
                _ = await Self.expectRejected(altered, "frame \(index + 1), byte \(offset)")
            }
        }
    }

    @Test("every truncation is detected, at frame boundaries as well as inside frames")
    func truncation() async throws {
        let envelope = try Self.envelope()
        let layout = try EnvelopeLayout(envelope)
        for length in 0..<envelope.count {
            let codes = await Self.expectRejected(Array(envelope.prefix(length)), "first \(length) bytes")
            if layout.frameStarts.contains(length) {
                // A clean cut between frames: only the missing final frame reveals it.
                #expect(codes == [.truncated, .truncated], "cut at \(length)")
            }
        }
    }

    @Test("reordering, dropping or duplicating frames is detected, even with the sequence numbers rewritten")
    func frameOrder() async throws {
        let envelope = try Self.envelope()
        let layout = try EnvelopeLayout(envelope)
        let header = Array(envelope[0..<layout.headerByteCount])
        let frames = layout.frameStarts.indices.map { Array(envelope[layout.frameRange($0)]) }

        func assemble(_ order: [Int], renumber: Bool) -> [UInt8] {
            var bytes = header
            for (position, index) in order.enumerated() {
                var frame = frames[index]
                if renumber {
                    let sequence = UInt32(position + 1)
                    frame[0] = UInt8(sequence >> 24)
                    frame[1] = UInt8(truncatingIfNeeded: sequence >> 16)
                    frame[2] = UInt8(truncatingIfNeeded: sequence >> 8)
                    frame[3] = UInt8(truncatingIfNeeded: sequence)
                }
                bytes += frame
            }
            return bytes
        }

        let orders: [(String, [Int])] = [
            ("swap 1 and 2", [1, 0, 2, 3]),
            ("swap 2 and 3", [0, 2, 1, 3]),
            ("drop frame 2", [0, 2, 3]),
            ("drop frame 1", [1, 2, 3]),
            ("duplicate frame 2", [0, 1, 1, 2, 3]),
            ("duplicate frame 1 at the start", [0, 0, 1, 2, 3]),
            ("final frame moved first", [3, 0, 1, 2]),
        ]
        for (name, order) in orders {
            _ = await Self.expectRejected(assemble(order, renumber: false), "\(name)")
            let codes = await Self.expectRejected(assemble(order, renumber: true), "\(name), renumbered")
            if order.last == 3, order.count <= 4 || name.hasPrefix("duplicate") {
                // In sequence on its face: only the AES-GCM tags can tell.
                #expect(codes.allSatisfy { $0 == .authenticationFailed }, "\(name), renumbered: \(codes)")
            }
        }
    }

    @Test("bytes or frames appended after the final frame are detected")
    func appending() async throws {
        let envelope = try Self.envelope()
        let layout = try EnvelopeLayout(envelope)
        let lastFrame = Array(envelope[layout.frameRange(layout.frameStarts.count - 1)])
        for suffix in [[0x00], [0x00, 0x00, 0x00, 0x05], lastFrame, Array(envelope.prefix(200))] {
            let codes = await Self.expectRejected(envelope + suffix, "\(suffix.count) bytes appended")
            #expect(codes == [.trailingData, .trailingData])
        }
    }

    @Test("relabelling frames as final, or the final frame as regular, is detected")
    func finalFlag() async throws {
        let envelope = try Self.envelope()
        let layout = try EnvelopeLayout(envelope)
        // End the message early: frame 3 becomes final (with its full length), frame 4 dropped.
        let third = layout.frameRange(2)
        var early = Array(envelope[0..<third.lowerBound])
        early += envelope[third.lowerBound..<third.lowerBound + 4]
        early += [0x01, 0x00, 0x00, 0x04, 0x00]  // type final, length 1,024
        early += envelope[(third.lowerBound + 5)..<third.upperBound]
        let codes = await Self.expectRejected(early, "frame 3 relabelled final")
        #expect(codes.allSatisfy { $0 == .authenticationFailed })

        // Frame 2 marked final with everything after it kept: its tag fails (and bytes follow).
        var marked = envelope
        marked[layout.frameStarts[1] + 4] = 0x01
        _ = await Self.expectRejected(marked, "frame 2 type flipped")

        // The final frame marked regular: the length field is read as ciphertext and it ends early.
        var unmarked = envelope
        unmarked[layout.frameStarts[3] + 4] = 0x00
        _ = await Self.expectRejected(unmarked, "final frame type flipped")
    }

    @Test("frames moved to another message's header, or headers swapped, are detected")
    func splicing() async throws {
        let first = try Self.envelope()
        let second = try Self.envelope()  // Same key and plaintext, another message id.
        let layoutFirst = try EnvelopeLayout(first)
        let layoutSecond = try EnvelopeLayout(second)
        let spliced = Array(first[0..<layoutFirst.headerByteCount]) + second[layoutSecond.headerByteCount...]
        let codes = await Self.expectRejected(spliced, "second message's frames under the first header")
        #expect(codes.allSatisfy { $0 == .authenticationFailed })

        // A frame from another message at the same position.
        var mixed = first
        mixed.replaceSubrange(layoutFirst.frameRange(1), with: second[layoutSecond.frameRange(1)])
        _ = await Self.expectRejected(mixed, "frame 2 from another message")
    }

    @Test("the wrong key is refused by the commitment before any frame is opened")
    func wrongKey() async throws {
        let envelope = try Self.envelope()
        let decryptor = EnvelopeDecryptor(provider: FixedKeyProvider(key: [UInt8](repeating: 7, count: 32)))
        let error = await #expect(throws: EnvelopeError.self) { try await decryptor.decrypt(envelope) }
        #expect(error?.code == .authenticationFailed)
        #expect(error?.message.contains("commitment") == true)
    }
}
