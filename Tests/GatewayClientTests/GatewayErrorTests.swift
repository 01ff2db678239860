import GatewayWire
import Testing

@testable import GatewayClient

@Suite("Gateway errors")
struct GatewayErrorTests {
    @Test("the description says the code, the reason, the origin and the message")
    func description() {
        let error = GatewayError(
            serverCode: .invalidArgument,
            reason: StatusReason.decryptionFailed,
            message: "the data key does not decrypt with this context"
        )
        #expect(error.origin == .server)
        #expect(
            error.description
                == "INVALID_ARGUMENT [DECRYPTION_FAILED] (server): the data key does not decrypt with this context"
        )
        let local = GatewayError.notSent(.unavailable, reason: GatewayError.LocalReason.connectFailed, "refused")
        #expect(local.origin == .client)
        #expect(local.description == "UNAVAILABLE [CONNECT_FAILED] (client): refused")
        #expect(local.requestProvablyNotProcessed)
    }

    @Test("codes this build does not know become UNKNOWN; the header's code wins over the message's")
    func unknownCodes() {
        #expect(GatewayError(serverCode: StatusCode(rawValue: 99), reason: "", message: "").code == .unknown)
        var status = Hsmgw_V1_Status(.notFound, "gone")
        status.code = 5
        let error = GatewayError(status: status, headerStatus: .permissionDenied)
        #expect(error.code == .permissionDenied)
        #expect(error.message == "gone")
    }

    @Test("no error the client makes holds the token")
    func noTokenInErrors() async throws {
        let token = "hsmgw_SECRETSECRETSECRETSECRETSECRETSECRETSECR"
        // Nothing listens on this Unix socket: the connect fails locally.
        let configuration = GatewayClientConfiguration(
            target: .unixSocket(path: "/tmp/h4-nobody-listens-\(UInt32.random(in: 0...UInt32.max)).sock"),
            transportSecurity: .plaintext,
            apiToken: APIToken(token),
            connectTimeout: .milliseconds(500),
            retryPolicy: RetryPolicy(
                maximumAttempts: 2, initialBackoff: .milliseconds(1), maximumBackoff: .milliseconds(2))
        )
        let client = try GatewayClient(configuration: configuration)
        let error = await #expect(throws: GatewayError.self) {
            try await client.generateDataKey(tenant: "acme", context: ["k": "v"])
        }
        #expect(error?.code == .unavailable)
        #expect(error?.reason == GatewayError.LocalReason.connectFailed)
        #expect(error?.origin == .client)
        let text = "\(String(describing: error)) \(String(reflecting: error))"
        #expect(!text.contains("SECRET"))
        #expect(!client.configuration.description.contains("SECRET"))
        await client.shutdown()
        let afterShutdown = await #expect(throws: GatewayError.self) { try await client.serverInfo() }
        #expect(afterShutdown?.reason == GatewayError.LocalReason.clientShutDown)
    }

    @Test("sensitive values never print")
    func sensitiveDescriptions() {
        let secret: [UInt8] = Array("plaintext-key-material-123456789".utf8)
        let bytes = SensitiveBytes(copying: secret)
        let key = DataKey(id: "k1", masterKeyVersion: 1, wrapped: [1, 2], plaintext: bytes)
        let payload = DecryptedPayload(plaintext: bytes, dataKeyID: "k1")
        let envelopeKey = EnvelopeDataKey(id: "k1", plaintext: bytes)
        var dumped = ""
        dump(key, to: &dumped)
        for text in [
            bytes.description, String(reflecting: bytes), key.description, String(reflecting: key), payload.description,
            envelopeKey.description, dumped,
        ] {
            #expect(!text.contains("plaintext-key"), "\(text)")
        }
        #expect(bytes.constantTimeEquals(secret))
        #expect(!bytes.constantTimeEquals(Array(secret.dropLast())))
        #expect(bytes.copyBytes() == secret)
    }
}
