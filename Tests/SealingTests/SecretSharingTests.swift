import SecretMemory
import Testing

@testable import Sealing

/// Randomness from a script, so splits have known answers.
struct ScriptedRandomness: ShareRandomness {
    var bytes: [UInt8]

    mutating func fill(_ buffer: UnsafeMutableRawBufferPointer) {
        precondition(bytes.count >= buffer.count, "the script ran out")
        for index in 0..<buffer.count {
            buffer[index] = bytes.removeFirst()
        }
    }
}

func secret(_ bytes: [UInt8]) -> SecretBytes { SecretBytes(copying: bytes) }

func randomSecret(length: Int = 32) -> SecretBytes {
    var randomness = SystemRandomness()
    return SecretBytes(count: length) { randomness.fill($0) }
}

func yBytes(_ share: SecretShare) -> [UInt8] { share.y.copyBytes() }

/// Every subset of `size` elements of `0..<count`.
func subsets(of count: Int, size: Int) -> [[Int]] {
    guard size > 0 else { return [[]] }
    guard count >= size else { return [] }
    let withLast = subsets(of: count - 1, size: size - 1).map { $0 + [count - 1] }
    return subsets(of: count - 1, size: size) + withLast
}

@Suite("Shamir's secret sharing")
struct SecretSharingTests {
    static let splitID: [UInt8] = [1, 2, 3, 4, 5, 6, 7, 8]

    // MARK: Known answers (hand-checked: FIPS-197 products, x² from the same table)

    @Test("K=2: y(x) = 0x42 + 0x05·x")
    func knownAnswerThresholdTwo() throws {
        // 0x05·1 = 0x05, 0x05·2 = 0x0A, 0x05·3 = 0x05·2 + 0x05 = 0x0F.
        var randomness = ScriptedRandomness(bytes: Self.splitID + [0x05])
        let shares = try SecretSharing.split(secret([0x42]), shareCount: 3, threshold: 2, randomness: &randomness)
        #expect(shares.map(\.x) == [1, 2, 3])
        #expect(shares.map(yBytes) == [[0x47], [0x48], [0x4D]])
        #expect(shares.allSatisfy { $0.splitID == Self.splitID && $0.threshold == 2 })
    }

    @Test("K=3: y(x) = s + a1·x + a2·x², two bytes")
    func knownAnswerThresholdThree() throws {
        // Byte 0: s = 0x42, a1 = 0x05, a2 = 0x57. x² is 1, 4, 5 for x = 1, 2, 3 (3·3 = 2·3 + 3).
        //   x=1: 42 ^ 05 ^ 57 = 10;  x=2: 42 ^ 0A ^ (57·4 = 47) = 0F;  x=3: 42 ^ 0F ^ (57·5 = 47 ^ 57 = 10) = 5D
        // Byte 1: s = 0x00, a1 = a2 = 0x01: y = x ^ x², so 00, 06, 06.
        var randomness = ScriptedRandomness(bytes: Self.splitID + [0x05, 0x57, 0x01, 0x01])
        let shares = try SecretSharing.split(
            secret([0x42, 0x00]), shareCount: 3, threshold: 3, randomness: &randomness
        )
        #expect(shares.map(yBytes) == [[0x10, 0x00], [0x0F, 0x06], [0x5D, 0x06]])
        #expect(try SecretSharing.combine(shares).copyBytes() == [0x42, 0x00])
    }

    @Test("The text form of a known share: version, split id, K, x, y, SHA-256 prefix")
    func knownText() throws {
        var randomness = ScriptedRandomness(bytes: Self.splitID + [0x05])
        let shares = try SecretSharing.split(secret([0x42]), shareCount: 3, threshold: 2, randomness: &randomness)
        let text = String(decoding: shares[0].text.copyBytes(), as: UTF8.self)
        // 01 | 0102030405060708 | 02 | 01 | 47 | first 4 bytes of SHA-256(01 0102030405060708 02 01 47)
        #expect(text == "0101020304050607080201477fe3a996")
        let parsed = try SecretShare(text: text)
        #expect(parsed.x == 1 && parsed.threshold == 2 && parsed.splitID == Self.splitID)
        #expect(yBytes(parsed) == [0x47])
    }

    // MARK: Reconstruction

    @Test("Every K-subset reconstructs, for every K, N ≤ 7", arguments: 2...7)
    func everySubsetReconstructs(shareCount: Int) throws {
        for threshold in 2...shareCount {
            let original = randomSecret()
            let shares = try SecretSharing.split(original, shareCount: shareCount, threshold: threshold)
            for subset in subsets(of: shareCount, size: threshold) {
                let rebuilt = try SecretSharing.combine(subset.map { shares[$0] })
                #expect(original.constantTimeEquals(rebuilt.copyBytes()), "N=\(shareCount) K=\(threshold) \(subset)")
            }
            // Order does not matter, and extra shares beyond K are ignored.
            let rebuilt = try SecretSharing.combine(shares.reversed())
            #expect(original.constantTimeEquals(rebuilt.copyBytes()))
        }
    }

    @Test("Every (K-1)-subset is refused, and interpolating it anyway gives another value", arguments: 3...6)
    func tooFewNeverReconstruct(shareCount: Int) throws {
        for threshold in 2...shareCount {
            let original = randomSecret()
            let shares = try SecretSharing.split(original, shareCount: shareCount, threshold: threshold)
            for subset in subsets(of: shareCount, size: threshold - 1) {
                let chosen = subset.map { shares[$0] }
                #expect(throws: SecretSharingError.self) { try SecretSharing.combine(chosen) }
                // Interpolating K-1 points gives the wrong polynomial; a 32-byte match would be
                // a 2^-256 accident.
                if chosen.count >= 1 {
                    let wrong = SecretSharing.interpolateAtZero(chosen)
                    #expect(!original.constantTimeEquals(wrong.copyBytes()))
                }
            }
        }
    }

    @Test("255 shares, threshold 255; and threshold 2 of 255 from the last two")
    func largestSplits() throws {
        let original = randomSecret(length: SecretSharing.maximumSecretLength)
        let all = try SecretSharing.split(original, shareCount: 255, threshold: 255)
        #expect(original.constantTimeEquals(try SecretSharing.combine(all).copyBytes()))
        #expect(throws: SecretSharingError.self) { try SecretSharing.combine(Array(all.dropFirst())) }
        let pairs = try SecretSharing.split(original, shareCount: 255, threshold: 2)
        #expect(original.constantTimeEquals(try SecretSharing.combine(Array(pairs.suffix(2))).copyBytes()))
    }

    // MARK: K-1 shares say nothing

    @Test("K=2: for every secret byte, the one share is uniform: each value once over all a1")
    func oneShareIsUniform() throws {
        for x in [UInt8(1), 2, 255] {
            for s in 0...255 {
                var seen = Set<UInt8>()
                for a1 in 0...255 {
                    seen.insert(UInt8(s) ^ GaloisField256.multiply(UInt8(a1), x))
                }
                #expect(seen.count == 256, "x=\(x) s=\(s)")
            }
        }
    }

    @Test("K=3: two observed shares are consistent with every secret value, by exactly one polynomial")
    func twoSharesConsistentWithEverySecret() throws {
        // Shares 1 and 2 of a real split of a 1-byte secret.
        let shares = try SecretSharing.split(secret([0x9C]), shareCount: 5, threshold: 3)
        let y1 = yBytes(shares[0])[0]
        let y2 = yBytes(shares[1])[0]
        for s in 0...255 {
            var polynomials = 0
            for a1 in 0...255 {
                // f(1) = s + a1 + a2 = y1 fixes a2; count those where f(2) = y2 too.
                let a2 = y1 ^ UInt8(s) ^ UInt8(a1)
                let f2 = UInt8(s) ^ GaloisField256.multiply(UInt8(a1), 2) ^ GaloisField256.multiply(a2, 4)
                if f2 == y2 { polynomials += 1 }
            }
            #expect(polynomials == 1, "secret \(s)")
        }
    }

    // MARK: Refusals

    @Test("Duplicate shares are refused")
    func duplicates() throws {
        let shares = try SecretSharing.split(randomSecret(), shareCount: 5, threshold: 3)
        let error = #expect(throws: SecretSharingError.self) {
            try SecretSharing.combine([shares[0], shares[1], shares[0]])
        }
        #expect(error?.code == .duplicateShare)
    }

    @Test("Shares of another split are refused, even of the same secret")
    func foreign() throws {
        let original = randomSecret()
        let first = try SecretSharing.split(original, shareCount: 5, threshold: 3)
        let second = try SecretSharing.split(original, shareCount: 5, threshold: 3)
        #expect(first[0].splitID != second[0].splitID)
        let error = #expect(throws: SecretSharingError.self) {
            try SecretSharing.combine([first[0], first[1], second[2]])
        }
        #expect(error?.code == .foreignShare)
    }

    @Test(
        "Limits: share count 2...255, threshold 2...N, secret 1...128 bytes",
        arguments: [(1, 1, 32), (256, 3, 32), (5, 1, 32), (5, 6, 32), (0, 0, 32), (5, 3, 0), (5, 3, 129)]
    )
    func limits(shareCount: Int, threshold: Int, length: Int) {
        let error = #expect(throws: SecretSharingError.self) {
            try SecretSharing.split(randomSecret(length: length), shareCount: shareCount, threshold: threshold)
        }
        #expect(error?.code == .invalidParameters)
    }

    @Test("Defaults are 5 shares, threshold 3, within the limits")
    func defaults() {
        #expect(SecretSharing.defaultShareCount == 5 && SecretSharing.defaultThreshold == 3)
        #expect(SecretSharing.shareCountLimit.contains(SecretSharing.defaultShareCount))
        #expect(
            SecretSharing.thresholdLimit(shareCount: SecretSharing.defaultShareCount).contains(
                SecretSharing.defaultThreshold
            )
        )
    }

    // MARK: Text form

    @Test("Text round trip, with separators and upper case accepted")
    func textRoundTrip() throws {
        let shares = try SecretSharing.split(randomSecret(), shareCount: 3, threshold: 2)
        let text = String(decoding: shares[2].text.copyBytes(), as: UTF8.self)
        var grouped = ""
        for (index, character) in text.uppercased().enumerated() {
            if index > 0 && index % 8 == 0 { grouped += index % 32 == 0 ? "\n" : "-" }
            grouped.append(character)
        }
        let parsed = try SecretShare(text: grouped + "\n")
        #expect(parsed.x == 3 && yBytes(parsed) == yBytes(shares[2]))
    }

    @Test("A mistyped digit fails the checksum")
    func checksum() throws {
        let shares = try SecretSharing.split(randomSecret(), shareCount: 3, threshold: 2)
        var text = Array(String(decoding: shares[0].text.copyBytes(), as: UTF8.self))
        // Change one y digit.
        let position = 2 * SecretShare.headerLength + 3
        text[position] = text[position] == "0" ? "1" : "0"
        let error = #expect(throws: SecretSharingError.self) { try SecretShare(text: String(text)) }
        #expect(error?.code == .checksumMismatch)
    }

    @Test(
        "Malformed text is refused",
        arguments: [
            ("", SecretSharingError.Code.malformedShare),
            ("0", .malformedShare),
            ("zz", .malformedShare),
            ("0101020304050607080201477fe3a99", .malformedShare),
            ("0201020304050607080201477fe3a996", .unsupportedVersion),
            (String(repeating: "0", count: SecretShare.maximumTextLength + 2), .malformedShare),
        ]
    )
    func malformed(text: String, code: SecretSharingError.Code) {
        let error = #expect(throws: SecretSharingError.self) { try SecretShare(text: text) }
        #expect(error?.code == code)
    }

    @Test("description never shows share bytes")
    func redacted() throws {
        let shares = try SecretSharing.split(secret([0x42]), shareCount: 3, threshold: 2)
        #expect(shares[0].description == "SecretShare(number 1, threshold 2, redacted)")
    }
}
