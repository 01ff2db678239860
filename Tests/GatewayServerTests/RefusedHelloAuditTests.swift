import KeyHierarchy
import Logging
import Synchronization
import Testing

@testable import GatewayServer

/// The bounded path of refused Hellos' audit records, with a writer of the test's own (the real
/// one is exercised end to end in `UnauthenticatedAbuseTests`).
@Suite("Refused-Hello audit queue")
struct RefusedHelloAuditTests {
    /// Records what the writer was given; blocks while `gate` is closed; fails while `failing`.
    final class Writer: Sendable {
        struct State {
            var batches: [[AuditEvent]] = []
            /// When each write was called.
            var calls: [ContinuousClock.Instant] = []
            var open = true
            var failing = false
            var waiting: [CheckedContinuation<Void, Never>] = []
        }
        let state = Mutex(State())

        func write(_ events: [AuditEvent]) async throws {
            state.withLock { $0.calls.append(.now) }
            await withCheckedContinuation { continuation in
                let open = state.withLock { state -> Bool in
                    if !state.open { state.waiting.append(continuation) }
                    return state.open
                }
                if open { continuation.resume() }
            }
            struct Failed: Error {}
            if state.withLock({ $0.failing }) { throw Failed() }
            state.withLock { $0.batches.append(events) }
        }

        func setOpen(_ open: Bool) {
            let waiting = state.withLock { state -> [CheckedContinuation<Void, Never>] in
                state.open = open
                defer { state.waiting = [] }
                return open ? state.waiting : []
            }
            for continuation in waiting { continuation.resume() }
        }

        var batches: [[AuditEvent]] { state.withLock { $0.batches } }
    }

    static func event(_ index: Int) -> AuditEvent {
        KeyService.accessFailureEvent(
            .authentication, principal: .unauthenticated, tenant: nil, operation: "Hello",
            reason: "unknown-token", request: RequestContext(principal: .unauthenticated, requestID: "r-\(index)"))
    }

    /// The count a record of drops names for `key` (`dropped`, or a refusal reason).
    static func count(_ key: String, in detail: String) -> Int? {
        guard detail.hasPrefix("method=Hello reason=audit-queue-full ") else { return nil }
        return detail.split(separator: " ").first { $0.hasPrefix(key + "=") }.flatMap {
            Int($0.dropFirst(key.count + 1))
        }
    }

    static func dropped(in batches: [[AuditEvent]], _ key: String = "dropped") -> Int {
        batches.joined().compactMap { count(key, in: $0.detail) }.reduce(0, +)
    }

    @Test("a flood while the store is slow: the queue stays at its bound, the rest is dropped, counted and reported")
    func floodIsBounded() async {
        let writer = Writer()
        let audit = RefusedHelloAudit(registry: nil, logger: Logger(label: "test")) { try await writer.write($0) }
        writer.setOpen(false)
        let flood = 5 * RefusedHelloAudit.capacity
        for index in 0..<flood { audit.enqueue(Self.event(index)) }
        #expect(audit.depth.highWater <= RefusedHelloAudit.capacity)
        writer.setOpen(true)
        await audit.flush()
        let batches = writer.batches
        #expect(batches.allSatisfy { $0.count <= RefusedHelloAudit.maximumBatch })
        let refusals = batches.joined().filter { $0.detail.hasSuffix("reason=unknown-token") }.count
        // Every refusal is either written or counted in a record that says how many were dropped.
        #expect(refusals + Self.dropped(in: batches) == flood)
        #expect(refusals <= RefusedHelloAudit.capacity + RefusedHelloAudit.maximumBatch)
        #expect(Self.dropped(in: batches) >= flood - RefusedHelloAudit.capacity - RefusedHelloAudit.maximumBatch)
        // Counted by reason too: all of them were unknown tokens.
        #expect(Self.dropped(in: batches, "unknown-token") == Self.dropped(in: batches))
        #expect(audit.depth.now == 0)
    }

    @Test("records that cannot be written count as dropped, and the next write reports them")
    func failedWritesAreReported() async {
        let writer = Writer()
        let audit = RefusedHelloAudit(registry: nil, logger: Logger(label: "test")) { try await writer.write($0) }
        writer.state.withLock { $0.failing = true }
        for index in 0..<10 { audit.enqueue(Self.event(index)) }
        await audit.flush()
        #expect(writer.batches.isEmpty)
        writer.state.withLock { $0.failing = false }
        audit.enqueue(Self.event(99))
        await audit.flush()
        let written = writer.batches.joined()
        #expect(written.map(\.requestID).contains("r-99"))
        #expect(Self.dropped(in: writer.batches) == 10)
        #expect(Self.dropped(in: writer.batches, "unknown-token") == 10)
    }

    @Test("the record of drops counts them by reason, with a bounded number of reasons")
    func dropsByReason() {
        var drops = RefusedHelloAudit.Drops()
        for reason in ["unknown-token", "unknown-token", "no-credentials"] {
            drops.count(
                KeyService.accessFailureEvent(
                    .authentication, principal: .unauthenticated, tenant: nil, operation: "Hello", reason: reason,
                    request: RequestContext(principal: .unauthenticated, requestID: "r")))
        }
        #expect(drops.detail == "method=Hello reason=audit-queue-full dropped=3 no-credentials=1 unknown-token=2")
        var many = RefusedHelloAudit.Drops()
        for index in 0..<(RefusedHelloAudit.maximumDroppedReasons + 5) {
            many.count(
                AuditEvent(
                    principal: .unauthenticated, tenant: nil, operation: .authenticate, requestID: "r",
                    detail: "reason=r\(index)"))
        }
        #expect(many.byReason.count == RefusedHelloAudit.maximumDroppedReasons + 1)
        #expect(many.byReason["other"] == 5)
        #expect(many.total == RefusedHelloAudit.maximumDroppedReasons + 5)
    }

    @Test("writes are paced: one transaction per pause at most")
    func paced() async {
        let writer = Writer()
        let audit = RefusedHelloAudit(registry: nil, logger: Logger(label: "test")) { try await writer.write($0) }
        writer.setOpen(false)
        for index in 0..<(3 * RefusedHelloAudit.maximumBatch) { audit.enqueue(Self.event(index)) }
        writer.setOpen(true)
        await audit.flush()
        #expect(writer.batches.count >= 3)
        #expect(writer.batches.joined().count == 3 * RefusedHelloAudit.maximumBatch)
        // Each write starts a pause after the one before it (less the few microseconds between the
        // writer taking the time and calling the write).
        let calls = writer.state.withLock { $0.calls }
        for (earlier, later) in zip(calls, calls.dropFirst()) {
            #expect(later - earlier >= RefusedHelloAudit.pause - .milliseconds(5))
        }
    }
}
