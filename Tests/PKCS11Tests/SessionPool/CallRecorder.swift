import PKCS11
import Synchronization
import Testing

/// Calls made one after another through a pool while a fault comes and goes: when each started
/// and ended and how it failed, to measure the time to the first error and to recovery.
final class CallRecorder: Sendable {
    struct Call: Sendable {
        let started: ContinuousClock.Instant
        let ended: ContinuousClock.Instant
        /// nil on success.
        let error: (any Error)?

        var latency: Duration { ended - started }
        var pkcs11Error: PKCS11Error? { error as? PKCS11Error }
        var succeeded: Bool { error == nil }
    }

    private let calls = Mutex<[Call]>([])
    private let stopped = Atomic(false)

    /// Starts calling `body` through `pool` every `interval` (after each call ends) until `stop()`.
    func start(
        _ pool: SessionPool, every interval: Duration,
        _ body: @escaping @Sendable (borrowing Session) throws -> Void
    ) -> Task<Void, Never> {
        Task {
            while !stopped.load(ordering: .relaxed) {
                let started = ContinuousClock.now
                var failure: (any Error)?
                do {
                    try await pool.withSession(body)
                } catch {
                    failure = error
                }
                let call = Call(started: started, ended: .now, error: failure)
                calls.withLock { $0.append(call) }
                try? await Task.sleep(for: interval)
            }
        }
    }

    func stop() { stopped.store(true, ordering: .relaxed) }

    var all: [Call] { calls.withLock { $0 } }

    /// The first call that ended after `instant` and failed.
    func firstFailure(after instant: ContinuousClock.Instant) -> Call? {
        all.first { $0.ended > instant && !$0.succeeded }
    }

    /// The first call that started after `instant` and succeeded.
    func firstSuccess(startedAfter instant: ContinuousClock.Instant) -> Call? {
        all.first { $0.started > instant && $0.succeeded }
    }

    /// The calls that started and ended within `range`.
    func calls(within range: Range<ContinuousClock.Instant>) -> [Call] {
        all.filter { range.contains($0.started) && range.contains($0.ended) }
    }

    /// Waits until `condition` holds for the calls so far, polling every 10 ms, at most `timeout`.
    func wait(upTo timeout: Duration, until condition: ([Call]) -> Bool) async -> Bool {
        let end = ContinuousClock.now + timeout
        while ContinuousClock.now < end {
            if condition(all) { return true }
            try? await Task.sleep(for: .milliseconds(10))
        }
        return condition(all)
    }
}

/// Milliseconds, for the measurements the tests print.
func milliseconds(_ duration: Duration) -> Int {
    Int(duration.components.seconds * 1000 + duration.components.attoseconds / 1_000_000_000_000_000)
}

/// Waits (at most 5 s) until `pool` has no session opening, leased or closing and nobody waits,
/// then checks that nothing leaked: every session it counts is idle and open in the module on
/// `slot`, and no close went unconfirmed.
func expectNoSessionLeaked(
    _ pool: SessionPool, slot: SlotID, sourceLocation: SourceLocation = #_sourceLocation
) async {
    let end = ContinuousClock.now + .seconds(5)
    var statistics = pool.statistics
    while statistics.opening + statistics.leased + statistics.closing + statistics.waiting > 0,
        ContinuousClock.now < end
    {
        try? await Task.sleep(for: .milliseconds(10))
        statistics = pool.statistics
    }
    #expect(
        statistics.opening + statistics.leased + statistics.closing + statistics.waiting == 0, "\(statistics)",
        sourceLocation: sourceLocation)
    #expect(statistics.unconfirmedCloses == 0, "\(statistics)", sourceLocation: sourceLocation)
    #expect(
        pool.module.openSessionCount(slot: slot) == statistics.idle,
        "\(pool.module.openSessionCount(slot: slot)) sessions open in the module, \(statistics.idle) idle in the pool",
        sourceLocation: sourceLocation)
}

/// Shuts `pool` down and checks it left no session open in the module on `slot`.
func shutDownLeavingNoSession(
    _ pool: SessionPool, slot: SlotID, sourceLocation: SourceLocation = #_sourceLocation
) async {
    await pool.shutdown()
    #expect(pool.module.openSessionCount(slot: slot) == 0, sourceLocation: sourceLocation)
    #expect(pool.statistics.unconfirmedCloses == 0, "\(pool.statistics)", sourceLocation: sourceLocation)
}
