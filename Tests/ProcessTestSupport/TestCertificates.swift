import Foundation

/// A throwaway PKI made with the `openssl` CLI: a CA, a server certificate for `localhost` and
/// 127.0.0.1, and client certificates with chosen subject common names (for mTLS).
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

    private init() throws {
        directory = try makeTemporaryDirectory("pki")
        try openssl([
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", directory + "/ca.key", "-out", caCertificate, "-days", "2", "-subj", "/CN=hsmgw test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        ])
        try issue(
            name: "server", commonName: "localhost",
            extensions:
                "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
    }

    /// A server certificate for the DNS name `localhost` only, with no IP address: a client
    /// connecting to 127.0.0.1 must name `localhost` to accept it (NIOSSL accepts a certificate
    /// whose IP address matches the connected address whatever server name was asked for).
    public func dnsOnlyServer() throws -> (certificate: String, key: String) {
        if !FileManager.default.fileExists(atPath: directory + "/server-dns.crt") {
            try issue(
                name: "server-dns", commonName: "localhost",
                extensions: "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
        }
        return (directory + "/server-dns.crt", directory + "/server-dns.key")
    }

    /// A client certificate and key signed by the CA, with subject CN `commonName`.
    public func client(commonName: String) throws -> (certificate: String, key: String) {
        let name = "client-" + commonName.map { $0.isLetter || $0.isNumber ? String($0) : "_" }.joined()
        if !FileManager.default.fileExists(atPath: "\(directory)/\(name).crt") {
            try issue(
                name: name, commonName: commonName,
                extensions: "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n")
        }
        return ("\(directory)/\(name).crt", "\(directory)/\(name).key")
    }

    /// A client certificate from a CA the server does not trust.
    public func untrustedClient(commonName: String) throws -> (certificate: String, key: String) {
        let other = directory + "/rogue"
        try? FileManager.default.createDirectory(atPath: other, withIntermediateDirectories: true)
        if !FileManager.default.fileExists(atPath: other + "/client.crt") {
            try openssl([
                "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", other + "/client.key", "-out", other + "/client.crt", "-days", "2",
                "-subj", "/CN=\(commonName)",
            ])
            chmod(other + "/client.key", 0o600)
        }
        return (other + "/client.crt", other + "/client.key")
    }

    private func issue(name: String, commonName: String, extensions: String) throws {
        let key = "\(directory)/\(name).key"
        let request = "\(directory)/\(name).csr"
        let extensionsFile = "\(directory)/\(name).ext"
        try extensions.write(toFile: extensionsFile, atomically: true, encoding: .utf8)
        try openssl([
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key,
            "-out", request, "-subj", "/CN=\(commonName)",
        ])
        try openssl([
            "x509", "-req", "-in", request, "-CA", caCertificate, "-CAkey", directory + "/ca.key",
            "-CAcreateserial", "-out", "\(directory)/\(name).crt", "-days", "2", "-extfile", extensionsFile,
        ])
        chmod(key, 0o600)
    }

    private func openssl(_ arguments: [String]) throws {
        let result = try ChildProcess.run("/usr/bin/openssl", arguments)
        guard result.status == 0 else {
            throw TestSetupError("openssl \(arguments.first ?? "") failed: \(result)")
        }
    }
}
