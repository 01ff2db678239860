import GatewayWire
import NIOCore
import NIOSSL
import Testing

@testable import GatewayTransport

@Suite("Transport server over loopback: TLS and mTLS")
struct TLSTests {
    private static func tls(
        _ certificates: TestCertificates,
        clientCertificates: ServerConfiguration.TLS.ClientCertificates
    ) -> ServerConfiguration.TLS {
        ServerConfiguration.TLS(
            certificateChainPath: certificates.serverCertificatePath,
            privateKeyPath: certificates.serverKeyPath,
            clientCAPath: clientCertificates == .none ? nil : certificates.caPath,
            clientCertificates: clientCertificates
        )
    }

    @Test("TLS: Hello over TLS; the connection is marked TLS, with no client CN")
    func tls() async throws {
        let certificates = try TestCertificates.load()
        try await withTestServer(tls: Self.tls(certificates, clientCertificates: .none)) { address, handler in
            let client = try await TestFrameClient.connect(
                to: address,
                tls: try certificates.clientContext(),
                serverHostname: "localhost"
            )
            #expect(try await client.hello().statusCode == .ok)
            let connection = try #require(handler.log.withLockedValue { $0.helloConnections.first })
            #expect(connection.isTLS)
            #expect(connection.clientCertificateCommonName == nil)
            await client.close()
        }
    }

    @Test(
        "TLS 1.2: forward-secret AEAD suites only; a client offering only CBC or RSA key exchange is refused",
        arguments: [
            ("ECDHE-ECDSA-AES128-GCM-SHA256", true),
            ("ECDHE-ECDSA-CHACHA20-POLY1305", true),
            ("ECDHE-ECDSA-AES128-SHA", false),
            ("AES128-GCM-SHA256", false),
        ]
    )
    func tls12CipherSuites(suite: String, accepted: Bool) async throws {
        let certificates = try TestCertificates.load()
        try await withTestServer(tls: Self.tls(certificates, clientCertificates: .none)) { address, handler in
            var configuration = TLSConfiguration.makeClientConfiguration()
            configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(certificates.caPath))
            configuration.maximumTLSVersion = .tlsv12
            configuration.cipherSuites = suite
            let context = try NIOSSLContext(configuration: configuration)
            var status: StatusCode?
            do {
                let client = try await TestFrameClient.connect(to: address, tls: context, serverHostname: "localhost")
                status = try? await client.hello().statusCode
                await client.close()
            } catch {
                status = nil
            }
            if accepted {
                #expect(status == .ok)
            } else {
                #expect(status == nil)
                #expect(handler.log.withLockedValue { $0.helloConnections.isEmpty })
            }
        }
    }

    @Test("TLS: a plaintext client gets no frame and is closed")
    func plaintextClientOnTLS() async throws {
        let certificates = try TestCertificates.load()
        try await withTestServer(tls: Self.tls(certificates, clientCertificates: .none)) { address, handler in
            let client = try await TestFrameClient.connect(to: address)
            try await client.request(1, .hello)
            let frames = try await client.framesUntilClosed()
            #expect(frames.isEmpty)
            #expect(handler.log.withLockedValue { $0.helloConnections.isEmpty })
        }
    }

    @Test("mTLS required: the verified client certificate's CN reaches ConnectionInfo and authenticates")
    func mtlsRequired() async throws {
        let certificates = try TestCertificates.load()
        try await withTestServer(tls: Self.tls(certificates, clientCertificates: .required)) { address, handler in
            let context = try certificates.clientContext(
                certificate: certificates.clientCertificatePath,
                key: certificates.clientKeyPath
            )
            let client = try await TestFrameClient.connect(to: address, tls: context, serverHostname: "localhost")
            let hello = try await client.hello(token: "")
            #expect(hello.statusCode == .ok)
            #expect(try Hsmgw_V1_HelloResponse(wirePayload: hello.payload).principal == "billing-service")
            let connection = try #require(handler.log.withLockedValue { $0.helloConnections.first })
            #expect(connection.clientCertificateCommonName == "billing-service")
            #expect(connection.isTLS)
            await client.close()
        }
    }

    @Test(
        "mTLS required: a client without a certificate, or with one from another CA, is refused",
        arguments: [false, true]
    )
    func mtlsRefused(rogueCertificate: Bool) async throws {
        let certificates = try TestCertificates.load()
        try await withTestServer(tls: Self.tls(certificates, clientCertificates: .required)) { address, handler in
            let context =
                rogueCertificate
                ? try certificates.clientContext(
                    certificate: certificates.rogueClientCertificatePath,
                    key: certificates.rogueClientKeyPath
                )
                : try certificates.clientContext()
            let client = try await TestFrameClient.connect(to: address, tls: context, serverHostname: "localhost")
            try? await client.request(1, .hello)
            let frames = (try? await client.framesUntilClosed()) ?? []
            #expect(frames.isEmpty)
            #expect(client.isClosed)
            #expect(handler.log.withLockedValue { $0.helloConnections.isEmpty })

            // Another, properly authenticated client is still served.
            let good = try await TestFrameClient.connect(
                to: address,
                tls: try certificates.clientContext(
                    certificate: certificates.clientCertificatePath,
                    key: certificates.clientKeyPath
                ),
                serverHostname: "localhost"
            )
            #expect(try await good.hello(token: "").statusCode == .ok)
            await good.close()
        }
    }

    @Test("mTLS optional: no certificate means no CN (token Hello works); a certificate gives its CN")
    func mtlsOptional() async throws {
        let certificates = try TestCertificates.load()
        try await withTestServer(tls: Self.tls(certificates, clientCertificates: .optional)) { address, handler in
            let anonymous = try await TestFrameClient.connect(
                to: address,
                tls: try certificates.clientContext(),
                serverHostname: "localhost"
            )
            #expect(try await anonymous.hello().statusCode == .ok)
            let withCertificate = try await TestFrameClient.connect(
                to: address,
                tls: try certificates.clientContext(
                    certificate: certificates.clientCertificatePath,
                    key: certificates.clientKeyPath
                ),
                serverHostname: "localhost"
            )
            #expect(try await withCertificate.hello(token: "").statusCode == .ok)
            let names = handler.log.withLockedValue { $0.helloConnections.map(\.clientCertificateCommonName) }
            #expect(names == [nil, "billing-service"])
            await anonymous.close()
            await withCertificate.close()
        }
    }
}

@Suite("Client certificate subject: the CN from DER")
struct CertificateSubjectTests {
    private static func der(_ path: String) throws -> [UInt8] {
        try #require(try NIOSSLCertificate.fromPEMFile(path).first).toDERBytes()
    }

    @Test("the CN of a certificate made by openssl, ASCII and UTF-8")
    func commonNames() throws {
        let certificates = try TestCertificates.load()
        #expect(
            CertificateSubject.commonName(fromDER: try Self.der(certificates.clientCertificatePath))
                == "billing-service")
        #expect(CertificateSubject.commonName(fromDER: try Self.der(certificates.serverCertificatePath)) == "localhost")
        #expect(
            CertificateSubject.commonName(fromDER: try Self.der(certificates.utf8NameCertificatePath))
                == "caf\u{E9}-service"
        )
    }

    @Test("two CNs in the subject are ambiguous: no name")
    func twoNames() throws {
        let certificates = try TestCertificates.load()
        #expect(CertificateSubject.commonName(fromDER: try Self.der(certificates.twoNamesCertificatePath)) == nil)
    }

    @Test("malformed DER gives nil: empty, garbage, every truncation, a length past the end")
    func malformed() throws {
        let certificates = try TestCertificates.load()
        let der = try Self.der(certificates.clientCertificatePath)
        #expect(CertificateSubject.commonName(fromDER: []) == nil)
        #expect(CertificateSubject.commonName(fromDER: [0x30, 0x84, 0xFF, 0xFF, 0xFF, 0xFF]) == nil)
        #expect(CertificateSubject.commonName(fromDER: Array(repeating: 0x30, count: 64)) == nil)
        for length in stride(from: 0, to: der.count, by: 7) {
            #expect(CertificateSubject.commonName(fromDER: Array(der.prefix(length))) == nil)
        }
        #expect(CertificateSubject.commonName(fromDER: der + [0]) == nil)  // trailing bytes
    }
}
