/// The extendedKeyUsage extension (RFC 5280 §4.2.1.12) of a DER X.509 certificate:
///
/// ```
/// Extension ::= SEQUENCE { extnID OID, critical BOOLEAN DEFAULT FALSE, extnValue OCTET STRING }
/// ExtKeyUsageSyntax ::= SEQUENCE SIZE (1..MAX) OF KeyPurposeId   -- inside extnValue
/// KeyPurposeId ::= OBJECT IDENTIFIER
/// ```
enum ExtendedKeyUsage: Equatable, Sendable {
    /// The certificate has no extendedKeyUsage extension.
    case absent
    /// The key purposes the extension lists, as dotted OIDs, in the certificate's order.
    case purposes([String])

    /// id-kp-clientAuth, TLS client authentication.
    static let clientAuth = "1.3.6.1.5.5.7.3.2"
    /// id-kp-serverAuth, TLS server authentication.
    static let serverAuth = "1.3.6.1.5.5.7.3.1"
    /// anyExtendedKeyUsage.
    static let anyExtendedKeyUsage = "2.5.29.37.0"

    /// The extendedKeyUsage OID 2.5.29.37, DER-encoded.
    private static let extensionOID: [UInt8] = [0x55, 0x1D, 0x25]

    /// The longest OID read, in DER content bytes: far beyond any real key purpose, and a bound
    /// on the text made for logs.
    static let maximumOIDBytes = 64

    /// What the certificate says; nil when it is malformed: the certificate's structure, an
    /// extension, two extendedKeyUsage extensions (RFC 5280 §4.2 allows one), an empty list or
    /// an OID that is not minimal DER.
    init?(certificateDER der: [UInt8]) {
        guard let fields = CertificateFields(certificateDER: der) else { return nil }
        guard let extensions = fields.extensions else {
            self = .absent
            return
        }
        var value: ArraySlice<UInt8>?
        var reader = DERReader(extensions)
        while !reader.isAtEnd {
            guard let item = reader.read(tag: 0x30) else { return nil }
            var parts = DERReader(item)
            guard let oid = parts.read(tag: 0x06) else { return nil }
            if parts.peekTag == 0x01 {
                guard let critical = parts.read(tag: 0x01), critical.count == 1 else { return nil }
            }
            guard let extensionValue = parts.read(tag: 0x04), parts.isAtEnd else { return nil }
            guard oid.elementsEqual(Self.extensionOID) else { continue }
            guard value == nil else { return nil }
            value = extensionValue
        }
        guard let value else {
            self = .absent
            return
        }
        var outer = DERReader(value)
        guard let list = outer.read(tag: 0x30), outer.isAtEnd, !list.isEmpty else { return nil }
        var purposes: [String] = []
        var items = DERReader(list)
        while !items.isAtEnd {
            guard let oid = items.read(tag: 0x06), let dotted = Self.dotted(oid) else { return nil }
            purposes.append(dotted)
        }
        self = .purposes(purposes)
    }

    /// An OID's DER contents as dotted text; nil when empty, over `maximumOIDBytes`, not minimal
    /// (a sub-identifier starting with 0x80), unterminated, or with an arc that does not fit 64 bits.
    static func dotted(_ contents: ArraySlice<UInt8>) -> String? {
        guard !contents.isEmpty, contents.count <= maximumOIDBytes else { return nil }
        var arcs: [UInt64] = []
        var current: UInt64 = 0
        var started = false
        for byte in contents {
            if !started, byte == 0x80 { return nil }
            guard current >> 57 == 0 else { return nil }
            current = current << 7 | UInt64(byte & 0x7F)
            started = true
            if byte & 0x80 == 0 {
                arcs.append(current)
                current = 0
                started = false
            }
        }
        guard !started, let first = arcs.first else { return nil }
        let head: [UInt64] = first < 40 ? [0, first] : first < 80 ? [1, first - 40] : [2, first - 80]
        return (head + arcs.dropFirst()).map(String.init).joined(separator: ".")
    }
}
