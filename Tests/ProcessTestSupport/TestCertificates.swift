import Foundation
import Synchronization

/// A throwaway PKI made with the `openssl` CLI, one per test process: a CA, a server
/// certificate for `localhost` and 127.0.0.1, and on demand a server certificate naming only
/// `localhost`, client certificates with chosen subjects (and `clientAuth`, or a chosen extended
/// key usage, or none), a client certificate from a CA the server does not trust, and a second CA
/// that signed nothing. All P-256, valid two days.
public struct TestCertificates: Sendable {
    /// Where the files are (mode 0700).
    public let directory: String
    /// The CA certificate (PEM), to trust.
    public var caCertificate: String { directory + "/ca.crt" }
    /// The server certificate (PEM), for `localhost` and 127.0.0.1.
    public var serverCertificate: String { directory + "/server.crt" }
    /// The server private key (PEM, mode 0600).
    public var serverKey: String { directory + "/server.key" }

    /// One set per test process.
    public static func shared() throws -> TestCertificates { try sharedResult.get() }
    private static let sharedResult: Result<TestCertificates, any Error> = Result { try TestCertificates() }
    /// Certificates made on demand are made once, whichever test asks first.
    private static let issuing = Mutex(())

    private init() throws {
        directory = try makeTemporaryDirectory("pki")
        try makeCA("ca", subject: "/CN=hsmgw test CA")
        try issue(
            name: "server", subject: "/CN=localhost",
            extensions:
                "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
    }

    /// A server certificate for the DNS name `localhost` only, with no IP address: a client
    /// connecting to 127.0.0.1 must name `localhost` to accept it (NIOSSL accepts a certificate
    /// whose IP address matches the connected address whatever server name was asked for).
    public func dnsOnlyServer() throws -> (certificate: String, key: String) {
        try onDemand("server-dns") { name in
            try issue(
                name: name, subject: "/CN=localhost",
                extensions: "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
        }
    }

    /// A client certificate and key signed by the CA, with subject CN `commonName` and the
    /// `clientAuth` extended key usage (which the gateway requires of client certificates).
    public func client(commonName: String) throws -> (certificate: String, key: String) {
        try client(subject: "/CN=\(commonName)", name: "client-" + Self.fileName(commonName))
    }

    /// A client certificate and key signed by the CA, with subject CN `commonName` and the
    /// extended key usage `extendedKeyUsage` as openssl writes it (`serverAuth`,
    /// `anyExtendedKeyUsage`, `clientAuth,serverAuth`, a dotted OID...), or no extendedKeyUsage
    /// extension at all when it is nil.
    public func client(commonName: String, extendedKeyUsage: String?) throws -> (certificate: String, key: String) {
        let usage = extendedKeyUsage.map { "eku-" + Self.fileName($0) } ?? "no-eku"
        return try onDemand("client-" + Self.fileName(commonName) + "-" + usage) { name in
            try issue(
                name: name, subject: "/CN=\(commonName)",
                extensions: (extendedKeyUsage.map { "extendedKeyUsage=\($0)\n" } ?? "") + "basicConstraints=CA:FALSE\n")
        }
    }

    /// A client certificate and key signed by the CA with `subject` as openssl writes it
    /// (`/CN=first/CN=second`; UTF-8 allowed) and the `clientAuth` extended key usage, in files
    /// called `name`.
    public func client(subject: String, name: String) throws -> (certificate: String, key: String) {
        try onDemand(name) { name in
            try issue(
                name: name, subject: subject, extensions: "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n")
        }
    }

    /// A self-signed client certificate with subject CN `commonName`: from a CA the server does
    /// not trust. It carries `clientAuth`, so the untrusted issuer is its only fault.
    public func untrustedClient(commonName: String) throws -> (certificate: String, key: String) {
        try onDemand("untrusted-" + Self.fileName(commonName)) { name in
            try openssl([
                "req", "-x509", "-utf8", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", "\(directory)/\(name).key", "-out", "\(directory)/\(name).crt", "-days", "2",
                "-subj", "/CN=\(commonName)", "-addext", "extendedKeyUsage=clientAuth",
            ])
        }
    }

    /// The certificate (PEM) of a second CA that signed nothing here: trusting only it must fail.
    public func otherCA() throws -> String {
        try onDemand("other-ca") { name in try makeCA(name, subject: "/CN=hsmgw other CA") }.certificate
    }

    /// `<name>.crt` and `<name>.key`, made by `make` unless they exist; keys mode 0600.
    private func onDemand(_ name: String, make: (String) throws -> Void) throws -> (certificate: String, key: String) {
        let files = (certificate: "\(directory)/\(name).crt", key: "\(directory)/\(name).key")
        try Self.issuing.withLock { _ in
            if !FileManager.default.fileExists(atPath: files.certificate) {
                try make(name)
                chmod(files.key, 0o600)
            }
        }
        return files
    }

    private func makeCA(_ name: String, subject: String) throws {
        try openssl([
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "\(directory)/\(name).key", "-out", "\(directory)/\(name).crt", "-days", "2", "-subj", subject,
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        ])
        chmod("\(directory)/\(name).key", 0o600)
    }

    private func issue(name: String, subject: String, extensions: String) throws {
        let key = "\(directory)/\(name).key"
        let request = "\(directory)/\(name).csr"
        let extensionsFile = "\(directory)/\(name).ext"
        try extensions.write(toFile: extensionsFile, atomically: true, encoding: .utf8)
        try openssl([
            "req", "-utf8", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key,
            "-out", request, "-subj", subject,
        ])
        try openssl([
            "x509", "-req", "-in", request, "-CA", caCertificate, "-CAkey", directory + "/ca.key",
            "-CAcreateserial", "-out", "\(directory)/\(name).crt", "-days", "2", "-extfile", extensionsFile,
        ])
        chmod(key, 0o600)
    }

    /// A file name for `text`: letters and digits kept, anything else `_`.
    private static func fileName(_ text: String) -> String {
        text.map { $0.isASCII && ($0.isLetter || $0.isNumber) ? String($0) : "_" }.joined()
    }

    private func openssl(_ arguments: [String]) throws {
        let result = try ChildProcess.run("/usr/bin/openssl", arguments)
        guard result.status == 0 else {
            throw TestSetupError("openssl \(arguments.first ?? "") failed: \(result)")
        }
    }
}
