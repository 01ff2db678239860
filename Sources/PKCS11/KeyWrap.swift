/// AES key wrap with padding (RFC 5649) and the check that a token's mechanism really is RFC 5649.
extension Session {
    /// RFC 5649 section 6, first example: a 192-bit KEK wrapping a 20-byte key.
    static let rfc5649KEK: [UInt8] = hex("5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8")
    static let rfc5649Key: [UInt8] = hex("c37b7e6492584340bed12207808941155068f738")
    static let rfc5649Wrapped: [UInt8] = hex("138bdeaa9b8fa7fc61f97742e72248ee5ae6ae5360d1ae6a5f54f373fa543b6a")

    /// The mechanism to use for AES key wrap with padding among `available`: `CKM_AES_KEY_WRAP_KWP`
    /// when listed, else `CKM_AES_KEY_WRAP_PAD` (whose meaning differs between modules; confirm
    /// with `checkRFC5649`). Nil when the token has neither with wrap and unwrap.
    public static func keyWrapWithPadding(among available: [MechanismInfo]) -> Mechanism? {
        let usable = available.filter { $0.flags.contains([.wrap, .unwrap]) }.map(\.mechanism)
        if usable.contains(.aesKeyWrapKWP) { return .aesKeyWrapKWP }
        if usable.contains(.aesKeyWrapPad) { return .aesKeyWrapPad }
        return nil
    }

    /// Runs the RFC 5649 known-answer test through `mechanism` with session objects (the test KEK
    /// and key are public test vectors): true when the token wraps to the RFC's bytes and unwraps
    /// them back. Leaves no objects behind.
    public func checkRFC5649(_ mechanism: Mechanism) throws -> Bool {
        let kek = try createObject([
            .objectClass(.secretKey), .keyType(.aes), .token(false), .wrap(true), .unwrap(true),
            .value(SecretBytes(copying: Session.rfc5649KEK)),
        ])
        defer { try? destroyObject(kek) }
        let key = try createObject([
            .objectClass(.secretKey), .keyType(.genericSecret), .token(false), .extractable(true),
            .sensitive(false), .value(SecretBytes(copying: Session.rfc5649Key)),
        ])
        defer { try? destroyObject(key) }
        let wrapped = try wrapKey(key, with: kek, mechanism: mechanism)
        guard wrapped == Session.rfc5649Wrapped else { return false }
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
        return try secretValue(of: unwrapped).constantTimeEquals(Session.rfc5649Key)
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
