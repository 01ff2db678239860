import ArgumentParser
import Foundation
import GatewayClient
import GatewayWire
import Synchronization

/// How `load` reaches the gateway.
enum LoadTransport: String, EnumerableFlag, Sendable {
    case tls
    case plaintext

    static func help(for value: LoadTransport) -> ArgumentHelp? {
        switch value {
        case .tls: return "TLS."
        case .plaintext: return "No TLS (a gateway started with --dev or --allow-plaintext)."
        }
    }
}

/// A load generator for a gateway that is already running, in the manner of `ghz` and
/// `vault-benchmark`: a weighted mix of data-key and payload calls through the Swift client,
/// closed loop (`--concurrency` workers) or open loop (`--rate` requests per second on a
/// schedule), latency per operation from a histogram. The client's retries are off, so every
/// refusal is counted.
struct LoadBenchmark: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "load",
        abstract: "Drives a running gateway with a mix of calls and reports ops/s, latency and errors.",
        discussion: """
            Operations for --mix: \(LoadOperation.names). Latency is measured per call, from the \
            moment it was sent (closed loop) or due (open loop), for successful calls only; failed \
            calls are counted by status. Nothing is printed of keys or payloads.
            """
    )

    // MARK: Limits

    /// Closed-loop workers: 4,096 is 32 times the server's default in-flight limit per
    /// connection, far past saturation for any gateway instance.
    static let concurrencyRange = 1...4096
    /// Client connections: the client library's own limit on a pool.
    static let connectionsRange = 1...GatewayClientConfiguration.maximumPoolSize
    /// Open-loop request rate per second: a million is beyond what one client process sends.
    static let rateRange = 1.0...1_000_000
    /// Open-loop calls in flight at once: the client's bound on calls queued per connection.
    static let maxOutstandingRange = 1...GatewayClientConfiguration.maximumQueuedRequestsLimit
    /// Seconds of warm-up: 0 (none) to 10 minutes.
    static let warmupRange = 0.0...600
    /// Seconds measured: 1 s to an hour.
    static let durationRange = 1.0...3600
    /// Per-call deadline in milliseconds: up to the client's longest deadline.
    static let deadlineRange = 1...3_600_000
    /// Payload bytes for encrypt and decrypt-payload: the protocol's Encrypt limit (64 KiB).
    static let payloadBytesRange = 1...65_536
    /// Keys per batch call: the protocol's batch limit.
    static let batchSizeRange = 1...1000
    /// Keys made before the run: enough to spread decrypts over many rows, few enough to make in
    /// well under a minute.
    static let preloadRange = 0...100_000
    /// Tenant ids as the protocol defines them (`docs/protocol.md`): 1 to 63 bytes.
    static let tenantByteCountRange = 1...63
    /// The largest token file read: gateway tokens are 49 bytes; this only bounds the read.
    static let maximumTokenFileByteCount = 4096
    /// Keys per preload call: the protocol's batch limit.
    static let preloadBatchSize = 1000

    /// The stderr lines of `--mark-window`, exactly (scripts match them).
    static let windowOpenLine = "hsm-bench load: window open"
    static let windowClosedLine = "hsm-bench load: window closed"

    // MARK: Options

    @Option(help: "The running gateway: host:port, [IPv6]:port, or unix:PATH.")
    var target: String

    @Flag(exclusivity: .exclusive)
    var transport: LoadTransport = .tls

    @Option(help: "PEM file of the CA that signed the gateway's certificate (default: the system's trust store).")
    var caFile: String?

    @Option(help: "The name to verify in the gateway's certificate, when it is not the target's host.")
    var serverName: String?

    @Option(help: "PEM client certificate chain for mutual TLS (with --client-key).")
    var clientCert: String?

    @Option(help: "PEM private key of the client certificate (with --client-cert).")
    var clientKey: String?

    @Option(help: "A file holding the API token (read once; a trailing newline is ignored).")
    var tokenFile: String?

    @Option(help: "The tenant (1 to 63 bytes of a-z 0-9 - _).")
    var tenant = "load"

    @Flag(help: "Create the tenant first (an existing tenant is fine).")
    var createTenant = false

    @Option(help: "Weighted operations, e.g. generate=50,decrypt=50 (weights 0 to \(LoadMix.maximumWeight)).")
    var mix = "generate=1"

    @Option(help: "Payload bytes for encrypt and decrypt-payload (1 to 65536).")
    var payloadBytes = 1024

    @Option(help: "Keys per generate-batch / decrypt-batch call (1 to 1000).")
    var batchSize = 10

    @Option(
        help:
            "Data keys made first, in batches, for decrypt, decrypt-batch, rewrap, encrypt, decrypt-payload (0 to 100000)."
    )
    var preload = 100

    @Option(help: "Closed loop: workers each sending one call at a time (1 to 4096; default 16).")
    var concurrency: Int?

    @Option(help: "Client connections; workers and sends are spread over them (1 to 64).")
    var connections = 2

    @Option(help: "Open loop: requests per second sent on a schedule (1 to 1000000), instead of --concurrency.")
    var rate: Double?

    @Option(help: "Open loop: the most calls in flight; a send due past it is skipped and counted (1 to 100000).")
    var maxOutstanding = 1024

    @Option(help: "Seconds run before measuring, not recorded (0 to 600).")
    var warmup: Double = 1

    @Option(help: "Seconds measured (1 to 3600).")
    var duration: Double = 10

    @Option(help: "Per-call deadline in milliseconds (1 to 3600000).")
    var deadlineMs = 10_000

    @Flag(help: "A progress line each second on stderr even when it is not a terminal.")
    var progress = false

    @Flag(help: "Print the result as one JSON object on stdout instead of the table.")
    var json = false

    @Flag(
        help:
            "Print \"\(LoadBenchmark.windowOpenLine)\" and \"\(LoadBenchmark.windowClosedLine)\" on stderr as the measured window opens and closes (for a script that samples CPU time around it)."
    )
    var markWindow = false

    // MARK: Validation

    func validate() throws {
        guard Self.parseTarget(target) != nil else {
            throw ValidationError("--target must be host:port (port 1 to 65535), [IPv6]:port or unix:PATH")
        }
        if transport == .plaintext {
            guard caFile == nil, serverName == nil, clientCert == nil, clientKey == nil else {
                throw ValidationError("--ca-file, --server-name, --client-cert and --client-key need --tls")
            }
        }
        guard (clientCert == nil) == (clientKey == nil) else {
            throw ValidationError("--client-cert and --client-key go together")
        }
        for (flag, path) in [
            ("--ca-file", caFile), ("--client-cert", clientCert), ("--client-key", clientKey),
            ("--token-file", tokenFile),
        ] {
            if let path, !FileManager.default.isReadableFile(atPath: path) {
                throw ValidationError("\(flag): cannot read \(path)")
            }
        }
        guard Self.tenantByteCountRange.contains(tenant.utf8.count),
            tenant.utf8.first.map({ Self.isTenantStart($0) }) == true,
            tenant.utf8.allSatisfy({ Self.isTenantStart($0) || $0 == UInt8(ascii: "-") || $0 == UInt8(ascii: "_") })
        else {
            throw ValidationError("--tenant must be 1 to 63 bytes of a-z 0-9 - _, starting with a letter or digit")
        }
        let mix: LoadMix
        do throws(LoadMix.ParseError) {
            mix = try LoadMix(parsing: self.mix)
        } catch {
            throw ValidationError(error.description)
        }
        try Self.check(payloadBytes, in: Self.payloadBytesRange, "--payload-bytes")
        try Self.check(batchSize, in: Self.batchSizeRange, "--batch-size")
        try Self.check(preload, in: Self.preloadRange, "--preload")
        if let needing = mix.operations.first(where: \.needsPreloadedKeys), preload == 0 {
            throw ValidationError("--mix has \(needing.rawValue), which needs --preload of at least 1")
        }
        if let concurrency {
            guard rate == nil else {
                throw ValidationError("--concurrency is the closed loop and --rate the open loop: give one")
            }
            try Self.check(concurrency, in: Self.concurrencyRange, "--concurrency")
        }
        if let rate {
            guard Self.rateRange.contains(rate) else { throw ValidationError("--rate must be from 1 to 1000000") }
        }
        try Self.check(maxOutstanding, in: Self.maxOutstandingRange, "--max-outstanding")
        try Self.check(connections, in: Self.connectionsRange, "--connections")
        guard Self.warmupRange.contains(warmup) else { throw ValidationError("--warmup must be from 0 to 600") }
        guard Self.durationRange.contains(duration) else { throw ValidationError("--duration must be from 1 to 3600") }
        try Self.check(deadlineMs, in: Self.deadlineRange, "--deadline-ms")
    }

    private static func check(_ value: Int, in range: ClosedRange<Int>, _ flag: String) throws {
        guard range.contains(value) else {
            throw ValidationError("\(flag) must be from \(range.lowerBound) to \(range.upperBound), is \(value)")
        }
    }

    private static func isTenantStart(_ byte: UInt8) -> Bool {
        (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte)
    }

    /// `host:port`, `[v6]:port` or `unix:PATH`; nil when it is none of them.
    static func parseTarget(_ text: String) -> GatewayClientConfiguration.Target? {
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst("unix:".count))
            return path.isEmpty ? nil : .unixSocket(path: path)
        }
        let host: Substring
        let portText: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]"), text[text.index(after: close)...].hasPrefix(":") else {
                return nil
            }
            host = text[text.index(after: text.startIndex)..<close]
            portText = text[text.index(close, offsetBy: 2)...]
        } else {
            guard let colon = text.lastIndex(of: ":") else { return nil }
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
            guard !host.contains(":") else { return nil }  // IPv6 needs brackets.
        }
        guard !host.isEmpty, let port = Int(portText), (1...65535).contains(port) else { return nil }
        return .host(String(host), port: port)
    }

    // MARK: Run

    func run() async throws {
        let mix = try LoadMix(parsing: self.mix)
        let concurrency = self.concurrency ?? 16
        let deadline = Duration.milliseconds(deadlineMs)
        let showProgress = progress || isatty(STDERR_FILENO) == 1
        let clients = try makeClients()
        let report: LoadReport
        do {
            if createTenant {
                try await Self.createTenantIfMissing(tenant, client: clients[0], deadline: deadline)
            }
            // Opens every connection now, so a wrong address, certificate or token fails here.
            for client in clients { _ = try await client.hello() }
            let fixtures = try await makeFixtures(mix, client: clients[0], deadline: deadline, say: showProgress)

            let start = ContinuousClock.now
            let windowStart = start + .milliseconds(Int(warmup * 1000))
            let window = windowStart..<(windowStart + .milliseconds(Int(duration * 1000)))
            let recorder = LoadRecorder(operations: mix.entries.count, window: window)
            let progressLine = showProgress ? Self.progressLoop(recorder, start: start) : nil
            let windowCPU = Self.windowCPU(window, marked: markWindow)
            if let rate {
                await Self.openLoop(
                    rate: rate, maxOutstanding: maxOutstanding, mix: mix, fixtures: fixtures, clients: clients,
                    start: start, recorder: recorder)
            } else {
                await Self.closedLoop(
                    concurrency: concurrency, mix: mix, fixtures: fixtures, clients: clients, recorder: recorder)
            }
            progressLine?.cancel()
            // The window has closed once the loop returns; this only waits for the task to see it.
            let cpuSeconds = await windowCPU.value
            let (tallies, notSent) = recorder.result
            report = LoadReport(
                settings: LoadSettings(
                    target: target, transport: transport.rawValue, tenant: tenant, rate: rate,
                    concurrency: concurrency, maxOutstanding: maxOutstanding, connections: connections, warmup: warmup,
                    duration: duration, deadlineMilliseconds: deadlineMs, payloadBytes: payloadBytes,
                    batchSize: batchSize, preload: fixtures.keyIDs.count),
                mix: mix, tallies: tallies, notSent: notSent, cpuSeconds: cpuSeconds)
        } catch {
            for client in clients { await client.shutdown(drainLimit: .seconds(1)) }
            throw LoadError("\(error)")
        }
        for client in clients { await client.shutdown(drainLimit: .seconds(1)) }
        print(try json ? report.json() : report.table())
    }

    /// `--connections` clients of one connection each, so the calls really spread over that many
    /// connections (one client's pool opens a second connection only when the first is full).
    /// Retries off: a refusal is a result here.
    private func makeClients() throws -> [GatewayClient] {
        guard let target = Self.parseTarget(target) else { throw LoadError("bad --target") }
        let security: GatewayClientConfiguration.TransportSecurity
        switch transport {
        case .plaintext:
            security = .plaintext
        case .tls:
            security = .tls(
                .init(
                    trustRoots: caFile.map { .pemFile(path: $0) } ?? .system, serverHostnameOverride: serverName,
                    clientCertificateChainPath: clientCert, clientPrivateKeyPath: clientKey))
        }
        let token = try tokenFile.map { path in try APIToken(Self.readToken(path)) }
        // Open loop: every outstanding call may wait for a slot on its connection.
        let queue = min(
            GatewayClientConfiguration.maximumQueuedRequestsLimit,
            max(4096, (rate == nil ? (concurrency ?? 16) : maxOutstanding) / connections + 1))
        return try (0..<connections).map { _ in
            let configuration = GatewayClientConfiguration(
                target: target, transportSecurity: security, apiToken: token, clientName: "hsm-bench-load",
                poolSize: 1, defaultDeadline: .milliseconds(deadlineMs), retryPolicy: .none,
                maximumQueuedRequestsPerConnection: queue)
            do {
                return try GatewayClient(configuration: configuration)
            } catch {
                throw LoadError("client configuration: \(error)")
            }
        }
    }

    /// Creates `tenant`; one that exists already is what `--create-tenant` asks for.
    static func createTenantIfMissing(
        _ tenant: String, client: GatewayClient, deadline: Duration
    ) async throws(GatewayError) {
        do throws(GatewayError) {
            _ = try await client.createTenant(tenant, deadline: deadline)
        } catch {
            guard error.code == .alreadyExists else { throw error }
        }
    }

    /// The token in `path`, without surrounding white space; never printed.
    static func readToken(_ path: String) throws -> String {
        guard let handle = FileHandle(forReadingAtPath: path) else { throw LoadError("cannot read \(path)") }
        defer { try? handle.close() }
        let data = (try? handle.read(upToCount: maximumTokenFileByteCount + 1)) ?? Data()
        guard data.count <= maximumTokenFileByteCount else {
            throw LoadError("\(path) is longer than \(maximumTokenFileByteCount) bytes: not a token file")
        }
        let token = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        guard !token.isEmpty else { throw LoadError("\(path) is empty") }
        return token
    }

    /// Preloaded keys (wrapped only: the plaintexts are not asked for) and, for decrypt-payload,
    /// ciphertexts made under them.
    private func makeFixtures(
        _ mix: LoadMix, client: GatewayClient, deadline: Duration, say: Bool
    ) async throws -> LoadFixtures {
        let context = ["bench": "hsm-bench-load"]
        let payload = [UInt8](repeating: 0x5A, count: payloadBytes)
        var keyIDs: [String] = []
        if mix.operations.contains(where: \.needsPreloadedKeys) {
            if say { Self.printError("hsm-bench load: making \(preload) data keys") }
            while keyIDs.count < preload {
                let keys = try await client.generateDataKeys(
                    tenant: tenant, count: min(Self.preloadBatchSize, preload - keyIDs.count), context: context,
                    includePlaintext: false, deadline: deadline)
                keyIDs += keys.map(\.id)
            }
        }
        var ciphertexts: [[UInt8]] = []
        if mix.operations.contains(.decryptPayload) {
            for index in 0..<LoadFixtures.ciphertextCount {
                ciphertexts.append(
                    try await client.encrypt(
                        tenant: tenant, dataKeyID: keyIDs[index % keyIDs.count], plaintext: payload,
                        context: context, deadline: deadline))
            }
        }
        return LoadFixtures(
            tenant: tenant, context: context, deadline: deadline, batchSize: batchSize, keyIDs: keyIDs,
            ciphertexts: ciphertexts, payload: payload)
    }

    /// `concurrency` workers, each sending its next call when the last one ends, until the window
    /// closes; latency from the send.
    static func closedLoop(
        concurrency: Int, mix: LoadMix, fixtures: LoadFixtures, clients: [GatewayClient], recorder: LoadRecorder
    ) async {
        let end = recorder.window.upperBound
        await withDiscardingTaskGroup { group in
            for worker in 0..<concurrency {
                let client = clients[worker % clients.count]
                group.addTask {
                    while true {
                        let start = ContinuousClock.now
                        guard start < end else { return }
                        await Self.call(
                            mix.pick(), mix: mix, fixtures: fixtures, client: client, start: start, recorder)
                    }
                }
            }
        }
    }

    /// Calls due every 1/`rate` s from `start` until the window closes, each sent at its time
    /// whether or not earlier ones have finished, so a slow gateway cannot slow the schedule
    /// (coordinated omission): latency runs from when the call was due. A call due while
    /// `maxOutstanding` are in flight is not sent, and counted.
    static func openLoop(
        rate: Double, maxOutstanding: Int, mix: LoadMix, fixtures: LoadFixtures, clients: [GatewayClient],
        start: ContinuousClock.Instant, recorder: LoadRecorder
    ) async {
        let end = recorder.window.upperBound
        let outstanding = OutstandingCalls()
        let nanosecondsApart = 1e9 / rate
        await withDiscardingTaskGroup { group in
            var sequence = 0
            while true {
                let due = start + .nanoseconds(Int64((Double(sequence) * nanosecondsApart).rounded()))
                guard due < end else { break }
                sequence += 1
                if due > ContinuousClock.now {
                    try? await Task.sleep(until: due, clock: .continuous)
                }
                guard outstanding.enter(limit: maxOutstanding) else {
                    recorder.recordNotSent(due: due)
                    continue
                }
                let client = clients[sequence % clients.count]
                let index = mix.pick()
                group.addTask {
                    await Self.call(index, mix: mix, fixtures: fixtures, client: client, start: due, recorder)
                    outstanding.leave()
                }
            }
        }
    }

    /// One call of entry `index`, recorded from `start`.
    private static func call(
        _ index: Int, mix: LoadMix, fixtures: LoadFixtures, client: GatewayClient, start: ContinuousClock.Instant,
        _ recorder: LoadRecorder
    ) async {
        do throws(GatewayError) {
            try await fixtures.perform(mix.entries[index].operation, on: client)
            recorder.record(index, start: start, error: nil)
        } catch {
            recorder.record(index, start: start, error: error.loadErrorKey)
        }
    }

    /// A line on stderr each second: the phase, completions and errors in that second, totals.
    static func progressLoop(_ recorder: LoadRecorder, start: ContinuousClock.Instant) -> Task<Void, Never> {
        Task {
            var second = 0
            var last = (completed: 0, failed: 0)
            while !Task.isCancelled {
                second += 1
                do {
                    try await Task.sleep(until: start + .seconds(second), clock: .continuous)
                } catch {
                    return
                }
                let now = recorder.progress
                let phase =
                    ContinuousClock.now < recorder.window.lowerBound
                    ? "warm-up" : ContinuousClock.now < recorder.window.upperBound ? "measuring" : "finishing"
                printError(
                    "[\(second) s] \(phase): \(now.completed - last.completed) ops/s, "
                        + "\(now.failed - last.failed) errors/s (\(now.completed) calls, \(now.failed) errors so far)")
                last = now
            }
        }
    }

    /// The CPU seconds this process uses while `window` is open, read at each bound; with
    /// `marked`, the `--mark-window` line is printed right after each reading.
    static func windowCPU(_ window: Range<ContinuousClock.Instant>, marked: Bool) -> Task<Double, Never> {
        Task {
            try? await Task.sleep(until: window.lowerBound, clock: .continuous)
            let opened = processCPUSeconds()
            if marked { printError(windowOpenLine) }
            try? await Task.sleep(until: window.upperBound, clock: .continuous)
            let closed = processCPUSeconds()
            if marked { printError(windowClosedLine) }
            return closed - opened
        }
    }

    /// User and system CPU time of the whole process (every thread) so far.
    static func processCPUSeconds() -> Double {
        var now = timespec()
        guard clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &now) == 0 else { return 0 }
        return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
    }

    static func printError(_ line: String) {
        FileHandle.standardError.write(Data((line + "\n").utf8))
    }
}

/// The run's settings as the report shows them.
struct LoadSettings {
    var target: String
    var transport: String
    var tenant: String
    var rate: Double?
    var concurrency: Int
    var maxOutstanding: Int
    var connections: Int
    var warmup: Double
    var duration: Double
    var deadlineMilliseconds: Int
    var payloadBytes: Int
    var batchSize: Int
    var preload: Int
}

/// Calls in flight in the open loop.
final class OutstandingCalls: Sendable {
    private let count = Mutex(0)

    /// Takes a place if fewer than `limit` are taken.
    func enter(limit: Int) -> Bool {
        count.withLock { count in
            guard count < limit else { return false }
            count += 1
            return true
        }
    }

    func leave() { count.withLock { $0 -= 1 } }
}

/// Why `load` stopped before measuring (or could not finish): the message names what failed,
/// never a token or key.
struct LoadError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
