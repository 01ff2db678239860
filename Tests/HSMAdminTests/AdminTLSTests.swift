import DevGatewayTestSupport
import Foundation
import ProcessTestSupport
import SoftHSMTestSupport
import Synchronization
import Testing

/// One production-mode `hsm-gateway` per test process serving TLS on a free loopback port, with
/// optional client certificates from the test CA: a fresh SoftHSM2 token, a SQLite store and a
/// bootstrap admin token in a temporary directory. Started on first use, stopped at exit.
///
/// Its certificate names `localhost` and no IP address, so clients must verify the name.
final class TLSGatewayProcess: Sendable {
    static func shared() throws -> TLSGatewayProcess { try sharedResult.get() }
    private static let sharedResult: Result<TLSGatewayProcess, any Error> = Result { try TLSGatewayProcess() }

    let root: String
    let port: Int
    let pki: TestCertificates
    let adminExecutable: String
    var adminTokenFile: String { root + "/admin.token" }
    var home: String { root + "/home" }
    /// The address by the name in its certificate.
    var server: String { "localhost:\(port)" }
    /// The address by IP, which its certificate does not name.
    var serverByAddress: String { "127.0.0.1:\(port)" }

    private init() throws {
        let fixture = try SoftHSMFixture.shared()
        let token = try fixture.makeToken("admin-tls")
        pki = try TestCertificates.shared()
        let serverCertificate = try pki.dnsOnlyServer()
        root = try makeTemporaryDirectory("admin-tls")
        try FileManager.default.createDirectory(
            atPath: root + "/home", withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        adminExecutable = try DevGatewayProcess.builtExecutable("hsm-admin")
        let gateway = try DevGatewayProcess.builtExecutable("hsm-gateway")
        // The fixture's SOFTHSM2_CONF comes with the inherited environment, so the gateway sees
        // the token this process made.
        let process = try SpawnedProcess(
            gateway,
            [
                "--hsm-module", SoftHSMFixture.modulePath, "--token-label", token.label, "--pin-file", token.pinFile,
                "--store", "sqlite", "--sqlite-path", root + "/gateway.sqlite",
                "--bootstrap-token-file", root + "/admin.token", "--listen", "127.0.0.1:0",
                "--metrics-listen", "off", "--tls-certificate", serverCertificate.certificate,
                "--tls-private-key", serverCertificate.key, "--tls-client-ca", pki.caCertificate,
                "--client-certificates", "optional",
            ],
            outputPath: root + "/gateway.log"
        )
        Self.running.withLock { $0 = process }
        atexit {
            TLSGatewayProcess.running.withLock { $0 }?.stop()
        }
        // The "serving" log line names the bound address; the admin token is written before it.
        // (Synchronous: this runs in a static initialiser, not in a task.)
        let deadline = ContinuousClock.now + DevGatewayProcess.startTimeout
        var found: Int?
        while found == nil, ContinuousClock.now < deadline, process.poll() == nil {
            found = process.outputMatch(#"listen=127\.0\.0\.1:(\d+)"#).flatMap { Int($0) }
            if found == nil || !FileManager.default.fileExists(atPath: root + "/admin.token") {
                found = nil
                usleep(100_000)
            }
        }
        guard let found else {
            process.stop()
            throw TestSetupError("hsm-gateway with TLS did not start:\n\(process.output())")
        }
        port = found
    }

    private static let running = Mutex<SpawnedProcess?>(nil)
}

/// The built `hsm-admin` against a TLS gateway: CA files, server names, client certificates
/// (alone and from the environment), and the exit codes of each kind of TLS failure.
@Suite("hsm-admin over TLS and mutual TLS", .serialized)
struct AdminTLSTests {
    let gateway: TLSGatewayProcess

    init() throws {
        gateway = try TLSGatewayProcess.shared()
    }

    /// `hsm-admin` with only `environment` (plus PATH and HOME): nothing from this process leaks in.
    func admin(_ arguments: [String], environment extra: [String: String] = [:]) throws -> ChildProcess.Result {
        var environment = ["PATH": "/usr/bin:/bin", "HOME": gateway.home]
        environment.merge(extra) { $1 }
        return try ChildProcess.run(
            gateway.adminExecutable, arguments, environment: environment, inheritEnvironment: false)
    }

    /// The principal a successful `status --json` names.
    func principal(_ result: ChildProcess.Result) throws -> String? {
        try #require(result.status == 0, "\(result)")
        let object = try JSONSerialization.jsonObject(with: Data(result.output.utf8)) as? [String: Any]
        return object?["principal"] as? String
    }

    /// The settings for the TLS gateway as the admin, as flags.
    var tlsFlags: [String] {
        ["--server", gateway.server, "--token-file", gateway.adminTokenFile, "--ca-file", gateway.pki.caCertificate]
    }

    @Test("status over TLS with --ca-file: verified against the test CA, reported as TLS")
    func statusOverTLS() throws {
        let status = try admin(["status"] + tlsFlags)
        #expect(status.status == 0, "\(status)")
        #expect(status.output.contains("server       \(gateway.server) (TLS)"), "\(status.output)")
        #expect(status.output.contains("principal    admin"))

        // The same from the environment instead of flags.
        let fromEnvironment = try admin(
            ["status", "--json"],
            environment: [
                "HSMGW_SERVER": gateway.server, "HSMGW_TOKEN_FILE": gateway.adminTokenFile,
                "HSMGW_CA_FILE": gateway.pki.caCertificate,
            ])
        #expect(try principal(fromEnvironment) == "admin")
    }

    @Test("TLS failures exit 69: untrusted server, wrong or missing server name, plaintext to a TLS port")
    func tlsFailures() throws {
        // Loopback defaults to plaintext; --tls with the system roots cannot verify the test CA.
        let untrusted = try admin([
            "status", "--server", gateway.server, "--token-file", gateway.adminTokenFile, "--tls", "--timeout",
            "10s",
        ])
        #expect(untrusted.status == 69, "\(untrusted)")
        #expect(untrusted.output.isEmpty)
        #expect(untrusted.error.localizedCaseInsensitiveContains("tls"), "\(untrusted.error)")

        let wrongName = try admin(["status", "--server-name", "other.example", "--timeout", "10s"] + tlsFlags)
        #expect(wrongName.status == 69, "\(wrongName)")

        // By IP address: the certificate does not name 127.0.0.1, so only --server-name gets in.
        let byAddress = ["--server", gateway.serverByAddress, "--token-file", gateway.adminTokenFile]
        let unnamed = try admin(["status", "--ca-file", gateway.pki.caCertificate, "--timeout", "10s"] + byAddress)
        #expect(unnamed.status == 69, "\(unnamed)")
        let named = try admin(
            ["status", "--ca-file", gateway.pki.caCertificate, "--server-name", "localhost"] + byAddress)
        #expect(named.status == 0, "\(named)")

        let plaintext = try admin([
            "status", "--server", gateway.server, "--token-file", gateway.adminTokenFile, "--plaintext",
            "--timeout", "10s",
        ])
        #expect(plaintext.status == 69, "\(plaintext)")
        // The token never appears in what the CLI prints.
        let token = try String(contentsOfFile: gateway.adminTokenFile, encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        for result in [untrusted, wrongName, unnamed, plaintext] {
            #expect(!result.error.contains(token) && !result.output.contains(token))
        }
    }

    @Test("a client certificate alone authenticates as the principal mapped to its CN; from flags or environment")
    func clientCertificates() throws {
        let name = "ops-\(String(UInt32.random(in: 0...UInt32.max), radix: 36))"
        let commonName = name + "-cli"
        let created = try admin(["principal", "create", name, "--cn", commonName, "--role", "*:admin"] + tlsFlags)
        #expect(created.status == 0, "\(created)")

        let (certificate, key) = try gateway.pki.client(commonName: commonName)
        let withFlags = try admin([
            "status", "--json", "--server", gateway.server, "--ca-file", gateway.pki.caCertificate,
            "--cert", certificate, "--key", key,
        ])
        #expect(try principal(withFlags) == name)

        let withEnvironment = try admin(
            ["tenant", "list", "--json"],
            environment: [
                "HSMGW_SERVER": gateway.server, "HSMGW_CA_FILE": gateway.pki.caCertificate,
                "HSMGW_CERT_FILE": certificate, "HSMGW_KEY_FILE": key,
            ])
        #expect(withEnvironment.status == 0, "\(withEnvironment)")

        // A verified certificate that names no principal: refused by the gateway (77).
        let (strangerCertificate, strangerKey) = try gateway.pki.client(commonName: "nobody-\(name)")
        let stranger = try admin([
            "status", "--server", gateway.server, "--ca-file", gateway.pki.caCertificate,
            "--cert", strangerCertificate, "--key", strangerKey,
        ])
        #expect(stranger.status == 77, "\(stranger)")
        #expect(stranger.error.contains("UNAUTHENTICATED"), "\(stranger.error)")

        // A certificate from a CA the gateway does not trust fails the handshake (69).
        let (rogueCertificate, rogueKey) = try gateway.pki.untrustedClient(commonName: commonName)
        let rogue = try admin([
            "status", "--server", gateway.server, "--ca-file", gateway.pki.caCertificate,
            "--cert", rogueCertificate, "--key", rogueKey, "--timeout", "10s",
        ])
        #expect(rogue.status == 69, "\(rogue)")

        // Half a client identity is a usage error, found before connecting.
        let half = try admin([
            "status", "--server", gateway.server, "--ca-file", gateway.pki.caCertificate, "--cert", certificate,
        ])
        #expect(half.status == 64, "\(half)")
        #expect(half.error.contains("--key"), "\(half.error)")

        // An unreadable CA file is unusable settings (78), not a connection failure.
        let missingCA = try admin([
            "status", "--server", gateway.server, "--token-file", gateway.adminTokenFile, "--ca-file",
            gateway.root + "/none.pem",
        ])
        #expect(missingCA.status == 78, "\(missingCA)")
    }
}
