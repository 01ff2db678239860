import KeyHierarchy
import Synchronization

/// What a connection's credentials mean right now: its principal (roles, disabled flag) and,
/// when it authenticated with an API token, that token's record (revocation, expiry). Every
/// request is checked against it, so a revoked or expired token, a disabled principal or a
/// removed role stops working on connections that are already open.
///
/// Entries live `ttl` (at most 2 s, the protocol's promise); the instance that revokes a token or
/// changes a principal drops the affected entries at once, and on PostgreSQL every other instance
/// drops them when the change is notified (`ChangePropagationService`), well within the TTL. Concurrent requests of one connection
/// share one lookup (a burst of 1,000 requests costs two reads, not 2,000).
final class AccessCache: Sendable {
    /// Who a connection acts as: a principal and the token it presented (nil: a certificate).
    struct Key: Hashable, Sendable {
        var principal: String
        var tokenID: String?
    }

    /// The stored state behind a key, as of `loadedAt`.
    struct Snapshot: Sendable {
        var principal: PrincipalRecord
        var token: APITokenRecord?
    }

    /// The most keys kept: one per live (principal, token) pair; beyond it the cache starts
    /// over, which costs reads but keeps memory bounded whatever callers do.
    static let maximumEntries = 10_000

    private struct Entry {
        var loadedAt: ContinuousClock.Instant
        var task: Task<Snapshot, any Error>
    }

    let ttl: Duration
    private let entries = Mutex<[Key: Entry]>([:])

    init(ttl: Duration) {
        self.ttl = ttl
    }

    /// The snapshot for `key`, loading it with `load` when missing or older than `ttl`.
    func snapshot(
        for key: Key,
        load: @escaping @Sendable () async throws -> Snapshot
    ) async throws -> Snapshot {
        let now = ContinuousClock.now
        let task = entries.withLock { entries -> Task<Snapshot, any Error> in
            if let entry = entries[key], now - entry.loadedAt < ttl {
                return entry.task
            }
            if entries.count >= Self.maximumEntries {
                entries.removeAll(keepingCapacity: true)
            }
            let task = Task { try await load() }
            entries[key] = Entry(loadedAt: now, task: task)
            return task
        }
        do {
            return try await task.value
        } catch {
            // A failed load (the store is down) is not remembered: the next request tries again.
            entries.withLock { entries in
                if let entry = entries[key], entry.loadedAt == now { entries[key] = nil }
            }
            throw error
        }
    }

    /// Seeds the cache after a handshake, which has just read both records.
    func store(_ snapshot: Snapshot, for key: Key) {
        let task = Task<Snapshot, any Error> { snapshot }
        entries.withLock { entries in
            if entries.count >= Self.maximumEntries { entries.removeAll(keepingCapacity: true) }
            entries[key] = Entry(loadedAt: .now, task: task)
        }
    }

    /// Drops every entry of the token (it was revoked, here or on another instance).
    func invalidate(tokenID: String) {
        entries.withLock { entries in entries = entries.filter { $0.key.tokenID != tokenID } }
    }

    /// Drops every entry of the principal (its roles or state changed, here or elsewhere).
    func invalidate(principal: String) {
        entries.withLock { entries in entries = entries.filter { $0.key.principal != principal } }
    }

    /// Drops every entry (changes may have been missed).
    func invalidateAll() {
        entries.withLock { $0.removeAll() }
    }
}
