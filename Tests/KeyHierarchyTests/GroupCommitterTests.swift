import Synchronization
import Testing

@testable import KeyHierarchy

@Suite("Group commit: batching, isolation of failures, audit chaining")
struct GroupCommitterTests {
    /// Returns once `count` units wait for a batch (their callers have queued; no sleeping on
    /// the wall clock to let them).
    static func waitUntilQueued(_ committer: GroupCommitter, _ count: Int) async {
        while committer.queuedUnits < count { try? await Task.sleep(for: .milliseconds(1)) }
    }

    struct UnitFailure: Error, Equatable {
        var index: Int
    }

    static func tenantID(_ index: Int) -> TenantID { TenantID(trusted: "unit-\(index)") }

    /// A unit that writes one row, then appends `(index % 3) + 1` audit events tagged with its
    /// index; throws `UnitFailure` after writing when `fails`.
    static func unit(
        _ index: Int,
        fails: Bool = false
    ) -> @Sendable (any KeyRepositoryTransaction) async throws -> UnitOutcome<Int> {
        { transaction in
            let time = Timestamp(millisecondsSinceEpoch: 1_700_000_000_000)
            try await transaction.insertTenant(
                TenantRecord(id: tenantID(index), state: .enabled, primaryVersion: 1, createdAt: time, updatedAt: time))
            if fails { throw UnitFailure(index: index) }
            let events = (0...(index % 3)).map { part in
                AuditEvent(
                    time: time,
                    principal: Principal("caller-\(index)"),
                    tenant: tenantID(index),
                    operation: .createTenant,
                    keyIDs: ["part-\(part)"],
                    requestID: "request-\(index)"
                )
            }
            return UnitOutcome(index, audit: events)
        }
    }

    /// Runs `indices` concurrently; results by index.
    static func commitConcurrently(
        _ committer: GroupCommitter,
        _ indices: some Sequence<Int>,
        failing: Set<Int> = []
    ) async -> [Int: Result<Committed<Int>, any Error>] {
        await withTaskGroup(of: (Int, Result<Committed<Int>, any Error>).self) { group in
            for index in indices {
                group.addTask {
                    do {
                        return (
                            index, .success(try await committer.commit(unit(index, fails: failing.contains(index))))
                        )
                    } catch {
                        return (index, .failure(error))
                    }
                }
            }
            var results: [Int: Result<Committed<Int>, any Error>] = [:]
            for await (index, result) in group { results[index] = result }
            return results
        }
    }

    /// Checks that a caller got exactly its own records, as stored.
    static func expectOwnRecords(_ committed: Committed<Int>, index: Int, stored: [Int64: AuditRecord]) {
        #expect(committed.value == index)
        #expect(committed.records.count == index % 3 + 1)
        #expect(committed.records.allSatisfy { $0.event.requestID == "request-\(index)" })
        #expect(committed.records.map(\.event.keyIDs) == (0...(index % 3)).map { ["part-\($0)"] })
        if let first = committed.records.first?.sequence {
            #expect(committed.records.map(\.sequence) == Array(first..<first + Int64(committed.records.count)))
        }
        for record in committed.records {
            #expect(stored[record.sequence] == record)
        }
    }

    @Test("100 concurrent commits all succeed, chained in one gapless sequence, each with its own records")
    func concurrentCommits() async throws {
        let repository = InMemoryRepository(holdTransaction: .milliseconds(10))
        let committer = GroupCommitter(repository: repository)
        let results = await Self.commitConcurrently(committer, 0..<100)
        let snapshot = repository.snapshot

        let stored = Dictionary(uniqueKeysWithValues: snapshot.audit.map { ($0.sequence, $0) })
        var sequences: [Int64] = []
        for index in 0..<100 {
            let committed = try #require(try results[index]?.get())
            Self.expectOwnRecords(committed, index: index, stored: stored)
            sequences += committed.records.map(\.sequence)
        }
        let expectedTotal = (0..<100).reduce(0) { $0 + $1 % 3 + 1 }
        #expect(sequences.sorted() == Array(1...Int64(expectedTotal)))
        #expect(snapshot.audit.map(\.sequence) == Array(1...Int64(expectedTotal)))
        #expect(
            AuditChain.verify(snapshot.audit, head: snapshot.head)
                == .verified(records: Int64(expectedTotal), head: snapshot.head))
        #expect(snapshot.tenants == Set((0..<100).map(Self.tenantID)))
        #expect(snapshot.overlappingTransactions == 0)
        #expect(snapshot.unitsPerAttempt.reduce(0, +) == 100)
        #expect(snapshot.unitsPerAttempt.max()! > 1, "no batch formed: \(snapshot.unitsPerAttempt)")
        #expect(snapshot.unitsPerAttempt.max()! <= GroupCommitter.defaultMaximumBatch)
        #expect(snapshot.headLocksPerAttempt.allSatisfy { $0 == 1 })
    }

    @Test("a unit that throws fails only its own caller; the rest of its batch commits")
    func failingUnitIsIsolated() async throws {
        let gate = Gate()
        let repository = InMemoryRepository(beforeBody: { attempt in if attempt == 1 { await gate.wait() } })
        let committer = GroupCommitter(repository: repository)
        let failing: Set<Int> = [3, 4, 10, 17]
        // The first unit holds the only transaction open while the others queue behind it.
        async let first = Self.commitConcurrently(committer, [0])
        await repository.waitForAttempt(1)
        async let rest = Self.commitConcurrently(committer, 1..<20, failing: failing)
        await Self.waitUntilQueued(committer, 19)
        gate.open()
        let results = (await first).merging(await rest) { lhs, _ in lhs }
        let snapshot = repository.snapshot

        let stored = Dictionary(uniqueKeysWithValues: snapshot.audit.map { ($0.sequence, $0) })
        for index in 0..<20 {
            let result = try #require(results[index])
            if failing.contains(index) {
                #expect(throws: UnitFailure(index: index)) { try result.get() }
            } else {
                Self.expectOwnRecords(try result.get(), index: index, stored: stored)
            }
        }
        #expect(snapshot.tenants == Set((0..<20).filter { !failing.contains($0) }.map(Self.tenantID)))
        #expect(snapshot.audit.allSatisfy { record in !failing.contains { record.event.requestID == "request-\($0)" } })
        let expectedTotal = (0..<20).filter { !failing.contains($0) }.reduce(0) { $0 + $1 % 3 + 1 }
        #expect(
            AuditChain.verify(snapshot.audit, head: snapshot.head)
                == .verified(records: Int64(expectedTotal), head: snapshot.head))
        #expect(snapshot.unitsPerAttempt.first == 1)
        // Failing units shared a transaction with units that committed.
        let sharedWithFailure = snapshot.unitIDsPerAttempt.filter { ids in
            ids.count > 1 && ids.contains { failing.map(Self.tenantID).contains($0) }
        }
        #expect(!sharedWithFailure.isEmpty, "no batch mixed failing and committing units: \(snapshot.unitsPerAttempt)")
    }

    @Test("a caller cancelled while its unit waits for a batch takes it out: it never runs; the others commit")
    func cancelledWaitingUnitIsWithdrawn() async throws {
        let gate = Gate()
        let repository = InMemoryRepository(beforeBody: { attempt in if attempt == 1 { await gate.wait() } })
        let committer = GroupCommitter(repository: repository)
        // The first unit holds the only transaction open while the others queue behind it.
        async let first = Self.commitConcurrently(committer, [0])
        await repository.waitForAttempt(1)
        let cancelled = Task { try await committer.commit(Self.unit(1)) }
        let kept = Task { try await committer.commit(Self.unit(2)) }
        await Self.waitUntilQueued(committer, 2)
        cancelled.cancel()
        await #expect(throws: CancellationError.self) { try await cancelled.value }
        gate.open()
        #expect(try await kept.value.value == 2)
        #expect(try #require(await first[0]).get().value == 0)
        let snapshot = repository.snapshot
        #expect(snapshot.tenants == [Self.tenantID(0), Self.tenantID(2)])
        #expect(!snapshot.unitIDsPerAttempt.joined().contains(Self.tenantID(1)))
        #expect(
            AuditChain.verify(snapshot.audit, head: snapshot.head) == .verified(records: 1 + 3, head: snapshot.head))
    }

    @Test("a batch takes units round-robin over lanes: a lane's unit queued behind another lane's flood goes next")
    func lanesAreServedRoundRobin() async throws {
        let gate = Gate()
        let repository = InMemoryRepository(beforeBody: { attempt in if attempt == 1 { await gate.wait() } })
        let committer = GroupCommitter(repository: repository, maximumBatch: 4)
        async let first = Self.commitConcurrently(committer, [0])
        await repository.waitForAttempt(1)
        // Lane "flood" queues 20 units, then lane "quiet" one.
        let flood = (1...20).map { index in Task { try await committer.commit(lane: "flood", Self.unit(index)) } }
        await Self.waitUntilQueued(committer, 20)
        let quiet = Task { try await committer.commit(lane: "quiet", Self.unit(99)) }
        await Self.waitUntilQueued(committer, 21)
        gate.open()
        #expect(try await quiet.value.value == 99)
        for task in flood { _ = try await task.value }
        _ = await first
        // The quiet unit went in the very next batch, not after five batches of the flood.
        let attempts = repository.snapshot.unitIDsPerAttempt
        #expect(attempts.count >= 2)
        #expect(attempts[1].contains(Self.tenantID(99)), "\(attempts)")
    }

    static func auditEvent(_ name: String) -> AuditEvent {
        AuditEvent(
            time: Timestamp(millisecondsSinceEpoch: 1_700_000_000_000),
            principal: Principal("reader"),
            tenant: tenantID(0),
            operation: .decryptDataKey,
            keyIDs: [name],
            requestID: name
        )
    }

    @Test(
        "an audit-only unit joins the batch in flight before it locks the audit head; a write unit waits for the next",
        arguments: [0, 1] as [Int]
    )
    func auditOnlyUnitsJoinTheBatchInFlight(conflicts: Int) async throws {
        let gate = Gate()
        let repository = InMemoryRepository(
            beforeBody: { attempt in if attempt == 1 { await gate.wait() } },
            conflictInAttempts: conflicts == 0 ? [] : [1]
        )
        let committer = GroupCommitter(repository: repository)
        async let first = Self.commitConcurrently(committer, [0])
        await repository.waitForAttempt(1)
        // The write unit queues first: in the next batch it would come before the audit-only one.
        let written = Task { try await committer.commit(lane: "quiet", Self.unit(1)) }
        await Self.waitUntilQueued(committer, 1)
        let appended = Task { try await committer.append(lane: "quiet", [Self.auditEvent("late")]) }
        await Self.waitUntilQueued(committer, 2)
        gate.open()
        let records = try await appended.value
        _ = try await written.value
        _ = try #require(await first[0]).get()
        let snapshot = repository.snapshot
        // The audit-only unit was appended right after unit 0's record, by the transaction that
        // carried unit 0 (after a conflict, by its rerun); unit 1 came in a transaction of its own.
        #expect(records.map(\.sequence) == [2])
        #expect(records.map(\.event.requestID) == ["late"])
        #expect(
            snapshot.unitIDsPerAttempt == Array(repeating: [Self.tenantID(0)], count: 1 + conflicts) + [
                [Self.tenantID(1)]
            ])
        #expect(snapshot.audit.map(\.event.requestID) == ["request-0", "late", "request-1", "request-1"])
        #expect(
            AuditChain.verify(snapshot.audit, head: snapshot.head) == .verified(records: 4, head: snapshot.head))
    }

    @Test("an audit-only unit that joined a batch fails with it when its append fails")
    func joinedUnitFailsWithItsBatch() async throws {
        let gate = Gate()
        let repository = InMemoryRepository(
            beforeBody: { attempt in if attempt == 1 { await gate.wait() } },
            failAppendInAttempt: 1
        )
        let committer = GroupCommitter(repository: repository)
        async let first = Self.commitConcurrently(committer, [0])
        await repository.waitForAttempt(1)
        let appended = Task { try await committer.append([Self.auditEvent("late")]) }
        await Self.waitUntilQueued(committer, 1)
        gate.open()
        let error = await #expect(throws: StorageError.self) { try await appended.value }
        #expect(error?.kind == .unavailable)
        let firstResult = try #require(await first[0])
        #expect(throws: StorageError.self) { try firstResult.get() }
        #expect(repository.snapshot.audit.isEmpty)
        #expect(repository.snapshot.unitIDsPerAttempt.count == 1)
    }

    @Test("batch selection: an isolated unit at the head goes alone; otherwise round-robin over lanes, oldest first")
    func batchSelection() {
        #expect(GroupCommitter.selectBatch(lanes: [], isolated: [], maximum: 4) == [])
        #expect(GroupCommitter.selectBatch(lanes: ["a", "a"], isolated: [true, false], maximum: 4) == [0])
        #expect(
            GroupCommitter.selectBatch(
                lanes: ["a", "a", "a", "b", "a", "c"], isolated: [false, false, false, false, false, false], maximum: 4)
                == [0, 3, 5, 1])
        #expect(
            GroupCommitter.selectBatch(lanes: ["a", "b", "a"], isolated: [false, true, false], maximum: 8) == [0, 2])
    }

    @Test("the observer sees every transaction: committed ones with their units, rolled-back ones as such")
    func observerSeesEveryTransaction() async throws {
        let gate = Gate()
        let repository = InMemoryRepository(beforeBody: { attempt in if attempt == 1 { await gate.wait() } })
        let observations = Mutex<[GroupCommitObservation]>([])
        let committer = GroupCommitter(repository: repository) { observation in
            observations.withLock { $0.append(observation) }
        }
        async let first = Self.commitConcurrently(committer, [0])
        await repository.waitForAttempt(1)
        async let rest = Self.commitConcurrently(committer, 1..<20, failing: [5])
        await Self.waitUntilQueued(committer, 19)
        gate.open()
        _ = (await first, await rest)
        let seen = observations.withLock { $0 }
        let snapshot = repository.snapshot
        // One observation per transaction attempt, in order; the refused unit rolled one back.
        #expect(seen.count == snapshot.unitsPerAttempt.count)
        // The first unit alone; the 19 queued behind it in one batch, rolled back at the refused
        // unit; the 18 others again.
        #expect(seen.map(\.units) == [1, 19, 18])
        #expect(seen.map(\.committed) == [true, false, true])
        #expect(seen.filter { !$0.committed }.count == 1)
        #expect(seen.filter(\.committed).map(\.units).reduce(0, +) == 19)
        #expect(seen.allSatisfy { $0.duration >= .zero })
    }

    @Test("a unit that throws alone in its batch fails its caller and leaves nothing behind")
    func failingLoneUnit() async throws {
        let repository = InMemoryRepository()
        let committer = GroupCommitter(repository: repository)
        await #expect(throws: UnitFailure(index: 5)) { try await committer.commit(Self.unit(5, fails: true)) }
        let committed = try await committer.commit(Self.unit(6))
        let snapshot = repository.snapshot
        #expect(snapshot.tenants == [Self.tenantID(6)])
        #expect(committed.records.map(\.sequence) == [1])
        #expect(snapshot.head.sequence == 1)
    }

    @Test("a failing audit append fails every caller of the batch and stores nothing of it")
    func failingAppendFailsTheBatch() async throws {
        let gate = Gate()
        let repository = InMemoryRepository(
            beforeBody: { attempt in if attempt == 1 { await gate.wait() } },
            failAppendInAttempt: 2
        )
        let committer = GroupCommitter(repository: repository)
        async let first = Self.commitConcurrently(committer, [0])
        await repository.waitForAttempt(1)
        async let batch = Self.commitConcurrently(committer, 1..<11)
        await Self.waitUntilQueued(committer, 10)
        gate.open()
        let firstResult = try #require((await first)[0])
        let batchResults = await batch
        let after = try await committer.commit(Self.unit(11))
        let snapshot = repository.snapshot

        #expect(snapshot.unitsPerAttempt.first == 1)
        let failedBatch = Set(snapshot.unitIDsPerAttempt[1])
        #expect(failedBatch.count > 1, "the failing batch held one unit: \(snapshot.unitsPerAttempt)")
        _ = try firstResult.get()
        var committed = [0, 11]
        for index in 1..<11 {
            let result = try #require(batchResults[index])
            if failedBatch.contains(Self.tenantID(index)) {
                // Every caller of the batch gets the append's error.
                let error = #expect(throws: StorageError.self) { try result.get() }
                #expect(error?.kind == .unavailable)
            } else {
                _ = try result.get()
                committed.append(index)
            }
        }
        #expect(snapshot.tenants == Set(committed.map(Self.tenantID)))
        #expect(Set(snapshot.audit.map(\.event.requestID)) == Set(committed.map { "request-\($0)" }))
        #expect(snapshot.tenants.isDisjoint(with: failedBatch))
        // The failed batch left no gap.
        let total = committed.reduce(0) { $0 + $1 % 3 + 1 }
        #expect(snapshot.audit.map(\.sequence) == Array(1...Int64(total)))
        #expect(
            AuditChain.verify(snapshot.audit, head: snapshot.head)
                == .verified(records: Int64(total), head: snapshot.head))
        #expect(after.records.last?.sequence == Int64(total))
    }

    @Test(
        "a conflict from the transaction is retried up to three times",
        arguments: [(0, true), (1, true), (3, true), (4, false)] as [(Int, Bool)]
    )
    func conflictRetried(conflicts: Int, succeeds: Bool) async throws {
        let repository = InMemoryRepository(conflicts: conflicts)
        let committer = GroupCommitter(repository: repository)
        if succeeds {
            let committed = try await committer.commit(Self.unit(2))
            #expect(committed.records.map(\.sequence) == [1, 2, 3])
        } else {
            let error = await #expect(throws: StorageError.self) { try await committer.commit(Self.unit(2)) }
            #expect(error?.kind == .conflict)
        }
        let snapshot = repository.snapshot
        #expect(snapshot.unitsPerAttempt.count == min(conflicts, GroupCommitter.conflictRetries) + 1)
        // Retried attempts left nothing behind; the one that committed appended once.
        #expect(snapshot.tenants == (succeeds ? [Self.tenantID(2)] : []))
        #expect(snapshot.audit.count == (succeeds ? 3 : 0))
        #expect(
            AuditChain.verify(snapshot.audit, head: snapshot.head)
                == .verified(records: Int64(snapshot.audit.count), head: snapshot.head))
    }

    @Test("a conflicting batch of many units is retried as a whole")
    func conflictRetriesBatch() async throws {
        let gate = Gate()
        let repository = InMemoryRepository(
            beforeBody: { attempt in if attempt == 1 { await gate.wait() } },
            conflictInAttempts: [2, 3]
        )
        let committer = GroupCommitter(repository: repository)
        async let first = Self.commitConcurrently(committer, [0])
        await repository.waitForAttempt(1)
        async let rest = Self.commitConcurrently(committer, 1..<9)
        await Self.waitUntilQueued(committer, 8)
        gate.open()
        let results = (await first).merging(await rest) { lhs, _ in lhs }
        let snapshot = repository.snapshot
        // Attempts 2 and 3 lost a race; attempt 4 committed the same batch.
        #expect(snapshot.unitsPerAttempt.first == 1)
        #expect(snapshot.unitIDsPerAttempt.count >= 4)
        #expect(snapshot.unitsPerAttempt[1] > 1)
        #expect(snapshot.unitIDsPerAttempt[1] == snapshot.unitIDsPerAttempt[2])
        #expect(snapshot.unitIDsPerAttempt[1] == snapshot.unitIDsPerAttempt[3])
        let stored = Dictionary(uniqueKeysWithValues: snapshot.audit.map { ($0.sequence, $0) })
        for index in 0..<9 {
            Self.expectOwnRecords(try #require(try results[index]?.get()), index: index, stored: stored)
        }
        #expect(snapshot.tenants.count == 9)
    }

    @Test("batches never exceed maximumBatch", arguments: [1, 4, 16])
    func maximumBatch(maximum: Int) async throws {
        let repository = InMemoryRepository(holdTransaction: .milliseconds(5))
        let committer = GroupCommitter(repository: repository, maximumBatch: maximum)
        let results = await Self.commitConcurrently(committer, 0..<40)
        for index in 0..<40 { _ = try #require(try results[index]?.get()) }
        let snapshot = repository.snapshot
        #expect(snapshot.unitsPerAttempt.allSatisfy { $0 >= 1 && $0 <= maximum }, "\(snapshot.unitsPerAttempt)")
        #expect(snapshot.unitsPerAttempt.reduce(0, +) == 40)
        #expect(snapshot.audit.count == (0..<40).reduce(0) { $0 + $1 % 3 + 1 })
        if maximum > 1 {
            #expect(snapshot.unitsPerAttempt.max()! > 1, "no batch formed: \(snapshot.unitsPerAttempt)")
        }
    }

    @Test("units without audit events commit without locking the audit head")
    func noAuditNoHeadLock() async throws {
        let repository = InMemoryRepository()
        let committer = GroupCommitter(repository: repository)
        let committed = try await committer.commit { _ in UnitOutcome("done", audit: []) }
        #expect(committed.value == "done")
        #expect(committed.records.isEmpty)
        #expect(repository.snapshot.headLocksPerAttempt == [0])
        #expect(repository.snapshot.head == .genesis)
    }

    @Test("commits after an earlier batch continue the chain from the stored head")
    func sequentialCommitsContinueTheChain() async throws {
        let repository = InMemoryRepository()
        let committer = GroupCommitter(repository: repository)
        var last: Int64 = 0
        for index in 0..<10 {
            let committed = try await committer.commit(Self.unit(index))
            #expect(committed.records.first?.sequence == last + 1)
            last = committed.records.last!.sequence
        }
        let snapshot = repository.snapshot
        #expect(snapshot.unitsPerAttempt == [Int](repeating: 1, count: 10))
        #expect(AuditChain.verify(snapshot.audit, head: snapshot.head) == .verified(records: last, head: snapshot.head))
    }
}

// MARK: - Test doubles

/// Opens once; everyone waiting, and everyone who comes later, goes on.
final class Gate: Sendable {
    private let state = Mutex<(open: Bool, waiters: [CheckedContinuation<Void, Never>])>((false, []))

    func wait() async {
        await withCheckedContinuation { continuation in
            let proceed = state.withLock { state in
                if state.open { return true }
                state.waiters.append(continuation)
                return false
            }
            if proceed { continuation.resume() }
        }
    }

    func open() {
        let waiters = state.withLock { state in
            state.open = true
            defer { state.waiters = [] }
            return state.waiters
        }
        for waiter in waiters { waiter.resume() }
    }
}

/// A key repository in memory holding only what `GroupCommitter` touches: tenant rows (the units'
/// writes), the audit log and its head. Transactions stage their writes and publish them on
/// commit; savepoints restore the staged state when their body throws. Everything else traps.
final class InMemoryRepository: KeyRepository {
    struct Stored: Sendable {
        var tenants: Set<TenantID> = []
        var audit: [AuditRecord] = []
        var head = AuditHead.genesis
    }

    struct Snapshot: Sendable {
        var tenants: Set<TenantID>
        var audit: [AuditRecord]
        var head: AuditHead
        /// The units (their tenant inserts, rolled back or not) of each transaction attempt, in order.
        var unitIDsPerAttempt: [[TenantID]]
        var unitsPerAttempt: [Int] { unitIDsPerAttempt.map(\.count) }
        var headLocksPerAttempt: [Int]
        var overlappingTransactions: Int
    }

    private struct State: Sendable {
        var stored = Stored()
        var attempts = 0
        var unitIDsPerAttempt: [[TenantID]] = []
        var headLocksPerAttempt: [Int] = []
        var inTransaction = false
        var overlappingTransactions = 0
        var conflictsLeft: Int
    }

    private let state: Mutex<State>
    private let holdTransaction: Duration
    private let beforeBody: @Sendable (Int) async -> Void
    private let failAppendInAttempt: Int?
    private let conflictInAttempts: Set<Int>

    /// - Parameters:
    ///   - holdTransaction: how long each transaction stays open before its body runs (an fsync's
    ///     worth), so concurrent callers queue up and batch.
    ///   - beforeBody: called with the attempt number (from 1) before each body runs.
    ///   - failAppendInAttempt: the attempt whose `appendAuditRecords` throws `.unavailable`.
    ///   - conflicts: the first `conflicts` attempts throw `.conflict` at commit.
    ///   - conflictInAttempts: these attempts throw `.conflict` at commit.
    init(
        holdTransaction: Duration = .zero,
        beforeBody: @escaping @Sendable (Int) async -> Void = { _ in },
        failAppendInAttempt: Int? = nil,
        conflicts: Int = 0,
        conflictInAttempts: Set<Int> = []
    ) {
        self.state = Mutex(State(conflictsLeft: conflicts))
        self.holdTransaction = holdTransaction
        self.beforeBody = beforeBody
        self.failAppendInAttempt = failAppendInAttempt
        self.conflictInAttempts = conflictInAttempts
    }

    var snapshot: Snapshot {
        state.withLock { state in
            Snapshot(
                tenants: state.stored.tenants,
                audit: state.stored.audit,
                head: state.stored.head,
                unitIDsPerAttempt: state.unitIDsPerAttempt,
                headLocksPerAttempt: state.headLocksPerAttempt,
                overlappingTransactions: state.overlappingTransactions
            )
        }
    }

    /// Returns once attempt `attempt` has begun.
    func waitForAttempt(_ attempt: Int) async {
        while state.withLock({ $0.attempts < attempt }) {
            try? await Task.sleep(for: .milliseconds(1))
        }
    }

    func transaction<T: Sendable>(_ body: (any KeyRepositoryTransaction) async throws -> T) async throws -> T {
        let (attempt, stored) = state.withLock { state in
            if state.inTransaction { state.overlappingTransactions += 1 }
            state.inTransaction = true
            state.attempts += 1
            state.unitIDsPerAttempt.append([])
            state.headLocksPerAttempt.append(0)
            return (state.attempts, state.stored)
        }
        defer { state.withLock { $0.inTransaction = false } }
        await beforeBody(attempt)
        if holdTransaction > .zero { try await Task.sleep(for: holdTransaction) }
        let transaction = InMemoryTransaction(repository: self, attempt: attempt, staged: stored)
        let value = try await body(transaction)
        let staged = transaction.staged
        try state.withLock { state throws(StorageError) in
            if state.conflictsLeft > 0 || conflictInAttempts.contains(attempt) {
                state.conflictsLeft = max(0, state.conflictsLeft - 1)
                throw StorageError(.conflict, "serialization failure (test)")
            }
            state.stored = staged
        }
        return value
    }

    func read<T: Sendable>(_ body: (any KeyRepositoryTransaction) async throws -> T) async throws -> T {
        fatalError("not used by GroupCommitter")
    }

    func close() async {}

    fileprivate func noteUnit(_ attempt: Int, _ id: TenantID) {
        state.withLock { $0.unitIDsPerAttempt[attempt - 1].append(id) }
    }

    fileprivate func noteHeadLock(_ attempt: Int) {
        state.withLock { $0.headLocksPerAttempt[attempt - 1] += 1 }
    }

    fileprivate func appendFails(_ attempt: Int) -> Bool { attempt == failAppendInAttempt }
}

/// One transaction of `InMemoryRepository`.
final class InMemoryTransaction: KeyRepositoryTransaction {
    private let repository: InMemoryRepository
    private let attempt: Int
    private let state: Mutex<InMemoryRepository.Stored>

    fileprivate init(repository: InMemoryRepository, attempt: Int, staged: InMemoryRepository.Stored) {
        self.repository = repository
        self.attempt = attempt
        self.state = Mutex(staged)
    }

    var staged: InMemoryRepository.Stored { state.withLock { $0 } }

    func savepoint<T: Sendable>(_ body: () async throws -> T) async throws -> T {
        let saved = staged
        do {
            return try await body()
        } catch {
            state.withLock { $0 = saved }
            throw error
        }
    }

    func insertTenant(_ tenant: TenantRecord) async throws {
        repository.noteUnit(attempt, tenant.id)
        try state.withLock { state throws(StorageError) in
            guard state.tenants.insert(tenant.id).inserted else {
                throw StorageError(.uniqueViolation, "tenant exists")
            }
        }
    }

    func lockAuditHead() async throws -> AnchoredAuditHead {
        repository.noteHeadLock(attempt)
        return AnchoredAuditHead(head: state.withLock { $0.head }, anchor: nil)
    }

    func appendAuditRecords(
        _ records: [AuditRecord],
        head: AuditHead,
        anchor: AuditCheckpoint?,
        keepCheckpoint: Bool
    ) async throws {
        if repository.appendFails(attempt) { throw StorageError(.unavailable, "disk full (test)") }
        try state.withLock { state throws(StorageError) in
            // The committer must link after the head it locked.
            guard records.first?.sequence == state.head.sequence + 1,
                records.first?.previousHash == state.head.hash,
                records.last?.sequence == head.sequence, records.last?.hash == head.hash
            else { throw StorageError(.corrupt, "records do not continue the head") }
            state.audit += records
            state.head = head
        }
    }

    // Not used by GroupCommitter.

    func tenant(_ id: TenantID, forUpdate: Bool) async throws -> TenantRecord? { fatalError() }
    func updateTenant(_ tenant: TenantRecord) async throws { fatalError() }
    func tenants(after: TenantID?, limit: Int) async throws -> [TenantRecord] { fatalError() }
    func insertMasterKeyVersion(_ version: MasterKeyVersionRecord) async throws { fatalError() }
    func masterKeyVersion(_ tenant: TenantID, _ version: MasterKeyVersionNumber) async throws
        -> MasterKeyVersionRecord?
    { fatalError() }
    func masterKeyVersions(_ tenant: TenantID) async throws -> [MasterKeyVersionRecord] { fatalError() }
    func updateMasterKeyVersion(_ version: MasterKeyVersionRecord) async throws { fatalError() }
    func reserveInvocations(_ tenant: TenantID, _ version: MasterKeyVersionNumber, count: Int64, limit: Int64)
        async throws -> Int64?
    { fatalError() }
    func versionsDueForDestruction(now: Timestamp, limit: Int) async throws -> [MasterKeyVersionRecord] {
        fatalError()
    }
    func insertDataKeys(_ keys: [DataKeyRecord]) async throws { fatalError() }
    func dataKey(_ tenant: TenantID, _ id: DataKeyID) async throws -> DataKeyRecord? { fatalError() }
    func dataKeys(_ tenant: TenantID, ids: [DataKeyID]) async throws -> [DataKeyRecord] { fatalError() }
    func dataKeys(_ tenant: TenantID, state: DataKeyState?, after: DataKeyID?, limit: Int) async throws
        -> [DataKeyRecord]
    { fatalError() }
    func dataKeysNotUnderVersion(_ tenant: TenantID, _ version: MasterKeyVersionNumber, after: DataKeyID?, limit: Int)
        async throws -> [DataKeyRecord]
    { fatalError() }
    func countLiveDataKeys(_ tenant: TenantID, version: MasterKeyVersionNumber?) async throws -> Int64 { fatalError() }
    func updateDataKeyWrapping(
        _ tenant: TenantID,
        _ id: DataKeyID,
        fromVersion: MasterKeyVersionNumber,
        toVersion: MasterKeyVersionNumber,
        wrapped: [UInt8],
        contextHash: [UInt8],
        at time: Timestamp
    ) async throws -> Bool { fatalError() }
    func setDataKeyState(
        _ tenant: TenantID, _ id: DataKeyID, to state: DataKeyState, clearWrapped: Bool, at time: Timestamp
    )
        async throws -> Bool
    { fatalError() }
    func countEncryption(_ tenant: TenantID, _ id: DataKeyID, limit: Int64) async throws -> Int64? { fatalError() }
    func deleteDataKeys(_ tenant: TenantID) async throws -> Int64 { fatalError() }
    func idempotencyRecord(scope: String, key: String) async throws -> IdempotencyRecord? { fatalError() }
    func insertIdempotencyRecord(_ record: IdempotencyRecord) async throws { fatalError() }
    func deleteIdempotencyRecords(before time: Timestamp) async throws -> Int64 { fatalError() }
    func rewrapJob(_ tenant: TenantID) async throws -> RewrapJobRecord? { fatalError() }
    func saveRewrapJob(_ job: RewrapJobRecord) async throws { fatalError() }
    func auditHead() async throws -> AnchoredAuditHead { fatalError() }
    func auditCheckpoints(after: Int64, limit: Int) async throws -> [AuditCheckpoint] { fatalError() }
    func auditRecords(after: Int64, limit: Int) async throws -> [AuditRecord] { fatalError() }
}
