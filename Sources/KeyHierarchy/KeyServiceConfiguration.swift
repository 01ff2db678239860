/// The key service's limits and policies. Each has a reason; `validate()` enforces the bounds.
public struct KeyServiceConfiguration: Sendable, Hashable {
    /// Wraps allowed under one master-key version before the tenant rotates automatically.
    /// Wrapping IVs are 96 random bits from the token's RNG, for which NIST SP 800-38D §8.3 bounds
    /// GCM to 2^32 invocations per key. The count is kept in the database, which can be rolled
    /// back, so the gateway rotates far below that bound: 2^30 by default, leaving room for three
    /// times as many wraps uncounted by restores before 2^32 is reached. At most 2^32 - 1.
    public var invocationLimit: Int64 = 1 << 30
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
    /// Records between two audit checkpoints kept in the history (every batch's head is anchored
    /// in the head row anyway): how precisely `verifyAuditLog` can say where a forgery starts,
    /// against one small row per interval. 1 to 1,000,000.
    public var auditCheckpointInterval: Int64 = 1000

    public init() {}

    /// Throws `invalidArgument` naming the first setting out of bounds.
    public func validate() throws(KeyServiceError) {
        guard invocationLimit >= 1, invocationLimit < (1 << 32) else {
            throw KeyServiceError(.invalidArgument, "invocation limit must be between 1 and 2^32 - 1")
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
        guard auditCheckpointInterval >= 1, auditCheckpointInterval <= 1_000_000 else {
            throw KeyServiceError(.invalidArgument, "audit checkpoint interval must be 1 to 1,000,000 records")
        }
        guard rewrapBatchSize >= 1, rewrapBatchSize <= Self.maximumBatchSize else {
            throw KeyServiceError(.invalidArgument, "rewrap batch size must be 1 to \(Self.maximumBatchSize)")
        }
    }
}
