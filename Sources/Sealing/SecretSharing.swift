import SecretMemory

/// Shamir's secret sharing over GF(256), one byte at a time: the secret's byte i is the constant
/// term of a random polynomial of degree `threshold - 1`, and share x holds every polynomial's
/// value at x. Any `threshold` shares rebuild the secret by Lagrange interpolation at 0; fewer
/// are consistent with every possible secret, so they reveal nothing about it.
public enum SecretSharing {
    /// Shares in one split. At least two (one share would be the secret itself); at most 255,
    /// the non-zero x coordinates GF(256) has.
    public static let shareCountLimit: ClosedRange<Int> = 2...255
    /// Shares handed out when the operator does not say: five, as Vault does, so two can be
    /// lost or unavailable while three still unseal.
    public static let defaultShareCount = 5
    /// The smallest threshold: two, so no single share holder can unseal alone. The largest is
    /// the share count.
    public static let minimumThreshold = 2
    /// Shares needed to rebuild when the operator does not say.
    public static let defaultThreshold = 3
    /// The longest secret that can be split: PKCS#11 tokens cap their PINs well below this
    /// (SoftHSM2 at 255 characters, most hardware at 64 or fewer), and the PIN the gateway makes
    /// is 32 characters. A bound keeps share input short enough to read from a prompt.
    public static let maximumSecretLength = 128

    /// The thresholds allowed for `shareCount` shares.
    public static func thresholdLimit(shareCount: Int) -> ClosedRange<Int> {
        minimumThreshold...max(minimumThreshold, shareCount)
    }

    /// Splits `secret` into `shareCount` shares, any `threshold` of which rebuild it. Randomness
    /// (the split identifier and every coefficient) comes from the system CSPRNG.
    public static func split(_ secret: SecretBytes, shareCount: Int, threshold: Int) throws(SecretSharingError)
        -> [SecretShare]
    {
        var randomness = SystemRandomness()
        return try split(secret, shareCount: shareCount, threshold: threshold, randomness: &randomness)
    }

    /// `split`, with the randomness injected (tests use a scripted source for known answers).
    package static func split(
        _ secret: SecretBytes,
        shareCount: Int,
        threshold: Int,
        randomness: inout some ShareRandomness
    ) throws(SecretSharingError) -> [SecretShare] {
        guard shareCountLimit.contains(shareCount) else {
            throw SecretSharingError(
                .invalidParameters,
                "the share count must be in \(shareCountLimit.lowerBound)...\(shareCountLimit.upperBound)"
            )
        }
        guard thresholdLimit(shareCount: shareCount).contains(threshold) else {
            throw SecretSharingError(
                .invalidParameters,
                "the threshold must be in \(minimumThreshold)...\(shareCount) (the share count)"
            )
        }
        guard (1...maximumSecretLength).contains(secret.count) else {
            throw SecretSharingError(
                .invalidParameters, "the secret must be 1...\(maximumSecretLength) bytes"
            )
        }
        var splitID = [UInt8](repeating: 0, count: SecretShare.splitIDLength)
        splitID.withUnsafeMutableBytes { randomness.fill($0) }

        // One row of `threshold - 1` random coefficients per secret byte, in zeroed memory.
        let degree = threshold - 1
        let coefficients = SecretBytes(count: secret.count * degree) { randomness.fill($0) }
        return (1...shareCount).map { xCoordinate in
            let x = UInt8(xCoordinate)
            let y = SecretBytes(count: secret.count) { output in
                secret.withUnsafeBytes { secretBytes in
                    coefficients.withUnsafeBytes { coefficientBytes in
                        for index in 0..<secretBytes.count {
                            // Horner's rule from the highest coefficient down to the secret byte.
                            var value: UInt8 = 0
                            for power in stride(from: degree, through: 1, by: -1) {
                                let coefficient = coefficientBytes[index * degree + power - 1]
                                value = GaloisField256.multiply(value ^ coefficient, x)
                            }
                            output[index] = value ^ secretBytes[index]
                        }
                    }
                }
            }
            return SecretShare(splitID: splitID, threshold: UInt8(threshold), x: x, y: y)
        }
    }

    /// Rebuilds the secret from at least `threshold` shares of one split. Extra shares beyond the
    /// threshold are not used (the first `threshold` are).
    public static func combine(_ shares: [SecretShare]) throws(SecretSharingError) -> SecretBytes {
        guard let first = shares.first else {
            throw SecretSharingError(.tooFewShares, "no shares were given")
        }
        for share in shares.dropFirst() {
            guard share.splitID == first.splitID, share.threshold == first.threshold,
                share.y.count == first.y.count
            else {
                throw SecretSharingError(.foreignShare, "the shares come from different splits")
            }
        }
        var seen = Set<UInt8>()
        for share in shares where !seen.insert(share.x).inserted {
            throw SecretSharingError(.duplicateShare, "share \(share.x) was given twice")
        }
        let threshold = Int(first.threshold)
        guard shares.count >= threshold else {
            throw SecretSharingError(
                .tooFewShares, "\(threshold) shares are needed, \(shares.count) were given"
            )
        }
        return interpolateAtZero(Array(shares.prefix(threshold)))
    }

    /// Lagrange interpolation at x = 0 over distinct, non-zero x coordinates, with no threshold
    /// check (tests use it to show that too few shares give a wrong answer).
    package static func interpolateAtZero(_ shares: [SecretShare]) -> SecretBytes {
        let length = shares.first?.y.count ?? 0
        // The Lagrange basis at 0: l_i = prod_{j != i} x_j / (x_j - x_i); subtraction is xor.
        let basis: [UInt8] = shares.indices.map { i in
            var numerator: UInt8 = 1
            var denominator: UInt8 = 1
            for j in shares.indices where j != i {
                numerator = GaloisField256.multiply(numerator, shares[j].x)
                denominator = GaloisField256.multiply(denominator, shares[j].x ^ shares[i].x)
            }
            return GaloisField256.divide(numerator, denominator)
        }
        return SecretBytes(count: length) { output in
            for (share, weight) in zip(shares, basis) {
                share.y.withUnsafeBytes { y in
                    for index in 0..<length {
                        output[index] ^= GaloisField256.multiply(y[index], weight)
                    }
                }
            }
        }
    }
}

/// Where a split's random bytes come from.
package protocol ShareRandomness {
    /// Fills `buffer` with random bytes.
    mutating func fill(_ buffer: UnsafeMutableRawBufferPointer)
}

/// The system CSPRNG (`getrandom` on Linux, `arc4random` on Darwin, via the standard library).
package struct SystemRandomness: ShareRandomness {
    private var generator = SystemRandomNumberGenerator()

    package init() {}

    package mutating func fill(_ buffer: UnsafeMutableRawBufferPointer) {
        var offset = 0
        while offset < buffer.count {
            var word = generator.next()
            let take = min(8, buffer.count - offset)
            withUnsafeBytes(of: &word) { wordBytes in
                for index in 0..<take {
                    buffer[offset + index] = wordBytes[index]
                }
            }
            word = 0
            offset += take
        }
    }
}
