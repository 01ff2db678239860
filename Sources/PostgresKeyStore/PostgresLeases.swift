import KeyHierarchy
import PostgresNIO

extension PostgresKeyStore {
    /// The longest a lease call may take: a renewal that has not answered by then has failed (the
    /// holder must know well before its lease runs out; a frozen server answers nothing).
    public static let leaseCallTimeout: Duration = .seconds(2)

    /// Takes the lease `name` for `holder` when it is free or expired, or renews it when `holder`
    /// holds it, for `duration` from now by the server's clock. Returns the lease's fencing token
    /// (it grows at every change of holder) when `holder` holds it afterwards, nil when another
    /// holder's lease has not expired. One conditional statement: two instances taking an expired
    /// lease at once cannot both win.
    public func acquireLease(_ name: String, holder: String, duration: Duration) async throws -> Int64? {
        let milliseconds = duration.components.seconds * 1000 + duration.components.attoseconds / 1_000_000_000_000_000
        return try await PostgresPool.withTimeout(Self.leaseCallTimeout) { [self] in
            try await withLeasedConnection(operation: "acquireLease") { connection in
                let rows = try await Self.query(
                    connection,
                    """
                    INSERT INTO leases (name, holder, token, expires_at) \
                    VALUES (\(name), \(holder), 1, clock_timestamp() + \(milliseconds)::float8 * interval '1 millisecond') \
                    ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
                    token = CASE WHEN leases.holder = excluded.holder THEN leases.token ELSE leases.token + 1 END, \
                    expires_at = excluded.expires_at \
                    WHERE leases.holder = excluded.holder OR leases.expires_at <= clock_timestamp() \
                    RETURNING token
                    """,
                    logger: logger,
                    operation: "acquireLease"
                )
                guard let row = rows.first else { return nil }
                return try Self.decode(row, as: Int64.self, operation: "acquireLease")
            }
        }
    }

    /// Gives the lease up when `holder` holds it (a graceful shutdown), so another instance takes
    /// it at its next attempt instead of after the expiry.
    public func releaseLease(_ name: String, holder: String) async throws {
        try await PostgresPool.withTimeout(Self.leaseCallTimeout) { [self] in
            try await withLeasedConnection(operation: "releaseLease") { connection in
                _ = try await Self.query(
                    connection,
                    "DELETE FROM leases WHERE name = \(name) AND holder = \(holder)",
                    logger: logger,
                    operation: "releaseLease"
                )
            }
        }
    }
}
