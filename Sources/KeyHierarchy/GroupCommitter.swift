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
/// Each unit runs inside its own savepoint, so a unit that fails (a lost race, a refused state
/// change) rolls back alone and its caller gets its error; the others go on. The audit events of
/// the units that succeeded are chained and appended at the end of the same transaction. No
/// caller is answered before the commit returns; when the commit or the audit append fails,
/// every caller in the batch gets the error and nothing of the batch is stored (fail closed).
///
/// The first caller to find no batch running leads: it drains the queue batch by batch in a
/// task of its own; later callers only enqueue and wait.
public final class GroupCommitter: Sendable {
    /// The most units in one transaction: bounds how long the audit head stays locked and how
    /// much one failed commit takes down with it.
    public static let defaultMaximumBatch = 64
    /// How often a batch that lost a race (`StorageError.conflict`) is tried again.
    public static let conflictRetries = 3

    private struct Pending: Sendable {
        let isolated: Bool
        let execute: @Sendable (any KeyRepositoryTransaction) async throws -> Executed
        let fail: @Sendable (any Error) -> Void
    }

    private struct Executed: Sendable {
        let events: [AuditEvent]
        let deliver: @Sendable ([AuditRecord]) -> Void
    }

    private struct State: ~Copyable {
        var queue: [Pending] = []
        var leading = false
    }

    private let repository: any KeyRepository
    private let maximumBatch: Int
    private let state = Mutex(State())

    public init(repository: any KeyRepository, maximumBatch: Int = GroupCommitter.defaultMaximumBatch) {
        precondition(maximumBatch >= 1, "a batch holds at least one unit")
        self.repository = repository
        self.maximumBatch = maximumBatch
    }

    /// Runs `unit` in a shared transaction and returns once it is durable.
    ///
    /// An `isolated` unit gets a transaction of its own. Used for units that lock rows in
    /// another order than the rest (IV reservations lock a version row before anything else):
    /// sharing a transaction with units that lock the tenant row first could deadlock against
    /// another gateway instance doing the same in the opposite order.
    public func commit<Value: Sendable>(
        isolated: Bool = false,
        _ unit: @escaping @Sendable (any KeyRepositoryTransaction) async throws -> UnitOutcome<Value>
    ) async throws -> Committed<Value> {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Committed<Value>, any Error>) in
            let pending = Pending(
                isolated: isolated,
                execute: { transaction in
                    let outcome = try await unit(transaction)
                    return Executed(events: outcome.audit) { records in
                        continuation.resume(returning: Committed(value: outcome.value, records: records))
                    }
                },
                fail: { continuation.resume(throwing: $0) }
            )
            let lead = state.withLock { state in
                state.queue.append(pending)
                if state.leading { return false }
                state.leading = true
                return true
            }
            if lead {
                Task { await self.drain() }
            }
        }
    }

    private func drain() async {
        while true {
            let batch: [Pending] = state.withLock { state in
                var count = 0
                if state.queue.first?.isolated == true {
                    count = 1
                } else {
                    while count < min(state.queue.count, maximumBatch), !state.queue[count].isolated { count += 1 }
                }
                let batch = Array(state.queue.prefix(count))
                state.queue.removeFirst(count)
                if batch.isEmpty { state.leading = false }
                return batch
            }
            if batch.isEmpty { return }
            await run(batch)
        }
    }

    private func run(_ batch: [Pending]) async {
        var attempt = 0
        while true {
            do {
                let results = try await repository.transaction { transaction in
                    try await Self.execute(batch, in: transaction)
                }
                for (pending, result) in zip(batch, results) {
                    switch result {
                    case .success(let linked): linked.executed.deliver(linked.records)
                    case .failure(let error): pending.fail(error)
                    }
                }
                return
            } catch let error as StorageError where error.kind == .conflict && attempt < Self.conflictRetries {
                attempt += 1
            } catch {
                for pending in batch { pending.fail(error) }
                return
            }
        }
    }

    private struct Linked: Sendable {
        let executed: Executed
        let records: [AuditRecord]
    }

    private static func execute(
        _ batch: [Pending],
        in transaction: any KeyRepositoryTransaction
    ) async throws -> [Result<Linked, any Error>] {
        var executed: [Result<Executed, any Error>] = []
        executed.reserveCapacity(batch.count)
        if batch.count == 1 {
            // Alone, a unit needs no savepoint: its failure may roll back the whole transaction.
            executed.append(.success(try await batch[0].execute(transaction)))
        } else {
            for pending in batch {
                do {
                    executed.append(
                        .success(try await transaction.savepoint { try await pending.execute(transaction) }))
                } catch {
                    executed.append(.failure(error))
                }
            }
        }
        let events = executed.flatMap { (try? $0.get().events) ?? [] }
        var records: [AuditRecord] = []
        if !events.isEmpty {
            let head = try await transaction.lockAuditHead()
            let linked = AuditChain.link(events, after: head)
            try await transaction.appendAuditRecords(linked.records, head: linked.head)
            records = linked.records
        }
        var offset = 0
        return executed.map { result in
            result.map { executed in
                let mine = Array(records[offset..<offset + executed.events.count])
                offset += executed.events.count
                return Linked(executed: executed, records: mine)
            }
        }
    }
}
