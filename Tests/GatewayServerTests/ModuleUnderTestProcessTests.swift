import Foundation
import GatewayClient
import GatewayWire
import ProcessTestSupport
import SoftHSMTestSupport
import Testing

/// The real `hsm-gateway` binary over the PKCS#11 module under test (SoftHSM2, or NSS's softoken
/// with `HSMGW_TEST_PKCS11=nss`, its database named in `hsm.initialize_args`): data keys, the
/// gateway's own encryption and a rotation on SQLite across a restart, and two instances sharing
/// one token on PostgreSQL.
@Suite("hsm-gateway processes on the module under test", .serialized)
struct ModuleUnderTestProcessTests {
    /// One `hsm-gateway` on SQLite with the fixture's token.
    struct SQLiteGateway {
        let process: SpawnedProcess
        let port: Int

        static func start(token: TestToken, directory: String, log: String, gcmIV: String? = nil) async throws
            -> SQLiteGateway
        {
            var arguments = [
                "--hsm-module", SoftHSMFixture.modulePath, "--token-label", token.label, "--pin-file", token.pinFile,
                "--store", "sqlite", "--sqlite-path", directory + "/gateway.sqlite",
                "--bootstrap-token-file", directory + "/admin.token",
                "--listen", "127.0.0.1:0", "--metrics-listen", "off",
            ]
            if let initializeArguments = token.initializeArguments {
                arguments += ["--set", "hsm.initialize_args=\(initializeArguments)"]
            }
            if let gcmIV { arguments += ["--set", "hsm.gcm_iv=\(gcmIV)"] }
            let fixture = try SoftHSMFixture.shared()
            let process = try SpawnedProcess(
                PackagePaths.gatewayBinary, arguments, environment: ["SOFTHSM2_CONF": fixture.configPath],
                outputPath: log)
            let port = try await process.servingPort()
            return SQLiteGateway(process: process, port: port)
        }

        func client(token: String) throws -> GatewayClient {
            var configuration = GatewayClientConfiguration(
                target: .host("127.0.0.1", port: port), transportSecurity: .plaintext, apiToken: APIToken(token),
                poolSize: 1)
            configuration.retryPolicy = .none
            return try GatewayClient(configuration: configuration, logger: quietLogger)
        }
    }

    @Test("SQLite: data keys, Encrypt/Decrypt and a rotation survive a restart; the log holds no initialize_args")
    func sqliteAcrossRestart() async throws {
        let fixture = try SoftHSMFixture.shared()
        let token = try fixture.makeToken("process-sqlite")
        let directory = try makeTemporaryDirectory("module-process")
        defer { try? FileManager.default.removeItem(atPath: directory) }

        let first = try await SQLiteGateway.start(token: token, directory: directory, log: directory + "/first.log")
        let adminToken = try String(contentsOfFile: directory + "/admin.token", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let client = try first.client(token: adminToken)
        _ = try await client.createTenant("acme")
        let before = try await client.generateDataKey(tenant: "acme", context: ["app": "billing"])
        let ciphertext = try await client.encrypt(
            tenant: "acme", dataKeyID: before.id, plaintext: Array("payload".utf8), context: ["app": "billing"])
        let rotated = try await client.rotateMasterKey(tenant: "acme")
        #expect(rotated.version == 2)
        let after = try await client.generateDataKey(tenant: "acme", context: ["app": "billing"])
        #expect(after.masterKeyVersion == 2)
        await client.shutdown()
        first.process.send(SIGTERM)
        #expect(await first.process.wait(timeout: .seconds(60)) == 0)

        // NSS has PKCS#11 3.0 message-based encryption: the restart switches to `hsm.gcm_iv:
        // message` (the token's IV generator), which changes no stored format, so what was sealed
        // with gateway IVs still opens, and what is sealed now opens too.
        let secondIV = SoftHSMFixture.implementation == .nss ? "message" : nil
        let second = try await SQLiteGateway.start(
            token: token, directory: directory, log: directory + "/second.log", gcmIV: secondIV)
        #expect(second.process.output().contains("gcm-iv=\(secondIV ?? "gateway")"), "\(second.process.output())")
        let again = try second.client(token: adminToken)
        let made = try await again.generateDataKey(tenant: "acme", context: ["app": "billing"])
        let rewrapped = try await again.rewrapDataKey(tenant: "acme", id: before.id, context: ["app": "billing"])
        #expect(rewrapped.masterKeyVersion == 2)
        for key in [before, after, made] {
            let decrypted = try await again.decryptDataKey(tenant: "acme", id: key.id, context: ["app": "billing"])
            #expect(decrypted.plaintext?.copyBytes() == key.plaintext?.copyBytes())
        }
        let payload = try await again.decrypt(tenant: "acme", ciphertext: ciphertext, context: ["app": "billing"])
        #expect(payload.plaintext.copyBytes() == Array("payload".utf8))
        await again.shutdown()
        second.process.send(SIGTERM)
        #expect(await second.process.wait(timeout: .seconds(60)) == 0)

        // The library parameters are configuration, yet never logged.
        if let initializeArguments = token.initializeArguments {
            for log in [first.process.output(), second.process.output()] {
                #expect(!log.contains(initializeArguments))
                #expect(!log.contains("configdir"))
            }
        }
    }

    @Test("PostgreSQL: two instances share one token; a key made on one decrypts on the other")
    func postgresTwoInstances() async throws {
        let cluster = try await GatewayProcessCluster.start("module-pg", instances: ["a", "b"])
        defer { cluster.stopAll() }
        let a = try cluster.instance("a").client(token: cluster.adminToken)
        let b = try cluster.instance("b").client(token: cluster.adminToken)
        _ = try await a.createTenant("acme")
        var keys: [DataKey] = []
        for index in 0..<20 {
            keys.append(try await a.generateDataKey(tenant: "acme", context: ["i": "\(index)"]))
        }
        for (index, key) in keys.enumerated() {
            let decrypted = try await b.decryptDataKey(tenant: "acme", id: key.id, context: ["i": "\(index)"])
            #expect(decrypted.plaintext?.copyBytes() == key.plaintext?.copyBytes())
        }
        // A rotation on b: a new master key written to the token by one process, used by the other.
        _ = try await b.rotateMasterKey(tenant: "acme")
        let fresh = try await b.generateDataKey(tenant: "acme", context: [:])
        #expect(fresh.masterKeyVersion == 2)
        let decrypted = try await a.decryptDataKey(tenant: "acme", id: fresh.id, context: [:])
        #expect(decrypted.plaintext?.copyBytes() == fresh.plaintext?.copyBytes())
        await a.shutdown()
        await b.shutdown()
    }
}
