import Foundation
import Histogram
import Synchronization

/// What `load` counts while it runs: per operation, a latency histogram of the successful calls
/// and the failed calls by status; for the progress line, everything completed so far. Calls that
/// started (or were due) outside the measured window count for progress only.
///
/// One lock for every worker: a few microseconds per call against calls of a millisecond or more.
final class LoadRecorder: Sendable {
    /// The longest latency the histograms hold (1 hour, the client's longest deadline); longer
    /// values are recorded as this.
    static let highestTrackableMicroseconds: UInt64 = 3_600_000_000

    struct Tally: Sendable {
        var latencies = Histogram<UInt64>(
            lowestDiscernibleValue: 1,
            highestTrackableValue: LoadRecorder.highestTrackableMicroseconds,
            numberOfSignificantValueDigits: .three)
        var errors: [String: Int] = [:]
        var errorCount: Int { errors.values.reduce(0, +) }
    }

    private struct State {
        var tallies: [Tally]
        /// Every completion, window or not, for the progress line.
        var completed = 0
        var failed = 0
        /// Sends the open loop skipped in the window because the outstanding cap was reached.
        var notSent = 0
    }

    /// Start and end of the measured window.
    let window: Range<ContinuousClock.Instant>
    private let state: Mutex<State>

    init(operations: Int, window: Range<ContinuousClock.Instant>) {
        self.window = window
        self.state = Mutex(State(tallies: Array(repeating: Tally(), count: operations)))
    }

    /// Records one call of operation `index` that started (or was due) at `start`: `error` is the
    /// status key of a failure, nil for a success.
    func record(_ index: Int, start: ContinuousClock.Instant, error: String?) {
        let end = ContinuousClock.now
        let inWindow = window.contains(start)
        let microseconds = Self.microseconds(end - start)
        state.withLock { state in
            state.completed += 1
            if error != nil { state.failed += 1 }
            guard inWindow else { return }
            if let error {
                state.tallies[index].errors[error, default: 0] += 1
            } else {
                _ = state.tallies[index].latencies.record(min(microseconds, Self.highestTrackableMicroseconds))
            }
        }
    }

    /// Counts one send the open loop skipped because `--max-outstanding` calls were in flight.
    func recordNotSent(due: ContinuousClock.Instant) {
        guard window.contains(due) else { return }
        state.withLock { $0.notSent += 1 }
    }

    /// Completions and failures so far, for the progress line.
    var progress: (completed: Int, failed: Int) { state.withLock { ($0.completed, $0.failed) } }

    /// The window's tallies, in mix order, and the skipped sends.
    var result: (tallies: [Tally], notSent: Int) { state.withLock { ($0.tallies, $0.notSent) } }

    /// Whole microseconds, at least 1 (the histogram's lowest value).
    static func microseconds(_ duration: Duration) -> UInt64 {
        let (seconds, attoseconds) = duration.components
        guard seconds >= 0, duration > .zero else { return 1 }
        return max(1, UInt64(seconds) &* 1_000_000 &+ UInt64(attoseconds / 1_000_000_000_000))
    }
}

/// The end-of-run figures, as the table and as `--json` (fields in docs/benchmarks.md).
struct LoadReport: Encodable {
    struct Latency: Encodable {
        var p50: Double
        var p90: Double
        var p99: Double
        var p999: Double
        var max: Double
        var mean: Double

        enum CodingKeys: String, CodingKey {
            case p50, p90, p99
            case p999 = "p99.9"
            case max, mean
        }

        /// Milliseconds from a histogram of microseconds; nil when it is empty.
        init?(_ histogram: Histogram<UInt64>) {
            guard histogram.totalCount > 0 else { return nil }
            func milliseconds(_ value: UInt64) -> Double { Double(value) / 1000 }
            p50 = milliseconds(histogram.valueAtPercentile(50))
            p90 = milliseconds(histogram.valueAtPercentile(90))
            p99 = milliseconds(histogram.valueAtPercentile(99))
            p999 = milliseconds(histogram.valueAtPercentile(99.9))
            max = milliseconds(histogram.max)
            mean = histogram.mean.rounded() / 1000
        }
    }

    struct Operation: Encodable {
        /// The weight in the mix (nil for the total).
        var weight: Int?
        /// Successful calls in the window.
        var count: Int
        /// Successful calls per second of the window.
        var opsPerSecond: Double
        /// Latency of the successful calls (nil when there were none).
        var latencyMs: Latency?
        /// Failed calls in the window.
        var errorCount: Int
        /// Failed calls by status name (and reason).
        var errors: [String: Int]

        init(weight: Int?, tally: LoadRecorder.Tally, seconds: Double) {
            self.weight = weight
            self.count = Int(tally.latencies.totalCount)
            self.opsPerSecond = (Double(count) / seconds * 10).rounded() / 10
            self.latencyMs = Latency(tally.latencies)
            self.errorCount = tally.errorCount
            self.errors = tally.errors
        }
    }

    var target: String
    var transport: String
    var tenant: String
    /// "closed" (`--concurrency`) or "open" (`--rate`).
    var mode: String
    var concurrency: Int?
    var rate: Double?
    var maxOutstanding: Int?
    var connections: Int
    var warmupSeconds: Double
    var durationSeconds: Double
    var deadlineMs: Int
    var payloadBytes: Int
    var batchSize: Int
    var preload: Int
    /// Open loop: sends due in the window but skipped because the cap was reached.
    var notSent: Int
    /// CPU time (user and system, every thread) this process used while the window was open:
    /// whether the load generator itself was short of CPU.
    var cpuSeconds: Double
    var operations: [String: Operation]
    var total: Operation
    /// Mix order, for the table.
    private var order: [String]

    enum CodingKeys: String, CodingKey {
        case target, transport, tenant, mode, concurrency, rate, maxOutstanding, connections, warmupSeconds,
            durationSeconds, deadlineMs, payloadBytes, batchSize, preload, notSent, cpuSeconds, operations, total
    }

    init(settings: LoadSettings, mix: LoadMix, tallies: [LoadRecorder.Tally], notSent: Int, cpuSeconds: Double) {
        target = settings.target
        transport = settings.transport
        tenant = settings.tenant
        mode = settings.rate == nil ? "closed" : "open"
        concurrency = settings.rate == nil ? settings.concurrency : nil
        rate = settings.rate
        maxOutstanding = settings.rate == nil ? nil : settings.maxOutstanding
        connections = settings.connections
        warmupSeconds = settings.warmup
        durationSeconds = settings.duration
        deadlineMs = settings.deadlineMilliseconds
        payloadBytes = settings.payloadBytes
        batchSize = settings.batchSize
        preload = settings.preload
        self.notSent = notSent
        self.cpuSeconds = (cpuSeconds * 1000).rounded() / 1000
        var operations: [String: Operation] = [:]
        var all = LoadRecorder.Tally()
        for (index, entry) in mix.entries.enumerated() {
            operations[entry.operation.rawValue] = Operation(
                weight: entry.weight, tally: tallies[index], seconds: settings.duration)
            all.latencies.add(tallies[index].latencies)
            all.errors.merge(tallies[index].errors, uniquingKeysWith: +)
        }
        self.operations = operations
        self.total = Operation(weight: nil, tally: all, seconds: settings.duration)
        self.order = mix.operations.map(\.rawValue)
    }

    /// One JSON object, keys sorted.
    func json() throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return String(decoding: try encoder.encode(self), as: UTF8.self)
    }

    /// The readable table: a heading, one row per operation and the total, then the errors.
    func table() -> String {
        var lines: [String] = []
        let shape =
            mode == "closed"
            ? "closed loop, \(concurrency ?? 0) worker\(concurrency == 1 ? "" : "s")"
            : "open loop, \(Self.number(rate ?? 0)) req/s, at most \(maxOutstanding ?? 0) outstanding"
        lines.append(
            "target \(target) (\(transport)), tenant \(tenant), \(shape) over \(connections) connection"
                + "\(connections == 1 ? "" : "s"), warm-up \(Self.number(warmupSeconds)) s, "
                + "measured \(Self.number(durationSeconds)) s, deadline \(deadlineMs) ms")
        let header = ["operation", "count", "ops/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "errors"]
        var rows: [[String]] = [header]
        for name in order + ["total"] {
            guard let operation = name == "total" ? total : operations[name] else { continue }
            let latency = operation.latencyMs
            let cells = [latency?.p50, latency?.p90, latency?.p99, latency?.p999, latency?.max].map { value in
                value.map { String(format: "%.3f", $0) } ?? "-"
            }
            rows.append(
                [name, String(operation.count), String(format: "%.1f", operation.opsPerSecond)] + cells + [
                    String(operation.errorCount)
                ])
        }
        let widths = header.indices.map { column in rows.map { $0[column].count }.max() ?? 0 }
        for row in rows {
            let cells = row.enumerated().map { column, cell in
                let pad = String(repeating: " ", count: widths[column] - cell.count)
                return column == 0 ? cell + pad : pad + cell
            }
            lines.append(cells.joined(separator: "  "))
        }
        for name in order {
            guard let errors = operations[name]?.errors, !errors.isEmpty else { continue }
            for (status, count) in errors.sorted(by: { $0.value > $1.value }) {
                lines.append("errors: \(name) \(status) \(count)")
            }
        }
        if mode == "open" {
            lines.append("not sent (\(maxOutstanding ?? 0) outstanding, the cap): \(notSent)")
        }
        let calls = total.count + total.errorCount
        lines.append(
            "load generator CPU in the window: \(String(format: "%.3f", cpuSeconds)) s"
                + (calls > 0 ? String(format: " (%.0f µs per call)", cpuSeconds * 1e6 / Double(calls)) : ""))
        return lines.joined(separator: "\n")
    }

    /// `5` for whole numbers, `2.5` otherwise.
    static func number(_ value: Double) -> String {
        value == value.rounded() ? String(Int(value)) : String(value)
    }
}
