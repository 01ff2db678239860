import KeyHierarchy
import Logging
import Prometheus
import Synchronization

/// The audit records of refused Hellos, written on a bounded path of their own.
///
/// Anyone who can open a connection can make the gateway refuse Hellos, as fast as the
/// failed-authentication throttle and the connection limits let them, from as many addresses as
/// they have. Their records must neither grow memory without bound nor hold up key operations, so
/// they do not go through the key operations' group-commit queue: they wait here, in a queue of at
/// most ``capacity`` records, for one writer task of low priority that appends up to
/// ``maximumBatch`` of them per transaction (``KeyService/appendAuditRecordsApart(_:)``), at most
/// one transaction per ``pause``: at most 320 records a second, in transactions short enough that
/// a key operation's commit waiting behind one is not noticeably delayed (measured: a flood of
/// 1,500 refused Hellos a second left GenerateDataKey's p99 where it was with no audit writes at
/// all; with transactions of 128 records its p99 doubled). A record that finds the queue full is
/// dropped and counted (`hsmgw_auth_audit_dropped_total`), by reason; the next transaction then
/// carries one record saying how many were dropped since the last such record, and for which
/// reasons (`reason=audit-queue-full dropped=<n> unknown-token=<n> ...`), so the log still tells
/// that a flood happened, how big it was and what it tried. Records that cannot be written (the
/// store is down) count as dropped too.
///
/// The Hello's answer does not wait for its record.
final class RefusedHelloAudit: Sendable {
    /// Records waiting to be written, at most: a flood costs at most this much memory (a record is
    /// a few hundred bytes), and anything beyond it is dropped and counted.
    static let capacity = 1024
    /// Records per transaction, at most: bounds how long one transaction holds the audit head and
    /// the store's writer (which key operations' commits also need) and how much one failed write
    /// loses.
    static let maximumBatch = 32
    /// The least time between two transactions of this writer: at most ten a second, whatever the
    /// flood, so key operations' commits always get the audit head between them.
    static let pause: Duration = .milliseconds(100)

    /// Distinct refusal reasons counted apart in a record of drops; any further ones are counted
    /// as `other` (the reasons are a small fixed set, so this only guards the record's size).
    static let maximumDroppedReasons = 16

    /// Records dropped and not yet reported, by the refusal reason they carried.
    struct Drops: Sendable, Hashable {
        private(set) var total = 0
        private(set) var byReason: [String: Int] = [:]

        var isEmpty: Bool { total == 0 }

        mutating func count(_ event: AuditEvent, times: Int = 1) {
            // `method=Hello reason=unknown-token ...`: the reason's first word.
            let reason =
                event.detail.split(separator: " ").first { $0.hasPrefix("reason=") }
                .map { String($0.dropFirst("reason=".count)) } ?? "other"
            let key =
                byReason[reason] != nil || byReason.count < RefusedHelloAudit.maximumDroppedReasons ? reason : "other"
            total += times
            byReason[key, default: 0] += times
        }

        mutating func merge(_ other: Drops) {
            total += other.total
            for (reason, count) in other.byReason { byReason[reason, default: 0] += count }
        }

        /// `method=Hello reason=audit-queue-full dropped=<total> <reason>=<count> ...`, reasons sorted.
        var detail: String { event.detail }

        /// The record that reports these drops: a refused authentication like the ones it stands
        /// for, with the counts as its reason.
        var event: AuditEvent {
            let counts = ["dropped=\(total)"] + byReason.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }
            return KeyService.accessFailureEvent(
                .authentication,
                principal: .unauthenticated,
                tenant: nil,
                operation: "Hello",
                reason: "audit-queue-full " + counts.joined(separator: " "),
                request: RequestContext(principal: .unauthenticated, requestID: "refused-hello-audit")
            )
        }
    }

    private struct State {
        var queue: [AuditEvent] = []
        /// Dropped since the last record that reported drops.
        var unreported = Drops()
        /// The writer task runs.
        var writing = false
        /// The most records ever queued at once (for tests and the log).
        var highWater = 0
        /// Callers of `flush`, resumed when the writer goes idle.
        var flushers: [CheckedContinuation<Void, Never>] = []
    }

    private let write: @Sendable ([AuditEvent]) async throws -> Void
    private let logger: Logger
    private let state = Mutex(State())
    private let dropped: Counter?
    private let queued: Gauge?

    /// A writer appending through `service`; metrics go to `registry` when given.
    convenience init(service: KeyService, registry: PrometheusCollectorRegistry?, logger: Logger) {
        self.init(registry: registry, logger: logger) { events in try await service.appendAuditRecordsApart(events) }
    }

    /// A writer that appends with `write` (tests pass their own).
    init(
        registry: PrometheusCollectorRegistry?,
        logger: Logger,
        write: @escaping @Sendable ([AuditEvent]) async throws -> Void
    ) {
        self.write = write
        self.logger = logger
        self.dropped = registry?.makeCounter(
            name: "hsmgw_auth_audit_dropped_total",
            help: "Audit records of refused Hellos dropped because their bounded queue was full or the store failed.")
        self.queued = registry?.makeGauge(
            name: "hsmgw_auth_audit_queued", help: "Audit records of refused Hellos waiting to be written.")
    }

    /// Queues `event` without waiting; drops it (and counts it) when the queue is full.
    func enqueue(_ event: AuditEvent) {
        let (startWriter, depth) = state.withLock { state -> (Bool, Int?) in
            guard state.queue.count < Self.capacity else {
                state.unreported.count(event)
                return (false, nil)
            }
            state.queue.append(event)
            state.highWater = max(state.highWater, state.queue.count)
            defer { state.writing = true }
            return (!state.writing, state.queue.count)
        }
        if let depth {
            queued?.set(Double(depth))
        } else {
            dropped?.increment()
        }
        if startWriter {
            // Below the key operations' tasks: under load, refusals are written last.
            Task(priority: .background) { await self.drain() }
        }
    }

    /// Waits until the records queued so far are written (or dropped): at shutdown, before the
    /// store closes, and in tests.
    func flush() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let idle = state.withLock { state -> Bool in
                guard state.writing else { return true }
                state.flushers.append(continuation)
                return false
            }
            if idle { continuation.resume() }
        }
    }

    /// What the queue has held at most, and what it holds now (for tests).
    var depth: (highWater: Int, now: Int) { state.withLock { ($0.highWater, $0.queue.count) } }

    private func drain() async {
        while true {
            // The queued records, and one reporting earlier drops when there is room for it.
            let (batch, reported) = state.withLock { state -> ([AuditEvent], Drops) in
                var batch = Array(state.queue.prefix(Self.maximumBatch))
                state.queue.removeFirst(batch.count)
                guard !state.unreported.isEmpty, batch.count < Self.maximumBatch else { return (batch, Drops()) }
                let reported = state.unreported
                batch.append(reported.event)
                state.unreported = Drops()
                return (batch, reported)
            }
            var failed = false
            if !batch.isEmpty {
                let started = ContinuousClock.now
                queued?.set(Double(state.withLock { $0.queue.count }))
                do {
                    try await write(batch)
                } catch {
                    failed = true
                    let refusals = batch.dropLast(reported.isEmpty ? 0 : 1)
                    // Counted, and reported by the next record that gets through.
                    state.withLock { state in
                        for event in refusals { state.unreported.count(event) }
                        state.unreported.merge(reported)
                    }
                    dropped?.increment(by: Int64(refusals.count))
                    logger.error(
                        "could not audit refused Hellos; counted as dropped",
                        metadata: ["records": "\(refusals.count)", "error": "\(error)"]
                    )
                }
                // The pause runs from the start of the write: a slow store is not made slower.
                try? await Task.sleep(until: started + Self.pause)
            }
            let flushers = state.withLock { state -> [CheckedContinuation<Void, Never>]? in
                // Drops still unreported after a failed write wait for the next refused Hello.
                guard state.queue.isEmpty, state.unreported.isEmpty || failed || batch.isEmpty else { return nil }
                state.writing = false
                defer { state.flushers = [] }
                return state.flushers
            }
            if let flushers {
                for flusher in flushers { flusher.resume() }
                return
            }
        }
    }
}
