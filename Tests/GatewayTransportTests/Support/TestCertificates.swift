import Foundation
import NIOSSL
import ProcessTestSupport

/// The process's test PKI (`ProcessTestSupport`) under the names these tests use: a CA, a
/// server certificate (localhost, 127.0.0.1) and client certificates.
struct TestCertificates: Sendable {
    var caPath: String
    var serverCertificatePath: String
    var serverKeyPath: String
    /// Signed by the CA; subject CN `billing-service`.
    var clientCertificatePath: String
    var clientKeyPath: String
    /// From a CA the server does not trust; subject CN `intruder`.
    var rogueClientCertificatePath: String
    var rogueClientKeyPath: String
    /// Signed by the CA; two CNs in the subject.
    var twoNamesCertificatePath: String
    /// Signed by the CA; a UTF-8 CN.
    var utf8NameCertificatePath: String

    static func load() throws -> TestCertificates {
        let pki = try ProcessTestSupport.TestCertificates.shared()
        let client = try pki.client(commonName: "billing-service")
        let rogue = try pki.untrustedClient(commonName: "intruder")
        return TestCertificates(
            caPath: pki.caCertificate,
            serverCertificatePath: pki.serverCertificate,
            serverKeyPath: pki.serverKey,
            clientCertificatePath: client.certificate,
            clientKeyPath: client.key,
            rogueClientCertificatePath: rogue.certificate,
            rogueClientKeyPath: rogue.key,
            twoNamesCertificatePath: try pki.client(subject: "/CN=first/CN=second", name: "two-names").certificate,
            utf8NameCertificatePath: try pki.client(subject: "/CN=caf\u{E9}-service", name: "utf8-name").certificate
        )
    }

    /// A client certificate and key signed by the CA, with subject CN `billing-service` and
    /// `extendedKeyUsage` as openssl writes it (nil: no extendedKeyUsage extension).
    func client(extendedKeyUsage: String?) throws -> (certificate: String, key: String) {
        try ProcessTestSupport.TestCertificates.shared().client(
            commonName: "billing-service", extendedKeyUsage: extendedKeyUsage)
    }

    /// A client TLS context trusting the test CA, optionally presenting a certificate.
    func clientContext(
        certificate: String? = nil,
        key: String? = nil,
        maximumTLSVersion: TLSVersion? = nil
    ) throws -> NIOSSLContext {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.maximumTLSVersion = maximumTLSVersion
        configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(caPath))
        if let certificate, let key {
            configuration.certificateChain = try NIOSSLCertificate.fromPEMFile(certificate).map { .certificate($0) }
            configuration.privateKey = .privateKey(try NIOSSLPrivateKey(file: key, format: .pem))
        }
        return try NIOSSLContext(configuration: configuration)
    }
}
