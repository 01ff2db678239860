import DevGatewayTestSupport
import Foundation
import GatewayClient
import ProcessTestSupport
import Testing

/// The built `hsm-admin` against a real `hsm-gateway --dev` (SoftHSM2 token, SQLite store,
/// plaintext on a free loopback port): output, `--json` and exit codes.
@Suite("hsm-admin against hsm-gateway --dev", .serialized)
struct AdminEndToEndTests {
    let gateway: DevGatewayProcess

    init() throws {
        gateway = try DevGatewayProcess.shared()
    }

    /// Runs `hsm-admin` against the gateway as the bootstrap admin (unless `environment` says
    /// otherwise), with a HOME that holds no admin config.
    func admin(
        _ arguments: [String],
        environment extra: [String: String] = [:],
        directory: String? = nil
    ) throws -> ChildProcess.Result {
        var environment = [
            "PATH": "/usr/bin:/bin", "HOME": gateway.home, "HSMGW_SERVER": gateway.server,
            "HSMGW_TOKEN_FILE": gateway.adminTokenFile,
        ]
        environment.merge(extra) { $1 }
        environment = environment.filter { !$0.value.isEmpty }
        return try ChildProcess.run(
            gateway.adminExecutable, arguments, environment: environment, inheritEnvironment: false,
            directory: directory)
    }

    /// `--json` output as an object.
    func json(_ result: ChildProcess.Result) throws -> [String: Any] {
        try #require(result.status == 0, "\(result)")
        let object = try JSONSerialization.jsonObject(with: Data(result.output.utf8))
        return try #require(object as? [String: Any], "\(result.output)")
    }

    func unique(_ prefix: String) -> String {
        "\(prefix)-\(String(UInt32.random(in: 0...UInt32.max), radix: 36))"
    }

    /// A file holding `token`, mode 0600.
    func tokenFile(_ token: String, name: String) throws -> String {
        let path = gateway.root + "/home/\(name).token"
        try Data((token + "\n").utf8).write(to: URL(fileURLWithPath: path))
        try FileManager.default.setAttributes([.posixPermissions: 0o600], ofItemAtPath: path)
        return path
    }

    @Test("status works next to hsm-gateway --dev with the default token file, and as JSON")
    func status() throws {
        // No token setting at all: ./.hsm-dev/admin.token relative to the working directory.
        let text = try admin(["status"], environment: ["HSMGW_TOKEN_FILE": ""], directory: gateway.root)
        #expect(text.status == 0, "\(text)")
        #expect(text.output.contains("server       \(gateway.server) (plaintext)"), "\(text.output)")
        #expect(text.output.contains("principal    admin"))
        #expect(text.output.contains("roles        *:admin"))
        #expect(text.output.contains("ready        yes"))

        let object = try json(try admin(["status", "--json"]))
        #expect(object["principal"] as? String == "admin")
        #expect(object["ready"] as? Bool == true)
        #expect(object["store"] as? String == "sqlite")
        let roles = try #require(object["roles"] as? [[String: String]])
        #expect(roles.contains(["tenant": "*", "role": "admin"]))

        // Elsewhere, without the default file, there are no credentials.
        let none = try admin(["status"], environment: ["HSMGW_TOKEN_FILE": ""], directory: gateway.home)
        #expect(none.status == 77, "\(none)")
    }

    @Test("tenant create, list, show, disable, enable; a duplicate exits 3, an unknown tenant 2")
    func tenants() throws {
        let tenant = unique("e2e-t")
        let created = try admin(["tenant", "create", tenant])
        #expect(created.status == 0, "\(created)")
        #expect(created.output.contains("tenant              \(tenant)"), "\(created.output)")
        #expect(created.output.contains("primary master key  v1"))

        let duplicate = try admin(["tenant", "create", tenant])
        #expect(duplicate.status == 3, "\(duplicate)")
        #expect(duplicate.error.contains("ALREADY_EXISTS"))

        let list = try admin(["tenant", "list"])
        #expect(list.status == 0, "\(list)")
        let lines = list.output.split(separator: "\n")
        #expect(lines.first?.hasPrefix("TENANT") == true)
        #expect(lines.contains { $0.hasPrefix(tenant + " ") && $0.contains("enabled") && $0.contains("v1") })

        let listed = try #require(try json(try admin(["tenant", "list", "--json"]))["tenants"] as? [[String: Any]])
        #expect(listed.contains { $0["id"] as? String == tenant && $0["state"] as? String == "enabled" })

        let shown = try json(try admin(["tenant", "show", tenant, "--json"]))
        #expect(shown["primaryMasterKeyVersion"] as? Int == 1)
        #expect((shown["createdAt"] as? String)?.hasSuffix("Z") == true)

        #expect(try json(try admin(["tenant", "disable", tenant, "--json"]))["state"] as? String == "disabled")
        #expect(try json(try admin(["tenant", "enable", tenant, "--json"]))["state"] as? String == "enabled")

        let unknown = try admin(["tenant", "show", unique("e2e-none")])
        #expect(unknown.status == 2, "\(unknown)")
        #expect(unknown.output.isEmpty)
        #expect(unknown.error.contains("NOT_FOUND"))
    }

    @Test("master-key rotate and list; --no-activate adds a pre-active version")
    func masterKeys() throws {
        let tenant = unique("e2e-mk")
        #expect(try admin(["tenant", "create", tenant]).status == 0)

        let rotated = try admin(["master-key", "rotate", tenant])
        #expect(rotated.status == 0, "\(rotated)")
        #expect(rotated.output.contains("version               v2"), "\(rotated.output)")
        #expect(rotated.output.contains("primary               yes"))

        let list = try admin(["master-key", "list", tenant])
        #expect(list.status == 0, "\(list)")
        let rows = list.output.split(separator: "\n")
        #expect(rows.count == 3, "\(list.output)")
        #expect(rows.first?.contains("VERSION") == true)
        #expect(rows.contains { $0.contains("v2") && $0.contains("yes") })

        let pending = try json(try admin(["master-key", "rotate", tenant, "--no-activate", "--json"]))
        #expect(pending["version"] as? Int == 3)
        #expect(pending["primary"] as? Bool == false)
        #expect(pending["state"] as? String == "pre-active")

        let versions = try #require(
            try json(try admin(["master-key", "list", tenant, "--json"]))["versions"] as? [[String: Any]])
        #expect(versions.compactMap { $0["version"] as? Int }.sorted() == [1, 2, 3])
        #expect(versions.filter { $0["primary"] as? Bool == true }.compactMap { $0["version"] as? Int } == [2])

        let missing = try admin(["master-key", "activate", tenant, "9"])
        #expect(missing.status == 2, "\(missing)")
    }

    @Test("principal and token create; data-key list, show, disable, destroy; rewrap --watch")
    func dataKeys() async throws {
        let tenant = unique("e2e-dk")
        #expect(try admin(["tenant", "create", tenant]).status == 0)
        let principal = unique("e2e-app")
        let created = try admin(["principal", "create", principal, "--role", "\(tenant):key-user", "--json"])
        let principalObject = try json(created)
        #expect(principalObject["name"] as? String == principal)
        #expect((principalObject["roles"] as? [[String: String]]) == [["tenant": tenant, "role": "key-user"]])

        let tokenResult = try admin(["token", "create", "--principal", principal, "--description", "e2e app"])
        #expect(tokenResult.status == 0, "\(tokenResult)")
        let token = tokenResult.output.trimmingCharacters(in: .newlines)

        // Three data keys, generated by the client library as the application.
        let client = try GatewayClient(
            configuration: .init(
                target: .host("127.0.0.1", port: gateway.port),
                transportSecurity: .plaintext,
                apiToken: APIToken(token)
            )
        )
        var ids: [String] = []
        for index in 0..<3 {
            let key = try await client.generateDataKey(
                tenant: tenant, context: ["n": "\(index)"], includePlaintext: false)
            ids.append(key.id)
        }
        await client.shutdown()

        let all = try admin(["data-key", "list", tenant])
        #expect(all.status == 0, "\(all)")
        let rows = all.output.split(separator: "\n")
        #expect(rows.count == 4, "\(all.output)")
        #expect(rows.first?.hasPrefix("ID") == true)
        for id in ids { #expect(rows.contains { $0.hasPrefix(id) && $0.contains("enabled") }) }
        #expect(all.error.isEmpty)

        let limited = try admin(["data-key", "list", tenant, "--limit", "2"])
        #expect(limited.output.split(separator: "\n").count == 3)
        #expect(limited.error.contains("more data keys exist"))
        let limitedJSON = try json(try admin(["data-key", "list", tenant, "--limit", "2", "--json"]))
        #expect((limitedJSON["dataKeys"] as? [Any])?.count == 2)
        #expect(limitedJSON["more"] as? Bool == true)
        let allJSON = try json(try admin(["data-key", "list", tenant, "--all", "--json"]))
        #expect((allJSON["dataKeys"] as? [[String: Any]])?.compactMap { $0["id"] as? String }.sorted() == ids.sorted())
        #expect(allJSON["more"] as? Bool == false)

        let shown = try json(try admin(["data-key", "show", tenant, ids[0], "--json"]))
        #expect(shown["id"] as? String == ids[0])
        #expect(shown["masterKeyVersion"] as? Int == 1)
        #expect(
            try json(try admin(["data-key", "disable", tenant, ids[0], "--json"]))["state"] as? String == "disabled")
        let disabled = try json(try admin(["data-key", "list", tenant, "--state", "disabled", "--json"]))
        #expect((disabled["dataKeys"] as? [[String: Any]])?.compactMap { $0["id"] as? String } == [ids[0]])
        #expect(try json(try admin(["data-key", "enable", tenant, ids[0], "--json"]))["state"] as? String == "enabled")

        let unconfirmed = try admin(["data-key", "destroy", tenant, ids[1]])
        #expect(unconfirmed.status == 64)
        #expect(try json(try admin(["data-key", "show", tenant, ids[1], "--json"]))["state"] as? String == "enabled")
        let destroyed = try admin(["data-key", "destroy", tenant, ids[1], "--confirm", ids[1], "--json"])
        #expect(try json(destroyed)["state"] as? String == "destroyed")

        // Rotate, then move the keys to v2 and watch it finish (not a terminal: a line per change).
        #expect(try admin(["master-key", "rotate", tenant]).status == 0)
        let noJob = try json(try admin(["rewrap", "status", tenant, "--json"]))
        #expect(noJob["job"] is NSNull)
        #expect(try admin(["rewrap", "status", tenant]).output == "tenant \(tenant) has no rewrap job\n")
        let started = try admin(["rewrap", "start", tenant])
        #expect(started.status == 0, "\(started)")
        let watched = try admin(["rewrap", "status", tenant, "--watch", "--interval", "200ms"])
        #expect(watched.status == 0, "\(watched)")
        let lines = watched.output.split(separator: "\n")
        #expect(lines.last?.hasPrefix("rewrap \(tenant) to v2: completed") == true, "\(watched.output)")
        #expect(!watched.output.contains("\r"))
        let job = try #require(try json(try admin(["rewrap", "status", tenant, "--json"]))["job"] as? [String: Any])
        #expect(job["state"] as? String == "completed")
        #expect(job["targetVersion"] as? Int == 2)
        let jsonWatch = try admin(["rewrap", "status", tenant, "--watch", "--json"])
        let updates = try jsonWatch.output.split(separator: "\n").map { line in
            try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        }
        #expect(updates.count == 1)
        #expect(updates.first?["state"] as? String == "completed")
        let after = try json(try admin(["data-key", "show", tenant, ids[0], "--json"]))
        #expect(after["masterKeyVersion"] as? Int == 2)
    }

    @Test("token create prints the token alone; a revoked token then exits 77")
    func tokens() throws {
        let principal = unique("e2e-ops")
        #expect(try admin(["principal", "create", principal, "--role", "*:admin"]).status == 0)

        let created = try admin(["token", "create", "--principal", principal, "--ttl", "30d"])
        #expect(created.status == 0, "\(created)")
        let token = created.output.trimmingCharacters(in: .newlines)
        #expect(created.output == token + "\n", "stdout holds the token alone")
        #expect(token.hasPrefix("hsmgw_") && token.utf8.count == 49)
        #expect(created.error.contains("shown once"))
        #expect(!created.error.contains(token))

        let file = try tokenFile(token, name: principal)
        let status = try json(try admin(["status", "--json"], environment: ["HSMGW_TOKEN_FILE": file]))
        #expect(status["principal"] as? String == principal)
        let viaEnvironment = try admin(["status"], environment: ["HSMGW_TOKEN_FILE": "", "HSMGW_TOKEN": token])
        #expect(viaEnvironment.status == 0, "\(viaEnvironment)")

        let listed = try json(try admin(["token", "list", "--principal", principal, "--json"]))
        let tokens = try #require(listed["tokens"] as? [[String: Any]])
        #expect(tokens.count == 1)
        let id = try #require(tokens.first?["id"] as? String)
        #expect(tokens.first?["state"] as? String == "active")
        #expect(tokens.first?["expiresAt"] is String)
        #expect(!listed.description.contains(token))
        #expect(created.error.contains(id))
        let table = try admin(["token", "list"])
        #expect(table.output.split(separator: "\n").contains { $0.hasPrefix(id) && $0.contains("active") })

        let revoked = try json(try admin(["token", "revoke", id, "--json"]))
        #expect(revoked["state"] as? String == "revoked")

        let refused = try admin(["status"], environment: ["HSMGW_TOKEN_FILE": file])
        #expect(refused.status == 77, "\(refused)")
        #expect(refused.error.contains("refused the credentials"))
        #expect(refused.error.contains("UNAUTHENTICATED"))
        #expect(!refused.error.contains(token))

        let json = try admin(["token", "create", "--principal", principal, "--json"])
        let object = try self.json(json)
        #expect((object["token"] as? String)?.hasPrefix("hsmgw_") == true)
        #expect((object["info"] as? [String: Any])?["principal"] as? String == principal)
    }

    @Test("audit verify, tail and export")
    func audit() throws {
        #expect(try admin(["tenant", "create", unique("e2e-au")]).status == 0)

        let verified = try admin(["audit", "verify"])
        #expect(verified.status == 0, "\(verified)")
        #expect(verified.output.contains("audit chain      intact"), "\(verified.output)")
        #expect(verified.output.contains("HSM checkpoints  "), "\(verified.output)")
        let verification = try json(try admin(["audit", "verify", "--json"]))
        #expect(verification["intact"] as? Bool == true)
        let checked = try #require(verification["recordsChecked"] as? Int)
        #expect(checked > 0)
        // The head is anchored in the HSM: its checkpoint, at least, verified there.
        #expect(verification["anchoredThrough"] as? Int == verification["headSequence"] as? Int)
        #expect((verification["checkpointsChecked"] as? Int ?? 0) >= 1)

        let exportPath = gateway.home + "/audit.jsonl"
        let exported = try admin(["audit", "export", "--output", exportPath])
        #expect(exported.status == 0, "\(exported)")
        #expect(exported.output.isEmpty)
        #expect(exported.error.contains("to \(exportPath)"))
        let lines = try String(contentsOfFile: exportPath, encoding: .utf8).split(separator: "\n")
        let sequences = try lines.map { line in
            let object = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
            #expect((object["hash"] as? String)?.count == 64)
            return try #require(object["sequence"] as? Int)
        }
        #expect(sequences.count >= checked)
        #expect(sequences == Array(1...sequences.count))
        let mode = try FileManager.default.attributesOfItem(atPath: exportPath)[.posixPermissions] as? Int
        #expect(mode == 0o600)

        let stdout = try admin(["audit", "export", "--after", "\(sequences.count - 2)"])
        #expect(stdout.status == 0)
        #expect(stdout.output.split(separator: "\n").count >= 2)

        let tail = try admin(["audit", "tail", "--limit", "3", "--json"])
        #expect(tail.status == 0, "\(tail)")
        let tailSequences = try tail.output.split(separator: "\n").map { line in
            try #require(
                (try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])?["sequence"] as? Int)
        }
        #expect(tailSequences.count == 3)
        #expect(tailSequences == Array(tailSequences[0]...tailSequences[0] + 2))
        #expect(tailSequences.last! >= sequences.last!)

        let table = try admin(["audit", "tail", "--after", "0", "--limit", "2"])
        let rows = table.output.split(separator: "\n")
        #expect(rows.count == 3, "\(table.output)")
        #expect(rows.first?.contains("SEQ") == true && rows.first?.contains("OPERATION") == true)
        #expect(rows.dropFirst().first?.trimmingCharacters(in: .whitespaces).hasPrefix("1 ") == true)
    }

    @Test("audit tail --follow prints records as they are written")
    func follow() throws {
        let log = gateway.home + "/follow-\(UInt32.random(in: 0...UInt32.max)).jsonl"
        let follower = try SpawnedProcess(
            gateway.adminExecutable,
            ["audit", "tail", "--follow", "--json", "--limit", "1", "--interval", "200ms"],
            environment: [
                "PATH": "/usr/bin:/bin", "HOME": gateway.home, "HSMGW_SERVER": gateway.server,
                "HSMGW_TOKEN_FILE": gateway.adminTokenFile,
            ],
            inheritEnvironment: false,
            outputPath: log
        )
        defer { follower.stop(grace: .seconds(2)) }
        let tenant = unique("e2e-follow")
        #expect(try admin(["tenant", "create", tenant]).status == 0)
        let deadline = ContinuousClock.now + .seconds(20)
        var seen = false
        while !seen, ContinuousClock.now < deadline {
            let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            seen = text.split(separator: "\n").contains { line in
                guard let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
                    return false
                }
                return object["tenant"] as? String == tenant && object["operation"] as? String == "tenant.create"
            }
            usleep(100_000)
        }
        #expect(seen, "\((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")")
        #expect(follower.poll() == nil, "--follow keeps running")
    }
}
