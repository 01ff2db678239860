import Foundation
import Testing

@testable import GatewayClient

@Suite("Client configuration")
struct ConfigurationTests {
    static let token = APIToken("hsmgw_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8")

    static func valid() -> GatewayClientConfiguration {
        GatewayClientConfiguration(
            target: .host("localhost", port: 7700), transportSecurity: .plaintext, apiToken: token)
    }

    static func expectInvalid(
        _ change: (inout GatewayClientConfiguration) -> Void,
        field: String,
        code: GatewayClientConfigurationError.Code,
        sourceLocation: SourceLocation = #_sourceLocation
    ) {
        var configuration = valid()
        change(&configuration)
        do {
            try configuration.validate()
            Issue.record("accepted; expected \(field)", sourceLocation: sourceLocation)
        } catch {
            #expect(error.field == field, sourceLocation: sourceLocation)
            #expect(error.code == code, sourceLocation: sourceLocation)
            #expect(!error.description.contains(token.value), sourceLocation: sourceLocation)
        }
    }

    @Test("defaults are valid and documented")
    func defaults() throws {
        let configuration = Self.valid()
        try configuration.validate()
        #expect(configuration.poolSize == 2)
        #expect(configuration.connectTimeout == .seconds(10))
        #expect(configuration.defaultDeadline == .seconds(30))
        #expect(configuration.retryPolicy == .default)
        #expect(configuration.maximumRequestsInFlightPerConnection == nil)
        #expect(configuration.localDeadlineGrace == .seconds(1))
        try GatewayClientConfiguration(target: .unixSocket(path: "/tmp/hsmgw.sock"), transportSecurity: .plaintext)
            .validate()
    }

    @Test("each field is checked against its named limit, and the error names the field")
    func fieldErrors() {
        Self.expectInvalid({ $0.target = .host("", port: 7700) }, field: "target.host", code: .invalidValue)
        Self.expectInvalid({ $0.target = .host("a b", port: 7700) }, field: "target.host", code: .invalidValue)
        Self.expectInvalid({ $0.target = .host("x", port: 0) }, field: "target.port", code: .outOfRange)
        Self.expectInvalid({ $0.target = .host("x", port: 65536) }, field: "target.port", code: .outOfRange)
        Self.expectInvalid(
            { $0.target = .unixSocket(path: "/" + String(repeating: "s", count: 103)) },
            field: "target.path",
            code: .invalidValue
        )
        Self.expectInvalid({ $0.target = .unixSocket(path: "") }, field: "target.path", code: .invalidValue)
        Self.expectInvalid({ $0.apiToken = APIToken("") }, field: "apiToken", code: .invalidValue)
        Self.expectInvalid({ $0.apiToken = APIToken("has space") }, field: "apiToken", code: .invalidValue)
        Self.expectInvalid(
            { $0.apiToken = APIToken(String(repeating: "t", count: 513)) },
            field: "apiToken",
            code: .invalidValue
        )
        Self.expectInvalid(
            { $0.clientName = String(repeating: "n", count: 129) },
            field: "clientName",
            code: .invalidValue
        )
        // The server's rule (GatewayWire.ClientNameRule): control, format, line and paragraph
        // separator characters are refused before connecting.
        for name in ["bad\nname", "bell\u{7}", "zero\u{200B}width", "\u{202E}reversed", "line\u{2028}separator"] {
            Self.expectInvalid({ $0.clientName = name }, field: "clientName", code: .invalidValue)
        }
        var nonASCII = Self.valid()
        nonASCII.clientName = "caf\u{E9}-\u{8A08}\u{7B97} 2.0"
        #expect(throws: Never.self) { try nonASCII.validate() }
        Self.expectInvalid({ $0.poolSize = 0 }, field: "poolSize", code: .outOfRange)
        Self.expectInvalid({ $0.poolSize = 65 }, field: "poolSize", code: .outOfRange)
        Self.expectInvalid({ $0.connectTimeout = .zero }, field: "connectTimeout", code: .outOfRange)
        Self.expectInvalid({ $0.connectTimeout = .seconds(301) }, field: "connectTimeout", code: .outOfRange)
        Self.expectInvalid({ $0.defaultDeadline = .zero }, field: "defaultDeadline", code: .outOfRange)
        Self.expectInvalid({ $0.defaultDeadline = .seconds(3601) }, field: "defaultDeadline", code: .outOfRange)
        Self.expectInvalid(
            { $0.retryPolicy.maximumAttempts = 0 },
            field: "retryPolicy.maximumAttempts",
            code: .outOfRange
        )
        Self.expectInvalid(
            { $0.maximumRequestsInFlightPerConnection = 0 },
            field: "maximumRequestsInFlightPerConnection",
            code: .outOfRange
        )
        Self.expectInvalid(
            { $0.maximumQueuedRequestsPerConnection = -1 },
            field: "maximumQueuedRequestsPerConnection",
            code: .outOfRange
        )
        Self.expectInvalid({ $0.localDeadlineGrace = .seconds(11) }, field: "localDeadlineGrace", code: .outOfRange)
    }

    @Test("TLS settings: both halves of a client identity, readable files")
    func tlsSettings() throws {
        Self.expectInvalid(
            { $0.transportSecurity = .tls(.init(clientCertificateChainPath: "/tmp/cert.pem")) },
            field: "tls.clientPrivateKeyPath",
            code: .conflictingValues
        )
        Self.expectInvalid(
            { $0.transportSecurity = .tls(.init(clientPrivateKeyPath: "/tmp/key.pem")) },
            field: "tls.clientCertificateChainPath",
            code: .conflictingValues
        )
        Self.expectInvalid(
            { $0.transportSecurity = .tls(.init(trustRoots: .pemFile(path: ""))) },
            field: "tls.trustRoots",
            code: .invalidValue
        )
        Self.expectInvalid(
            { $0.transportSecurity = .tls(.init(serverHostnameOverride: "")) },
            field: "tls.serverHostnameOverride",
            code: .invalidValue
        )

        // Files are loaded when the client is made: a missing or non-PEM file is named.
        var missing = Self.valid()
        missing.transportSecurity = .tls(.init(trustRoots: .pemFile(path: "/nonexistent/ca.pem")))
        #expect(throws: GatewayClientConfigurationError.self) { try GatewayClient(configuration: missing) }
        do {
            _ = try GatewayClient(configuration: missing)
        } catch {
            #expect(error.field == "tls.trustRoots")
            #expect(error.code == .unreadableFile)
            #expect(error.message.contains("/nonexistent/ca.pem"))
        }
        let garbage = FileManager.default.temporaryDirectory.appendingPathComponent("h4-not-a-cert-\(UUID()).pem")
        try Data("not a certificate".utf8).write(to: garbage)
        defer { try? FileManager.default.removeItem(at: garbage) }
        var notPEM = Self.valid()
        notPEM.transportSecurity = .tls(.init(trustRoots: .pemFile(path: garbage.path)))
        #expect(throws: GatewayClientConfigurationError.self) { try GatewayClient(configuration: notPEM) }

        var system = Self.valid()
        system.transportSecurity = .tls(.init())
        #expect(throws: Never.self) { try GatewayClient(configuration: system) }
    }

    @Test("the TLS server name: the override, else the host unless it is an IP address")
    func serverHostname() {
        var configuration = Self.valid()
        #expect(configuration.tlsServerHostname == nil)  // plaintext
        configuration.transportSecurity = .tls(.init())
        #expect(configuration.tlsServerHostname == "localhost")
        configuration.target = .host("127.0.0.1", port: 7700)
        #expect(configuration.tlsServerHostname == nil)
        configuration.target = .host("::1", port: 7700)
        #expect(configuration.tlsServerHostname == nil)
        configuration.transportSecurity = .tls(.init(serverHostnameOverride: "gateway.internal"))
        #expect(configuration.tlsServerHostname == "gateway.internal")
        configuration.target = .unixSocket(path: "/tmp/s")
        #expect(configuration.tlsServerHostname == "gateway.internal")
    }

    @Test("the token never prints: description, debug description, dump, interpolation")
    func tokenRedaction() {
        let configuration = Self.valid()
        var dumped = ""
        dump(configuration, to: &dumped)
        var dumpedToken = ""
        dump(Self.token, to: &dumpedToken)
        let renderings = [
            configuration.description,
            String(describing: configuration),
            String(reflecting: configuration),
            "\(configuration)",
            dumped,
            Self.token.description,
            String(reflecting: Self.token),
            dumpedToken,
            "\(Self.token)",
            String(describing: configuration.apiToken),
        ]
        for text in renderings {
            #expect(!text.contains(Self.token.value), "\(text)")
            #expect(!text.contains("AAECAwQF"))
        }
        #expect(configuration.description.contains("redacted"))
    }
}
