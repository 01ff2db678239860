import NIOSSL
import Testing

@testable import GatewayTransport

/// DER helpers: just enough to build certificate skeletons with chosen extensions.
private enum DER {
    static func tlv(_ tag: UInt8, _ contents: [UInt8]) -> [UInt8] {
        switch contents.count {
        case ..<0x80: return [tag, UInt8(contents.count)] + contents
        case ..<0x100: return [tag, 0x81, UInt8(contents.count)] + contents
        default: return [tag, 0x82, UInt8(contents.count >> 8), UInt8(contents.count & 0xFF)] + contents
        }
    }

    static let clientAuth: [UInt8] = [0x2B, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02]
    static let serverAuth: [UInt8] = [0x2B, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01]
    static let anyExtendedKeyUsage: [UInt8] = [0x55, 0x1D, 0x25, 0x00]

    /// An extension: `extnID`, `critical` when given (raw BOOLEAN contents), `extnValue`.
    static func extensionItem(_ oid: [UInt8], critical: [UInt8]? = nil, value: [UInt8]) -> [UInt8] {
        tlv(0x30, tlv(0x06, oid) + (critical.map { tlv(0x01, $0) } ?? []) + tlv(0x04, value))
    }

    /// An extendedKeyUsage extension listing `purposes` (OID contents).
    static func extendedKeyUsage(_ purposes: [[UInt8]], critical: Bool = false) -> [UInt8] {
        extensionItem(
            [0x55, 0x1D, 0x25], critical: critical ? [0xFF] : nil,
            value: tlv(0x30, purposes.flatMap { tlv(0x06, $0) }))
    }

    /// basicConstraints with CA false (an empty SEQUENCE).
    static let basicConstraints = extensionItem([0x55, 0x1D, 0x13], value: tlv(0x30, []))

    /// A certificate skeleton with the fields the reader walks (subject CN `billing-service`),
    /// `extensions` inside `[3]` (nil: no extensions field), and `afterExtensions` appended to
    /// the TBSCertificate.
    static func certificate(extensions: [[UInt8]]?, afterExtensions: [UInt8] = []) -> [UInt8] {
        let commonName = tlv(0x31, tlv(0x30, tlv(0x06, [0x55, 0x04, 0x03]) + tlv(0x0C, Array("billing-service".utf8))))
        var tbs = tlv(0xA0, tlv(0x02, [0x02])) + tlv(0x02, [0x01]) + tlv(0x30, []) + tlv(0x30, [])
        tbs += tlv(0x30, []) + tlv(0x30, commonName) + tlv(0x30, [])
        if let extensions { tbs += tlv(0xA3, tlv(0x30, extensions.flatMap { $0 })) }
        tbs += afterExtensions
        return tlv(0x30, tlv(0x30, tbs) + tlv(0x30, []) + tlv(0x03, [0x00]))
    }
}

@Suite("extendedKeyUsage from DER, and the clientAuth rule")
struct ExtendedKeyUsageTests {
    private static func der(_ path: String) throws -> [UInt8] {
        try #require(try NIOSSLCertificate.fromPEMFile(path).first).toDERBytes()
    }

    @Test("certificates made by openssl: the purposes in order, or absent")
    func fromOpenSSL() throws {
        let certificates = try TestCertificates.load()
        #expect(
            ExtendedKeyUsage(certificateDER: try Self.der(certificates.clientCertificatePath))
                == .purposes([ExtendedKeyUsage.clientAuth]))
        #expect(
            ExtendedKeyUsage(certificateDER: try Self.der(certificates.serverCertificatePath))
                == .purposes([ExtendedKeyUsage.serverAuth]))
        #expect(
            ExtendedKeyUsage(certificateDER: try Self.der(certificates.client(extendedKeyUsage: nil).certificate))
                == .absent)
        #expect(
            ExtendedKeyUsage(
                certificateDER: try Self.der(certificates.client(extendedKeyUsage: "serverAuth,clientAuth").certificate)
            )
                == .purposes([ExtendedKeyUsage.serverAuth, ExtendedKeyUsage.clientAuth]))
        #expect(
            ExtendedKeyUsage(
                certificateDER: try Self.der(certificates.client(extendedKeyUsage: "anyExtendedKeyUsage").certificate))
                == .purposes([ExtendedKeyUsage.anyExtendedKeyUsage]))
    }

    @Test("skeletons: no extensions field, other extensions only, a critical extendedKeyUsage")
    func wellFormed() {
        #expect(ExtendedKeyUsage(certificateDER: DER.certificate(extensions: nil)) == .absent)
        #expect(ExtendedKeyUsage(certificateDER: DER.certificate(extensions: [DER.basicConstraints])) == .absent)
        #expect(
            ExtendedKeyUsage(
                certificateDER: DER.certificate(extensions: [
                    DER.basicConstraints, DER.extendedKeyUsage([DER.clientAuth], critical: true),
                ])) == .purposes([ExtendedKeyUsage.clientAuth]))
        // issuerUniqueID and subjectUniqueID before the extensions are skipped.
        let uniqueIDs = DER.tlv(0x81, [0x00, 0x01]) + DER.tlv(0x82, [0x00, 0x02])
        var withIDs = DER.certificate(extensions: nil, afterExtensions: uniqueIDs)
        #expect(ExtendedKeyUsage(certificateDER: withIDs) == .absent)
        withIDs = DER.certificate(
            extensions: nil,
            afterExtensions: uniqueIDs + DER.tlv(0xA3, DER.tlv(0x30, DER.extendedKeyUsage([DER.clientAuth]))))
        #expect(ExtendedKeyUsage(certificateDER: withIDs) == .purposes([ExtendedKeyUsage.clientAuth]))
    }

    @Test("the rule: clientAuth listed is accepted; absent, serverAuth or anyExtendedKeyUsage alone refused")
    func rule() {
        func check(_ extensions: [[UInt8]]?) -> ClientCertificateRefusal? {
            ClientCertificateRefusal.check(certificateDER: DER.certificate(extensions: extensions))
        }
        #expect(check([DER.extendedKeyUsage([DER.clientAuth])]) == nil)
        #expect(check([DER.extendedKeyUsage([DER.serverAuth, DER.clientAuth])]) == nil)
        #expect(check([DER.extendedKeyUsage([DER.anyExtendedKeyUsage, DER.clientAuth])]) == nil)
        #expect(
            check(nil)
                == ClientCertificateRefusal(cause: .noExtendedKeyUsage, commonName: "billing-service"))
        #expect(check([DER.basicConstraints])?.cause == .noExtendedKeyUsage)
        #expect(
            check([DER.extendedKeyUsage([DER.serverAuth])])
                == ClientCertificateRefusal(
                    cause: .clientAuthMissing, purposes: [ExtendedKeyUsage.serverAuth], commonName: "billing-service"))
        #expect(check([DER.extendedKeyUsage([DER.anyExtendedKeyUsage])])?.cause == .clientAuthMissing)
        #expect(ClientCertificateRefusal.check(certificateDER: [0x30, 0x00])?.cause == .unreadable)
        #expect(ClientCertificateRefusal.check(certificateDER: [])?.cause == .unreadable)
    }

    @Test(
        "malformed extensions give nil (and a refusal), never a trap",
        arguments: [
            ("an empty Extensions SEQUENCE", DER.certificate(extensions: [])),
            ("an empty key purpose list", DER.certificate(extensions: [DER.extendedKeyUsage([])])),
            (
                "two extendedKeyUsage extensions",
                DER.certificate(extensions: [
                    DER.extendedKeyUsage([DER.clientAuth]), DER.extendedKeyUsage([DER.clientAuth]),
                ])
            ),
            ("a non-minimal OID", DER.certificate(extensions: [DER.extendedKeyUsage([[0x2B, 0x80, 0x06]])])),
            ("an unterminated OID", DER.certificate(extensions: [DER.extendedKeyUsage([[0x2B, 0x86]])])),
            ("an empty OID", DER.certificate(extensions: [DER.extendedKeyUsage([[]])])),
            (
                "an OID over the length bound",
                DER.certificate(extensions: [DER.extendedKeyUsage([[0x2B] + Array(repeating: 0x01, count: 64)])])
            ),
            (
                "an arc over 64 bits",
                DER.certificate(extensions: [
                    DER.extendedKeyUsage([[0x2B] + Array(repeating: 0xFF, count: 10) + [0x7F]])
                ])
            ),
            (
                "a key purpose that is not an OID",
                DER.certificate(extensions: [
                    DER.extensionItem(
                        [0x55, 0x1D, 0x25], value: DER.tlv(0x30, DER.tlv(0x0C, Array("clientAuth".utf8))))
                ])
            ),
            (
                "a key purpose list that is a SET",
                DER.certificate(extensions: [
                    DER.extensionItem([0x55, 0x1D, 0x25], value: DER.tlv(0x31, DER.tlv(0x06, DER.clientAuth)))
                ])
            ),
            (
                "bytes after the key purpose list",
                DER.certificate(extensions: [
                    DER.extensionItem([0x55, 0x1D, 0x25], value: DER.tlv(0x30, DER.tlv(0x06, DER.clientAuth)) + [0x00])
                ])
            ),
            (
                "a critical flag of two bytes",
                DER.certificate(extensions: [
                    DER.extensionItem(
                        [0x55, 0x1D, 0x25], critical: [0xFF, 0xFF], value: DER.tlv(0x30, DER.tlv(0x06, DER.clientAuth)))
                ])
            ),
            (
                "extnValue as a BIT STRING",
                DER.certificate(extensions: [
                    DER.tlv(
                        0x30,
                        DER.tlv(0x06, [0x55, 0x1D, 0x25]) + DER.tlv(0x03, DER.tlv(0x30, DER.tlv(0x06, DER.clientAuth))))
                ])
            ),
            (
                "an extension without extnValue",
                DER.certificate(extensions: [DER.tlv(0x30, DER.tlv(0x06, [0x55, 0x1D, 0x25]))])
            ),
            (
                "an extension that is not a SEQUENCE",
                DER.certificate(extensions: [DER.tlv(0x31, DER.tlv(0x06, [0x55, 0x1D, 0x25]))])
            ),
            (
                "an unknown field after the extensions",
                DER.certificate(
                    extensions: [DER.extendedKeyUsage([DER.clientAuth])], afterExtensions: DER.tlv(0xA4, []))
            ),
            (
                "a length past the end",
                DER.certificate(extensions: [
                    DER.extensionItem([0x55, 0x1D, 0x25], value: [0x30, 0x84, 0xFF, 0xFF, 0xFF, 0xFF])
                ])
            ),
        ] as [(String, [UInt8])]
    )
    func malformed(_ what: String, der: [UInt8]) {
        #expect(ExtendedKeyUsage(certificateDER: der) == nil, "\(what)")
        #expect(ClientCertificateRefusal.check(certificateDER: der)?.cause == .unreadable, "\(what)")
    }

    @Test("a real certificate: every truncation, and trailing bytes, give nil")
    func truncated() throws {
        let der = try Self.der(try TestCertificates.load().clientCertificatePath)
        for length in 0..<der.count {
            #expect(ExtendedKeyUsage(certificateDER: Array(der.prefix(length))) == nil, "\(length) bytes")
        }
        #expect(ExtendedKeyUsage(certificateDER: der + [0x00]) == nil)
    }

    @Test("a real certificate with any one byte changed never traps; a change inside clientAuth is refused")
    func mutated() throws {
        let der = try Self.der(try TestCertificates.load().clientCertificatePath)
        let oid = DER.tlv(0x06, DER.clientAuth)
        let start = try #require((0...(der.count - oid.count)).first { Array(der[$0..<($0 + oid.count)]) == oid })
        for index in der.indices {
            for value: UInt8 in [0x00, 0x80, 0xFF, der[index] ^ 0x01] where value != der[index] {
                var changed = der
                changed[index] = value
                let refusal = ClientCertificateRefusal.check(certificateDER: changed)
                if (start + 2)..<(start + oid.count) ~= index {
                    #expect(refusal != nil, "byte \(index) set to \(value)")
                }
            }
        }
    }

    @Test("OIDs as dotted text, including a first arc over 80 and multi-byte arcs")
    func dotted() {
        #expect(ExtendedKeyUsage.dotted(DER.clientAuth[...]) == "1.3.6.1.5.5.7.3.2")
        #expect(ExtendedKeyUsage.dotted(DER.anyExtendedKeyUsage[...]) == "2.5.29.37.0")
        #expect(ExtendedKeyUsage.dotted([0x88, 0x37, 0x03][...]) == "2.999.3")
        #expect(ExtendedKeyUsage.dotted([0x00][...]) == "0.0")
        #expect(ExtendedKeyUsage.dotted([0x2B, 0x81, 0x00][...]) == "1.3.128")
        #expect(ExtendedKeyUsage.dotted([][...]) == nil)
        #expect(ExtendedKeyUsage.dotted([0x80, 0x01][...]) == nil)
    }
}
