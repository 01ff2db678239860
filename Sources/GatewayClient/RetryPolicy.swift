import GatewayWire

/// When and how often the client tries a call again, in the manner of gRPC's retry policy:
/// exponential backoff with full jitter, capped, and never beyond the call's deadline.
///
/// What is retried is `RetryPolicy.isRetryable`: calls that provably did not run (the
/// connection could not be opened or went away before the request left; the server refused it
/// before any work), and `UNAVAILABLE` for idempotent calls: methods that `Method.isIdempotent`
/// marks, and calls that carry an idempotency key. A non-idempotent call that may have run is
/// never sent twice.
public struct RetryPolicy: Sendable, Hashable {
    /// The most attempts one call may make, the first included. Ten attempts at the default
    /// backoff already spans tens of seconds; more only hides an outage from the caller.
    public static let maximumAttemptsLimit = 10
    /// The longest backoff accepted: longer waits belong to the caller's own scheduling.
    public static let maximumBackoffLimit: Duration = .seconds(60)

    /// Attempts per call, the first included: 1 means no retries (1 to `maximumAttemptsLimit`).
    public var maximumAttempts: Int
    /// The backoff ceiling before the first retry (greater than zero).
    public var initialBackoff: Duration
    /// The largest backoff ceiling (at least `initialBackoff`, at most `maximumBackoffLimit`).
    public var maximumBackoff: Duration
    /// The factor by which the ceiling grows per retry (1 to 10).
    public var backoffMultiplier: Double

    /// The protocol's recommendation: five attempts, 100 ms doubling up to 5 s.
    public init(
        maximumAttempts: Int = 5,
        initialBackoff: Duration = .milliseconds(100),
        maximumBackoff: Duration = .seconds(5),
        backoffMultiplier: Double = 2
    ) {
        self.maximumAttempts = maximumAttempts
        self.initialBackoff = initialBackoff
        self.maximumBackoff = maximumBackoff
        self.backoffMultiplier = backoffMultiplier
    }

    /// The default policy.
    public static let `default` = RetryPolicy()
    /// One attempt per call.
    public static let none = RetryPolicy(maximumAttempts: 1)

    /// Checks the ranges above.
    public func validate() throws(GatewayClientConfigurationError) {
        guard (1...Self.maximumAttemptsLimit).contains(maximumAttempts) else {
            throw .init(
                .outOfRange,
                field: "retryPolicy.maximumAttempts",
                "must be 1 to \(Self.maximumAttemptsLimit), is \(maximumAttempts)"
            )
        }
        guard initialBackoff > .zero else {
            throw .init(.outOfRange, field: "retryPolicy.initialBackoff", "must be greater than zero")
        }
        guard maximumBackoff >= initialBackoff, maximumBackoff <= Self.maximumBackoffLimit else {
            throw .init(
                .outOfRange,
                field: "retryPolicy.maximumBackoff",
                "must be between initialBackoff and \(Self.maximumBackoffLimit)"
            )
        }
        guard backoffMultiplier >= 1, backoffMultiplier <= 10 else {
            throw .init(.outOfRange, field: "retryPolicy.backoffMultiplier", "must be 1 to 10")
        }
    }

    /// The largest backoff before retry `retry` (1 for the first retry):
    /// `min(initialBackoff × multiplier^(retry−1), maximumBackoff)`.
    public func backoffCeiling(beforeRetry retry: Int) -> Duration {
        precondition(retry >= 1, "retries are numbered from 1")
        let initial = initialBackoff.secondsAsDouble
        let ceiling = min(initial * pow(backoffMultiplier, Double(retry - 1)), maximumBackoff.secondsAsDouble)
        return .seconds(ceiling)
    }

    /// The backoff before retry `retry`: uniformly random between zero and the ceiling ("full
    /// jitter"), so clients that failed together do not come back together. `random` draws a
    /// number in the half-open unit interval; tests pass a fixed one.
    public func backoff(beforeRetry retry: Int, unitRandom: () -> Double = { Double.random(in: 0..<1) }) -> Duration {
        let fraction = min(max(unitRandom(), 0), 1)
        return .seconds(backoffCeiling(beforeRetry: retry).secondsAsDouble * fraction)
    }

    /// Whether a call of `method` that failed with `error` may be tried again
    /// (`docs/protocol.md`, section 13):
    /// - `UNAVAILABLE` (from the server or the client): when the request provably never
    ///   reached the server, or the method is idempotent, or the call carries an idempotency key;
    ///   never after the client was shut down;
    /// - `ABORTED`, and `RESOURCE_EXHAUSTED` with `OVERLOADED`, `TOO_MANY_REQUESTS_IN_FLIGHT` or
    ///   `TOO_MANY_CONNECTIONS` (or `TOO_MANY_CONNECTIONS_FROM_ADDRESS`) from the server: the work
    ///   did not happen, so always;
    /// - nothing else (deadlines and cancellations included: the caller's time is up).
    public static func isRetryable(_ error: GatewayError, method: Method, hasIdempotencyKey: Bool) -> Bool {
        switch error.code {
        case .unavailable:
            guard error.reason != GatewayError.LocalReason.clientShutDown || error.origin == .server else {
                return false
            }
            return error.requestProvablyNotProcessed || method.isIdempotent || hasIdempotencyKey
        case .aborted, .resourceExhausted:
            return error.origin == .server && error.requestProvablyNotProcessed
        default:
            return false
        }
    }
}

/// `x^y` without Foundation.
private func pow(_ base: Double, _ exponent: Double) -> Double {
    var result = 1.0
    var remaining = Int(exponent)
    while remaining > 0 {
        result *= base
        remaining -= 1
    }
    return result
}

extension Duration {
    /// The duration in seconds, as a `Double`.
    var secondsAsDouble: Double {
        let (seconds, attoseconds) = components
        return Double(seconds) + Double(attoseconds) / 1e18
    }

    /// Whole milliseconds, rounded up so a positive duration never becomes 0 ("no deadline").
    var millisecondsRoundedUp: UInt64 {
        let (seconds, attoseconds) = components
        guard seconds >= 0, attoseconds >= 0, self > .zero else { return 0 }
        let attosecondsPerMillisecond: Int64 = 1_000_000_000_000_000
        let fraction = (attoseconds + attosecondsPerMillisecond - 1) / attosecondsPerMillisecond
        return UInt64(seconds).multipliedReportingOverflow(by: 1000).partialValue + UInt64(fraction)
    }
}
