import Foundation
import NIOSSL

/// A CA, a server certificate (localhost, 127.0.0.1) and client certificates, made once per test
/// process by the `openssl` CLI in a temporary directory.
struct TestCertificates: Sendable {
    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    /// The temporary directory holding every file.
    let directory: String

    var caPath: String { directory + "/ca.pem" }
    var serverCertificatePath: String { directory + "/server.pem" }
    var serverKeyPath: String { directory + "/server.key" }
    /// Signed by the CA; subject CN `billing-service`.
    var clientCertificatePath: String { directory + "/client.pem" }
    var clientKeyPath: String { directory + "/client.key" }
    /// Signed by another CA; subject CN `intruder`.
    var rogueClientCertificatePath: String { directory + "/rogue-client.pem" }
    var rogueClientKeyPath: String { directory + "/rogue-client.key" }
    /// Signed by the CA; two CNs in the subject.
    var twoNamesCertificatePath: String { directory + "/two-names.pem" }
    /// Signed by the CA; a UTF-8 CN.
    var utf8NameCertificatePath: String { directory + "/utf8-name.pem" }

    static let shared = Result<TestCertificates, Failure>(catching: { () throws(Failure) in try make() })

    static func load() throws -> TestCertificates { try shared.get() }

    private static func make() throws(Failure) -> TestCertificates {
        var template = Array("/tmp/hsmgw-transport-tls-XXXXXX".utf8CString)
        guard let created = mkdtemp(&template) else { throw Failure(description: "mkdtemp failed: errno \(errno)") }
        let directory = String(cString: created)
        let certificates = TestCertificates(directory: directory)
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        try openssl(
            ["req", "-x509"] + ec + [
                "-keyout", directory + "/ca.key", "-out", directory + "/ca.pem", "-days", "2", "-subj", "/CN=test-ca",
                "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            ]
        )
        try openssl(
            ["req", "-x509"] + ec + [
                "-keyout", directory + "/rogue-ca.key", "-out", directory + "/rogue-ca.pem", "-days", "2",
                "-subj", "/CN=rogue-ca", "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            ]
        )
        try write(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
                + "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
            to: directory + "/server.ext"
        )
        try write(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
            to: directory + "/client.ext"
        )
        let issue: [(name: String, subject: String, ca: String, ext: String)] = [
            ("server", "/CN=localhost", "ca", "server.ext"),
            ("client", "/CN=billing-service", "ca", "client.ext"),
            ("rogue-client", "/CN=intruder", "rogue-ca", "client.ext"),
            ("two-names", "/CN=first/CN=second", "ca", "client.ext"),
            ("utf8-name", "/CN=caf\u{E9}-service", "ca", "client.ext"),
        ]
        for (index, item) in issue.enumerated() {
            try openssl(
                ["req", "-utf8"] + ec + [
                    "-keyout", "\(directory)/\(item.name).key", "-out", "\(directory)/\(item.name).csr",
                    "-subj", item.subject,
                ]
            )
            try openssl([
                "x509", "-req", "-in", "\(directory)/\(item.name).csr", "-CA", "\(directory)/\(item.ca).pem",
                "-CAkey", "\(directory)/\(item.ca).key", "-set_serial", "\(1000 + index)", "-days", "2",
                "-extfile", "\(directory)/\(item.ext)", "-out", "\(directory)/\(item.name).pem",
            ])
        }
        return certificates
    }

    private static func write(_ text: String, to path: String) throws(Failure) {
        guard FileManager.default.createFile(atPath: path, contents: Data(text.utf8)) else {
            throw Failure(description: "cannot write \(path)")
        }
    }

    /// Runs `openssl` with posix_spawn (Foundation's Process hangs in the test runner).
    private static func openssl(_ arguments: [String]) throws(Failure) {
        let executable = ["/usr/bin/openssl", "/usr/local/bin/openssl", "/opt/homebrew/bin/openssl"]
            .first { FileManager.default.isExecutableFile(atPath: $0) }
        guard let executable else { throw Failure(description: "openssl is not installed") }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0)
        let argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { for pointer in argv { free(pointer) } }
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, executable, &actions, nil, argv, environ)
        guard spawned == 0 else { throw Failure(description: "cannot run openssl: errno \(spawned)") }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) == -1 {
            guard errno == EINTR else { throw Failure(description: "waitpid failed: errno \(errno)") }
        }
        guard status & 0x7F == 0, (status >> 8) & 0xFF == 0 else {
            throw Failure(
                description: "openssl \(arguments.prefix(2).joined(separator: " ")) failed (status \(status))")
        }
    }

    /// A client TLS context trusting the test CA, optionally presenting a certificate.
    func clientContext(certificate: String? = nil, key: String? = nil) throws -> NIOSSLContext {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(caPath))
        if let certificate, let key {
            configuration.certificateChain = try NIOSSLCertificate.fromPEMFile(certificate).map { .certificate($0) }
            configuration.privateKey = .privateKey(try NIOSSLPrivateKey(file: key, format: .pem))
        }
        return try NIOSSLContext(configuration: configuration)
    }
}
