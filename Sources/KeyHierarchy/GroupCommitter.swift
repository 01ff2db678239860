import Synchronization

/// What a write unit returns: its value and the audit events to append in the same transaction.
public struct UnitOutcome<Value: Sendable>: Sendable {
    public var value: Value
    public var audit: [AuditEvent]

    public init(_ value: Value, audit: [AuditEvent]) {
        self.value = value
        self.audit = audit
    }
}

/// A unit's value once durable, with the audit records that were appended for it.
public struct Committed<Value: Sendable>: Sendable {
    public var value: Value
    public var records: [AuditRecord]
}

/// Group commit: concurrent write units share one transaction, so one durable commit (the
/// expensive part: an fsync) serves many callers, and the audit head is locked once per batch.
///
/// When a unit fails (a refused state change, a lost race), the transaction is rolled back and
/// run again without it: its caller gets its error, the others go on. (A savepoint per unit
/// would do the same at two extra round trips per unit on PostgreSQL; refusals are rare.) The audit events of
/// the units that succeeded are chained and appended at the end of the same transaction. No
/// caller is answered before the commit returns; when the commit or the audit append fails,
/// every caller in the batch gets the error and nothing of the batch is stored (fail closed).
///
/// The first caller to find no batch running leads: it drains the queue batch by batch in a
/// task of its own; later callers only enqueue and wait.
///
/// Set-based units (``commitInScope(lane:_:)``: GenerateDataKey) read the rows they check and
/// write what they store through the batch's ``BatchScope``, so a batch of them costs a fixed
/// number of statements (about ten) instead of about four per unit; the scope's writes are
/// flushed before the audit head is locked, and before any other unit runs.
///
/// Units that only append audit records (``append(lane:_:)``: the record of a decrypt) do not wait
/// behind write batches for longer than the audit chain requires. On a store with one writer
/// (SQLite) they join the batch in flight as long as it has not yet locked the audit head, so they
/// wait for the rest of one batch, not for that and all of the next. On a store whose write
/// transactions run side by side (PostgreSQL) they are committed by a second drain of their own,
/// in batches among themselves, and meet the write batches only at the audit head lock, which a
/// batch takes only after its units have run and holds until its commit.
public final class GroupCommitter: Sendable {
    /// Told about every transaction a batch ran (the server turns it into the audit-write latency
    /// metric: each batch's transaction is where the audit records become durable).
    public typealias Observer = @Sendable (GroupCommitObservation) -> Void

    /// The most units in one transaction: bounds how long the audit head stays locked and how
    /// much one failed commit takes down with it.
    public static let defaultMaximumBatch = 64
    /// How often a batch that lost a race (`StorageError.conflict`) is tried again.
    public static let conflictRetries = 3

    private struct Pending: Sendable {
        let id: Int
        let isolated: Bool
        /// The fairness lane (a tenant): batches take units round-robin over lanes.
        let lane: String
        /// Appends audit records and touches nothing else: may join the batch in flight.
        let auditOnly: Bool
        /// Reads and writes through the batch's `BatchScope` only (a set-based unit).
        let scoped: Bool
        let execute: @Sendable (any KeyRepositoryTransaction, BatchScope) async throws -> Executed
        let fail: @Sendable (any Error) -> Void
    }

    private struct Executed: Sendable {
        let events: [AuditEvent]
        let deliver: @Sendable ([AuditRecord]) -> Void
    }

    private struct State: ~Copyable {
        var queue: [Pending] = []
        var leading = false
        /// Audit-only units, when they have a drain of their own.
        var auditQueue: [Pending] = []
        var auditLeading = false
        var nextID = 0
    }

    private let repository: any KeyRepository
    private let maximumBatch: Int
    /// Audit-only units are drained apart (the store runs write transactions side by side).
    private let auditLane: Bool
    private let observer: Observer?
    /// Anchors each batch's new head in the HSM; nil appends unanchored (unit tests of the logic).
    let anchoring: AuditAnchoring?
    private let state = Mutex(State())

    /// Units waiting for a batch now (for tests that wait until callers have queued).
    var queuedUnits: Int { state.withLock { $0.queue.count + $0.auditQueue.count } }

    /// Appends `events` to the audit log and returns their records once durable: a unit that
    /// touches nothing else, so it may join the batch in flight (see the type's comment).
    public func append(lane: String = "", _ events: [AuditEvent]) async throws -> [AuditRecord] {
        try await enqueue(isolated: false, auditOnly: true, scoped: true, lane: lane) { _, _ in
            UnitOutcome((), audit: events)
        }.records
    }

    public init(
        repository: any KeyRepository,
        maximumBatch: Int = GroupCommitter.defaultMaximumBatch,
        anchoring: AuditAnchoring? = nil,
        observer: Observer? = nil
    ) {
        precondition(maximumBatch >= 1, "a batch holds at least one unit")
        self.repository = repository
        self.maximumBatch = maximumBatch
        self.auditLane = repository.concurrentWriteTransactions
        self.anchoring = anchoring
        self.observer = observer
    }

    /// Runs `unit` in a shared transaction and returns once it is durable.
    ///
    /// An `isolated` unit gets a transaction of its own. Used for units that lock rows in
    /// another order than the rest, or whose failure must not cost the others a rerun: sharing a
    /// transaction with units that lock the tenant row first could deadlock against another
    /// gateway instance doing the same in the opposite order.
    ///
    /// `lane` (the tenant, for key operations) makes batching fair: a batch takes units
    /// round-robin over the lanes that wait, oldest first within each, so one tenant's flood of
    /// units cannot push another tenant's unit behind a queue of its own; a unit waits at most for
    /// the batch in flight.
    public func commit<Value: Sendable>(
        isolated: Bool = false,
        lane: String = "",
        _ unit: @escaping @Sendable (any KeyRepositoryTransaction) async throws -> UnitOutcome<Value>
    ) async throws -> Committed<Value> {
        try await enqueue(isolated: isolated, auditOnly: false, scoped: false, lane: lane) { transaction, _ in
            try await unit(transaction)
        }
    }

    /// Runs a set-based `unit` in a shared transaction and returns once it is durable: the unit
    /// reads the tenant and version rows it checks and writes invocation counts and data keys
    /// through `BatchScope`, which folds them with the other units of the batch into a fixed
    /// number of statements. It may use the transaction directly only for writes whose failure
    /// is its own (an idempotency record).
    public func commitInScope<Value: Sendable>(
        lane: String = "",
        _ unit: @escaping @Sendable (any KeyRepositoryTransaction, BatchScope) async throws -> UnitOutcome<Value>
    ) async throws -> Committed<Value> {
        try await enqueue(isolated: false, auditOnly: false, scoped: true, lane: lane, unit)
    }

    private func enqueue<Value: Sendable>(
        isolated: Bool,
        auditOnly: Bool,
        scoped: Bool,
        lane: String,
        _ unit: @escaping @Sendable (any KeyRepositoryTransaction, BatchScope) async throws -> UnitOutcome<Value>
    ) async throws -> Committed<Value> {
        let id = state.withLock { state in
            defer { state.nextID += 1 }
            return state.nextID
        }
        // A caller that gives up (its deadline passed, it was cancelled) while its unit still waits
        // for a batch takes the unit out of the queue: nothing of it ran, and a backlog of units
        // nobody waits for any more is not worked off after an outage. A unit already in a batch
        // runs to the end.
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation {
                (continuation: CheckedContinuation<Committed<Value>, any Error>) in
                let pending = Pending(
                    id: id,
                    isolated: isolated,
                    lane: lane,
                    auditOnly: auditOnly,
                    scoped: scoped,
                    execute: { transaction, scope in
                        let outcome = try await unit(transaction, scope)
                        return Executed(events: outcome.audit) { records in
                            continuation.resume(returning: Committed(value: outcome.value, records: records))
                        }
                    },
                    fail: { continuation.resume(throwing: $0) }
                )
                let apart = auditOnly && auditLane
                let lead = state.withLock { state in
                    if apart {
                        state.auditQueue.append(pending)
                        if state.auditLeading { return false }
                        state.auditLeading = true
                        return true
                    }
                    state.queue.append(pending)
                    if state.leading { return false }
                    state.leading = true
                    return true
                }
                if lead {
                    Task { await self.drain(auditLane: apart) }
                }
                // A cancellation that came before the unit was queued found nothing to take out.
                if Task.isCancelled { withdraw(id) }
            }
        } onCancel: {
            withdraw(id)
        }
    }

    /// Takes unit `id` out of the queue, if it is still there, and fails it as cancelled.
    private func withdraw(_ id: Int) {
        let withdrawn = state.withLock { state -> Pending? in
            if let index = state.queue.firstIndex(where: { $0.id == id }) { return state.queue.remove(at: index) }
            if let index = state.auditQueue.firstIndex(where: { $0.id == id }) {
                return state.auditQueue.remove(at: index)
            }
            return nil
        }
        withdrawn?.fail(CancellationError())
    }

    private func drain(auditLane: Bool) async {
        while true {
            let batch: [Pending] = state.withLock { state in
                if auditLane {
                    let batch = Array(state.auditQueue.prefix(maximumBatch))
                    state.auditQueue.removeFirst(batch.count)
                    if batch.isEmpty { state.auditLeading = false }
                    return batch
                }
                let chosen = Self.selectBatch(
                    lanes: state.queue.map(\.lane), isolated: state.queue.map(\.isolated), maximum: maximumBatch)
                let batch = chosen.map { state.queue[$0] }
                for index in chosen.sorted(by: >) { state.queue.remove(at: index) }
                if batch.isEmpty { state.leading = false }
                return batch
            }
            if batch.isEmpty { return }
            await run(batch, auditLane: auditLane)
        }
    }

    /// The queue positions of the next batch: the first unit alone when it is isolated; otherwise
    /// up to `maximum` non-isolated units taken round-robin over their lanes (lanes in the order
    /// their oldest unit arrived, oldest first within a lane).
    static func selectBatch(lanes: [String], isolated: [Bool], maximum: Int) -> [Int] {
        guard let first = isolated.first else { return [] }
        if first { return [0] }
        var byLane: [String: [Int]] = [:]
        var order: [String] = []
        for (index, lane) in lanes.enumerated() where !isolated[index] {
            if byLane[lane] == nil { order.append(lane) }
            byLane[lane, default: []].append(index)
        }
        var chosen: [Int] = []
        var round = 0
        while chosen.count < maximum {
            var took = false
            for lane in order where chosen.count < maximum {
                if let positions = byLane[lane], round < positions.count {
                    chosen.append(positions[round])
                    took = true
                }
            }
            if !took { break }
            round += 1
        }
        return chosen
    }

    private func run(_ batch: [Pending], auditLane: Bool) async {
        var batch = batch
        // Units refused on the way are answered only once the rest is committed (or failed), so
        // a caller that reacts to its refusal (an idempotency retry reading the winner's result)
        // sees what the others stored.
        var refused: [(Pending, any Error)] = []
        defer { for (pending, error) in refused { pending.fail(error) } }
        var attempt = 0
        while !batch.isEmpty {
            let started = ContinuousClock.now
            // Audit-only units that joined this attempt on its way (they belong to the batch from
            // then on: rerun with it, failed with it).
            let joined = Mutex<[Pending]>([])
            let observe = { [observer] (committed: Bool) in
                observer?(
                    GroupCommitObservation(
                        duration: ContinuousClock.now - started,
                        units: batch.count + joined.withLock(\.count),
                        committed: committed
                    )
                )
            }
            let current = batch
            do {
                let results = try await repository.transaction { transaction in
                    // Should the store run the body again, the units that joined the first run
                    // join the next one too.
                    try await Self.execute(current, in: transaction, anchoring: self.anchoring) {
                        joined.withLock { joined in
                            joined += self.takeAuditOnly(
                                maximum: self.maximumBatch - joined.count, fromAuditLane: auditLane)
                            return joined
                        }
                    }
                }
                observe(true)
                for linked in results {
                    linked.executed.deliver(linked.records)
                }
                return
            } catch let failure as UnitFailure {
                observe(false)
                // One unit refused: the transaction rolled back; the others run again without it.
                refused.append((batch[failure.index], failure.error))
                batch.remove(at: failure.index)
                batch += joined.withLock { $0 }
            } catch let error as StorageError where error.kind == .conflict && attempt < Self.conflictRetries {
                observe(false)
                attempt += 1
                batch += joined.withLock { $0 }
            } catch {
                observe(false)
                for pending in batch + joined.withLock({ $0 }) { pending.fail(error) }
                return
            }
        }
    }

    /// Takes up to `maximum` queued audit-only units, oldest first, to join the batch in flight
    /// (from the audit lane's queue for a batch of that lane).
    private func takeAuditOnly(maximum: Int, fromAuditLane: Bool) -> [Pending] {
        state.withLock { state in
            if fromAuditLane {
                let taken = Array(state.auditQueue.prefix(maximum))
                state.auditQueue.removeFirst(taken.count)
                return taken
            }
            var taken: [Pending] = []
            state.queue.removeAll { pending in
                guard pending.auditOnly, !pending.isolated, taken.count < maximum else { return false }
                taken.append(pending)
                return true
            }
            return taken
        }
    }

    /// A unit of a shared batch threw: the whole transaction is rolled back and run again
    /// without it (cheaper than a savepoint per unit, which costs two round trips each on
    /// PostgreSQL, since refusals are rare).
    private struct UnitFailure: Error {
        let index: Int
        let error: any Error
    }

    private struct Linked: Sendable {
        let executed: Executed
        let records: [AuditRecord]
    }

    /// Runs the batch's units, then `lateJoiners` (audit-only units that queued meanwhile: they
    /// cannot fail), then appends every unit's audit events under the head lock.
    private static func execute(
        _ batch: [Pending],
        in transaction: any KeyRepositoryTransaction,
        anchoring: AuditAnchoring?,
        lateJoiners: @Sendable () -> [Pending]
    ) async throws -> [Linked] {
        var executed: [Executed] = []
        executed.reserveCapacity(batch.count)
        let scope = BatchScope()
        for (index, pending) in batch.enumerated() {
            // A unit outside the scope may read what the scope deferred, or change what it read.
            if !pending.scoped { try await scope.flush(transaction, forget: true) }
            do {
                executed.append(try await pending.execute(transaction, scope))
            } catch let error as StorageError where error.kind == .conflict {
                // A lost lock race concerns the whole transaction: retry the batch.
                throw error
            } catch {
                // Alone, a unit's failure is simply the transaction's failure.
                if batch.count == 1 { throw error }
                throw UnitFailure(index: index, error: error)
            }
        }
        for pending in lateJoiners() {
            executed.append(try await pending.execute(transaction, scope))
        }
        // The batch's folded writes, before the audit head is locked (it is held until the commit).
        try await scope.flush(transaction, forget: false)
        let events = executed.flatMap(\.events)
        var records: [AuditRecord] = []
        if !events.isEmpty {
            let locked = try await transaction.lockAuditHead()
            // The head appended to must be the one the HSM anchored; the new head is anchored in
            // the same transaction, while the lock is held.
            try await anchoring?.check(locked)
            let linked = AuditChain.link(events, after: locked.head)
            let anchor = try await anchoring?.sign(linked.head)
            try await transaction.appendAuditRecords(
                linked.records,
                head: linked.head,
                anchor: anchor,
                keepCheckpoint: anchor != nil && anchoring?.keepsCheckpoint(from: locked, to: linked.head) == true
            )
            records = linked.records
        }
        var offset = 0
        return executed.map { executed in
            let mine = Array(records[offset..<offset + executed.events.count])
            offset += executed.events.count
            return Linked(executed: executed, records: mine)
        }
    }
}

/// One transaction of the group committer, as its observer sees it.
public struct GroupCommitObservation: Sendable, Hashable {
    /// From the start of the transaction to its durable commit (or its failure).
    public var duration: Duration
    /// Write units the transaction carried.
    public var units: Int
    /// Whether it committed; false when it rolled back (a refused unit, a conflict, a failure).
    public var committed: Bool

    public init(duration: Duration, units: Int, committed: Bool) {
        self.duration = duration
        self.units = units
        self.committed = committed
    }
}

extension GroupCommitter {
    /// What `checkAnchor` found.
    public enum AnchorState: Sendable, Hashable {
        /// The log is empty: the first append anchors it.
        case empty
        /// The head carries a checkpoint that verifies.
        case anchored(through: Int64)
        /// The log predates anchoring and this start generated the audit key: its head was anchored
        /// now, with an audit record saying so.
        case adopted(through: Int64)
    }

    /// Checks the audit head against the HSM under the head lock, generating the audit key on a
    /// first start (and anchoring a log that predates anchoring). Throws `dataLoss` when the log
    /// fails its integrity check. Run at start-up so a broken log is reported before any call.
    public func checkAnchor(principal: Principal, requestID: String) async throws -> AnchorState {
        guard let anchoring else { return .empty }
        return try await repository.transaction { transaction in
            let locked = try await transaction.lockAuditHead()
            try await anchoring.check(locked)
            if locked.anchor != nil { return .anchored(through: locked.head.sequence) }
            if locked.head.sequence == 0 { return .empty }
            let event = AuditEvent(
                principal: principal,
                tenant: nil,
                operation: .anchorAuditLog,
                requestID: requestID,
                detail: "adopted-through=\(locked.head.sequence)"
            )
            let linked = AuditChain.link([event], after: locked.head)
            let anchor = try await anchoring.sign(linked.head)
            try await transaction.appendAuditRecords(
                linked.records, head: linked.head, anchor: anchor, keepCheckpoint: true)
            return .adopted(through: locked.head.sequence)
        }
    }
}
