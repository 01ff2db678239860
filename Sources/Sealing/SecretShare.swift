import Crypto
import SecretMemory

/// One share of a split secret.
///
/// Binary layout (the text form is the same bytes in lowercase hexadecimal):
///
/// | bytes | field |
/// |---|---|
/// | 1 | format version, 1 |
/// | 8 | split identifier: random, the same in every share of one split |
/// | 1 | threshold K |
/// | 1 | x coordinate, 1...255 |
/// | L | y: the polynomials' values at x, one byte per secret byte |
/// | 4 | checksum: the first 4 bytes of SHA-256 over everything before it |
///
/// The split identifier lets a share from another split (an older `operator init` or a
/// `rekey`) be refused before it spoils a reconstruction; it is random, so it says nothing about
/// the secret or the other shares. The checksum covers only this share and catches typing errors.
public struct SecretShare: Sendable, CustomStringConvertible {
    /// The format this build writes and reads.
    public static let formatVersion: UInt8 = 1
    /// Bytes of the split identifier: 64 random bits make two splits' identifiers collide with
    /// negligible probability.
    public static let splitIDLength = 8
    /// Bytes of the checksum: enough to catch a mistyped share, too few to matter as a hash.
    public static let checksumLength = 4
    /// Bytes before y: version, split identifier, threshold, x.
    static let headerLength = 1 + splitIDLength + 1 + 1
    /// The longest text form accepted, whitespace included, so a file or prompt cannot make the
    /// parser hold more than a share's worth (the longest share is 2 × 143 hex digits).
    public static let maximumTextLength = 1024

    /// The identifier shared by every share of one split.
    public let splitID: [UInt8]
    /// Shares needed to rebuild the secret.
    public let threshold: UInt8
    /// This share's x coordinate, its number (1...255).
    public let x: UInt8
    /// The polynomials' values at `x`: secret-equivalent, kept in zeroed memory.
    let y: SecretBytes

    init(splitID: [UInt8], threshold: UInt8, x: UInt8, y: SecretBytes) {
        self.splitID = splitID
        self.threshold = threshold
        self.x = x
        self.y = y
    }

    /// The secret's length in bytes.
    public var secretLength: Int { y.count }

    /// The binary form, in zeroed memory.
    public var encoded: SecretBytes {
        let length = Self.headerLength + y.count + Self.checksumLength
        return SecretBytes(count: length) { output in
            output[0] = Self.formatVersion
            for (index, byte) in splitID.enumerated() {
                output[1 + index] = byte
            }
            output[1 + Self.splitIDLength] = threshold
            output[2 + Self.splitIDLength] = x
            y.withUnsafeBytes { y in
                for index in 0..<y.count {
                    output[Self.headerLength + index] = y[index]
                }
            }
            let checksum = Self.checksum(UnsafeRawBufferPointer(rebasing: output[0..<(length - Self.checksumLength)]))
            for index in 0..<Self.checksumLength {
                output[length - Self.checksumLength + index] = checksum[index]
            }
        }
    }

    /// The text form (lowercase hexadecimal, no separators), in zeroed memory, for printing once
    /// or writing to a share file.
    public var text: SecretBytes {
        let binary = encoded
        let digits: [UInt8] = Array("0123456789abcdef".utf8)
        return binary.withUnsafeBytes { bytes in
            SecretBytes(count: bytes.count * 2) { output in
                for (index, byte) in bytes.enumerated() {
                    output[2 * index] = digits[Int(byte >> 4)]
                    output[2 * index + 1] = digits[Int(byte & 0x0F)]
                }
            }
        }
    }

    /// Parses the binary form.
    public init(encoded bytes: UnsafeRawBufferPointer) throws(SecretSharingError) {
        guard bytes.count >= 1 else {
            throw SecretSharingError(.malformedShare, "the share is empty")
        }
        guard bytes[0] == Self.formatVersion else {
            throw SecretSharingError(
                .unsupportedVersion, "share format \(bytes[0]) is not supported (this build reads format 1)"
            )
        }
        let yLength = bytes.count - Self.headerLength - Self.checksumLength
        guard (1...SecretSharing.maximumSecretLength).contains(yLength) else {
            throw SecretSharingError(.malformedShare, "the share has the wrong length")
        }
        let body = UnsafeRawBufferPointer(rebasing: bytes[0..<(bytes.count - Self.checksumLength)])
        let expected = Self.checksum(body)
        var difference: UInt8 = 0
        for index in 0..<Self.checksumLength {
            difference |= expected[index] ^ bytes[body.count + index]
        }
        guard difference == 0 else {
            throw SecretSharingError(.checksumMismatch, "the share's checksum does not match (mistyped or damaged)")
        }
        let threshold = bytes[1 + Self.splitIDLength]
        let x = bytes[2 + Self.splitIDLength]
        guard x != 0 else {
            throw SecretSharingError(.malformedShare, "the share's number is 0")
        }
        guard Int(threshold) >= SecretSharing.minimumThreshold else {
            throw SecretSharingError(
                .malformedShare, "the share's threshold is below \(SecretSharing.minimumThreshold)")
        }
        self.splitID = Array(bytes[1...Self.splitIDLength])
        self.threshold = threshold
        self.x = x
        self.y = SecretBytes(count: yLength) { output in
            output.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[Self.headerLength..<body.count]))
        }
    }

    /// Parses the text form: hexadecimal digits in either case; spaces, tabs, line breaks and
    /// dashes are ignored, so a share can be written in groups and a file can end in a newline.
    public init(text: UnsafeRawBufferPointer) throws(SecretSharingError) {
        guard text.count <= Self.maximumTextLength else {
            throw SecretSharingError(.malformedShare, "the share is longer than \(Self.maximumTextLength) characters")
        }
        guard !text.contains(where: { Self.nibble($0) == nil && !Self.isSeparator($0) }) else {
            throw SecretSharingError(.malformedShare, "the share holds a character that is not a hexadecimal digit")
        }
        let nibbles = text.reduce(0) { count, character in count + (Self.nibble(character) == nil ? 0 : 1) }
        guard nibbles % 2 == 0 else {
            throw SecretSharingError(.malformedShare, "the share has an odd number of hexadecimal digits")
        }
        let binary = SecretBytes(count: nibbles / 2) { output in
            var position = 0
            for character in text {
                guard let value = Self.nibble(character) else { continue }
                if position % 2 == 0 {
                    output[position / 2] = value << 4
                } else {
                    output[position / 2] |= value
                }
                position += 1
            }
        }
        self = try binary.withUnsafeBytes { (bytes) throws(SecretSharingError) in
            try SecretShare(encoded: bytes)
        }
    }

    /// Parses the text form from a string (tests and tools that already hold one).
    public init(text: String) throws(SecretSharingError) {
        var utf8 = Array(text.utf8)
        defer { _ = utf8.withUnsafeMutableBytes { $0.initializeMemory(as: UInt8.self, repeating: 0) } }
        // Array's withUnsafeBytes is untyped `rethrows`: carry the typed error out in a Result.
        let parsed = utf8.withUnsafeBytes { bytes in
            Result { () throws(SecretSharingError) in try SecretShare(text: bytes) }
        }
        self = try parsed.get()
    }

    public var description: String { "SecretShare(number \(x), threshold \(threshold), redacted)" }

    private static func checksum(_ bytes: UnsafeRawBufferPointer) -> [UInt8] {
        Array(SHA256.hash(data: bytes).prefix(checksumLength))
    }

    private static func nibble(_ character: UInt8) -> UInt8? {
        switch character {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): character - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): character - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): character - UInt8(ascii: "A") + 10
        default: nil
        }
    }

    private static func isSeparator(_ character: UInt8) -> Bool {
        character == UInt8(ascii: " ") || character == UInt8(ascii: "\t") || character == UInt8(ascii: "\n")
            || character == UInt8(ascii: "\r") || character == UInt8(ascii: "-")
    }
}
