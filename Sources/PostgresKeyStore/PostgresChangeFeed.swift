import KeyHierarchy
import Logging
import PostgresNIO

/// A change another gateway instance (or this one) committed to something instances cache, as
/// the `hsmgw_changes` notifications of migration 4 describe it.
public enum StoreChange: Sendable, Hashable {
    /// A tenant's state or primary version, or one of its master-key versions, changed.
    case tenant(TenantID)
    /// A principal, or its role bindings, changed.
    case principal(String)
    /// An API token changed (revoked, deleted).
    case apiToken(String)
    /// A tenant's rewrap job was started or restarted (migration 5): the lease holder runs it.
    case rewrapJob(TenantID)
    /// Changes may have been missed (the listening connection was just opened, or lost): forget
    /// everything cached.
    case everything

    /// The change a notification's payload names; nil for a payload this build does not know (a
    /// newer gateway's kind), which the caller counts and ignores.
    init?(payload: String) {
        guard let colon = payload.firstIndex(of: ":") else { return nil }
        let kind = payload[..<colon]
        let name = String(payload[payload.index(after: colon)...])
        guard !name.isEmpty else { return nil }
        switch kind {
        case "tenant": self = .tenant(TenantID(trusted: name))
        case "principal": self = .principal(name)
        case "token": self = .apiToken(name)
        case "job": self = .rewrapJob(TenantID(trusted: name))
        default: return nil
        }
    }

    /// The kind, for metrics and logs (never the name).
    public var kind: String {
        switch self {
        case .tenant: "tenant"
        case .principal: "principal"
        case .apiToken: "token"
        case .rewrapJob: "job"
        case .everything: "everything"
        }
    }
}

extension PostgresKeyStore {
    /// The channel migration 4's triggers notify.
    static let changeChannel = "hsmgw_changes"

    /// How long to wait before listening again after the listening connection was lost or could
    /// not be opened: short, since caches are flushed meanwhile (every call reads the store), and
    /// not a busy loop while the server is down.
    public static let changeListenerRetryInterval: Duration = .milliseconds(250)

    /// How often the listening connection is pinged: a connection that died without a reset (a
    /// partition, a host gone) delivers nothing and raises nothing, so a ping that fails or takes
    /// longer than `changeListenerPingTimeout` ends it, and the caches are flushed.
    public static let changeListenerPingInterval: Duration = .seconds(2)

    /// How long a ping of the listening connection may take before the connection counts as dead.
    public static let changeListenerPingTimeout: Duration = .seconds(3)

    /// Listens for `hsmgw_changes` on a connection of its own and calls `onChange` for every
    /// change, until the task is cancelled.
    ///
    /// `onChange(.everything)` comes once `LISTEN` is in effect on each new connection (anything
    /// committed before it was not heard) and whenever the connection is lost or cannot be
    /// opened, so a caller that forgets what the changes name is never left with an entry it
    /// was not told about. Notifications are delivered in commit order, after the commit.
    public func followChanges(_ onChange: @escaping @Sendable (StoreChange) -> Void) async {
        while !Task.isCancelled {
            do {
                let connection = try await makeDedicatedConnection()
                do {
                    try await listen(on: connection, onChange)
                } catch {
                    if !Task.isCancelled {
                        logger.warning(
                            "change listener connection lost; caches flushed",
                            metadata: [
                                "error": "\(PostgresErrorMapping.storageError(error, operation: "listen").detail)"
                            ]
                        )
                    }
                }
                try? await connection.close()
            } catch {
                logger.debug("change listener cannot connect", metadata: ["error": "\(error)"])
            }
            onChange(.everything)
            try? await Task.sleep(for: Self.changeListenerRetryInterval)
        }
    }

    /// Listens on `connection` until it fails (or the task is cancelled), pinging it meanwhile.
    private func listen(
        on connection: PostgresConnection,
        _ onChange: @escaping @Sendable (StoreChange) -> Void
    ) async throws {
        let logger = self.logger
        try await connection.listen(on: Self.changeChannel) { notifications in
            logger.debug("listening for changes")
            onChange(.everything)
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    for try await notification in notifications {
                        if let change = StoreChange(payload: notification.payload) {
                            onChange(change)
                        } else {
                            logger.debug("unknown change notification ignored")
                        }
                    }
                    throw StorageError(.unavailable, "the change notifications ended")
                }
                group.addTask {
                    while true {
                        try await Task.sleep(for: Self.changeListenerPingInterval)
                        try await PostgresPool.withTimeout(Self.changeListenerPingTimeout, late: { _ in }) {
                            _ = try await connection.query("SELECT 1", logger: logger)
                        }
                    }
                }
                defer { group.cancelAll() }
                try await group.next()
            }
        }
    }
}
