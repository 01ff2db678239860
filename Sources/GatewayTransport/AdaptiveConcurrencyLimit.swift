/// How many tenant-scoped requests may run at once, learnt from how long they take: the limit
/// grows while requests finish about as fast as they do on an idle gateway, and shrinks when
/// they slow down, so only as much work is admitted as the real bottleneck (the store's commit
/// path, the HSM) finishes promptly; the rest waits in the fair queue or is shed at once. A
/// gradient limit in the manner of Netflix's concurrency-limits (`Gradient2Limit`), with the
/// no-load latency taken from requests that ran (almost) alone instead of a running minimum.
///
/// Why not a running minimum: under group commit every request's latency grows with the number
/// in flight, so the minimum seen under load is itself a loaded latency and the limit would
/// drift up with nothing pulling it back. Requests admitted with at most `lowLoadInFlight` in
/// flight measure the idle latency; when none has finished for `probeInterval` while the gateway
/// was busy, the limit drops to one until one has (a probe: typically one round trip of the
/// store every 10 s). A fixed limit (`minimum == maximum`) never probes.
///
/// Pure bookkeeping: times are passed in, so tests drive it without a clock.
struct AdaptiveConcurrencyLimit: Sendable {
    struct Settings: Sendable, Hashable {
        /// The least the limit falls to outside a probe.
        var minimum: Int
        /// The most it grows to.
        var maximum: Int
        /// Where it starts.
        var initial: Int
        /// How much slower than on an idle gateway requests may finish before the limit
        /// shrinks: 1.5, so a request that meets a full gateway takes at most about one and a
        /// half times its idle latency once the limit has settled.
        var tolerance: Double = 1.5
        /// A request admitted with at most this many in flight (itself included) measures the
        /// idle latency.
        var lowLoadInFlight: Int = 2
        /// The longest the gateway runs busy without such a measurement before it probes.
        var probeInterval: Duration = .seconds(10)

        init(minimum: Int, maximum: Int, initial: Int? = nil) {
            precondition(minimum >= 1 && maximum >= minimum, "the limit needs 1 <= minimum <= maximum")
            self.minimum = minimum
            self.maximum = maximum
            self.initial = min(max(initial ?? min(16, maximum), minimum), maximum)
        }
    }

    let settings: Settings
    /// The learnt limit (a real number, so that many small steps add up).
    private(set) var estimate: Double
    /// The idle latency in seconds: an average over requests that ran almost alone.
    private(set) var idleLatency: Double?
    /// The recent latency in seconds: an average over every request.
    private(set) var recentLatency: Double?
    /// When the current busy stretch began (nil: not busy since the last measurement).
    private var busySince: Duration?
    /// True while probing: the limit is one until an idle measurement comes in.
    private(set) var probing = false

    init(settings: Settings) {
        self.settings = settings
        self.estimate = Double(settings.initial)
    }

    /// The number of requests that may run at once now.
    var current: Int {
        if probing { return 1 }
        return min(max(Int(estimate.rounded(.down)), settings.minimum), settings.maximum)
    }

    /// A request finished after `latency`; `inFlight` requests (itself included) ran when it was
    /// admitted, `running` still run now, and `now` is the time on the caller's clock.
    mutating func record(latency: Duration, inFlight: Int, running: Int, now: Duration) {
        let sample = max(latency.inSeconds, 1e-6)
        recentLatency = recentLatency.map { $0 * 0.9 + sample * 0.1 } ?? sample
        if inFlight <= settings.lowLoadInFlight {
            idleLatency = idleLatency.map { $0 * 0.8 + sample * 0.2 } ?? sample
            busySince = nil
            probing = false
        } else if busySince == nil {
            busySince = now
        }
        if !probing, settings.minimum < settings.maximum, let since = busySince,
            now - since >= settings.probeInterval
        {
            probing = true
        }
        guard let idle = idleLatency, let recent = recentLatency else { return }
        let gradient = min(1, max(0.5, settings.tolerance * idle / recent))
        let target: Double
        if gradient < 1 {
            target = estimate * gradient
        } else if running + 1 >= Int(estimate / 2) {
            // Grow only when the limit is being used: an idle gateway learns nothing about more.
            target = estimate + 1
        } else {
            return
        }
        estimate = min(max(estimate * 0.8 + target * 0.2, Double(settings.minimum)), Double(settings.maximum))
    }
}

extension Duration {
    /// The duration in seconds, as the limiter's averages keep it.
    var inSeconds: Double { Double(components.seconds) + Double(components.attoseconds) * 1e-18 }
}
