import Foundation

/// Operations timed from several concurrent tasks for a fixed time: what `keys` and `wire` report.
struct LoadMeasurement {
    var elapsed: Duration
    var latencies: [Duration]

    /// Runs `operation` from `tasks` tasks, each in a loop, until `duration` has passed.
    static func run(
        _ duration: Duration,
        tasks: Int,
        _ operation: @escaping @Sendable () async throws -> Void
    ) async throws -> LoadMeasurement {
        let started = ContinuousClock.now
        let deadline = started.advanced(by: duration)
        let latencies = try await withThrowingTaskGroup(of: [Duration].self) { group in
            for _ in 0..<tasks {
                group.addTask {
                    var mine: [Duration] = []
                    while ContinuousClock.now < deadline {
                        let begin = ContinuousClock.now
                        try await operation()
                        mine.append(ContinuousClock.now - begin)
                    }
                    return mine
                }
            }
            return try await group.reduce(into: [Duration]()) { $0 += $1 }
        }
        return LoadMeasurement(elapsed: ContinuousClock.now - started, latencies: latencies)
    }

    /// Completed operations per second over the whole run.
    var opsPerSecond: Double { Double(latencies.count) / GCMBenchmark.seconds(elapsed) }

    /// The latency at quantile `p` (0.5 for the median) in milliseconds; nil when nothing completed.
    func milliseconds(atQuantile p: Double) -> Double? {
        let sorted = latencies.sorted()
        guard !sorted.isEmpty else { return nil }
        return GCMBenchmark.seconds(sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))]) * 1000
    }

    /// The latency at quantile `p` (0.5 for the median), in milliseconds with two decimals.
    func percentile(_ p: Double) -> String {
        milliseconds(atQuantile: p).map { String(format: "%.2f ms", $0) } ?? "-"
    }

    /// Prints ops/s, p50 and p99 on one line.
    func report(_ name: String, concurrency: Int? = nil) {
        let rate = opsPerSecond
        let label = name.padding(toLength: 16, withPad: " ", startingAt: 0) + (concurrency.map { " x\($0)\t" } ?? " ")
        print("\(label)\(GCMBenchmark.format(rate)) ops/s   p50 \(percentile(0.5))   p99 \(percentile(0.99))")
    }
}
