import KeyHierarchy
import PostgresNIO

/// Turns postgres-nio's errors into `StorageError`s.
///
/// The detail keeps what an operator needs (the operation, SQLSTATE, constraint, table and column,
/// the server's message) and never a bound value: the server's `DETAIL` field (which repeats key
/// values) is dropped, and so is the message of class 22 errors (data exceptions quote the
/// offending input). `String(reflecting:)` of a `PSQLError` prints the query's binds and is never
/// used.
enum PostgresErrorMapping {
    /// SQLSTATEs that mean "the transaction lost a race; retry it".
    static let conflictStates: Set<String> = [
        "40001",  // serialization_failure
        "40P01",  // deadlock_detected
        "55P03",  // lock_not_available (lock_timeout, NOWAIT)
    ]

    /// SQLSTATEs, besides class 08 (connection exception) and 53 (insufficient resources), that
    /// mean the server cannot serve us now.
    static let unavailableStates: Set<String> = [
        "28000",  // invalid_authorization_specification
        "28P01",  // invalid_password
        "3D000",  // invalid_catalog_name: the database does not exist
        "57014",  // query_canceled (statement_timeout)
        "57P01",  // admin_shutdown
        "57P02",  // crash_shutdown
        "57P03",  // cannot_connect_now (starting up, shutting down)
        "57P04",  // database_dropped
        "57P05",  // idle_session_timeout: the server ended the session
        "25P03",  // idle_in_transaction_session_timeout: the server ended the session
        "25006",  // read_only_sql_transaction: a hot standby, not the primary
    ]

    /// The `StorageError` for `error`, raised while running `operation`. A `StorageError` passes
    /// through unchanged.
    static func storageError(_ error: any Error, operation: String) -> StorageError {
        switch error {
        case let error as StorageError:
            return error
        case let error as PSQLError:
            return storageError(error, operation: operation)
        case let error as PostgresDecodingError:
            return StorageError(
                .corrupt,
                "\(operation): column \(error.columnName) (#\(error.columnIndex)) does not decode as "
                    + "\(error.targetType) from \(error.postgresType): \(error.code)"
            )
        default:
            // Thrown by the pool (no connection could be leased: circuit breaker, shut down).
            return StorageError(.unavailable, "\(operation): \(type(of: error))")
        }
    }

    private static func storageError(_ error: PSQLError, operation: String) -> StorageError {
        guard error.code == .server, let info = error.serverInfo else {
            return StorageError(clientKind(error.code), "\(operation): \(error.code)")
        }
        let state = info[.sqlState] ?? "?????"
        var detail = "\(operation): SQLSTATE \(state)"
        if let constraint = info[.constraintName] { detail += ", constraint \(constraint)" }
        if let table = info[.tableName] { detail += ", table \(table)" }
        if let column = info[.columnName] { detail += ", column \(column)" }
        if !state.hasPrefix("22"), let message = info[.message] { detail += ": \(message)" }
        return StorageError(serverKind(state), detail)
    }

    /// The kind for a SQLSTATE.
    static func serverKind(_ state: String) -> StorageError.Kind {
        switch state {
        case "23505": return .uniqueViolation
        case "23503": return .foreignKeyViolation
        case _ where conflictStates.contains(state): return .conflict
        case _ where unavailableStates.contains(state) || state.hasPrefix("08") || state.hasPrefix("53"):
            return .unavailable
        case "XX001", "XX002": return .corrupt  // data_corrupted, index_corrupted
        default: return .other
        }
    }

    /// The kind for a failure on our side of the connection.
    private static func clientKind(_ code: PSQLError.Code) -> StorageError.Kind {
        switch code {
        case .connectionError, .serverClosedConnection, .clientClosedConnection, .uncleanShutdown, .poolClosed,
            .queryCancelled, .sslUnsupported, .failedToAddSSLHandler, .receivedUnencryptedDataAfterSSLRequest,
            .unsupportedAuthMechanism, .authMechanismRequiresPassword, .saslError:
            return .unavailable
        default:
            return .other
        }
    }
}
