/// The key service's limits and policies. Each has a reason; `validate()` enforces the bounds.
public struct KeyServiceConfiguration: Sendable, Hashable {
    /// Wraps allowed under one master-key version before the tenant rotates automatically.
    /// NIST SP 800-38D bounds GCM to 2^32 invocations per key with random IVs; the gateway's
    /// IVs are deterministic (never repeat by construction), and it still rotates far below
    /// that: 2^30 by default. At most 2^32 - 1.
    public var invocationLimit: Int64 = 1 << 30
    /// IV counters reserved from the database at a time. A crash wastes at most one block;
    /// larger blocks mean fewer database round trips.
    public var invocationBlockSize: Int64 = 256
    /// Encryptions allowed under one data key through Encrypt (random 96-bit nonces: NIST's
    /// 2^32 bound applies; 2^30 leaves a wide margin). Beyond it Encrypt refuses the key.
    public var dataKeyEncryptionLimit: Int64 = 1 << 30
    /// Default waiting period before a scheduled master-key destruction is carried out.
    public var destructionWaitingPeriodDays = 30
    /// The shortest waiting period an operator may ask for: time to notice a mistake.
    public static let minimumDestructionWaitingPeriodDays = 7
    /// The longest waiting period accepted.
    public static let maximumDestructionWaitingPeriodDays = 365
    /// The most data keys one GenerateDataKeys or DecryptDataKeys call handles.
    public static let maximumBatchSize = 1000
    /// How long an idempotency key is remembered (AWS and Stripe keep 24 hours).
    public var idempotencyRetentionHours = 24
    /// The longest idempotency key accepted.
    public static let maximumIdempotencyKeyLength = 128
    /// Write units per group-commit transaction.
    public var groupCommitMaximumBatch = GroupCommitter.defaultMaximumBatch
    /// Data keys the rewrap job moves per transaction.
    public var rewrapBatchSize = 100

    public init() {}

    /// Throws `invalidArgument` naming the first setting out of bounds.
    public func validate() throws(KeyServiceError) {
        guard invocationLimit >= 1, invocationLimit < (1 << 32) else {
            throw KeyServiceError(.invalidArgument, "invocation limit must be between 1 and 2^32 - 1")
        }
        guard invocationBlockSize >= 1, invocationBlockSize <= 1 << 20 else {
            throw KeyServiceError(.invalidArgument, "invocation block size must be between 1 and 2^20")
        }
        guard dataKeyEncryptionLimit >= 1, dataKeyEncryptionLimit < (1 << 32) else {
            throw KeyServiceError(.invalidArgument, "data key encryption limit must be between 1 and 2^32 - 1")
        }
        guard
            (Self.minimumDestructionWaitingPeriodDays...Self.maximumDestructionWaitingPeriodDays).contains(
                destructionWaitingPeriodDays
            )
        else {
            throw KeyServiceError(
                .invalidArgument,
                "destruction waiting period must be \(Self.minimumDestructionWaitingPeriodDays) to \(Self.maximumDestructionWaitingPeriodDays) days"
            )
        }
        guard idempotencyRetentionHours >= 1, idempotencyRetentionHours <= 24 * 30 else {
            throw KeyServiceError(.invalidArgument, "idempotency retention must be 1 hour to 30 days")
        }
        guard groupCommitMaximumBatch >= 1, groupCommitMaximumBatch <= 1024 else {
            throw KeyServiceError(.invalidArgument, "group commit batch must be 1 to 1024 units")
        }
        guard rewrapBatchSize >= 1, rewrapBatchSize <= Self.maximumBatchSize else {
            throw KeyServiceError(.invalidArgument, "rewrap batch size must be 1 to \(Self.maximumBatchSize)")
        }
    }
}
