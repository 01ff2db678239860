/// How closely a token's key-wrap-with-padding mechanism follows RFC 5649.
public enum KeyWrapConformance: String, Sendable, Hashable {
    /// Every known answer matches: the mechanism is RFC 5649.
    case rfc5649
    /// Keys whose length is a multiple of 8 bytes (every AES key) wrap exactly as RFC 5649;
    /// other lengths do not. SoftHSM2 2.6 zero-pads the key before wrapping, so the message
    /// length indicator holds the padded length (24 instead of 20).
    case rfc5649ForWholeBlocks
    /// Even whole-block keys wrap differently: the mechanism is something else.
    case nonconforming
}

/// AES key wrap with padding (RFC 5649) and the check of what a token's mechanism really does.
extension Session {
    /// RFC 5649 section 6, first example: a 192-bit KEK wrapping a 20-byte key.
    static let rfc5649KEK: [UInt8] = hex("5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8")
    static let rfc5649Key: [UInt8] = hex("c37b7e6492584340bed12207808941155068f738")
    static let rfc5649Wrapped: [UInt8] = hex("138bdeaa9b8fa7fc61f97742e72248ee5ae6ae5360d1ae6a5f54f373fa543b6a")
    /// A 256-bit key under a 256-bit KEK (the RFC 3394 section 4.6 inputs), wrapped with RFC 5649
    /// by OpenSSL's `EVP_aes_256_wrap_pad` (through pyca/cryptography 41): the case the gateway
    /// uses, data keys of 32 bytes.
    static let wholeBlockKEK: [UInt8] = hex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
    static let wholeBlockKey: [UInt8] = hex("00112233445566778899aabbccddeeff000102030405060708090a0b0c0d0e0f")
    static let wholeBlockWrapped: [UInt8] = hex(
        "4a8029243027353b0694cf1bd8fc745bb0ce8a739b19b1960b12426d4c39cfeda926d103ab34e9f6"
    )

    /// The mechanism to use for AES key wrap with padding among `available`: `CKM_AES_KEY_WRAP_KWP`
    /// when listed, else `CKM_AES_KEY_WRAP_PAD` (whose meaning differs between modules; confirm
    /// with `checkKeyWrapWithPadding`). Nil when the token has neither with wrap and unwrap.
    public static func keyWrapWithPadding(among available: [MechanismInfo]) -> Mechanism? {
        let usable = available.filter { $0.flags.contains([.wrap, .unwrap]) }.map(\.mechanism)
        if usable.contains(.aesKeyWrapKWP) { return .aesKeyWrapKWP }
        if usable.contains(.aesKeyWrapPad) { return .aesKeyWrapPad }
        return nil
    }

    /// Runs known-answer tests through `mechanism` with session objects (the KEKs and keys are
    /// public test vectors) and says how far the mechanism follows RFC 5649. Each vector must
    /// also unwrap back to its key. Leaves no objects behind.
    public func checkKeyWrapWithPadding(_ mechanism: Mechanism) throws -> KeyWrapConformance {
        guard
            try knownAnswer(
                mechanism, kek: Session.wholeBlockKEK, key: Session.wholeBlockKey,
                wrapped: Session.wholeBlockWrapped)
        else { return .nonconforming }
        return try knownAnswer(
            mechanism, kek: Session.rfc5649KEK, key: Session.rfc5649Key,
            wrapped: Session.rfc5649Wrapped) ? .rfc5649 : .rfc5649ForWholeBlocks
    }

    private func knownAnswer(
        _ mechanism: Mechanism, kek kekBytes: [UInt8], key keyBytes: [UInt8], wrapped expected: [UInt8]
    )
        throws -> Bool
    {
        let kek = try createObject([
            .objectClass(.secretKey), .keyType(.aes), .token(false), .wrap(true), .unwrap(true),
            .value(SecretBytes(copying: kekBytes)),
        ])
        defer { try? destroyObject(kek) }
        let key = try createObject([
            .objectClass(.secretKey), .keyType(.genericSecret), .token(false), .extractable(true),
            .sensitive(false), .value(SecretBytes(copying: keyBytes)),
        ])
        defer { try? destroyObject(key) }
        let wrapped = try wrapKey(key, with: kek, mechanism: mechanism)
        guard wrapped == expected else { return false }
        let unwrapped = try unwrapKey(
            wrapped,
            with: kek,
            mechanism: mechanism,
            template: [
                .objectClass(.secretKey), .keyType(.genericSecret), .token(false), .extractable(true),
                .sensitive(false),
            ]
        )
        defer { try? destroyObject(unwrapped) }
        return try secretValue(of: unwrapped).constantTimeEquals(keyBytes)
    }
}

/// Bytes from a hex string of known-good test vectors.
func hex(_ text: String) -> [UInt8] {
    var bytes: [UInt8] = []
    var iterator = text.utf8.makeIterator()
    while let high = iterator.next(), let low = iterator.next() {
        func nibble(_ c: UInt8) -> UInt8 {
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): c - UInt8(ascii: "A") + 10
            default: preconditionFailure("not a hex digit")
            }
        }
        bytes.append(nibble(high) << 4 | nibble(low))
    }
    return bytes
}
