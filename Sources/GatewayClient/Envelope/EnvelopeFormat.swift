import Crypto

import struct Foundation.Data

/// The constants and limits of the envelope format, version 1 (`docs/envelope-format.md` is the
/// byte-exact description).
///
/// An envelope is a header naming the tenant, the gateway data key and its encryption context,
/// then the plaintext in frames of a fixed size, each sealed with AES-256-GCM under a key derived
/// for this message alone.
public enum EnvelopeFormat {
    /// "HGWE": the first four bytes of every envelope.
    public static let magic: [UInt8] = [0x48, 0x47, 0x57, 0x45]
    /// The format version this library writes and reads.
    public static let version: UInt8 = 1
    /// Suite 1: AES-256-GCM frames, HKDF-SHA256 key derivation, a key commitment in the header.
    public static let suiteAES256GCMHKDFSHA256Committed: UInt8 = 1

    /// Bytes of the random message id (the HKDF salt): 256 bits, so a data key can seal 2⁶⁴
    /// messages with a collision probability far below 2⁻¹²⁸.
    public static let messageIDByteCount = 32
    /// Bytes of the key commitment.
    public static let commitmentByteCount = 32
    /// Bytes of a data key (AES-256).
    public static let dataKeyByteCount = 32
    /// Bytes of a GCM tag.
    public static let tagByteCount = 16
    /// Bytes of the fixed part of the header, up to and including the tenant length.
    static let fixedHeaderByteCount = 43

    /// Plaintext bytes per frame unless the caller chooses: 64 KiB keeps the overhead (25 bytes a
    /// frame) under 0.04 % and the memory of a streaming encryptor or decryptor near 130 KiB.
    public static let defaultFrameSize = 64 * 1024
    /// The smallest frame size: keeps the per-frame overhead under 2.5 %.
    public static let minimumFrameSize = 1024
    /// The largest frame size: a reader buffers one frame, so this bounds the memory a hostile
    /// header can make a decryptor allocate.
    public static let maximumFrameSize = 4 << 20
    /// The most frames in one message: sequence numbers are 32 bits and start at 1. At the
    /// default frame size that is 256 TiB.
    public static let maximumFrameCount = UInt32.max

    /// The longest tenant id, as the gateway allows (`[a-z0-9][a-z0-9_-]*`).
    public static let maximumTenantByteCount = 63
    /// The longest data key id: the gateway's are 36-byte UUIDs; this leaves room for other
    /// providers while bounding the header.
    public static let maximumDataKeyIDByteCount = 64
    /// The most encryption-context pairs, as the gateway allows.
    public static let maximumContextPairs = 64
    /// The longest context key (at least 1 byte), as the gateway allows.
    public static let maximumContextKeyByteCount = 256
    /// The longest context value, as the gateway allows.
    public static let maximumContextValueByteCount = 4096
    /// The longest canonical context encoding, as the gateway allows (8 KiB).
    public static let maximumEncodedContextByteCount = 8 * 1024
    /// The longest header these limits allow.
    public static let maximumHeaderByteCount =
        fixedHeaderByteCount + maximumTenantByteCount + 1 + maximumDataKeyIDByteCount + 2
        + maximumEncodedContextByteCount + commitmentByteCount

    /// Frame type byte of a frame that is not the last.
    static let regularFrameType: UInt8 = 0
    /// Frame type byte of the last frame.
    static let finalFrameType: UInt8 = 1
    /// HKDF `info` of the frame key.
    static let encryptionKeyInfo = Array("HGWE v1 encryption key".utf8)
    /// HKDF `info` of the key commitment.
    static let commitmentInfo = Array("HGWE v1 key commitment".utf8)

    /// Checks a tenant id against the gateway's rule.
    public static func validateTenant(_ tenant: String) throws(EnvelopeError) {
        let bytes = Array(tenant.utf8)
        guard (1...maximumTenantByteCount).contains(bytes.count) else {
            throw EnvelopeError(.invalidArgument, "the tenant id must be 1 to \(maximumTenantByteCount) bytes")
        }
        func isLowerAlphanumeric(_ byte: UInt8) -> Bool {
            (0x61...0x7A).contains(byte) || (0x30...0x39).contains(byte)
        }
        guard isLowerAlphanumeric(bytes[0]),
            bytes.allSatisfy({ isLowerAlphanumeric($0) || $0 == 0x5F || $0 == 0x2D })
        else {
            throw EnvelopeError(.invalidArgument, "the tenant id must match [a-z0-9][a-z0-9_-]*")
        }
    }

    /// Checks a data key id: 1 to 64 printable ASCII bytes.
    static func validateDataKeyID(_ id: String) throws(EnvelopeError) {
        let bytes = id.utf8
        guard (1...maximumDataKeyIDByteCount).contains(bytes.count), bytes.allSatisfy({ (0x21...0x7E).contains($0) })
        else {
            throw EnvelopeError(
                .invalidArgument,
                "the data key id must be 1 to \(maximumDataKeyIDByteCount) printable ASCII bytes"
            )
        }
    }

    /// Checks a frame size against its range.
    public static func validateFrameSize(_ frameSize: Int) throws(EnvelopeError) {
        guard (minimumFrameSize...maximumFrameSize).contains(frameSize) else {
            throw EnvelopeError(
                .invalidArgument,
                "the frame size must be \(minimumFrameSize) to \(maximumFrameSize) bytes, is \(frameSize)"
            )
        }
    }

    /// The canonical encoding of an encryption context, identical to the gateway's: a 4-byte
    /// big-endian pair count, then for each pair in the order of the keys' UTF-8 bytes, the key
    /// and the value, each as a 4-byte big-endian length and its UTF-8 bytes. Checks the
    /// gateway's limits.
    public static func encodeContext(_ context: [String: String]) throws(EnvelopeError) -> [UInt8] {
        guard context.count <= maximumContextPairs else {
            throw EnvelopeError(
                .invalidArgument,
                "the encryption context has \(context.count) pairs; at most \(maximumContextPairs) are allowed"
            )
        }
        let pairs = context.map { (key: Array($0.key.utf8), value: Array($0.value.utf8)) }
            .sorted { $0.key.lexicographicallyPrecedes($1.key) }
        var bytes: [UInt8] = []
        bytes.appendBigEndian(UInt32(pairs.count))
        for pair in pairs {
            guard (1...maximumContextKeyByteCount).contains(pair.key.count) else {
                throw EnvelopeError(
                    .invalidArgument,
                    "encryption context keys must be 1 to \(maximumContextKeyByteCount) bytes"
                )
            }
            guard pair.value.count <= maximumContextValueByteCount else {
                throw EnvelopeError(
                    .invalidArgument,
                    "encryption context values must be at most \(maximumContextValueByteCount) bytes"
                )
            }
            bytes.appendBigEndian(UInt32(pair.key.count))
            bytes.append(contentsOf: pair.key)
            bytes.appendBigEndian(UInt32(pair.value.count))
            bytes.append(contentsOf: pair.value)
        }
        guard bytes.count <= maximumEncodedContextByteCount else {
            throw EnvelopeError(
                .invalidArgument,
                "the encryption context is over \(maximumEncodedContextByteCount) bytes when encoded"
            )
        }
        return bytes
    }

    /// Reads a canonical context encoding, refusing any other encoding of the same map (keys out
    /// of order or repeated, lengths that do not add up, invalid UTF-8).
    static func decodeContext(_ bytes: ArraySlice<UInt8>) throws(EnvelopeError) -> [String: String] {
        var reader = ByteReader(bytes)
        guard let count = reader.readUInt32(), count <= maximumContextPairs else {
            throw EnvelopeError(.malformed, "the header's context pair count is missing or over \(maximumContextPairs)")
        }
        var context: [String: String] = [:]
        var previousKey: ArraySlice<UInt8>?
        for _ in 0..<count {
            guard let keyLength = reader.readUInt32(), (1...UInt32(maximumContextKeyByteCount)).contains(keyLength),
                let key = reader.read(Int(keyLength)),
                let valueLength = reader.readUInt32(), valueLength <= UInt32(maximumContextValueByteCount),
                let value = reader.read(Int(valueLength))
            else {
                throw EnvelopeError(.malformed, "the header's encryption context is not a valid canonical encoding")
            }
            if let previousKey, !previousKey.lexicographicallyPrecedes(key) {
                throw EnvelopeError(.malformed, "the header's encryption context keys are not in canonical order")
            }
            guard let keyText = String(validating: key, as: UTF8.self),
                let valueText = String(validating: value, as: UTF8.self)
            else {
                throw EnvelopeError(.malformed, "the header's encryption context is not valid UTF-8")
            }
            context[keyText] = valueText
            previousKey = key
        }
        guard reader.isAtEnd else {
            throw EnvelopeError(.malformed, "the header's encryption context has bytes after its last pair")
        }
        return context
    }

    /// The per-message frame key and the key commitment: HKDF-SHA256 over the data key, salted
    /// with the message id, with two different `info` labels.
    static func deriveKeys(dataKey: SensitiveBytes, messageID: [UInt8]) throws(EnvelopeError) -> (
        encryptionKey: SymmetricKey, commitment: [UInt8]
    ) {
        guard dataKey.count == dataKeyByteCount else {
            throw EnvelopeError(.invalidArgument, "the data key must be \(dataKeyByteCount) bytes, is \(dataKey.count)")
        }
        let inputKey = dataKey.withUnsafeBytes { SymmetricKey(data: $0) }
        let encryptionKey = HKDF<SHA256>.deriveKey(
            inputKeyMaterial: inputKey,
            salt: messageID,
            info: encryptionKeyInfo,
            outputByteCount: dataKeyByteCount
        )
        let commitmentKey = HKDF<SHA256>.deriveKey(
            inputKeyMaterial: inputKey,
            salt: messageID,
            info: commitmentInfo,
            outputByteCount: commitmentByteCount
        )
        let commitment = commitmentKey.withUnsafeBytes { Array($0) }
        return (encryptionKey, commitment)
    }

    /// The 96-bit GCM nonce of frame `sequence`: eight zero bytes, then the sequence number.
    static func nonce(sequence: UInt32) -> AES.GCM.Nonce {
        var bytes = [UInt8](repeating: 0, count: 8)
        bytes.appendBigEndian(sequence)
        // 12 bytes is always a valid GCM nonce.
        return try! AES.GCM.Nonce(data: bytes)
    }

    /// A frame's additional authenticated data: the header's SHA-256, the sequence number and
    /// the frame type.
    static func additionalData(headerHash: [UInt8], sequence: UInt32, frameType: UInt8) -> [UInt8] {
        var bytes = headerHash
        bytes.reserveCapacity(headerHash.count + 5)
        bytes.appendBigEndian(sequence)
        bytes.append(frameType)
        return bytes
    }
}

/// The header of an envelope: everything needed to ask the gateway for the data key and to check
/// the frames. Nothing in it is secret.
public struct EnvelopeHeader: Sendable, Hashable {
    /// The format version (1).
    public var version: UInt8
    /// The algorithm suite (1).
    public var suite: UInt8
    /// The random id of this message; salts the key derivation.
    public var messageID: [UInt8]
    /// Plaintext bytes per frame (the last frame may hold fewer).
    public var frameSize: Int
    /// The gateway tenant that owns the data key.
    public var tenant: String
    /// The gateway data key id.
    public var dataKeyID: String
    /// The encryption context the data key was generated with.
    public var context: [String: String]
    /// The key commitment: binds the ciphertext to one data key.
    public var commitment: [UInt8]

    /// The header's bytes, exactly as in the envelope.
    public let encoded: [UInt8]
    /// SHA-256 of `encoded`: authenticated with every frame.
    let hash: [UInt8]

    init(
        messageID: [UInt8],
        frameSize: Int,
        tenant: String,
        dataKeyID: String,
        context: [String: String],
        commitment: [UInt8]
    ) throws(EnvelopeError) {
        try EnvelopeFormat.validateTenant(tenant)
        try EnvelopeFormat.validateDataKeyID(dataKeyID)
        try EnvelopeFormat.validateFrameSize(frameSize)
        precondition(messageID.count == EnvelopeFormat.messageIDByteCount, "message ids are 32 bytes")
        precondition(commitment.count == EnvelopeFormat.commitmentByteCount, "commitments are 32 bytes")
        let encodedContext = try EnvelopeFormat.encodeContext(context)
        var bytes = EnvelopeFormat.magic
        bytes.append(EnvelopeFormat.version)
        bytes.append(EnvelopeFormat.suiteAES256GCMHKDFSHA256Committed)
        bytes.append(contentsOf: messageID)
        bytes.appendBigEndian(UInt32(frameSize))
        bytes.append(UInt8(tenant.utf8.count))
        bytes.append(contentsOf: tenant.utf8)
        bytes.append(UInt8(dataKeyID.utf8.count))
        bytes.append(contentsOf: dataKeyID.utf8)
        bytes.appendBigEndian(UInt16(encodedContext.count))
        bytes.append(contentsOf: encodedContext)
        bytes.append(contentsOf: commitment)
        self.version = EnvelopeFormat.version
        self.suite = EnvelopeFormat.suiteAES256GCMHKDFSHA256Committed
        self.messageID = messageID
        self.frameSize = frameSize
        self.tenant = tenant
        self.dataKeyID = dataKeyID
        self.context = context
        self.commitment = commitment
        self.encoded = bytes
        self.hash = Array(SHA256.hash(data: bytes))
    }

    /// Reads the header at the start of `bytes` (an envelope, or at least its header), checking
    /// every field against its limit. Nothing is decrypted: use this to see which tenant and data
    /// key an envelope needs.
    public init(parsing bytes: some Collection<UInt8>) throws(EnvelopeError) {
        let array = Array(bytes)
        let needed = try Self.byteCountNeeded(array[...])
        guard array.count >= needed else {
            throw EnvelopeError(.truncated, "the envelope ends inside its header")
        }
        try self.init(complete: array[0..<needed])
    }

    /// How many bytes the header takes, as far as `prefix` tells: the answer grows as more of
    /// the header is known, and is final once `prefix` holds that many bytes. Each field is
    /// checked against its limit as soon as it is there.
    static func byteCountNeeded(_ prefix: ArraySlice<UInt8>) throws(EnvelopeError) -> Int {
        let base = prefix.startIndex
        let fixed = EnvelopeFormat.fixedHeaderByteCount
        if prefix.count >= 6 {
            guard Array(prefix[base..<base + 4]) == EnvelopeFormat.magic else {
                throw EnvelopeError(.malformed, "the data does not start with the envelope magic \"HGWE\"")
            }
            guard prefix[base + 4] == EnvelopeFormat.version else {
                throw EnvelopeError(.unsupported, "envelope format version \(prefix[base + 4]) is not supported")
            }
            guard prefix[base + 5] == EnvelopeFormat.suiteAES256GCMHKDFSHA256Committed else {
                throw EnvelopeError(.unsupported, "envelope algorithm suite \(prefix[base + 5]) is not supported")
            }
        }
        guard prefix.count >= fixed else { return fixed }
        let frameSize = Int(prefix.bigEndianUInt32(at: base + 38))
        guard (EnvelopeFormat.minimumFrameSize...EnvelopeFormat.maximumFrameSize).contains(frameSize) else {
            throw EnvelopeError(.malformed, "the header's frame size \(frameSize) is out of range")
        }
        let tenantLength = Int(prefix[base + 42])
        guard (1...EnvelopeFormat.maximumTenantByteCount).contains(tenantLength) else {
            throw EnvelopeError(.malformed, "the header's tenant length \(tenantLength) is out of range")
        }
        let keyIDLengthOffset = fixed + tenantLength
        guard prefix.count > keyIDLengthOffset else { return keyIDLengthOffset + 1 }
        let keyIDLength = Int(prefix[base + keyIDLengthOffset])
        guard (1...EnvelopeFormat.maximumDataKeyIDByteCount).contains(keyIDLength) else {
            throw EnvelopeError(.malformed, "the header's data key id length \(keyIDLength) is out of range")
        }
        let contextLengthOffset = keyIDLengthOffset + 1 + keyIDLength
        guard prefix.count >= contextLengthOffset + 2 else { return contextLengthOffset + 2 }
        let contextLength = Int(prefix.bigEndianUInt16(at: base + contextLengthOffset))
        guard (4...EnvelopeFormat.maximumEncodedContextByteCount).contains(contextLength) else {
            throw EnvelopeError(.malformed, "the header's context length \(contextLength) is out of range")
        }
        return contextLengthOffset + 2 + contextLength + EnvelopeFormat.commitmentByteCount
    }

    /// Parses a complete header (exactly `byteCountNeeded` bytes).
    init(complete bytes: ArraySlice<UInt8>) throws(EnvelopeError) {
        let bytes = Array(bytes)
        var reader = ByteReader(bytes[...])
        _ = reader.read(6)  // magic, version, suite: checked by byteCountNeeded
        let messageID = Array(reader.read(EnvelopeFormat.messageIDByteCount)!)
        let frameSize = Int(reader.readUInt32()!)
        let tenantLength = Int(reader.read(1)!.first!)
        let tenantBytes = reader.read(tenantLength)!
        let keyIDLength = Int(reader.read(1)!.first!)
        let keyIDBytes = reader.read(keyIDLength)!
        let contextLength = Int(reader.readUInt16()!)
        let contextBytes = reader.read(contextLength)!
        let commitment = Array(reader.read(EnvelopeFormat.commitmentByteCount)!)
        guard let tenant = String(validating: tenantBytes, as: UTF8.self),
            let dataKeyID = String(validating: keyIDBytes, as: UTF8.self)
        else {
            throw EnvelopeError(.malformed, "the header's tenant or data key id is not valid UTF-8")
        }
        do {
            try EnvelopeFormat.validateTenant(tenant)
            try EnvelopeFormat.validateDataKeyID(dataKeyID)
        } catch {
            throw EnvelopeError(.malformed, "the header's \(error.message)")
        }
        let context = try EnvelopeFormat.decodeContext(contextBytes)
        self.version = bytes[4]
        self.suite = bytes[5]
        self.messageID = messageID
        self.frameSize = frameSize
        self.tenant = tenant
        self.dataKeyID = dataKeyID
        self.context = context
        self.commitment = commitment
        self.encoded = bytes
        self.hash = Array(SHA256.hash(data: bytes))
    }
}

/// Seals the frames of one message.
struct EnvelopeFrameSealer {
    let header: EnvelopeHeader
    private let key: SymmetricKey
    private(set) var nextSequence: UInt32 = 1
    private(set) var isFinished = false

    init(header: EnvelopeHeader, key: SymmetricKey) {
        self.header = header
        self.key = key
    }

    /// A new message under `dataKey`: derives its keys and builds its header.
    init(
        dataKey: EnvelopeDataKey,
        tenant: String,
        context: [String: String],
        frameSize: Int,
        messageID: [UInt8]
    ) throws(EnvelopeError) {
        let keys = try EnvelopeFormat.deriveKeys(dataKey: dataKey.plaintext, messageID: messageID)
        let header = try EnvelopeHeader(
            messageID: messageID,
            frameSize: frameSize,
            tenant: tenant,
            dataKeyID: dataKey.id,
            context: context,
            commitment: keys.commitment
        )
        self.init(header: header, key: keys.encryptionKey)
    }

    /// The sealed frame holding `plaintext` (exactly the frame size, or at most it when final).
    mutating func seal(_ plaintext: ArraySlice<UInt8>, final: Bool) throws(EnvelopeError) -> [UInt8] {
        precondition(!isFinished, "no frame follows the final frame")
        precondition(final ? plaintext.count <= header.frameSize : plaintext.count == header.frameSize)
        let sequence = nextSequence
        guard sequence < EnvelopeFormat.maximumFrameCount || final else {
            throw EnvelopeError(.invalidArgument, "the message is over \(EnvelopeFormat.maximumFrameCount) frames")
        }
        let frameType = final ? EnvelopeFormat.finalFrameType : EnvelopeFormat.regularFrameType
        let sealed: AES.GCM.SealedBox
        do {
            sealed = try AES.GCM.seal(
                plaintext,
                using: key,
                nonce: EnvelopeFormat.nonce(sequence: sequence),
                authenticating: EnvelopeFormat.additionalData(
                    headerHash: header.hash,
                    sequence: sequence,
                    frameType: frameType
                )
            )
        } catch {
            throw EnvelopeError(.invalidArgument, "AES-GCM refused to seal a frame")
        }
        var frame: [UInt8] = []
        frame.reserveCapacity(9 + plaintext.count + EnvelopeFormat.tagByteCount)
        frame.appendBigEndian(sequence)
        frame.append(frameType)
        if final {
            frame.appendBigEndian(UInt32(plaintext.count))
            isFinished = true
        }
        frame.append(contentsOf: sealed.ciphertext)
        frame.append(contentsOf: sealed.tag)
        nextSequence = sequence &+ 1
        return frame
    }
}

/// Opens the frames of one message, in order.
struct EnvelopeFrameOpener {
    let header: EnvelopeHeader
    private let key: SymmetricKey
    private(set) var expectedSequence: UInt32 = 1

    /// Checks the key commitment and derives the frame key.
    init(header: EnvelopeHeader, dataKey: SensitiveBytes) throws(EnvelopeError) {
        let keys = try EnvelopeFormat.deriveKeys(dataKey: dataKey, messageID: header.messageID)
        guard constantTimeEqual(keys.commitment, header.commitment) else {
            throw EnvelopeError(
                .authenticationFailed,
                "the key commitment does not match: this is not the data key that sealed the envelope"
            )
        }
        self.header = header
        self.key = keys.encryptionKey
    }

    /// The plaintext of one complete frame (sequence, type, [length], ciphertext, tag).
    mutating func open(_ frame: ArraySlice<UInt8>) throws(EnvelopeError) -> (plaintext: [UInt8], final: Bool) {
        let base = frame.startIndex
        let sequence = frame.bigEndianUInt32(at: base)
        let frameType = frame[base + 4]
        let final = frameType == EnvelopeFormat.finalFrameType
        let bodyStart = base + (final ? 9 : 5)
        let tagStart = frame.endIndex - EnvelopeFormat.tagByteCount
        var plaintext: Data
        do {
            let box = try AES.GCM.SealedBox(
                nonce: EnvelopeFormat.nonce(sequence: sequence),
                ciphertext: frame[bodyStart..<tagStart],
                tag: frame[tagStart...]
            )
            plaintext = try AES.GCM.open(
                box,
                using: key,
                authenticating: EnvelopeFormat.additionalData(
                    headerHash: header.hash,
                    sequence: sequence,
                    frameType: frameType
                )
            )
        } catch {
            throw EnvelopeError(.authenticationFailed, "frame \(sequence) does not authenticate")
        }
        expectedSequence = sequence &+ 1
        // The array goes to the caller; the buffer AES-GCM wrote into is cleared here.
        defer { plaintext.withUnsafeMutableBytes { zeroize($0) } }
        return (Array(plaintext), final)
    }
}

/// Reads big-endian fields from a slice, returning nil past its end.
struct ByteReader {
    private var bytes: ArraySlice<UInt8>

    init(_ bytes: ArraySlice<UInt8>) { self.bytes = bytes }

    var isAtEnd: Bool { bytes.isEmpty }

    mutating func read(_ count: Int) -> ArraySlice<UInt8>? {
        guard count >= 0, bytes.count >= count else { return nil }
        let slice = bytes.prefix(count)
        bytes = bytes.dropFirst(count)
        return slice
    }

    mutating func readUInt16() -> UInt16? {
        guard let slice = read(2) else { return nil }
        return slice.bigEndianUInt16(at: slice.startIndex)
    }

    mutating func readUInt32() -> UInt32? {
        guard let slice = read(4) else { return nil }
        return slice.bigEndianUInt32(at: slice.startIndex)
    }
}

extension ArraySlice<UInt8> {
    func bigEndianUInt16(at index: Int) -> UInt16 {
        UInt16(self[index]) << 8 | UInt16(self[index + 1])
    }

    func bigEndianUInt32(at index: Int) -> UInt32 {
        UInt32(self[index]) << 24 | UInt32(self[index + 1]) << 16 | UInt32(self[index + 2]) << 8
            | UInt32(self[index + 3])
    }
}

extension [UInt8] {
    mutating func appendBigEndian(_ value: UInt16) {
        append(UInt8(truncatingIfNeeded: value >> 8))
        append(UInt8(truncatingIfNeeded: value))
    }

    mutating func appendBigEndian(_ value: UInt32) {
        append(UInt8(truncatingIfNeeded: value >> 24))
        append(UInt8(truncatingIfNeeded: value >> 16))
        append(UInt8(truncatingIfNeeded: value >> 8))
        append(UInt8(truncatingIfNeeded: value))
    }
}

/// Compares without an early exit.
func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    guard a.count == b.count else { return false }
    var difference: UInt8 = 0
    for index in a.indices {
        difference |= a[index] ^ b[index]
    }
    return difference == 0
}
