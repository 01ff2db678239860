import Foundation
import Testing

@testable import HSMAdmin

/// The command line run in-process (`AdminRunner.main`, what the executable runs): usage errors,
/// refusals before connecting, and a gateway that is not there (a real closed loopback port).
@Suite("hsm-admin runner")
struct AdminRunnerTests {
    let directory: String
    let tokenFile: String
    /// No `HOME`: an operator's own ~/.config/hsm-admin/admin.conf must not leak into tests.
    let environment = ["HOME": "/nonexistent"]

    init() throws {
        directory =
            FileManager.default.temporaryDirectory.appendingPathComponent(
                "hsm-admin-runner-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            ).path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        tokenFile = directory + "/admin.token"
        try Data("hsmgw_notarealtoken".utf8).write(to: URL(fileURLWithPath: tokenFile))
        try FileManager.default.setAttributes([.posixPermissions: 0o600], ofItemAtPath: tokenFile)
    }

    func run(_ arguments: [String], environment extra: [String: String] = [:]) async -> (
        code: Int32, output: String, error: String
    ) {
        let capture = CapturedOutput()
        let code = await AdminRunner.main(
            arguments: arguments,
            environment: environment.merging(extra) { $1 },
            output: capture.output
        )
        return (code, capture.standardOutput, capture.standardError)
    }

    /// A loopback port nothing listens on: bound, read, closed.
    func closedPort() throws -> Int {
        let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        try #require(descriptor >= 0)
        defer { close(descriptor) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(descriptor, $0, length) }
        }
        try #require(bound == 0)
        let named = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(descriptor, $0, &length) }
        }
        try #require(named == 0)
        return Int(UInt16(bigEndian: address.sin_port))
    }

    @Test("help goes to stdout with exit 0 and lists the exit codes")
    func help() async {
        let result = await run(["--help"])
        #expect(result.code == 0)
        #expect(result.output.contains("USAGE: hsm-admin <subcommand>"))
        #expect(result.output.contains("77  unauthenticated or permission denied"))
        let group = await run(["tenant"])
        #expect(group.code == 0)
        #expect(group.output.contains("shred"))
    }

    @Test("shred without a matching --confirm is refused with 64 and the reason, before connecting")
    func shredConfirmation() async {
        let missing = await run(["tenant", "shred", "acme", "--server", "127.0.0.1:1", "--token-file", tokenFile])
        #expect(missing.code == 64)
        #expect(missing.error.contains("without --confirm acme"))
        #expect(missing.error.contains("irreversibly"))
        let wrong = await run(["tenant", "shred", "acme", "--confirm", "acme2"])
        #expect(wrong.code == 64)
        #expect(wrong.error.contains("does not match the tenant `acme`"))
        let destroy = await run(["data-key", "destroy", "acme", "0b3c", "--confirm", "other"])
        #expect(destroy.code == 64)
        #expect(destroy.error.contains("does not match the data key id"))
    }

    @Test("malformed arguments exit 64 with the rule")
    func badArguments() async {
        let cases: [([String], String)] = [
            (["principal", "create", "ops", "--role", "acme"], "TENANT:ROLE"),
            (["principal", "grant", "ops", "Acme:admin"], "tenant id `Acme`"),
            (["token", "create", "--principal", "ops", "--ttl", "30"], "without a unit"),
            (["token", "revoke", "hsmgw_pastedtokenbymistake"], "not the token itself"),
            (["tenant", "create", "Bad Tenant"], "lowercase letters"),
            (["master-key", "activate", "acme", "v0"], "a number from 1"),
            (["master-key", "set-state", "acme", "2", "destroyed"], "destroyed"),
            (["master-key", "schedule-deletion", "acme", "2", "--days", "3"], "--days must be 7 to 365"),
            (["data-key", "list", "acme", "--limit", "0"], "--limit must be"),
            (["audit", "tail", "--limit", "5000"], "--limit must be 1 to 1000"),
            (["rewrap", "status", "acme", "--watch", "--interval", "10ms"], "--interval must be"),
            (["status", "--token", "hsmgw_x"], "Unknown option '--token'"),
        ]
        for (arguments, message) in cases {
            let result = await run(arguments)
            #expect(result.code == 64, "\(arguments)")
            #expect(result.error.contains(message), "\(arguments): \(result.error)")
            #expect(result.output.isEmpty)
        }
    }

    @Test("no credentials exits 77; an open token file 78; plaintext to a remote host 64")
    func credentials() async throws {
        let none = await run(["status", "--server", "gw.example:7700"])
        #expect(none.code == 77)
        #expect(none.error.contains("no credentials for gw.example:7700"))

        let open = directory + "/open.token"
        try Data("hsmgw_secretvalue".utf8).write(to: URL(fileURLWithPath: open))
        try FileManager.default.setAttributes([.posixPermissions: 0o644], ofItemAtPath: open)
        let refused = await run(["status", "--server", "127.0.0.1:1", "--token-file", open])
        #expect(refused.code == 78)
        #expect(refused.error.contains("has mode 0644"))
        #expect(!refused.error.contains("hsmgw_secretvalue"))

        let plaintext = await run(["status", "--server", "gw.example:7700", "--plaintext", "--token-file", tokenFile])
        #expect(plaintext.code == 64)
        #expect(plaintext.error.contains("--insecure-plaintext"))

        let config = await run(["status", "--admin-config", directory + "/missing.conf"])
        #expect(config.code == 78)
        #expect(config.error.contains("cannot open admin config file"))

        let caFile = await run(["status", "--ca-file", directory + "/missing-ca.pem", "--token-file", tokenFile])
        #expect(caFile.code == 78)
        #expect(caFile.error.contains("missing-ca.pem cannot be read"), "\(caFile.error)")

        let environment = await run(
            ["status"], environment: ["HSMGW_SERVER": "gw.example:0", "HSMGW_TOKEN_FILE": tokenFile])
        #expect(environment.code == 78)
        #expect(environment.error.contains("HSMGW_SERVER"))
    }

    @Test("a gateway that is not listening exits 69 and says where it looked")
    func unreachable() async throws {
        let port = try closedPort()
        let result = await run([
            "status", "--server", "127.0.0.1:\(port)", "--token-file", tokenFile, "--timeout", "5s",
        ])
        #expect(result.code == 69, "\(result.error)")
        #expect(result.error.contains("cannot reach the gateway at 127.0.0.1:\(port) (plaintext) (from --server)"))
        #expect(result.output.isEmpty)
        #expect(!result.error.contains("hsmgw_notarealtoken"))

        let socket = await run(["tenant", "list", "--socket", directory + "/no.sock", "--token-file", tokenFile])
        #expect(socket.code == 69, "\(socket.error)")
        #expect(socket.error.contains("unix:\(directory)/no.sock"))
    }
}
