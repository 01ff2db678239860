import Synchronization

/// What the set-based units of one group-commit transaction share, so that a batch of N
/// GenerateDataKey calls costs a fixed number of statements rather than about 4N:
///
/// - a tenant row is locked (`FOR UPDATE`) and read once per batch, and a master-key version read
///   once, whatever the number of units that check them;
/// - invocation counts are added up per version and written with one conditional `UPDATE` each;
/// - data keys are inserted with one multi-row statement for the whole batch.
///
/// The deferred writes are flushed by the committer after the last unit and before the audit
/// append (the audit head lock), and before any unit that does not use the scope (it may read
/// what they write, or change what was read). What was read is forgotten at that point too, so a
/// unit that changes a tenant or a version in the same batch is seen by every later unit.
///
/// Why it is safe: every unit that reserves invocations first locks the tenant through the scope,
/// and every change of a tenant's primary or of a version's state or count takes the same tenant
/// lock, so within the transaction the rows read once cannot change under the units; the folded
/// `UPDATE` keeps its own condition (`invocations_reserved <= limit - count`), and should it find
/// the count moved anyway the batch fails with `StorageError.conflict` and runs again from the
/// start. A scope lives for one attempt of one transaction; a rerun gets a fresh one.
public final class BatchScope: Sendable {
    private struct VersionKey: Hashable {
        let tenant: TenantID
        let version: MasterKeyVersionNumber
    }

    private struct Reservation {
        var count: Int64
        var limit: Int64
    }

    private struct State {
        /// Tenants locked in this transaction; nil when the tenant does not exist.
        var tenants: [TenantID: TenantRecord?] = [:]
        var versions: [VersionKey: MasterKeyVersionRecord?] = [:]
        /// Invocations reserved by the units so far and not yet written, in the order first
        /// reserved (so the statements run in a stable order).
        var reservations: [VersionKey: Reservation] = [:]
        var reservationOrder: [VersionKey] = []
        var dataKeys: [DataKeyRecord] = []
    }

    private let state = Mutex(State())

    init() {}

    /// Locks and reads the tenant row once per transaction (`FOR UPDATE`); later calls get the
    /// same record.
    public func lockedTenant(_ id: TenantID, in transaction: any KeyRepositoryTransaction) async throws
        -> TenantRecord?
    {
        if let known = state.withLock({ $0.tenants[id] }) {
            return known
        }
        let record = try await transaction.tenant(id, forUpdate: true)
        state.withLock { $0.tenants[id] = .some(record) }
        return record
    }

    /// Reads a master-key version once per transaction. Call it after `lockedTenant` of its
    /// tenant: the lock is what keeps the row from changing meanwhile.
    public func masterKeyVersion(
        _ tenant: TenantID,
        _ version: MasterKeyVersionNumber,
        in transaction: any KeyRepositoryTransaction
    ) async throws -> MasterKeyVersionRecord? {
        let key = VersionKey(tenant: tenant, version: version)
        if let known = state.withLock({ $0.versions[key] }) {
            return known
        }
        let record = try await transaction.masterKeyVersion(tenant, version)
        state.withLock { $0.versions[key] = .some(record) }
        return record
    }

    /// Reserves `count` uses of the version when its stored count, plus what earlier units of
    /// this batch reserved, plus `count` stays within `limit`; false (nothing reserved) when it
    /// would not or the version does not exist. The count is written at the flush.
    public func reserveInvocations(
        _ tenant: TenantID,
        _ version: MasterKeyVersionNumber,
        count: Int64,
        limit: Int64,
        in transaction: any KeyRepositoryTransaction
    ) async throws -> Bool {
        guard count >= 0 else { throw StorageError(.other, "reserveInvocations: negative count") }
        guard let record = try await masterKeyVersion(tenant, version, in: transaction) else { return false }
        let key = VersionKey(tenant: tenant, version: version)
        return state.withLock { state in
            let pending = state.reservations[key]?.count ?? 0
            guard record.invocationsReserved <= limit - pending - count else { return false }
            if state.reservations[key] == nil {
                state.reservationOrder.append(key)
                state.reservations[key] = Reservation(count: count, limit: limit)
            } else {
                state.reservations[key]!.count += count
                state.reservations[key]!.limit = min(state.reservations[key]!.limit, limit)
            }
            return true
        }
    }

    /// Queues rows for the batch's one multi-row insert.
    public func insertDataKeys(_ keys: [DataKeyRecord]) {
        state.withLock { $0.dataKeys += keys }
    }

    /// Writes what the units deferred: one conditional `UPDATE` per version reserved from, then
    /// the data keys in one statement (or one per 1,000 rows). With `forget`, what was read is
    /// dropped as well (a unit outside the scope runs next).
    func flush(_ transaction: any KeyRepositoryTransaction, forget: Bool) async throws {
        let (order, reservations, keys) = state.withLock { state in
            defer {
                state.reservations = [:]
                state.reservationOrder = []
                state.dataKeys = []
            }
            return (state.reservationOrder, state.reservations, state.dataKeys)
        }
        for key in order {
            guard let reservation = reservations[key] else { continue }
            guard
                try await transaction.reserveInvocations(
                    key.tenant, key.version, count: reservation.count, limit: reservation.limit) != nil
            else {
                // Only a writer that skipped the tenant lock could have moved the count; run the
                // batch again from a fresh read.
                throw StorageError(.conflict, "the invocation count of a master-key version changed under a batch")
            }
            state.withLock { state in
                if case .some(.some(var record)) = state.versions[key] {
                    record.invocationsReserved += reservation.count
                    state.versions[key] = record
                }
            }
        }
        if !keys.isEmpty { try await transaction.insertDataKeys(keys) }
        if forget {
            state.withLock { state in
                state.tenants = [:]
                state.versions = [:]
            }
        }
    }
}
