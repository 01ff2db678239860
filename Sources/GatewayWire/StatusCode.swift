/// A response's status: gRPC's canonical codes, with gRPC's numbers, carried in the frame
/// header's status field and repeated in the `Status` message of a failed response.
public struct StatusCode: RawRepresentable, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    /// Success; the payload is the method's response message.
    public static let ok = StatusCode(rawValue: 0)
    /// The caller cancelled the request (a cancel frame).
    public static let cancelled = StatusCode(rawValue: 1)
    /// An error with no better code (a peer sent a status this build does not know).
    public static let unknown = StatusCode(rawValue: 2)
    /// A field is malformed or over its limit, the payload is not the method's message, or a
    /// ciphertext, wrapped key or context does not authenticate (reason `DECRYPTION_FAILED`).
    public static let invalidArgument = StatusCode(rawValue: 3)
    /// The request's deadline passed before it finished.
    public static let deadlineExceeded = StatusCode(rawValue: 4)
    /// The tenant, key or version does not exist, or the caller may not know whether it does.
    public static let notFound = StatusCode(rawValue: 5)
    /// A create for something that exists; an idempotency key reused for another request.
    public static let alreadyExists = StatusCode(rawValue: 6)
    /// Authenticated, but the principal's roles do not allow this method on this tenant.
    public static let permissionDenied = StatusCode(rawValue: 7)
    /// A limit was reached: requests in flight, a queue's wait bound, invocations under a key.
    public static let resourceExhausted = StatusCode(rawValue: 8)
    /// The state forbids it (disabled tenant or key, a version's state, a referenced version).
    public static let failedPrecondition = StatusCode(rawValue: 9)
    /// A concurrent change won; retrying may succeed.
    public static let aborted = StatusCode(rawValue: 10)
    /// A value is out of its range (reserved; the gateway uses `INVALID_ARGUMENT`).
    public static let outOfRange = StatusCode(rawValue: 11)
    /// The method number is unknown to this server.
    public static let unimplemented = StatusCode(rawValue: 12)
    /// A bug or an unexpected failure inside the gateway; details are in the server log only.
    public static let internalError = StatusCode(rawValue: 13)
    /// The HSM or the database cannot be reached now, the gateway is sealed, or the connection
    /// is going away. Retrying (with backoff, on another connection after a goaway) may succeed.
    public static let unavailable = StatusCode(rawValue: 14)
    /// Stored state is inconsistent.
    public static let dataLoss = StatusCode(rawValue: 15)
    /// No valid credentials: no handshake yet, or an unknown, revoked or expired token.
    public static let unauthenticated = StatusCode(rawValue: 16)

    /// The upper-case name as in gRPC, e.g. `PERMISSION_DENIED`.
    public var name: String {
        switch rawValue {
        case 0: return "OK"
        case 1: return "CANCELLED"
        case 2: return "UNKNOWN"
        case 3: return "INVALID_ARGUMENT"
        case 4: return "DEADLINE_EXCEEDED"
        case 5: return "NOT_FOUND"
        case 6: return "ALREADY_EXISTS"
        case 7: return "PERMISSION_DENIED"
        case 8: return "RESOURCE_EXHAUSTED"
        case 9: return "FAILED_PRECONDITION"
        case 10: return "ABORTED"
        case 11: return "OUT_OF_RANGE"
        case 12: return "UNIMPLEMENTED"
        case 13: return "INTERNAL"
        case 14: return "UNAVAILABLE"
        case 15: return "DATA_LOSS"
        case 16: return "UNAUTHENTICATED"
        default: return "STATUS_\(rawValue)"
        }
    }

    public var description: String { name }
}
