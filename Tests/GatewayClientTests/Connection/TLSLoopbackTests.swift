import Foundation
import GatewayWire
import NIOSSL
import Testing

@testable import GatewayClient

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// TLS and mutual TLS against the fake gateway, with a throwaway PKI made by the `openssl` CLI.
@Suite("TLS over loopback")
struct TLSLoopbackTests {
    /// A CA, a server certificate for localhost and 127.0.0.1, a client certificate, and a second
    /// CA that signed nothing the server uses.
    struct PKI: Sendable {
        let directory: String
        var ca: String { directory + "/ca.crt" }
        var otherCA: String { directory + "/other-ca.crt" }
        var serverCertificate: String { directory + "/server.crt" }
        var serverKey: String { directory + "/server.key" }
        /// A server certificate that names only DNS:localhost (no IP address).
        var namedServerCertificate: String { directory + "/named-server.crt" }
        var namedServerKey: String { directory + "/named-server.key" }
        var clientCertificate: String { directory + "/client.crt" }
        var clientKey: String { directory + "/client.key" }

        static let shared: Result<PKI, any Error> = Result { try PKI() }

        private init() throws {
            directory = NSTemporaryDirectory() + "h4-pki-\(UUID().uuidString)"
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            for name in ["ca", "other-ca"] {
                try Self.openssl([
                    "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", "\(directory)/\(name).key", "-out", "\(directory)/\(name).crt", "-days", "2",
                    "-subj", "/CN=h4 \(name)", "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                ])
            }
            try issue("server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
            try issue("named-server", "localhost", "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n")
            try issue("client", "billing-service", "extendedKeyUsage=clientAuth\n")
        }

        private func issue(_ name: String, _ commonName: String, _ extensions: String) throws {
            try extensions.write(toFile: "\(directory)/\(name).ext", atomically: true, encoding: .utf8)
            try Self.openssl([
                "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", "\(directory)/\(name).key", "-out", "\(directory)/\(name).csr", "-subj", "/CN=\(commonName)",
            ])
            try Self.openssl([
                "x509", "-req", "-in", "\(directory)/\(name).csr", "-CA", ca, "-CAkey", "\(directory)/ca.key",
                "-CAcreateserial", "-out", "\(directory)/\(name).crt", "-days", "2",
                "-extfile", "\(directory)/\(name).ext",
            ])
        }

        /// Runs openssl with posix_spawn (Foundation's Process can hang in the test runner).
        private static func openssl(_ arguments: [String]) throws {
            var actions = posix_spawn_file_actions_t()
            posix_spawn_file_actions_init(&actions)
            defer { posix_spawn_file_actions_destroy(&actions) }
            posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
            posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
            posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0)
            let argv: [UnsafeMutablePointer<CChar>?] = (["/usr/bin/openssl"] + arguments).map { strdup($0) } + [nil]
            defer { for pointer in argv { free(pointer) } }
            var pid: pid_t = 0
            guard posix_spawn(&pid, "/usr/bin/openssl", &actions, nil, argv, environ) == 0 else {
                throw PKIError(message: "cannot run openssl")
            }
            var status: Int32 = 0
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
            guard status == 0 else { throw PKIError(message: "openssl \(arguments[0]) failed: \(status)") }
        }
    }

    struct PKIError: Error {
        var message: String
    }

    static func serverContext(_ pki: PKI, requireClientCertificate: Bool, namedOnly: Bool = false) throws
        -> NIOSSLContext
    {
        let certificate = namedOnly ? pki.namedServerCertificate : pki.serverCertificate
        let key = namedOnly ? pki.namedServerKey : pki.serverKey
        var configuration = TLSConfiguration.makeServerConfiguration(
            certificateChain: try NIOSSLCertificate.fromPEMFile(certificate).map { .certificate($0) },
            privateKey: .privateKey(try NIOSSLPrivateKey(file: key, format: .pem))
        )
        if requireClientCertificate {
            configuration.certificateVerification = .noHostnameVerification
            configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(pki.ca))
        }
        return try NIOSSLContext(configuration: configuration)
    }

    static func configuration(port: Int, host: String = "127.0.0.1", tls: GatewayClientConfiguration.TLS)
        -> GatewayClientConfiguration
    {
        var configuration = fakeConfiguration(port: port)
        configuration.target = .host(host, port: port)
        configuration.transportSecurity = .tls(tls)
        configuration.retryPolicy = .none
        return configuration
    }

    static let script: FakeGateway.Script = { connection in
        try await connection.acceptHello()
        while let request = try await connection.nextRequest() { try await connection.echoTenant(request) }
    }

    @Test("TLS to an IP address and to a host name, trusting the CA from a PEM file")
    func serverAuthentication() async throws {
        let pki = try PKI.shared.get()
        try await FakeGateway.run(tls: Self.serverContext(pki, requireClientCertificate: false), script: Self.script) {
            port in
            for host in ["127.0.0.1", "localhost"] {
                let client = try GatewayClient(
                    configuration: Self.configuration(
                        port: port, host: host, tls: .init(trustRoots: .pemFile(path: pki.ca)))
                )
                #expect(try await client.getTenant("acme").id == "acme", "\(host)")
                await client.shutdown()
            }
            // The name in the certificate can be given when the target's name does not match it.
            let overridden = try GatewayClient(
                configuration: Self.configuration(
                    port: port,
                    tls: .init(trustRoots: .pemFile(path: pki.ca), serverHostnameOverride: "localhost")
                )
            )
            #expect(try await overridden.getTenant("acme").id == "acme")
            await overridden.shutdown()
        }
    }

    @Test("a server certificate from another CA, or for another name, is refused")
    func untrustedServer() async throws {
        let pki = try PKI.shared.get()
        try await FakeGateway.run(tls: Self.serverContext(pki, requireClientCertificate: false), script: Self.script) {
            port in
            let wrongCA = try GatewayClient(
                configuration: Self.configuration(port: port, tls: .init(trustRoots: .pemFile(path: pki.otherCA)))
            )
            let error = await #expect(throws: GatewayError.self) { try await wrongCA.getTenant("acme") }
            #expect(error?.reason == GatewayError.LocalReason.connectFailed)
            await wrongCA.shutdown()

        }

        // A certificate that names only "localhost": reached by IP address, the client must be told
        // the name to check, and a wrong name is refused.
        let named = try Self.serverContext(pki, requireClientCertificate: false, namedOnly: true)
        try await FakeGateway.run(tls: named, script: Self.script) { port in
            for (override, succeeds) in [(nil, false), ("gateway.example", false), ("localhost", true)] {
                let client = try GatewayClient(
                    configuration: Self.configuration(
                        port: port,
                        tls: .init(trustRoots: .pemFile(path: pki.ca), serverHostnameOverride: override)
                    )
                )
                if succeeds {
                    #expect(try await client.getTenant("acme").id == "acme")
                } else {
                    let error = await #expect(throws: GatewayError.self, "\(override ?? "no name")") {
                        try await client.getTenant("acme")
                    }
                    #expect(error?.reason == GatewayError.LocalReason.connectFailed)
                }
                await client.shutdown()
            }
        }
    }

    @Test("mutual TLS: the client presents its certificate; without one the server refuses")
    func mutualTLS() async throws {
        let pki = try PKI.shared.get()
        try await FakeGateway.run(tls: Self.serverContext(pki, requireClientCertificate: true), script: Self.script) {
            port in
            let withCertificate = try GatewayClient(
                configuration: Self.configuration(
                    port: port,
                    tls: .init(
                        trustRoots: .pemFile(path: pki.ca),
                        clientCertificateChainPath: pki.clientCertificate,
                        clientPrivateKeyPath: pki.clientKey
                    )
                )
            )
            #expect(try await withCertificate.getTenant("acme").id == "acme")
            await withCertificate.shutdown()

            let without = try GatewayClient(
                configuration: Self.configuration(port: port, tls: .init(trustRoots: .pemFile(path: pki.ca)))
            )
            let error = await #expect(throws: GatewayError.self) { try await without.getTenant("acme") }
            #expect(error?.code == .unavailable)
            await without.shutdown()
        }
    }

    @Test("a client key that does not match its certificate is a configuration error")
    func mismatchedClientKey() throws {
        let pki = try PKI.shared.get()
        var configuration = Self.configuration(
            port: 7700,
            tls: .init(
                trustRoots: .pemFile(path: pki.ca),
                clientCertificateChainPath: pki.clientCertificate,
                clientPrivateKeyPath: pki.serverKey
            )
        )
        #expect(throws: GatewayClientConfigurationError.self) { try GatewayClient(configuration: configuration) }
        configuration.transportSecurity = .tls(
            .init(
                trustRoots: .pemFile(path: pki.ca), clientCertificateChainPath: pki.clientKey,
                clientPrivateKeyPath: pki.clientKey)
        )
        do {
            _ = try GatewayClient(configuration: configuration)
            Issue.record("a key file accepted as a certificate chain")
        } catch {
            #expect(error.field == "tls.clientCertificateChainPath")
            #expect(error.code == .unreadableFile)
        }
    }
}
