import Foundation
import ProcessTestSupport
import Testing

extension PackagePaths {
    /// The `hsm-bench` executable: `HSMGW_TEST_BENCH_BINARY`, else the debug build.
    static var benchBinary: String {
        if let path = ProcessInfo.processInfo.environment["HSMGW_TEST_BENCH_BINARY"] { return path }
        return root + "/.build/debug/hsm-bench"
    }
}

/// `hsm-bench load` as a user runs it: a child process driving an `hsm-gateway --dev` child
/// process, checked through its `--json` output, its table and its exit status.
@Suite("hsm-bench load", .serialized)
struct LoadToolTests {
    /// Runs `hsm-bench load` with `arguments` on a thread of its own (it blocks while the child runs).
    static func load(_ arguments: [String]) async throws -> ChildProcess.Result {
        try await runBlocking {
            try ChildProcess.run(PackagePaths.benchBinary, ["load"] + arguments, timeout: .seconds(180))
        }
    }

    /// The arguments that point `load` at `gateway` with its admin token.
    static func targetArguments(_ gateway: HSMFaultTests.DevGateway) -> [String] {
        ["--target", "127.0.0.1:\(gateway.port)", "--plaintext", "--token-file", gateway.data + "/admin.token"]
    }

    /// The `--json` object of a run.
    static func report(_ result: ChildProcess.Result) throws -> [String: Any] {
        let object = try JSONSerialization.jsonObject(with: Data(result.output.utf8))
        return try #require(object as? [String: Any], "not a JSON object: \(result)")
    }

    /// Operation `name` of a report, with its count, error count and latency.
    static func operation(_ report: [String: Any], _ name: String) throws -> [String: Any] {
        let operations = try #require(report["operations"] as? [String: Any])
        return try #require(operations[name] as? [String: Any], "no \(name) in \(operations.keys)")
    }

    /// Checks that the operation has successful calls, no errors and ordered percentiles.
    static func expectClean(_ operation: [String: Any], _ name: String) throws {
        let count = try #require(operation["count"] as? Int)
        #expect(count > 0, "\(name): no successful calls")
        #expect(operation["errorCount"] as? Int == 0, "\(name): \(operation["errors"] ?? "")")
        #expect((operation["errors"] as? [String: Any])?.isEmpty == true)
        let latency = try #require(operation["latencyMs"] as? [String: Double], "\(name) has no latency")
        let (p50, p90, p99, p999, max) = (
            try #require(latency["p50"]), try #require(latency["p90"]), try #require(latency["p99"]),
            try #require(latency["p99.9"]), try #require(latency["max"])
        )
        #expect(p50 > 0)
        #expect(p50 <= p90 && p90 <= p99 && p99 <= p999 && p999 <= max, "\(name): \(latency)")
        #expect((operation["opsPerSecond"] as? Double ?? 0) > 0)
    }

    @Test("closed loop, generate and decrypt of preloaded keys: both counted, no errors, percentiles ordered")
    func closedLoopJSON() async throws {
        let gateway = try await HSMFaultTests.DevGateway.start("load-closed")
        defer { gateway.process.send(SIGKILL) }
        let result = try await Self.load(
            Self.targetArguments(gateway) + [
                "--json", "--duration", "2", "--warmup", "0.5", "--concurrency", "4", "--connections", "2",
                "--mix", "generate=1,decrypt=1", "--preload", "20", "--create-tenant", "--tenant", "load-closed",
            ])
        #expect(result.status == 0, "\(result)")
        let report = try Self.report(result)
        #expect(report["mode"] as? String == "closed")
        #expect(report["concurrency"] as? Int == 4)
        #expect(report["preload"] as? Int == 20)
        #expect(report["notSent"] as? Int == 0)
        for name in ["generate", "decrypt"] {
            try Self.expectClean(try Self.operation(report, name), name)
        }
        let total = try #require(report["total"] as? [String: Any])
        let sum = try ["generate", "decrypt"].map { try Self.operation(report, $0)["count"] as? Int ?? 0 }.reduce(0, +)
        #expect(total["count"] as? Int == sum)
        // Neither the token nor anything else secret is printed.
        let token = try String(contentsOfFile: gateway.data + "/admin.token", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(!result.output.contains(token) && !result.error.contains(token))
        #expect(!result.output.contains("plaintext\":\""))
    }

    /// TLS verified against the test CA by name, with an API token; and mutual TLS with the
    /// certificate alone, of a principal bound to its common name: the paths `--dev` (plaintext)
    /// cannot show.
    @Test(
        "over TLS with a token, and over mutual TLS with a client certificate alone: a clean run",
        arguments: [false, true]
    )
    func overTLS(clientCertificate: Bool) async throws {
        let pki = try TestCertificates.shared()
        let security: GatewayHarness.Security = clientCertificate ? .mutualTLS(.optional) : .tls
        try await withGateway(.sqlite, "load-tls-\(clientCertificate)", security: security) { gateway in
            var arguments = [
                "--target", "127.0.0.1:\(gateway.port)", "--tls", "--ca-file", pki.caCertificate,
                "--server-name", "localhost", "--json", "--duration", "1", "--warmup", "0.2", "--concurrency", "2",
                "--mix", "decrypt=1,generate=1", "--preload", "10", "--tenant", "load-tls",
            ]
            if clientCertificate {
                let admin = try gateway.client(token: gateway.adminToken)
                defer { Task { await admin.shutdown() } }
                _ = try await admin.createTenant("load-tls")
                _ = try await admin.createCertificatePrincipal("loader", commonName: "load-tool", tenant: "load-tls")
                let client = try pki.client(commonName: "load-tool")
                arguments += ["--client-cert", client.certificate, "--client-key", client.key]
            } else {
                let tokenFile = gateway.directory + "/load.token"
                try Data((gateway.adminToken + "\n").utf8).write(to: URL(fileURLWithPath: tokenFile))
                arguments += ["--token-file", tokenFile, "--create-tenant"]
            }
            let result = try await Self.load(arguments)
            #expect(result.status == 0, "\(result)")
            let report = try Self.report(result)
            #expect(report["transport"] as? String == "tls")
            for name in ["generate", "decrypt"] {
                try Self.expectClean(try Self.operation(report, name), name)
            }
        }
    }

    @Test("--mark-window: the window's opening and closing on stderr, in order, and the tool's own CPU in the report")
    func markWindow() async throws {
        let gateway = try await HSMFaultTests.DevGateway.start("load-marks")
        defer { gateway.process.send(SIGKILL) }
        let arguments =
            Self.targetArguments(gateway) + [
                "--json", "--duration", "1", "--warmup", "0.5", "--concurrency", "2", "--mix", "decrypt=1",
                "--preload", "10", "--create-tenant", "--tenant", "load-marks",
            ]
        let marked = try await Self.load(arguments + ["--mark-window"])
        #expect(marked.status == 0, "\(marked)")
        let lines = marked.error.split(separator: "\n").map(String.init)
        let open = try #require(lines.firstIndex(of: "hsm-bench load: window open"), "\(marked)")
        let closed = try #require(lines.firstIndex(of: "hsm-bench load: window closed"), "\(marked)")
        #expect(open < closed)
        #expect(lines.filter { $0.hasPrefix("hsm-bench load: window") }.count == 2, "\(marked)")
        let report = try Self.report(marked)
        try Self.expectClean(try Self.operation(report, "decrypt"), "decrypt")
        // Calls were made in the window, so the tool used CPU in it; never more than all of the
        // machine's cores for the whole second (with room for the clock's granularity).
        let cpu = try #require(report["cpuSeconds"] as? Double, "\(report)")
        #expect(cpu > 0 && cpu < Double(ProcessInfo.processInfo.activeProcessorCount) * 1.5, "\(cpu)")

        let unmarked = try await Self.load(arguments)
        #expect(unmarked.status == 0, "\(unmarked)")
        #expect(!unmarked.error.contains("hsm-bench load: window"), "\(unmarked)")
    }

    @Test("open loop: every due send is either made or counted as not sent, latency from the due time")
    func openLoopAccountsForEverySend() async throws {
        let gateway = try await HSMFaultTests.DevGateway.start("load-open")
        defer { gateway.process.send(SIGKILL) }
        // 1,000 sends due per second, at most 2 in flight: a debug gateway cannot keep up, so
        // some sends are skipped, and every one due in the window is accounted for.
        let result = try await Self.load(
            Self.targetArguments(gateway) + [
                "--json", "--duration", "2", "--warmup", "0", "--rate", "1000", "--max-outstanding", "2",
                "--mix", "generate-wrapped=1", "--create-tenant", "--tenant", "load-open",
            ])
        #expect(result.status == 0, "\(result)")
        let report = try Self.report(result)
        #expect(report["mode"] as? String == "open")
        #expect(report["maxOutstanding"] as? Int == 2)
        let operation = try Self.operation(report, "generate-wrapped")
        try Self.expectClean(operation, "generate-wrapped")
        let count = try #require(operation["count"] as? Int)
        let notSent = try #require(report["notSent"] as? Int)
        #expect(notSent > 0, "2 outstanding should not carry 1,000/s: \(report)")
        #expect(count + notSent == 2000, "due in 2 s at 1,000/s: \(count) sent + \(notSent) not sent")
    }

    @Test("every operation of the mix, as a table with progress lines")
    func everyOperationTable() async throws {
        let gateway = try await HSMFaultTests.DevGateway.start("load-every")
        defer { gateway.process.send(SIGKILL) }
        let operations = [
            "generate", "generate-wrapped", "generate-batch", "decrypt", "decrypt-batch", "encrypt",
            "decrypt-payload", "rewrap",
        ]
        let arguments = [
            "--duration", "2", "--warmup", "0", "--concurrency", "4", "--preload", "30", "--batch-size", "5",
            "--payload-bytes", "100", "--mix", operations.map { $0 + "=1" }.joined(separator: ","),
            "--create-tenant", "--tenant", "load-every",
        ]
        let json = try await Self.load(Self.targetArguments(gateway) + arguments + ["--json"])
        #expect(json.status == 0, "\(json)")
        let report = try Self.report(json)
        for name in operations {
            try Self.expectClean(try Self.operation(report, name), name)
        }

        let table = try await Self.load(Self.targetArguments(gateway) + arguments + ["--progress"])
        #expect(table.status == 0, "\(table)")
        let lines = table.output.split(separator: "\n").map(String.init)
        #expect(lines.contains { $0.hasPrefix("operation") && $0.contains("p99.9 ms") }, "\(table)")
        for name in operations + ["total"] {
            #expect(lines.contains { $0.hasPrefix(name + " ") }, "no row for \(name): \(table)")
        }
        #expect(table.error.contains("[1 s] measuring:"), "no progress line: \(table)")
        #expect(lines.contains { $0.hasPrefix("load generator CPU in the window: ") }, "\(table)")
    }

    @Test(
        "a bad option value exits non-zero and says which option",
        arguments: [
            (["--concurrency", "0"], "--concurrency must be from 1 to 4096"),
            (["--mix", "generate=1,frobnicate=1"], "unknown operation 'frobnicate'"),
            (["--mix", "generate=-1"], "weight of generate must be an integer"),
            (["--mix", "decrypt=1", "--preload", "0"], "needs --preload of at least 1"),
            (["--rate", "10", "--concurrency", "4"], "give one"),
            (["--duration", "0"], "--duration must be from 1 to 3600"),
            (["--deadline-ms", "0"], "--deadline-ms must be from 1"),
            (["--tenant", "Bad Tenant"], "--tenant must be"),
            (["--token-file", "/nonexistent/token"], "--token-file: cannot read"),
            (["--ca-file", "/etc/hostname"], "need --tls"),
        ])
    func badOptionValue(extra: [String], message: String) async throws {
        let arguments = ["--target", "127.0.0.1:7700", "--plaintext"] + extra
        let result = try await Self.load(arguments)
        #expect(result.status != 0, "\(result)")
        #expect(result.error.contains(message), "\(result)")
    }

    @Test("a malformed target is refused before any connection")
    func badTarget() async throws {
        for target in ["localhost", "localhost:0", "localhost:99999", "::1:7700", ":7700"] {
            let result = try await Self.load(["--target", target, "--plaintext"])
            #expect(result.status != 0, "\(target): \(result)")
            #expect(result.error.contains("--target must be host:port"), "\(target): \(result)")
        }
    }

    @Test("TLS to a plaintext gateway, and a CA file that holds no certificate: clear errors, no report")
    func transportErrors() async throws {
        let gateway = try await HSMFaultTests.DevGateway.start("load-tls")
        defer { gateway.process.send(SIGKILL) }
        let target = ["--target", "127.0.0.1:\(gateway.port)", "--token-file", gateway.data + "/admin.token"]
        let handshake = try await Self.load(target + ["--tls", "--server-name", "localhost", "--duration", "1"])
        #expect(handshake.status != 0, "\(handshake)")
        #expect(handshake.output.isEmpty, "\(handshake)")
        #expect(handshake.error.contains("UNAVAILABLE"), "\(handshake)")

        let notPEM = try makeTemporaryDirectory("load-ca") + "/ca.pem"
        try "not a certificate\n".write(toFile: notPEM, atomically: true, encoding: .utf8)
        let badCA = try await Self.load(target + ["--tls", "--ca-file", notPEM, "--duration", "1"])
        #expect(badCA.status != 0, "\(badCA)")
        #expect(badCA.error.contains("tls.trustRoots"), "\(badCA)")
    }

    @Test("nobody listening: a clear error and a non-zero exit, not a report")
    func nobodyListening() async throws {
        let port = try HSMFaultTests.freeLoopbackPort()
        let result = try await Self.load([
            "--target", "127.0.0.1:\(port)", "--plaintext", "--duration", "1", "--json",
        ])
        #expect(result.status != 0, "\(result)")
        #expect(result.output.isEmpty, "\(result)")
        #expect(result.error.contains("UNAVAILABLE"), "\(result)")
    }
}
