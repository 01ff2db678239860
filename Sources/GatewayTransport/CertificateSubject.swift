/// Reads the subject common name out of a DER X.509 certificate (``CertificateFields``):
///
/// ```
/// Name ::= SEQUENCE OF SET OF SEQUENCE { type OID, value ANY }
/// ```
///
/// Malformed input gives nil, never a trap.
enum CertificateSubject {
    /// The commonName OID 2.5.4.3, DER-encoded.
    private static let commonNameOID: [UInt8] = [0x55, 0x04, 0x03]

    /// The subject's common name, when it has exactly one in a string type (several would make
    /// the mapping to a principal ambiguous, so that case gives nil too).
    static func commonName(fromDER der: [UInt8]) -> String? {
        guard let subject = CertificateFields(certificateDER: der)?.subject else { return nil }
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
