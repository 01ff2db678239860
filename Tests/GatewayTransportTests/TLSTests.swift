import GatewayWire
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL
import Prometheus
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

@Suite("Client certificates must carry the clientAuth extended key usage")
struct ClientAuthUsageTests {
    private static func tls(
        _ certificates: TestCertificates,
        clientCertificates: ServerConfiguration.TLS.ClientCertificates
    ) -> ServerConfiguration.TLS {
        ServerConfiguration.TLS(
            certificateChainPath: certificates.serverCertificatePath,
            privateKeyPath: certificates.serverKeyPath,
            clientCAPath: certificates.caPath,
            clientCertificates: clientCertificates
        )
    }

    /// The text of `registry`'s metrics.
    private static func metricsText(_ registry: PrometheusCollectorRegistry) -> String {
        var buffer: [UInt8] = []
        registry.emit(into: &buffer)
        return String(decoding: buffer, as: UTF8.self)
    }

    /// Why the gateway checks the usage itself: BoringSSL's own verification of a client
    /// certificate (purpose `ssl_client`, run by NIOSSL with the gateway's TLS context) refuses an
    /// extendedKeyUsage without clientAuth, but accepts a certificate with no such extension.
    /// If a NIOSSL update changes this, docs/protocol.md §7.3 must say so.
    @Test(
        "NIOSSL alone: no extendedKeyUsage is accepted; serverAuth or anyExtendedKeyUsage alone is refused",
        arguments: [
            (nil, true), ("clientAuth", true), ("serverAuth", false), ("anyExtendedKeyUsage", false),
            ("codeSigning", false),
        ] as [(String?, Bool)]
    )
    func nioSSLAlone(extendedKeyUsage: String?, accepted: Bool) async throws {
        let certificates = try TestCertificates.load()
        let configuration = ServerConfiguration(
            listeners: [.tcp(host: "127.0.0.1", port: 0)],
            tls: Self.tls(certificates, clientCertificates: .required)
        )
        let serverContext = try #require(try configuration.makeTLSContext())
        let outcome = NIOLockedValueBox<Bool?>(nil)
        let server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: serverContext))
                    try channel.pipeline.syncOperations.addHandler(HandshakeOutcomeRecorder(outcome: outcome))
                }
            }
            .bind(host: "127.0.0.1", port: 0)
            .get()
        let files = try certificates.client(extendedKeyUsage: extendedKeyUsage)
        let clientContext = try certificates.clientContext(certificate: files.certificate, key: files.key)
        let client = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        NIOSSLClientHandler(context: clientContext, serverHostname: "localhost"))
                }
            }
            .connect(to: try #require(server.localAddress))
            .get()
        // Sent once the client's side of the handshake is done (TLS 1.3: before the server has
        // judged the certificate).
        try? await client.writeAndFlush(ByteBuffer(string: "x"))
        let clock = ContinuousClock()
        let end = clock.now + .seconds(10)
        while outcome.withLockedValue({ $0 }) == nil, clock.now < end { try await Task.sleep(for: .milliseconds(5)) }
        #expect(outcome.withLockedValue { $0 } == accepted)
        try? await client.close()
        try? await server.close()
    }

    @Test(
        "a client certificate without clientAuth fails the TLS handshake (mTLS required or optional, TLS 1.2 or 1.3); others are served",
        arguments: [ServerConfiguration.TLS.ClientCertificates.required, .optional],
        [
            (nil, TLSVersion.tlsv13), (nil, .tlsv12), ("serverAuth", .tlsv13), ("serverAuth", .tlsv12),
            ("anyExtendedKeyUsage", .tlsv13), ("codeSigning,emailProtection", .tlsv13),
        ] as [(String?, TLSVersion)]
    )
    func refused(
        mode: ServerConfiguration.TLS.ClientCertificates,
        usage: (String?, TLSVersion)
    ) async throws {
        let (extendedKeyUsage, version) = usage
        let certificates = try TestCertificates.load()
        let registry = PrometheusCollectorRegistry()
        try await withTestServer(tls: Self.tls(certificates, clientCertificates: mode), metrics: registry) {
            address, handler in
            // A client served before the refusal keeps being served after it.
            let good = try await TestFrameClient.connect(
                to: address,
                tls: try certificates.clientContext(
                    certificate: certificates.clientCertificatePath, key: certificates.clientKeyPath),
                serverHostname: "localhost"
            )
            #expect(try await good.hello(token: "").statusCode == .ok)

            let files = try certificates.client(extendedKeyUsage: extendedKeyUsage)
            let context = try certificates.clientContext(
                certificate: files.certificate, key: files.key, maximumTLSVersion: version)
            let refused = try await TestFrameClient.connect(to: address, tls: context, serverHostname: "localhost")
            // A good token does not help: a presented certificate must be acceptable.
            try? await refused.request(1, .hello, payload: helloPayload(token: TestGatewayHandler.goodToken))
            let frames = (try? await refused.framesUntilClosed()) ?? []
            #expect(frames.isEmpty)
            #expect(refused.isClosed)
            #expect(handler.log.withLockedValue { $0.helloConnections.count } == 1)

            try await good.request(2, .listTenants, payload: ByteBuffer(string: "still here"))
            #expect(String(buffer: try await good.nextFrame().payload) == "still here")
            let again = try await TestFrameClient.connect(
                to: address,
                tls: try certificates.clientContext(
                    certificate: certificates.clientCertificatePath, key: certificates.clientKeyPath),
                serverHostname: "localhost"
            )
            #expect(try await again.hello(token: "").statusCode == .ok)
            if mode == .optional {
                let anonymous = try await TestFrameClient.connect(
                    to: address, tls: try certificates.clientContext(), serverHostname: "localhost")
                #expect(try await anonymous.hello().statusCode == .ok)
                await anonymous.close()
            }
            // Only a certificate BoringSSL accepted reaches the gateway's own check, which counts it.
            let counted = Self.metricsText(registry).contains(
                #"hsmgw_frames_refused_total{reason="CLIENT_CERTIFICATE_USAGE"} 1"#)
            #expect(counted == (extendedKeyUsage == nil))
            await good.close()
            await again.close()
        }
    }

    @Test(
        "a client certificate listing clientAuth among other purposes is accepted",
        arguments: ["clientAuth,serverAuth", "anyExtendedKeyUsage,clientAuth", "emailProtection,clientAuth"]
    )
    func acceptedAmongOthers(extendedKeyUsage: String) async throws {
        let certificates = try TestCertificates.load()
        try await withTestServer(tls: Self.tls(certificates, clientCertificates: .required)) { address, handler in
            let files = try certificates.client(extendedKeyUsage: extendedKeyUsage)
            let client = try await TestFrameClient.connect(
                to: address,
                tls: try certificates.clientContext(certificate: files.certificate, key: files.key),
                serverHostname: "localhost"
            )
            #expect(try await client.hello(token: "").statusCode == .ok)
            #expect(
                handler.log.withLockedValue { $0.helloConnections.first?.clientCertificateCommonName }
                    == "billing-service")
            await client.close()
        }
    }
}

/// A Hello payload with `token`.
private func helloPayload(token: String) -> ByteBuffer {
    var hello = Hsmgw_V1_HelloRequest()
    hello.apiToken = token
    return hello.wirePayload()
}

/// Records whether a bare NIOSSL server accepted the client: its first bytes arrived, which
/// NIOSSL delivers only after a successful handshake (true), or the handshake failed (false).
private final class HandshakeOutcomeRecorder: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let outcome: NIOLockedValueBox<Bool?>

    init(outcome: NIOLockedValueBox<Bool?>) { self.outcome = outcome }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        outcome.withLockedValue { $0 = $0 ?? true }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        outcome.withLockedValue { $0 = $0 ?? false }
        context.close(promise: nil)
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
