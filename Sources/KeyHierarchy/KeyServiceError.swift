/// An error from the key service: a code from an open set and a message that is safe to show a
/// client (no key material, PIN, payload, context value, `CK_RV`, SQL or token label).
///
/// Adapters put what operators need (the `CK_RV`, the SQL state) in `underlying`, which goes to
/// the server log only; `description` never includes it.
public struct KeyServiceError: Error, Hashable, Sendable, CustomStringConvertible {
    /// What kind of failure; the wire layer maps each code to one status.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Value: String, Sendable {
            case invalidArgument = "invalid argument"
            case notFound = "not found"
            case alreadyExists = "already exists"
            case failedPrecondition = "failed precondition"
            case resourceExhausted = "resource exhausted"
            case decryptionFailed = "decryption failed"
            case aborted = "aborted"
            case unavailable = "unavailable"
            case dataLoss = "data loss"
            case internalError = "internal error"
        }

        private let value: Value
        private init(_ value: Value) { self.value = value }

        /// A field is malformed or over its limit.
        public static let invalidArgument = Code(.invalidArgument)
        /// The tenant, version or data key does not exist (or belongs to another tenant).
        public static let notFound = Code(.notFound)
        /// A create call for something that exists; or an idempotency key reused for a
        /// different request.
        public static let alreadyExists = Code(.alreadyExists)
        /// The call is valid but the state forbids it (disabled tenant or key, a version state
        /// that does not allow the operation, a referenced version, a too-short waiting period).
        public static let failedPrecondition = Code(.failedPrecondition)
        /// A limit was reached (invocations under a data key, a full queue, a timeout).
        public static let resourceExhausted = Code(.resourceExhausted)
        /// Ciphertext, wrapped key or encryption context does not authenticate. Deliberately
        /// one code for all three, so a caller learns nothing about which part was wrong.
        public static let decryptionFailed = Code(.decryptionFailed)
        /// A concurrent change won; retrying may succeed.
        public static let aborted = Code(.aborted)
        /// The token or the database cannot be reached now.
        public static let unavailable = Code(.unavailable)
        /// Stored state is inconsistent (a master key missing from the token, a broken row).
        public static let dataLoss = Code(.dataLoss)
        /// A bug or an unexpected failure of a dependency.
        public static let internalError = Code(.internalError)

        public var description: String { value.rawValue }
    }

    public let code: Code
    /// The client-safe message.
    public let message: String
    /// The cause, for the server log only (may hold `CK_RV` names or SQL states).
    public let underlying: String?

    public init(_ code: Code, _ message: String, underlying: String? = nil) {
        self.code = code
        self.message = message
        self.underlying = underlying
    }

    public var description: String { "\(code): \(message)" }

    /// For the server log: the message and the underlying cause.
    public var logDescription: String {
        underlying.map { "\(description) (\($0))" } ?? description
    }

    public static func == (lhs: KeyServiceError, rhs: KeyServiceError) -> Bool {
        lhs.code == rhs.code && lhs.message == rhs.message
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(code)
        hasher.combine(message)
    }
}

/// A failure inside a storage adapter, which the key service turns into a `KeyServiceError`.
public struct StorageError: Error, Hashable, Sendable, CustomStringConvertible {
    public enum Kind: Hashable, Sendable {
        /// A unique constraint refused a row (the duplicate the constraint guards against).
        case uniqueViolation
        /// A foreign key refused a row (an orphan the constraint guards against).
        case foreignKeyViolation
        /// The transaction lost a race (serialization failure, deadlock, busy): retry it.
        case conflict
        /// The database cannot be reached or refused the connection.
        case unavailable
        /// Stored data does not parse (a corrupted or hand-edited row).
        case corrupt
        /// Anything else.
        case other
    }

    public let kind: Kind
    /// For the server log; may hold SQL states and constraint names, never values.
    public let detail: String

    public init(_ kind: Kind, _ detail: String) {
        self.kind = kind
        self.detail = detail
    }

    public var description: String { "storage error (\(kind)): \(detail)" }
}

/// A failure inside the token adapter.
public struct TokenError: Error, Hashable, Sendable, CustomStringConvertible {
    public enum Kind: Hashable, Sendable {
        /// GCM authentication failed: wrong key, IV, AAD, or a changed blob.
        case authenticationFailed
        /// The master key object is not on the token.
        case keyNotFound
        /// The master key on the token is weaker than the policy (extractable, wrong usage...).
        case policyViolation
        /// The token cannot be reached, or no session was free in time.
        case unavailable
        /// The object found by `CKA_ID` is not the key it must be (its label names another tenant
        /// or version, or it is not a gateway key at all): the database pointed a version at the
        /// wrong object.
        case bindingViolation
        /// The caller's task was cancelled (its deadline passed, or its connection went away)
        /// before the token ran the operation; nothing failed.
        case cancelled
        /// Anything else.
        case other
    }

    public let kind: Kind
    /// For the server log; may hold `CK_RV` names, never key material or PINs.
    public let detail: String
    /// The key the error concerns, when one does (a binding violation names the object's `CKA_ID`).
    public let key: TokenKeyID?

    public init(_ kind: Kind, _ detail: String, key: TokenKeyID? = nil) {
        self.kind = kind
        self.detail = detail
        self.key = key
    }

    public var description: String { "token error (\(kind)): \(detail)" }
}
