import Foundation
import GatewayWire
import NIOSSL
import ProcessTestSupport
import Testing

@testable import GatewayClient

/// TLS and mutual TLS against the fake gateway, with the throwaway PKI made by the `openssl` CLI.
@Suite("TLS over loopback")
struct TLSLoopbackTests {
    /// The process's test PKI (`ProcessTestSupport`) under the names these tests use.
    struct PKI: Sendable {
        var ca: String
        /// A CA that signed nothing the server uses.
        var otherCA: String
        var serverCertificate: String
        var serverKey: String
        /// A server certificate that names only DNS:localhost (no IP address).
        var namedServerCertificate: String
        var namedServerKey: String
        var clientCertificate: String
        var clientKey: String

        static let shared: Result<PKI, any Error> = Result {
            let pki = try TestCertificates.shared()
            let named = try pki.dnsOnlyServer()
            let client = try pki.client(commonName: "billing-service")
            return PKI(
                ca: pki.caCertificate, otherCA: try pki.otherCA(), serverCertificate: pki.serverCertificate,
                serverKey: pki.serverKey, namedServerCertificate: named.certificate, namedServerKey: named.key,
                clientCertificate: client.certificate, clientKey: client.key)
        }
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
