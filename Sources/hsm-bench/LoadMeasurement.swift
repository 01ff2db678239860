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

    /// The latency at quantile `p` (0.5 for the median), in milliseconds with two decimals.
    func percentile(_ p: Double) -> String {
        let sorted = latencies.sorted()
        guard !sorted.isEmpty else { return "-" }
        let value = sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))]
        return String(format: "%.2f ms", GCMBenchmark.seconds(value) * 1000)
    }

    /// Prints ops/s, p50 and p99 on one line.
    func report(_ name: String, concurrency: Int? = nil) {
        let sorted = latencies
        let rate = Double(sorted.count) / GCMBenchmark.seconds(elapsed)
        let label = name.padding(toLength: 16, withPad: " ", startingAt: 0) + (concurrency.map { " x\($0)\t" } ?? " ")
        print("\(label)\(GCMBenchmark.format(rate)) ops/s   p50 \(percentile(0.5))   p99 \(percentile(0.99))")
    }
}
