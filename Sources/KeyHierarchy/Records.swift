/// A tenant as stored.
public struct TenantRecord: Sendable, Hashable {
    public var id: TenantID
    public var state: TenantState
    /// The version that wraps new data keys; 0 only while a tenant is being created.
    public var primaryVersion: MasterKeyVersionNumber
    public var createdAt: Timestamp
    public var updatedAt: Timestamp

    public init(
        id: TenantID,
        state: TenantState,
        primaryVersion: MasterKeyVersionNumber,
        createdAt: Timestamp,
        updatedAt: Timestamp
    ) {
        self.id = id
        self.state = state
        self.primaryVersion = primaryVersion
        self.createdAt = createdAt
        self.updatedAt = updatedAt
    }
}

/// The `CKA_ID` of a master-key object on the token: 16 random bytes chosen when the version is
/// created. Not secret; the handle is never stored, the key is found again by this id.
public struct TokenKeyID: Hashable, Sendable, CustomStringConvertible {
    public static let byteCount = 16
    public let bytes: [UInt8]

    public init?(bytes: [UInt8]) {
        guard bytes.count == Self.byteCount else { return nil }
        self.bytes = bytes
    }

    public static func random() -> TokenKeyID {
        var generator = SystemRandomNumberGenerator()
        return TokenKeyID(bytes: (0..<byteCount).map { _ in UInt8.random(in: 0...255, using: &generator) })!
    }

    public var description: String { bytes.hexString }
}

extension String {
    func leftPadded(to width: Int) -> String {
        count >= width ? self : String(repeating: "0", count: width - count) + self
    }
}

/// One master-key version as stored.
public struct MasterKeyVersionRecord: Sendable, Hashable {
    public var tenant: TenantID
    public var version: MasterKeyVersionNumber
    public var state: MasterKeyState
    /// The key object's `CKA_ID` on the token.
    public var tokenKeyID: TokenKeyID
    /// IV counter values handed out under this version (reserved in blocks before use, so the
    /// count never falls behind the real number of encryptions, even after a crash).
    public var invocationsReserved: Int64
    public var createdAt: Timestamp
    public var updatedAt: Timestamp
    /// When a scheduled destruction becomes due; nil when none is scheduled.
    public var destroyAfter: Timestamp?
    public var destroyedAt: Timestamp?

    public init(
        tenant: TenantID,
        version: MasterKeyVersionNumber,
        state: MasterKeyState,
        tokenKeyID: TokenKeyID,
        invocationsReserved: Int64 = 0,
        createdAt: Timestamp,
        updatedAt: Timestamp,
        destroyAfter: Timestamp? = nil,
        destroyedAt: Timestamp? = nil
    ) {
        self.tenant = tenant
        self.version = version
        self.state = state
        self.tokenKeyID = tokenKeyID
        self.invocationsReserved = invocationsReserved
        self.createdAt = createdAt
        self.updatedAt = updatedAt
        self.destroyAfter = destroyAfter
        self.destroyedAt = destroyedAt
    }
}

/// One data key as stored: never its plaintext.
public struct DataKeyRecord: Sendable, Hashable {
    public var tenant: TenantID
    public var id: DataKeyID
    /// The master-key version that wrapped it.
    public var version: MasterKeyVersionNumber
    public var state: DataKeyState
    /// The wrapped key (`WrappedDataKey` encoding); nil once destroyed.
    public var wrapped: [UInt8]?
    /// SHA-256 of the canonical encryption context. Lets the rewrap job rebuild the AAD without
    /// the caller; the context values themselves are never stored.
    public var contextHash: [UInt8]
    /// Encryptions performed under this key by the gateway's Encrypt (random 96-bit nonces,
    /// counted to stay below NIST SP 800-38D's 2^32 bound).
    public var encryptions: Int64
    public var createdAt: Timestamp
    public var updatedAt: Timestamp

    public init(
        tenant: TenantID,
        id: DataKeyID,
        version: MasterKeyVersionNumber,
        state: DataKeyState,
        wrapped: [UInt8]?,
        contextHash: [UInt8],
        encryptions: Int64 = 0,
        createdAt: Timestamp,
        updatedAt: Timestamp
    ) {
        self.tenant = tenant
        self.id = id
        self.version = version
        self.state = state
        self.wrapped = wrapped
        self.contextHash = contextHash
        self.encryptions = encryptions
        self.createdAt = createdAt
        self.updatedAt = updatedAt
    }
}

/// What a create-type call returned the first time, kept under its idempotency key.
public struct IdempotencyRecord: Sendable, Hashable {
    /// The tenant id, or "" for calls outside a tenant (tenant creation).
    public var scope: String
    public var key: String
    /// The operation's name (`AuditOperation.rawValue`): a key reused for another call is refused.
    public var operation: String
    /// SHA-256 over the request's parameters: a key reused with other parameters is refused.
    public var fingerprint: [UInt8]
    /// The result, as text the operation understands (ids, never key material).
    public var result: String
    public var createdAt: Timestamp

    public init(
        scope: String,
        key: String,
        operation: String,
        fingerprint: [UInt8],
        result: String,
        createdAt: Timestamp
    ) {
        self.scope = scope
        self.key = key
        self.operation = operation
        self.fingerprint = fingerprint
        self.result = result
        self.createdAt = createdAt
    }
}

/// State of a tenant's rewrap job.
public enum RewrapJobState: String, Sendable, Hashable, Codable {
    case running
    case completed
}

/// A tenant's rewrap job as stored: one per tenant; a new start replaces a completed job.
public struct RewrapJobRecord: Sendable, Hashable {
    public var tenant: TenantID
    /// The version every data key is moved to (the primary when the job started).
    public var targetVersion: MasterKeyVersionNumber
    public var state: RewrapJobState
    /// The last data key id handled, in id order; the job resumes after it.
    public var cursor: DataKeyID?
    public var moved: Int64
    /// Data keys not under the target version when the job started.
    public var total: Int64
    public var startedAt: Timestamp
    public var updatedAt: Timestamp

    public init(
        tenant: TenantID,
        targetVersion: MasterKeyVersionNumber,
        state: RewrapJobState,
        cursor: DataKeyID?,
        moved: Int64,
        total: Int64,
        startedAt: Timestamp,
        updatedAt: Timestamp
    ) {
        self.tenant = tenant
        self.targetVersion = targetVersion
        self.state = state
        self.cursor = cursor
        self.moved = moved
        self.total = total
        self.startedAt = startedAt
        self.updatedAt = updatedAt
    }
}
