import Foundation
import ProcessTestSupport
import Testing

/// `hsm-bench compare` as a user runs it: a child process that measures its own token's AES-GCM
/// ceiling and an in-process gateway on that token, checked through its `--json` output and its
/// exit status.
@Suite("hsm-bench compare", .serialized)
struct CompareToolTests {
    static func compare(_ arguments: [String]) async throws -> ChildProcess.Result {
        try await runBlocking {
            try ChildProcess.run(PackagePaths.benchBinary, ["compare"] + arguments, timeout: .seconds(180))
        }
    }

    @Test("SQLite, short: both calls against their ceilings, the ratio is the gateway's rate over the higher one")
    func sqliteJSON() async throws {
        let result = try await Self.compare([
            "--store", "sqlite", "--seconds", "1", "--warmup", "0", "--concurrency", "4", "--sessions", "2", "--json",
        ])
        #expect(result.status == 0, "\(result)")
        let object = try JSONSerialization.jsonObject(with: Data(result.output.utf8))
        let report = try #require(object as? [String: Any], "not a JSON object: \(result)")
        #expect(report["store"] as? String == "sqlite")
        #expect(report["transport"] as? String == "tls")
        #expect(report["sessions"] as? Int == 2)
        #expect(report["concurrency"] as? Int == 4)
        #expect(report["plaintextBytes"] as? Int == 32)
        let calls = try #require(report["calls"] as? [String: Any])
        for (name, operation) in [("GenerateDataKey", "aes-gcm-encrypt"), ("DecryptDataKey", "aes-gcm-decrypt")] {
            let call = try #require(calls[name] as? [String: Any], "no \(name): \(calls.keys)")
            #expect(call["ceilingOperation"] as? String == operation)
            let ceiling = try #require(call["ceilingOpsPerSecond"] as? [String: Double])
            let (one, threads) = (try #require(ceiling["oneThread"]), try #require(ceiling["sessionThreads"]))
            #expect(one > 0 && threads > 0, "\(name): \(ceiling)")
            let gateway = try #require(call["opsPerSecond"] as? Double)
            #expect(gateway > 0, "\(name)")
            let latency = try #require(call["latencyMs"] as? [String: Double])
            #expect((latency["p50"] ?? 0) > 0 && (latency["p50"] ?? 0) <= (latency["p99"] ?? 0), "\(latency)")
            // Each call makes one token operation, so the gateway stays below the token's own rate.
            let ratio = try #require(call["ratio"] as? Double)
            #expect(ratio > 0 && ratio < 1, "\(name): \(ratio)")
            #expect(abs(ratio - gateway / max(one, threads)) < 0.001, "\(name): \(ratio) vs \(gateway) / \(ceiling)")
        }
    }

    @Test(
        "a value outside its limit exits non-zero and names the option",
        arguments: [
            (["--concurrency", "0"], "--concurrency must be from 1 to 1024"),
            (["--concurrency", "1025"], "--concurrency must be from 1 to 1024"),
            (["--seconds", "0.5"], "--seconds must be from 1 to 600"),
            (["--warmup", "61"], "--warmup must be from 0 to 60"),
            (["--connections", "17"], "--connections must be from 1 to 16"),
            (["--sessions", "0"], "--sessions must be from 1 to 64"),
            (["--store", "mysql"], "--store"),
        ])
    func badOptionValue(extra: [String], message: String) async throws {
        let result = try await Self.compare(extra)
        #expect(result.status != 0, "\(result)")
        #expect(result.error.contains(message), "\(result)")
        #expect(result.output.isEmpty, "\(result)")
    }
}
