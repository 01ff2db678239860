import ArgumentParser
import Foundation
import GatewayClient
import PKCS11
import Synchronization

/// The token's own AES-GCM rate and the gateway's rate on that same token, back to back in one
/// run, and how much of the first the second reaches. A DecryptDataKey is one AES-GCM decrypt
/// under the token-object master key and a GenerateDataKey one random draw and one AES-GCM
/// encrypt, so those two operations, on a key made with the master-key template, are the
/// ceilings; the gateway (in this process, over TLS on loopback, with its store) adds the client,
/// the wire, admission, the store and the audit record on top.
struct CompareBenchmark: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "compare",
        abstract: "The token's AES-GCM ceiling and the gateway's ops/s on the same token, with their ratio.",
        discussion: """
            The ceiling is measured first, on one thread and on as many threads as the gateway has \
            HSM sessions (--sessions), while the gateway is idle; then GenerateDataKey and \
            DecryptDataKey through the gateway at --concurrency. The ratio is the gateway's ops/s \
            over the higher of the two ceilings.
            """
    )

    // MARK: Limits

    /// Concurrent gateway calls: as `wire`, far past what saturates one gateway.
    static let concurrencyRange = 1...1024
    /// Seconds per measurement: long enough to mean something, short enough for a session.
    static let secondsRange = 1.0...600
    /// Seconds of unrecorded gateway calls first: at most a minute.
    static let warmupRange = 0.0...60
    /// Client connections: as `wire`.
    static let connectionsRange = 1...16
    /// The tenant the gateway's calls use.
    static let tenant = "compare"

    // MARK: Options

    @OptionGroup var gatewayOptions: BenchGatewayOptions

    @Option(help: "Concurrent gateway calls (1 to 1024).")
    var concurrency = 64

    @Option(help: "Seconds per measurement (1 to 600).")
    var seconds: Double = 5

    @Option(help: "Seconds of gateway calls before measuring, not recorded (0 to 60).")
    var warmup: Double = 1

    @Option(help: "Client connections (1 to 16).")
    var connections = 2

    @Flag(help: "Print the result as one JSON object on stdout instead of the table.")
    var json = false

    func validate() throws {
        guard Self.concurrencyRange.contains(concurrency) else {
            throw ValidationError("--concurrency must be from 1 to 1024, is \(concurrency)")
        }
        guard Self.secondsRange.contains(seconds) else { throw ValidationError("--seconds must be from 1 to 600") }
        guard Self.warmupRange.contains(warmup) else { throw ValidationError("--warmup must be from 0 to 60") }
        guard Self.connectionsRange.contains(connections) else {
            throw ValidationError("--connections must be from 1 to 16, is \(connections)")
        }
    }

    // MARK: Run

    func run() async throws {
        let gateway = try await BenchGateway.start(gatewayOptions, label: "hsm-bench-compare")
        defer { gateway.stop() }
        let duration = Duration.milliseconds(Int(seconds * 1000))
        let ceiling = try TokenCeiling.measure(gateway.token, threads: gatewayOptions.sessions, for: duration)

        let client = try gateway.client(connections: connections)
        _ = try await client.createTenant(Self.tenant)
        let context = ["bench": "hsm-bench-compare"]
        let ids = Mutex<[String]>([])
        let generateOne: @Sendable () async throws -> Void = {
            let key = try await client.generateDataKey(tenant: Self.tenant, context: context, includePlaintext: true)
            ids.withLock { if $0.count < 200_000 { $0.append(key.id) } }
        }
        if warmup > 0 {
            _ = try await LoadMeasurement.run(.milliseconds(Int(warmup * 1000)), tasks: concurrency, generateOne)
        }
        let generate = try await LoadMeasurement.run(duration, tasks: concurrency, generateOne)
        let keys = ids.withLock { $0 }
        let decrypt = try await LoadMeasurement.run(duration, tasks: concurrency) {
            _ = try await client.decryptDataKey(
                tenant: Self.tenant, id: keys[Int.random(in: 0..<keys.count)], context: context)
        }
        await client.shutdown()
        await gateway.shutdown()

        let report = CompareReport(
            store: gatewayOptions.store.rawValue, transport: gatewayOptions.plaintext ? "plaintext" : "tls",
            sessions: gatewayOptions.sessions, concurrency: concurrency, connections: connections, seconds: seconds,
            warmupSeconds: warmup, plaintextBytes: TokenCeiling.plaintextByteCount,
            calls: [
                "GenerateDataKey": CompareReport.Call(
                    ceilingOperation: "aes-gcm-encrypt", oneThread: ceiling.encrypt,
                    threads: ceiling.parallelEncrypt, gateway: generate),
                "DecryptDataKey": CompareReport.Call(
                    ceilingOperation: "aes-gcm-decrypt", oneThread: ceiling.decrypt,
                    threads: ceiling.parallelDecrypt, gateway: decrypt),
            ])
        print(try json ? report.json() : report.table())
    }
}

/// AES-GCM straight through the PKCS#11 wrapper on a token, with a token-object key made with
/// the master-key template (a separate key, so the gateway's master key never sees a benchmark's
/// IVs), on one thread and on several at once.
struct TokenCeiling {
    /// A data key's size: what the gateway encrypts and decrypts under the master key.
    static let plaintextByteCount = MasterKeyPolicy.keyByteCount
    /// Not the master-key label prefix: the gateway must never take this key for one of its own.
    static let keyLabel = "hsm-bench-ceiling"

    var encrypt: Double
    var decrypt: Double
    var parallelEncrypt: Double
    var parallelDecrypt: Double

    static func measure(_ token: ThrowawayToken, threads: Int, for duration: Duration) throws -> TokenCeiling {
        let plaintext = [UInt8](repeating: 0x42, count: plaintextByteCount)
        let aad = Array("hsm-bench-compare".utf8)
        let key = try token.module.withSession(slot: token.slot) { session in
            try logIn(session, token)
            return try session.generateKey(
                .aesKeyGen, template: MasterKeyPolicy.template(label: keyLabel, id: Array(keyLabel.utf8)))
        }
        defer { _ = try? token.module.withSession(slot: token.slot) { try $0.destroyObject(key) } }
        let (encrypt, decrypt) = try token.module.withSession(slot: token.slot) { session in
            try GCMBenchmark.measure(session, key: key, plaintext: plaintext, aad: aad, for: duration)
        }
        let parallel = { (decrypting: Bool) in
            try rate(
                threads: threads, token: token, key: key, plaintext: plaintext, aad: aad, decrypting: decrypting,
                for: duration)
        }
        return TokenCeiling(
            encrypt: encrypt, decrypt: decrypt, parallelEncrypt: try parallel(false),
            parallelDecrypt: try parallel(true))
    }

    /// Logs the user in; the gateway's session pool normally has already, and login state is
    /// the whole process's.
    private static func logIn(_ session: borrowing Session, _ token: ThrowawayToken) throws {
        do {
            try session.login(.user, pin: token.pin)
        } catch let error as PKCS11Error where error.returnValue == .userAlreadyLoggedIn {}
    }

    /// Operations per second of `threads` threads at once, each with a session of its own,
    /// encrypting (a fresh IV each time) or decrypting one ciphertext over and over.
    static func rate(
        threads: Int, token: ThrowawayToken, key: ObjectHandle, plaintext: [UInt8], aad: [UInt8],
        decrypting: Bool, for duration: Duration
    ) throws -> Double {
        let results = ThreadResults()
        let finished = DispatchGroup()
        let started = ContinuousClock.now
        let deadline = started.advanced(by: duration)
        for index in 0..<threads {
            finished.enter()
            Thread {
                defer { finished.leave() }
                do {
                    let count = try token.module.withSession(slot: token.slot) { session in
                        // The thread's index in the IV's first bytes: no two threads share an IV.
                        var iv = [UInt8](repeating: 0, count: Session.gcmIVByteCount)
                        iv[0] = UInt8(truncatingIfNeeded: index)
                        iv[1] = UInt8(truncatingIfNeeded: index >> 8)
                        let sealedIV = iv
                        let sealed = try session.encryptAESGCM(key: key, iv: sealedIV, aad: aad, plaintext: plaintext)
                        var count = 0
                        while ContinuousClock.now < deadline {
                            if decrypting {
                                _ = try session.decryptAESGCM(
                                    key: key, iv: sealedIV, aad: aad, ciphertextAndTag: sealed)
                            } else {
                                GCMBenchmark.increment(&iv)
                                _ = try session.encryptAESGCM(key: key, iv: iv, aad: aad, plaintext: plaintext)
                            }
                            count += 1
                        }
                        return count
                    }
                    results.add(count)
                } catch {
                    results.fail("\(error)")
                }
            }.start()
        }
        finished.wait()
        let elapsed = ContinuousClock.now - started
        if let failure = results.failure { throw ValidationError("the ceiling's threads failed: \(failure)") }
        return Double(results.count) / GCMBenchmark.seconds(elapsed)
    }
}

/// What the ceiling's threads report: operations completed, and the first failure.
final class ThreadResults: Sendable {
    private let state = Mutex<(count: Int, failure: String?)>((0, nil))
    func add(_ count: Int) { state.withLock { $0.count += count } }
    func fail(_ description: String) { state.withLock { $0.failure = $0.failure ?? description } }
    var count: Int { state.withLock { $0.count } }
    var failure: String? { state.withLock { $0.failure } }
}

/// What `compare` prints: a Markdown table, or one JSON object (keys sorted).
struct CompareReport: Encodable {
    struct Call: Encodable {
        /// The token operation each call makes once: `aes-gcm-encrypt` or `aes-gcm-decrypt`.
        var ceilingOperation: String
        /// The ceiling on one thread and on `sessions` threads, ops/s.
        var ceilingOpsPerSecond: [String: Double]
        /// The gateway's ops/s at `concurrency`.
        var opsPerSecond: Double
        /// p50 and p99 of the gateway's calls, ms (absent when none completed).
        var latencyMs: [String: Double]
        /// `opsPerSecond` over the higher ceiling.
        var ratio: Double

        init(ceilingOperation: String, oneThread: Double, threads: Double, gateway: LoadMeasurement) {
            self.ceilingOperation = ceilingOperation
            ceilingOpsPerSecond = ["oneThread": Self.rounded(oneThread), "sessionThreads": Self.rounded(threads)]
            opsPerSecond = Self.rounded(gateway.opsPerSecond)
            var latency: [String: Double] = [:]
            for (name, quantile) in [("p50", 0.5), ("p99", 0.99)] {
                latency[name] = gateway.milliseconds(atQuantile: quantile).map { ($0 * 100).rounded() / 100 }
            }
            latencyMs = latency
            let best = max(oneThread, threads)
            ratio = best > 0 ? (gateway.opsPerSecond / best * 10_000).rounded() / 10_000 : 0
        }

        static func rounded(_ rate: Double) -> Double { (rate * 10).rounded() / 10 }
    }

    var store: String
    var transport: String
    var sessions: Int
    var concurrency: Int
    var connections: Int
    var seconds: Double
    var warmupSeconds: Double
    var plaintextBytes: Int
    var calls: [String: Call]

    func json() throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return String(decoding: try encoder.encode(self), as: UTF8.self)
    }

    func table() -> String {
        var lines = [
            "store \(store), \(transport), \(sessions) HSM sessions, \(concurrency) concurrent calls over "
                + "\(connections) connection\(connections == 1 ? "" : "s"), \(Self.number(seconds)) s per figure, "
                + "warm-up \(Self.number(warmupSeconds)) s",
            "ceiling: AES-256-GCM of \(plaintextBytes) bytes, token-object key, the gateway's token, gateway idle",
            "",
            "| call | ceiling operation | ceiling, 1 thread | ceiling, \(sessions) threads | gateway ops/s "
                + "| p50 ms | p99 ms | gateway / ceiling |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name in ["GenerateDataKey", "DecryptDataKey"] {
            guard let call = calls[name] else { continue }
            let cells = [
                name, call.ceilingOperation, Self.grouped(call.ceilingOpsPerSecond["oneThread"] ?? 0),
                Self.grouped(call.ceilingOpsPerSecond["sessionThreads"] ?? 0), Self.grouped(call.opsPerSecond),
                call.latencyMs["p50"].map { String(format: "%.2f", $0) } ?? "-",
                call.latencyMs["p99"].map { String(format: "%.2f", $0) } ?? "-",
                String(format: "%.1f%%", call.ratio * 100),
            ]
            lines.append("| " + cells.joined(separator: " | ") + " |")
        }
        return lines.joined(separator: "\n")
    }

    /// A rate as a whole number with thousands separators: 12,345.
    static func grouped(_ rate: Double) -> String {
        var digits = String(Int(rate.rounded()))
        var index = digits.count - 3
        while index > 0 {
            digits.insert(",", at: digits.index(digits.startIndex, offsetBy: index))
            index -= 3
        }
        return digits
    }

    /// Seconds without a needless ".0".
    static func number(_ value: Double) -> String {
        value == value.rounded() ? String(Int(value)) : String(value)
    }
}
