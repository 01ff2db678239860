import Crypto
import Foundation
import SecretMemory

/// What the gateway keeps to check a reconstruction before it logs in with it: never the PIN and
/// never a share, only the split's public facts and a keyed hash of the PIN.
///
/// The check matters because a wrong PIN costs a login attempt, and tokens lock the user PIN
/// after a few (SoftHSM2 does not, most hardware does): a reconstruction from an altered share
/// is refused here instead. The verifier is HMAC-SHA256 keyed by the PIN over a random salt and
/// the split identifier. A PIN the gateway generated (32 random characters) cannot be guessed
/// from it; a PIN an operator chose (for a token that refuses `C_SetPIN`) can be attacked offline
/// by whoever reads this file, as far as that PIN is weak, so such a PIN must be long and random.
public struct SealCheck: Sendable, Hashable, Codable {
    /// The format this build writes and reads.
    public static let formatVersion = 1
    /// Bytes of random salt.
    public static let saltLength = 32
    /// The largest check file read: a few hundred bytes of JSON; the bound stops a wrong path
    /// (a log, a device) from being read whole.
    public static let maximumFileSize = 4096

    /// The check file's format.
    public let format: Int
    /// The split's identifier, in hexadecimal: a share from another split is refused by it.
    public let splitID: String
    /// Shares handed out.
    public let shareCount: Int
    /// Shares needed.
    public let threshold: Int
    /// The secret's length in bytes.
    public let secretLength: Int
    /// Random salt, hexadecimal.
    public let salt: String
    /// HMAC-SHA256(key: PIN, "hsmgw seal check v1" | salt | split identifier), hexadecimal.
    public let verifier: String

    enum CodingKeys: String, CodingKey {
        case format
        case splitID = "split_id"
        case shareCount = "share_count"
        case threshold
        case secretLength = "secret_length"
        case salt
        case verifier
    }

    /// Makes the check for `secret`, split into `shares`.
    public init(secret: SecretBytes, shares: [SecretShare]) {
        var salt = [UInt8](repeating: 0, count: Self.saltLength)
        var randomness = SystemRandomness()
        salt.withUnsafeMutableBytes { randomness.fill($0) }
        let splitID = shares.first?.splitID ?? []
        self.format = Self.formatVersion
        self.splitID = Self.hex(splitID)
        self.shareCount = shares.count
        self.threshold = Int(shares.first?.threshold ?? 0)
        self.secretLength = secret.count
        self.salt = Self.hex(salt)
        self.verifier = Self.hex(Self.verifier(secret: secret, salt: salt, splitID: splitID))
    }

    /// Whether `share` belongs to this split (same identifier, threshold and length, a number
    /// within the share count).
    public func admits(_ share: SecretShare) -> Bool {
        Self.hex(share.splitID) == splitID && Int(share.threshold) == threshold
            && share.secretLength == secretLength && Int(share.x) <= shareCount
    }

    /// Whether `secret` is the secret this check was made for (constant-time comparison).
    public func verifies(_ secret: SecretBytes) -> Bool {
        guard let salt = Self.bytes(hex: salt), let splitID = Self.bytes(hex: splitID),
            let expected = Self.bytes(hex: verifier), secret.count == secretLength
        else { return false }
        let actual = Self.verifier(secret: secret, salt: salt, splitID: splitID)
        guard actual.count == expected.count else { return false }
        return zip(actual, expected).reduce(UInt8(0)) { $0 | ($1.0 ^ $1.1) } == 0
    }

    /// The JSON form written to the check file.
    public func encoded() -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        // Encoding plain strings and integers cannot fail.
        return Array(try! encoder.encode(self)) + [UInt8(ascii: "\n")]
    }

    /// Parses the check file.
    public init(encoded bytes: [UInt8]) throws(SecretSharingError) {
        guard bytes.count <= Self.maximumFileSize,
            let decoded = try? JSONDecoder().decode(SealCheck.self, from: Data(bytes))
        else {
            throw SecretSharingError(.malformedShare, "the check file is not a seal check")
        }
        guard decoded.format == Self.formatVersion else {
            throw SecretSharingError(.unsupportedVersion, "check file format \(decoded.format) is not supported")
        }
        guard SecretSharing.shareCountLimit.contains(decoded.shareCount),
            SecretSharing.thresholdLimit(shareCount: decoded.shareCount).contains(decoded.threshold),
            (1...SecretSharing.maximumSecretLength).contains(decoded.secretLength),
            Self.bytes(hex: decoded.splitID)?.count == SecretShare.splitIDLength,
            Self.bytes(hex: decoded.salt)?.count == Self.saltLength,
            Self.bytes(hex: decoded.verifier)?.count == SHA256.byteCount
        else {
            throw SecretSharingError(.malformedShare, "the check file has a field out of range")
        }
        self = decoded
    }

    private static func verifier(secret: SecretBytes, salt: [UInt8], splitID: [UInt8]) -> [UInt8] {
        let key = secret.withUnsafeBytes { SymmetricKey(data: $0) }
        var mac = HMAC<SHA256>(key: key)
        mac.update(data: Array("hsmgw seal check v1".utf8))
        mac.update(data: salt)
        mac.update(data: splitID)
        return Array(mac.finalize())
    }

    static func hex(_ bytes: [UInt8]) -> String {
        bytes.map { byte in
            let digits = Array("0123456789abcdef")
            return String([digits[Int(byte >> 4)], digits[Int(byte & 0x0F)]])
        }.joined()
    }

    static func bytes(hex: String) -> [UInt8]? {
        let characters = Array(hex.utf8)
        guard characters.count % 2 == 0 else { return nil }
        var result: [UInt8] = []
        result.reserveCapacity(characters.count / 2)
        for index in stride(from: 0, to: characters.count, by: 2) {
            guard let high = nibble(characters[index]), let low = nibble(characters[index + 1]) else { return nil }
            result.append(high << 4 | low)
        }
        return result
    }

    private static func nibble(_ character: UInt8) -> UInt8? {
        switch character {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): character - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): character - UInt8(ascii: "a") + 10
        default: nil
        }
    }
}
