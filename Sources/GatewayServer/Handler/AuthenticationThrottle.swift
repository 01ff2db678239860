import Synchronization

/// Refused authentications per source address, as a token bucket: an address may fail `burst`
/// times in a row, and earns one more try every `60 / perMinute` seconds. While its bucket is
/// empty its Hellos are answered RESOURCE_EXHAUSTED (`AUTH_THROTTLED`) without looking at the
/// credentials, so a client guessing or replaying tokens costs neither a store read nor an audit
/// record per attempt; the audit log gets one record when an address starts being throttled.
///
/// Only failures count: an address that authenticates keeps its bucket. Behind a proxy or on a
/// Unix socket every client shares one address; raise the limit there, or turn it off.
final class AuthenticationThrottle: Sendable {
    /// Addresses tracked at most. Beyond it, the entries whose buckets are full again go first,
    /// then the ones touched longest ago (never the one just failing), down to nine tenths (so that eviction runs once per
    /// thousand new addresses, not on each): memory stays bounded whatever the address spread.
    static let maximumTrackedAddresses = 10_000

    private struct Bucket {
        var tokens: Double
        var updatedAt: ContinuousClock.Instant
    }

    let limit: AuthSettings.FailureLimit
    private let now: @Sendable () -> ContinuousClock.Instant
    private let buckets = Mutex<[String: Bucket]>([:])

    init(limit: AuthSettings.FailureLimit, now: @escaping @Sendable () -> ContinuousClock.Instant = { .now }) {
        self.limit = limit
        self.now = now
    }

    /// How long `address` must wait before its next try counts; nil when it may try now.
    func waitBeforeNextTry(_ address: String) -> Duration? {
        let now = self.now()
        return buckets.withLock { buckets -> Duration? in
            guard var bucket = buckets[address] else { return nil }
            refill(&bucket, at: now)
            buckets[address] = bucket
            guard bucket.tokens < 1 else { return nil }
            return .seconds((1 - bucket.tokens) * 60 / Double(limit.perMinute))
        }
    }

    /// Counts a refused authentication from `address`; true when it used the address's last try
    /// (it is throttled from now on).
    func recordFailure(_ address: String) -> Bool {
        let now = self.now()
        return buckets.withLock { buckets -> Bool in
            var bucket = buckets[address] ?? Bucket(tokens: Double(limit.burst), updatedAt: now)
            refill(&bucket, at: now)
            let before = bucket.tokens
            bucket.tokens = max(0, bucket.tokens - 1)
            buckets[address] = bucket
            if buckets.count > Self.maximumTrackedAddresses { evict(&buckets, keeping: address, at: now) }
            return before >= 1 && bucket.tokens < 1
        }
    }

    /// Addresses tracked now (for tests).
    var trackedAddresses: Int { buckets.withLock { $0.count } }

    private func refill(_ bucket: inout Bucket, at now: ContinuousClock.Instant) {
        let elapsed = now - bucket.updatedAt
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        bucket.tokens = min(Double(limit.burst), bucket.tokens + max(0, seconds) * Double(limit.perMinute) / 60)
        bucket.updatedAt = now
    }

    private func evict(_ buckets: inout [String: Bucket], keeping current: String, at now: ContinuousClock.Instant) {
        for (address, var bucket) in buckets where address != current {
            refill(&bucket, at: now)
            if bucket.tokens >= Double(limit.burst) { buckets[address] = nil }
        }
        let excess = buckets.count - Self.maximumTrackedAddresses * 9 / 10
        if excess > 0 {
            let oldest = buckets.filter { $0.key != current }.sorted { $0.value.updatedAt < $1.value.updatedAt }
            for (address, _) in oldest.prefix(excess) { buckets[address] = nil }
        }
    }

    /// The address part of a transport peer description (`1.2.3.4:5678`, `[::1]:5678`, `unix`):
    /// the port changes with every connection, the address does not.
    static func sourceAddress(_ remote: String) -> String {
        if remote.hasPrefix("["), let end = remote.firstIndex(of: "]") {
            return String(remote[remote.index(after: remote.startIndex)..<end])
        }
        if let colon = remote.lastIndex(of: ":") { return String(remote[..<colon]) }
        return remote
    }
}
