/// Reads the subject common name out of a DER X.509 certificate. NIOSSL 2.37 verifies the
/// certificate but does not expose its subject, so this walks just enough DER:
///
/// ```
/// Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber,
///     signature, issuer Name, validity, subject Name, ... }, ... }
/// Name ::= SEQUENCE OF SET OF SEQUENCE { type OID, value ANY }
/// ```
///
/// Every length is checked against what remains; malformed input gives nil, never a trap.
enum CertificateSubject {
    /// The commonName OID 2.5.4.3, DER-encoded.
    private static let commonNameOID: [UInt8] = [0x55, 0x04, 0x03]

    /// The subject's common name, when it has exactly one in a string type (several would make
    /// the mapping to a principal ambiguous, so that case gives nil too).
    static func commonName(fromDER der: [UInt8]) -> String? {
        var reader = DERReader(der[...])
        guard let certificate = reader.read(tag: 0x30), reader.isAtEnd else { return nil }
        var certificateReader = DERReader(certificate)
        guard let tbs = certificateReader.read(tag: 0x30) else { return nil }
        var fields = DERReader(tbs)
        if fields.peekTag == 0xA0 { guard fields.read(tag: 0xA0) != nil else { return nil } }  // version
        guard fields.read(tag: 0x02) != nil,  // serialNumber
            fields.read(tag: 0x30) != nil,  // signature
            fields.read(tag: 0x30) != nil,  // issuer
            fields.read(tag: 0x30) != nil,  // validity
            let subject = fields.read(tag: 0x30)
        else { return nil }

        var names: [String] = []
        var rdns = DERReader(subject)
        while !rdns.isAtEnd {
            guard let rdn = rdns.read(tag: 0x31) else { return nil }
            var attributes = DERReader(rdn)
            while !attributes.isAtEnd {
                guard let attribute = attributes.read(tag: 0x30) else { return nil }
                var parts = DERReader(attribute)
                guard let oid = parts.read(tag: 0x06), let (tag, value) = parts.readAny() else { return nil }
                guard Array(oid) == commonNameOID else { continue }
                // UTF8String, PrintableString, IA5String; other string types are not accepted.
                guard [0x0C, 0x13, 0x16].contains(tag), let name = String(validating: value, as: UTF8.self) else {
                    return nil
                }
                names.append(name)
            }
        }
        return names.count == 1 ? names[0] : nil
    }
}

/// Reads DER tag-length-value items from a byte slice.
private struct DERReader {
    private var bytes: ArraySlice<UInt8>

    init(_ bytes: ArraySlice<UInt8>) { self.bytes = bytes }

    var isAtEnd: Bool { bytes.isEmpty }
    var peekTag: UInt8? { bytes.first }

    /// The contents of the next item if its tag is `tag`.
    mutating func read(tag: UInt8) -> ArraySlice<UInt8>? {
        guard peekTag == tag, let (_, contents) = readAny() else { return nil }
        return contents
    }

    /// The next item's tag and contents (single-byte tags, definite lengths up to 4 bytes).
    mutating func readAny() -> (UInt8, ArraySlice<UInt8>)? {
        var cursor = bytes
        guard let tag = cursor.popFirst(), tag & 0x1F != 0x1F, let first = cursor.popFirst() else { return nil }
        var length = 0
        if first < 0x80 {
            length = Int(first)
        } else {
            let count = Int(first & 0x7F)
            guard (1...4).contains(count), cursor.count >= count else { return nil }
            for _ in 0..<count { length = length << 8 | Int(cursor.popFirst()!) }
        }
        guard length <= cursor.count else { return nil }
        let contents = cursor.prefix(length)
        bytes = cursor.dropFirst(length)
        return (tag, contents)
    }
}
