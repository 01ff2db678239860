/// Reads DER tag-length-value items from a byte slice: just enough ASN.1 for the two facts the
/// transport takes from a client certificate (``CertificateSubject``, ``ExtendedKeyUsage``).
/// NIOSSL 2.37 verifies the certificate but exposes neither, and the project keeps a second
/// X.509 stack (swift-certificates) out. Every length is checked against what remains; malformed
/// input gives nil, never a trap.
struct DERReader {
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

/// The parts of a DER X.509 certificate the transport reads:
///
/// ```
/// Certificate ::= SEQUENCE { tbsCertificate TBSCertificate, signatureAlgorithm, signature }
/// TBSCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber, signature, issuer Name,
///     validity, subject Name, subjectPublicKeyInfo, [1] issuerUniqueID OPTIONAL,
///     [2] subjectUniqueID OPTIONAL, [3] extensions OPTIONAL }
/// ```
struct CertificateFields {
    /// The contents of the subject `Name` SEQUENCE.
    var subject: ArraySlice<UInt8>
    /// The contents of the `Extensions` SEQUENCE (inside `[3]`); nil when the certificate has no
    /// extensions field.
    var extensions: ArraySlice<UInt8>?

    /// Nil when `der` is not one certificate of that shape (trailing bytes included).
    init?(certificateDER der: [UInt8]) {
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
            let subject = fields.read(tag: 0x30),
            fields.read(tag: 0x30) != nil  // subjectPublicKeyInfo
        else { return nil }
        if fields.peekTag == 0x81 { guard fields.read(tag: 0x81) != nil else { return nil } }  // issuerUniqueID
        if fields.peekTag == 0x82 { guard fields.read(tag: 0x82) != nil else { return nil } }  // subjectUniqueID
        var extensions: ArraySlice<UInt8>?
        if fields.peekTag == 0xA3 {
            guard let explicit = fields.read(tag: 0xA3) else { return nil }
            var inner = DERReader(explicit)
            // Extensions ::= SEQUENCE SIZE (1..MAX) OF Extension
            guard let sequence = inner.read(tag: 0x30), inner.isAtEnd, !sequence.isEmpty else { return nil }
            extensions = sequence
        }
        guard fields.isAtEnd else { return nil }
        self.subject = subject
        self.extensions = extensions
    }
}
