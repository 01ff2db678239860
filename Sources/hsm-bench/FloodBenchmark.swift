import ArgumentParser
import Foundation
import GatewayClient
import GatewayServer
import Synchronization

/// One tenant floods, another works one call at a time: the quiet tenant's DecryptDataKey
/// latency alone (the baseline) and under the flood, and its errors, through the wire protocol
/// to a gateway in this process (issue 12: fairness must hold at any flood rate).
struct FloodBenchmark: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "flood",
        abstract: "A quiet tenant's latency and errors, alone and while another tenant floods the gateway."
    )

    @OptionGroup var gatewayOptions: BenchGatewayOptions

    @Option(help: "Seconds per measurement (1 to 600).")
    var seconds: Double = 10

    @Option(help: "The flooding tenant's concurrent GenerateDataKey loops (1 to 4096).")
    var floodTasks = 960

    @Option(help: "The flooding tenant's client connections (1 to 16).")
    var floodConnections = 8

    @Option(help: "Milliseconds a flooding loop waits after a refusal before sending again (0 to 10000).")
    var retryDelay = 10

    @Option(help: "A fixed admission limit (fair_queue.min_concurrent = max_concurrent), instead of the learnt one.")
    var fixedLimit: Int?

    @Flag(
        help:
            "Run the flooding client as a process of its own at nice 19 (as if on another machine; this one has two cores)."
    )
    var floodProcess = false

    func validate() throws {
        guard (1...600).contains(seconds) else { throw ValidationError("--seconds must be from 1 to 600") }
        guard (1...4096).contains(floodTasks) else { throw ValidationError("--flood-tasks must be from 1 to 4096") }
        guard (1...16).contains(floodConnections) else {
            throw ValidationError("--flood-connections must be from 1 to 16")
        }
        guard (0...10_000).contains(retryDelay) else { throw ValidationError("--retry-delay must be from 0 to 10000") }
        if let fixedLimit, !(1...100_000).contains(fixedLimit) {
            throw ValidationError("--fixed-limit must be from 1 to 100000")
        }
    }

    /// What the flooding loops share: when to stop, and what they got.
    final class FloodState: Sendable {
        let stop = Atomic(false)
        let counts = Mutex<(ok: Int, refused: [String: Int])>((0, [:]))
    }

    /// What the quiet tenant saw.
    struct QuietRun {
        var latencies: [Duration] = []
        var errors: [String: Int] = [:]
    }

    func run() async throws {
        let fixedLimit = self.fixedLimit
        let gateway = try await BenchGateway.start(gatewayOptions, label: "hsm-bench-flood") { configuration in
            if let fixedLimit {
                configuration.fairQueue.maximumConcurrent = fixedLimit
                configuration.fairQueue.minimumConcurrent = fixedLimit
            }
        }
        defer { gateway.stop() }
        // Neither client retries: every refusal is counted, none hidden in a latency.
        let quietClient = try gateway.client(connections: 1, retryPolicy: .none, name: "quiet")
        let floodClient = try gateway.client(connections: floodConnections, retryPolicy: .none, name: "flood")
        _ = try await quietClient.createTenant("quiet")
        _ = try await quietClient.createTenant("flood")
        let context = ["service": "bench"]
        var keys: [String] = []
        for _ in 0..<100 {
            keys.append(
                try await quietClient.generateDataKey(tenant: "quiet", context: context, includePlaintext: false).id)
        }
        let duration = Duration.milliseconds(Int(seconds * 1000))
        let limitText = fixedLimit.map { "fixed limit \($0)" } ?? "learnt limit"
        print(
            "\(gatewayOptions.summary)   \(limitText)"
                + "   flood: \(floodTasks) GenerateDataKey loops on \(floodConnections) connections,"
                + " \(retryDelay) ms after a refusal   \(seconds) s per figure"
        )
        let quietKeys = keys
        func quietRun() async -> QuietRun {
            var run = QuietRun()
            let end = ContinuousClock.now + duration
            var index = 0
            while ContinuousClock.now < end {
                let begin = ContinuousClock.now
                do {
                    _ = try await quietClient.decryptDataKey(
                        tenant: "quiet", id: quietKeys[index % quietKeys.count], context: context)
                    run.latencies.append(ContinuousClock.now - begin)
                } catch {
                    run.errors[Self.describe(error), default: 0] += 1
                }
                index += 1
            }
            return run
        }
        // Warm-up, then the baseline.
        _ = await quietRun()
        let baseline = await quietRun()
        Self.report("quiet DecryptDataKey, alone", baseline)

        let state = FloodState()
        let delay = Duration.milliseconds(retryDelay)
        var child: Process?
        let childOutput = Pipe()
        let flood: Task<Void, Never>
        if floodProcess {
            let tokenFile = gateway.directory + "/flood.token"
            try gateway.adminToken.write(toFile: tokenFile, atomically: true, encoding: .utf8)
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/nice")
            process.arguments =
                [
                    "-n", "19", CommandLine.arguments[0], "flood-load", "--port", "\(gateway.port)", "--token-file",
                    tokenFile, "--tasks", "\(floodTasks)", "--connections", "\(floodConnections)", "--retry-delay",
                    "\(retryDelay)", "--seconds", "\(seconds)",
                ] + (gateway.caCertificatePath.map { ["--ca", $0] } ?? [])
            process.standardOutput = childOutput
            try process.run()
            child = process
            flood = Task {}
        } else {
            flood = Task {
                await Self.flood(
                    floodClient, tasks: floodTasks, delay: delay, state: state)
            }
        }
        // The flood's warm-up (FloodLoad waits as long before it counts).
        try await Task.sleep(for: FloodLoad.warmUp)
        state.counts.withLock { $0 = (0, [:]) }
        let started = ContinuousClock.now
        // The learnt admission limit, as the metrics show it, once a second meanwhile.
        let limits = Task {
            var seen: [Int] = []
            while !Task.isCancelled {
                if let value = Self.metric(gateway, "hsmgw_admission_limit") { seen.append(value) }
                try? await Task.sleep(for: .seconds(1))
            }
            return seen
        }
        let flooded = await quietRun()
        limits.cancel()
        let limitSamples = await limits.value
        var (ok, refused) = state.counts.withLock { ($0.ok, $0.refused) }
        var elapsed = GCMBenchmark.seconds(ContinuousClock.now - started)
        state.stop.store(true, ordering: .relaxed)
        await flood.value
        if let child {
            // Its counts, over its own measured seconds.
            let text = String(decoding: childOutput.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            child.waitUntilExit()
            (ok, refused) = (0, [:])
            elapsed = seconds
            for line in text.split(separator: "\n") {
                let parts = line.split(separator: "=", maxSplits: 1).map(String.init)
                guard parts.count == 2, let count = Int(parts[1]) else { continue }
                if parts[0] == "ok" { ok = count } else { refused[parts[0], default: 0] += count }
            }
        }
        Self.report("quiet DecryptDataKey, flooded", flooded)
        let refusals = refused.sorted { $0.key < $1.key }.map {
            "\($0.key): \(GCMBenchmark.format(Double($0.value) / elapsed))/s"
        }
        print(
            "flood GenerateDataKey: \(GCMBenchmark.format(Double(ok) / elapsed)) ok/s   refused: "
                + (refusals.isEmpty ? "none" : refusals.joined(separator: ", "))
        )
        print(
            "admission limit while flooded (once a second): \(limitSamples.map(String.init).joined(separator: " "))"
                + "   connection read pauses: \(Self.metric(gateway, "hsmgw_connection_read_pauses_total") ?? 0)"
        )
        await quietClient.shutdown()
        await floodClient.shutdown()
        await gateway.shutdown()
    }

    /// Loops of GenerateDataKey on tenant "flood" until `state.stop`, each waiting `delay` after
    /// a refusal.
    static func flood(
        _ client: GatewayClient, tasks: Int, delay: Duration, state: FloodState
    ) async {
        await withTaskGroup(of: Void.self) { group in
            for _ in 0..<tasks {
                group.addTask {
                    while !state.stop.load(ordering: .relaxed) {
                        do {
                            _ = try await client.generateDataKey(
                                tenant: "flood", context: ["service": "bench"], includePlaintext: false)
                            state.counts.withLock { $0.ok += 1 }
                        } catch {
                            state.counts.withLock { $0.refused[Self.describe(error), default: 0] += 1 }
                            try? await Task.sleep(for: delay)
                        }
                    }
                }
            }
        }
    }

    /// A metric of the gateway without labels, as its registry shows it now.
    static func metric(_ gateway: BenchGateway, _ name: String) -> Int? {
        var buffer: [UInt8] = []
        gateway.app.metricsRegistry.emit(into: &buffer)
        let line = String(decoding: buffer, as: UTF8.self).split(separator: "\n").first { $0.hasPrefix(name + " ") }
        return line.flatMap { Double($0.split(separator: " ").last ?? "") }.map { Int($0) }
    }

    /// The code and reason of a gateway error (the type of any other).
    static func describe(_ error: any Error) -> String {
        guard let error = error as? GatewayError else { return "\(type(of: error))" }
        return "\(error.code) \(error.reason)"
    }

    static func report(_ name: String, _ run: QuietRun) {
        let measurement = LoadMeasurement(elapsed: .seconds(1), latencies: run.latencies)
        let errors = run.errors.isEmpty ? "0" : run.errors.map { "\($0.key) x\($0.value)" }.joined(separator: ", ")
        print(
            name.padding(toLength: 32, withPad: " ", startingAt: 0)
                + "\(run.latencies.count) calls   p50 \(measurement.percentile(0.5))   p99 \(measurement.percentile(0.99))"
                + "   errors: \(errors)"
        )
    }
}

/// The flooding side of `flood` as a process of its own: GenerateDataKey loops on tenant "flood"
/// of a running gateway; after a warm-up it counts for `--seconds` and prints `ok=N` and one
/// `<code> <reason>=N` line per kind of refusal.
struct FloodLoad: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "flood-load", abstract: "The flooding client of `flood`, run by it as a process of its own.",
        shouldDisplay: false)
    /// How long the loops run before counting.
    static let warmUp: Duration = .seconds(2)

    @Option var port: Int
    @Option var tokenFile: String
    @Option var ca: String?
    @Option var tasks = 960
    @Option var connections = 8
    @Option var retryDelay = 10
    @Option var seconds: Double = 10

    func validate() throws {
        guard (1...65_535).contains(port), (1...4096).contains(tasks), (1...16).contains(connections),
            (0...10_000).contains(retryDelay), (1...600).contains(seconds)
        else { throw ValidationError("an option is out of range") }
    }

    func run() async throws {
        let token = try String(contentsOfFile: tokenFile, encoding: .utf8).trimmingCharacters(
            in: .whitespacesAndNewlines)
        var configuration = GatewayClientConfiguration(
            target: .host("127.0.0.1", port: port),
            transportSecurity: ca.map {
                .tls(.init(trustRoots: .pemFile(path: $0), serverHostnameOverride: "localhost"))
            }
                ?? .plaintext,
            apiToken: APIToken(token), clientName: "flood", poolSize: connections, defaultDeadline: .seconds(60))
        configuration.retryPolicy = .none
        let client = try GatewayClient(configuration: configuration)
        let state = FloodBenchmark.FloodState()
        let flood = Task {
            await FloodBenchmark.flood(
                client, tasks: tasks, delay: .milliseconds(retryDelay), state: state)
        }
        try await Task.sleep(for: Self.warmUp)
        state.counts.withLock { $0 = (0, [:]) }
        try await Task.sleep(for: .milliseconds(Int(seconds * 1000)))
        let (ok, refused) = state.counts.withLock { ($0.ok, $0.refused) }
        state.stop.store(true, ordering: .relaxed)
        await flood.value
        print("ok=\(ok)")
        for (kind, count) in refused { print("\(kind)=\(count)") }
        await client.shutdown()
    }
}
