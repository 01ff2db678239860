import DevGatewayTestSupport
import Foundation
import GatewayClient
import ProcessTestSupport
import SoftHSMTestSupport
import Testing

/// The built `hsm-admin backup` and `restore` with a gateway's configuration file: a backup of a
/// live gateway's SQLite store, restored into a new store that a second gateway then serves on
/// the same SoftHSM2 token.
@Suite("hsm-admin backup and restore", .serialized)
struct BackupCommandTests {
    @Test
    func backupWhileServingRestoreAndServeAgain() async throws {
        let fixture = try SoftHSMFixture.shared()
        let token = try fixture.makeToken("admin-backup")
        let root = try makeTemporaryDirectory("admin-backup")
        let adminExecutable = try DevGatewayProcess.builtExecutable("hsm-admin")
        let live = try Self.writeConfiguration(root, "live", token: token, fixture: fixture)
        let restored = try Self.writeConfiguration(root, "restored", token: token, fixture: fixture)
        let spare = try Self.writeConfiguration(root, "spare", token: token, fixture: fixture)
        func admin(_ arguments: [String]) throws -> ChildProcess.Result {
            try ChildProcess.run(
                adminExecutable, arguments, environment: ["PATH": "/usr/bin:/bin", "HOME": root],
                inheritEnvironment: false)
        }

        // A live gateway with a tenant and keys made by an application.
        let first = try await Self.startGateway(root, config: live, name: "live", bootstrap: true)
        let adminToken = try String(contentsOfFile: root + "/admin.token", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let client = try Self.client(port: first.port, token: adminToken)
        _ = try await client.createTenant("acme")
        var keys: [DataKey] = []
        for index in 0..<5 {
            keys.append(try await client.generateDataKey(tenant: "acme", context: ["n": "\(index)"]))
        }

        // Backed up while it serves.
        let backup = root + "/backup.jsonl"
        let made = try admin(["backup", "--config", live, "--output", backup, "--json"])
        #expect(made.status == 0, "\(made)")
        let summary = try #require(
            try JSONSerialization.jsonObject(with: Data(made.output.utf8)) as? [String: Any])
        #expect((summary["counts"] as? [String: Any])?["dataKeys"] as? Int == 5)
        #expect((summary["token"] as? [String: Any])?["label"] as? String == token.label)
        // Never over an existing file.
        #expect(try admin(["backup", "--config", live, "--output", backup]).status == 73)

        let later = try await client.generateDataKey(tenant: "acme", context: ["n": "later"])
        await client.shutdown()
        _ = first.process.stop()

        // A changed byte: refused with 1, nothing written (the spare store stays usable below).
        let text = try String(contentsOfFile: backup, encoding: .utf8)
        let tampered = root + "/tampered.jsonl"
        try text.replacingOccurrences(of: "\"state\":\"enabled\"", with: "\"state\":\"disabled\"").write(
            toFile: tampered, atomically: false, encoding: .utf8)
        let refused = try admin(["restore", "--config", spare, "--input", tampered])
        #expect(refused.status == 1, "\(refused)")
        #expect(refused.error.contains("SHA-256"), "\(refused.error)")

        // Restored into a new store, once; a second time the store is not empty (3).
        let loaded = try admin(["restore", "--config", restored, "--input", backup])
        #expect(loaded.status == 0, "\(loaded)")
        #expect(loaded.output.contains("audit log verified"), "\(loaded.output)")
        #expect(try admin(["restore", "--config", restored, "--input", backup]).status == 3)

        // A gateway on the restored store and the same token serves the keys acknowledged before
        // the backup, the later one from its kept copy, and new keys (after one rotation).
        let second = try await Self.startGateway(root, config: restored, name: "restored", bootstrap: false)
        defer { _ = second.process.stop() }
        let again = try Self.client(port: second.port, token: adminToken)
        defer { Task { await again.shutdown() } }
        for (index, key) in keys.enumerated() {
            let decrypted = try await again.decryptDataKey(tenant: "acme", id: key.id, context: ["n": "\(index)"])
            #expect(decrypted.plaintext?.copyBytes() == key.plaintext?.copyBytes())
        }
        let recovered = try await again.decryptDataKey(
            tenant: "acme", id: "", context: ["n": "later"], wrapped: later.wrapped)
        #expect(recovered.plaintext?.copyBytes() == later.plaintext?.copyBytes())
        let fresh = try await again.generateDataKey(tenant: "acme")
        #expect(fresh.masterKeyVersion == 2)
        let verification = try await again.verifyAuditLog()
        #expect(verification.intact)
    }

    // MARK: Helpers

    /// A gateway configuration file on the test token with a SQLite store of its own.
    static func writeConfiguration(
        _ root: String, _ name: String, token: TestToken, fixture: SoftHSMFixture
    ) throws -> String {
        let path = "\(root)/\(name).yaml"
        let yaml = """
            listen:
              - 127.0.0.1:0
            metrics_listen: "off"
            hsm:
              module: \(SoftHSMFixture.modulePath)
              token_label: \(token.label)
              pin:
                file: \(token.pinFile)
              softhsm2_conf: \(fixture.configPath)
            store:
              kind: sqlite
              sqlite:
                path: \(root)/\(name).sqlite
            """
        try yaml.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    /// Starts the built `hsm-gateway` with `config`; returns it and its port.
    static func startGateway(
        _ root: String, config: String, name: String, bootstrap: Bool
    ) async throws -> (process: SpawnedProcess, port: Int) {
        let executable = try DevGatewayProcess.builtExecutable("hsm-gateway")
        let process = try SpawnedProcess(
            executable,
            ["--config", config] + (bootstrap ? ["--bootstrap-token-file", root + "/admin.token"] : []),
            outputPath: "\(root)/\(name).log"
        )
        guard
            let port = await process.waitForOutput(
                #"listen=127\.0\.0\.1:(\d+)"#, timeout: DevGatewayProcess.startTimeout
            )
            .flatMap({ Int($0) })
        else {
            _ = process.stop()
            throw TestSetupError("hsm-gateway did not start:\n\(process.output())")
        }
        return (process, port)
    }

    static func client(port: Int, token: String) throws -> GatewayClient {
        try GatewayClient(
            configuration: .init(
                target: .host("127.0.0.1", port: port), transportSecurity: .plaintext, apiToken: APIToken(token))
        )
    }
}
