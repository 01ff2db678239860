import GatewayTransport
import Synchronization

/// Refused authentications per source address (``SourceAddressGroup``: an IPv4 address, an IPv6
/// /64), as a token bucket: an address holds `burst` tries and earns one more every
/// `60 / perMinute` seconds.
///
/// A Hello takes a try when it starts, before its credentials are looked at, and holds it while
/// they are checked; a Hello that succeeds gives it back, one that fails (or is cancelled, or whose
/// connection goes away, while the check runs) keeps it spent. So Hellos sent in parallel cannot
/// all pass a check made before any of them has failed: at most `burst` Hellos of one address are
/// checked at once. When the address's tries are all held by Hellos still being checked, the next
/// Hello waits for one of them to finish (it may give its try back) instead of being refused, so a
/// client opening many connections at once with good credentials is only slowed; when none is left
/// and none is being checked, the Hello is answered RESOURCE_EXHAUSTED (`AUTH_THROTTLED`) at once,
/// without looking at its credentials, so a client guessing or replaying tokens costs neither a
/// store read nor an audit record per attempt. The audit log gets one record when an address
/// starts being throttled (again only once its bucket has refilled completely).
///
/// Behind a proxy or on a Unix socket every client shares one address; raise the limit there, or
/// turn it off.
final class AuthenticationThrottle: Sendable {
    /// Addresses tracked at most. Beyond it, the entries whose buckets are full again go first,
    /// then the ones touched longest ago (never one with a Hello being checked or waiting), down
    /// to nine tenths (so that eviction runs once per thousand new addresses, not on each): memory
    /// stays bounded whatever the address spread.
    static let maximumTrackedAddresses = 10_000

    /// What a Hello may do.
    enum Admission: Sendable {
        /// Check the credentials; the Hello holds one of its address's tries until it settles
        /// the ticket (a ticket dropped unsettled counts as a failure).
        case admitted(Ticket)
        /// Refuse at once. `retryAfter`: when the next try is earned. `startsThrottling`: this is
        /// the first Hello of the address refused since its bucket was last full (audit it).
        case throttled(retryAfter: Duration, startsThrottling: Bool)
        /// The Hello's task was cancelled while it waited for another Hello of its address.
        case cancelled
    }

    /// One admitted Hello's try.
    final class Ticket: Sendable {
        private let throttle: AuthenticationThrottle
        let address: SourceAddressGroup
        private let settled = Atomic(false)

        fileprivate init(throttle: AuthenticationThrottle, address: SourceAddressGroup) {
            self.throttle = throttle
            self.address = address
        }

        /// Ends the check: `refund` gives the try back (the Hello succeeded, or was refused
        /// before any credential was looked at), otherwise it stays spent. Only the first call
        /// counts.
        func settle(refund: Bool) {
            guard !settled.exchange(true, ordering: .acquiringAndReleasing) else { return }
            throttle.settle(address, refund: refund)
        }

        deinit {
            // A Hello that never settled (its task ended some other way) failed.
            settle(refund: false)
        }
    }

    private struct Waiter {
        let id: UInt64
        let continuation: CheckedContinuation<Admission, Never>
    }

    private struct Bucket {
        /// Tries left, not counting those held by Hellos being checked.
        var tokens: Double
        var updatedAt: ContinuousClock.Instant
        /// Hellos holding a try now.
        var checking = 0
        /// Hellos waiting for one of those to finish, oldest first.
        var waiters: [Waiter] = []
        /// A refusal has been reported as the start of throttling since the bucket was last full.
        var throttling = false

        var isIdle: Bool { checking == 0 && waiters.isEmpty }
    }

    private struct State {
        var buckets: [SourceAddressGroup: Bucket] = [:]
        var nextWaiterID: UInt64 = 1
    }

    let limit: AuthSettings.FailureLimit
    private let now: @Sendable () -> ContinuousClock.Instant
    private let state = Mutex(State())

    init(limit: AuthSettings.FailureLimit, now: @escaping @Sendable () -> ContinuousClock.Instant = { .now }) {
        self.limit = limit
        self.now = now
    }

    /// Takes a try for a Hello from `address`, waiting while all of the address's tries are held
    /// by Hellos being checked.
    func admit(_ address: SourceAddressGroup) async -> Admission {
        let id = state.withLock { state in
            defer { state.nextWaiterID += 1 }
            return state.nextWaiterID
        }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Admission, Never>) in
                let now = self.now()
                let immediate = state.withLock { state -> Admission? in
                    var bucket = state.buckets[address] ?? Bucket(tokens: Double(limit.burst), updatedAt: now)
                    refill(&bucket, at: now)
                    let admission: Admission?
                    if bucket.waiters.isEmpty, bucket.tokens >= 1 {
                        bucket.tokens -= 1
                        bucket.checking += 1
                        admission = .admitted(Ticket(throttle: self, address: address))
                    } else if bucket.checking > 0 {
                        if Task.isCancelled {
                            admission = .cancelled
                        } else {
                            bucket.waiters.append(Waiter(id: id, continuation: continuation))
                            admission = nil
                        }
                    } else {
                        admission = throttled(&bucket)
                    }
                    state.buckets[address] = bucket
                    if state.buckets.count > Self.maximumTrackedAddresses {
                        evict(&state.buckets, keeping: address, at: now)
                    }
                    return admission
                }
                if let immediate { continuation.resume(returning: immediate) }
            }
        } onCancel: {
            let waiter = state.withLock { state -> Waiter? in
                guard let index = state.buckets[address]?.waiters.firstIndex(where: { $0.id == id }) else {
                    return nil
                }
                return state.buckets[address]?.waiters.remove(at: index)
            }
            waiter?.continuation.resume(returning: .cancelled)
        }
    }

    /// Addresses tracked now (for tests).
    var trackedAddresses: Int { state.withLock { $0.buckets.count } }

    /// Hellos of `address` waiting for a try now (for tests).
    func waiting(_ address: SourceAddressGroup) -> Int {
        state.withLock { $0.buckets[address]?.waiters.count ?? 0 }
    }

    /// Tries `address` has left now, not counting those held by Hellos being checked (for tests).
    func triesLeft(_ address: SourceAddressGroup) -> Double {
        let now = self.now()
        return state.withLock { state in
            guard var bucket = state.buckets[address] else { return Double(limit.burst) }
            refill(&bucket, at: now)
            return bucket.tokens
        }
    }

    private func settle(_ address: SourceAddressGroup, refund: Bool) {
        let now = self.now()
        let resumptions = state.withLock { state -> [(Waiter, Admission)] in
            guard var bucket = state.buckets[address] else { return [] }
            refill(&bucket, at: now)
            bucket.checking -= 1
            if refund { bucket.tokens = min(Double(limit.burst), bucket.tokens + 1) }
            // Waiters in order: admitted while tries are left; refused once none is left and no
            // Hello that could give one back is being checked.
            var resumptions: [(Waiter, Admission)] = []
            while let waiter = bucket.waiters.first {
                if bucket.tokens >= 1 {
                    bucket.tokens -= 1
                    bucket.checking += 1
                    resumptions.append((waiter, .admitted(Ticket(throttle: self, address: address))))
                } else if bucket.checking == 0 {
                    resumptions.append((waiter, throttled(&bucket)))
                } else {
                    break
                }
                bucket.waiters.removeFirst()
            }
            if bucket.isIdle, bucket.tokens >= Double(limit.burst) {
                // Nothing to remember about an address whose bucket is full.
                state.buckets[address] = nil
            } else {
                state.buckets[address] = bucket
            }
            return resumptions
        }
        for (waiter, admission) in resumptions { waiter.continuation.resume(returning: admission) }
    }

    private func throttled(_ bucket: inout Bucket) -> Admission {
        let starts = !bucket.throttling
        bucket.throttling = true
        return .throttled(
            retryAfter: .seconds((1 - bucket.tokens) * 60 / Double(limit.perMinute)), startsThrottling: starts)
    }

    private func refill(_ bucket: inout Bucket, at now: ContinuousClock.Instant) {
        let elapsed = now - bucket.updatedAt
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        bucket.tokens = min(Double(limit.burst), bucket.tokens + max(0, seconds) * Double(limit.perMinute) / 60)
        bucket.updatedAt = now
        if bucket.tokens >= Double(limit.burst) { bucket.throttling = false }
    }

    private func evict(
        _ buckets: inout [SourceAddressGroup: Bucket],
        keeping current: SourceAddressGroup,
        at now: ContinuousClock.Instant
    ) {
        for (address, var bucket) in buckets where address != current && bucket.isIdle {
            refill(&bucket, at: now)
            if bucket.tokens >= Double(limit.burst) { buckets[address] = nil }
        }
        let excess = buckets.count - Self.maximumTrackedAddresses * 9 / 10
        if excess > 0 {
            let oldest = buckets.filter { $0.key != current && $0.value.isIdle }
                .sorted { $0.value.updatedAt < $1.value.updatedAt }
            for (address, _) in oldest.prefix(excess) { buckets[address] = nil }
        }
    }
}
