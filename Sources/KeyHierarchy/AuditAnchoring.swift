import Synchronization

/// Anchors the audit chain in the HSM: every group-commit batch MACs its new head with a
/// non-extractable HMAC key in the token and stores the checkpoint in the head row; every
/// `checkpointInterval` records a checkpoint is also kept in a history.
///
/// Before a batch appends, the head it appends to must carry a checkpoint that covers it and
/// verifies with the key (or the log must be empty). So whoever rewrites the tail and the head in
/// the database, or removes the checkpoint, makes every later write fail (fail closed) instead of
/// having the gateway extend and re-anchor a forged log; and `KeyService.verifyAuditLog` names
/// the first checkpoint a forgery breaks.
///
/// What this cannot catch: a database rolled back as a whole to an earlier consistent state (a
/// restore from backup looks the same), since the token keeps no state of the log.
///
/// Its methods are called with the audit head locked (inside the group committer's batch, or the
/// start-up check), which serialises them across gateway instances and within this one.
public final class AuditAnchoring: Sendable {
    /// The label of the audit-anchor key in the token.
    public static let keyLabel = "hsmgw:audit:v1"

    let token: any MasterKeyToken
    /// How many records lie between two kept checkpoints.
    let checkpointInterval: Int64
    private let state = Mutex(State())

    private struct State {
        /// The key, once found or generated.
        var key: TokenKeyID?
        /// Set when this process generated the key while the log already held unanchored records:
        /// a log from before anchoring existed, which this start adopts.
        var adopting = false
        /// The last checkpoint this process made or verified: a head carrying it needs no token call.
        var verified: AuditCheckpoint?
        /// Why the log failed its integrity check, while it does.
        var failure: String?
    }

    init(token: any MasterKeyToken, checkpointInterval: Int64) {
        self.token = token
        self.checkpointInterval = checkpointInterval
    }

    /// Why the audit log last failed its integrity check, or nil when the last check passed.
    public var integrityFailure: String? { state.withLock { $0.failure } }

    /// The key's reference, finding or generating it on first use. `unanchoredRecords` says
    /// whether the locked head has records but no checkpoint: generating the key then means the
    /// log predates anchoring, and it is adopted.
    func key(unanchoredRecords: Bool) async throws -> TokenKeyReference {
        if let key = state.withLock({ $0.key }) { return TokenKeyReference(id: key, label: Self.keyLabel) }
        let (id, created) = try await token.prepareAuditKey(label: Self.keyLabel)
        state.withLock { state in
            state.key = id
            state.adopting = created && unanchoredRecords
        }
        return TokenKeyReference(id: id, label: Self.keyLabel)
    }

    /// Checks that `locked` may be appended to: empty, or carrying a checkpoint of exactly this
    /// head that verifies with the audit key, or unanchored while this start adopts an old log.
    /// Throws `dataLoss` otherwise (and remembers why, for readiness and metrics).
    func check(_ locked: AnchoredAuditHead) async throws {
        let key = try await key(unanchoredRecords: locked.anchor == nil && locked.head.sequence > 0)
        do {
            try await verify(locked, key: key)
            state.withLock { $0.failure = nil }
        } catch let error as KeyServiceError where error.code == .dataLoss {
            state.withLock { $0.failure = error.underlying }
            throw error
        }
    }

    private func verify(_ locked: AnchoredAuditHead, key: TokenKeyReference) async throws {
        guard let anchor = locked.anchor else {
            if locked.head.sequence == 0 || state.withLock({ $0.adopting }) { return }
            throw Self.integrityError(
                "the audit head (record \(locked.head.sequence)) carries no checkpoint from the HSM although the "
                    + "token holds the audit key: its checkpoint was removed or the database was rolled back to "
                    + "before anchoring"
            )
        }
        guard anchor.covers(locked.head) else {
            throw Self.integrityError(
                "the audit head (record \(locked.head.sequence)) does not match its checkpoint (record "
                    + "\(anchor.sequence)): the log's tail and head were rewritten"
            )
        }
        if state.withLock({ $0.verified == anchor }) { return }
        guard anchor.keyID == key.id else {
            throw Self.integrityError("the audit head's checkpoint was made by another key (\(anchor.keyID))")
        }
        // The head row holds the MAC next to the sequence and hash it covers: a head rewritten
        // under a kept MAC and a forged MAC look the same, and neither verifies.
        guard try await macs([anchor], key: key)[0] else {
            throw Self.integrityError(
                "the audit head (record \(locked.head.sequence)) does not verify against its checkpoint from the "
                    + "HSM: the log's tail and head were rewritten, or the checkpoint forged"
            )
        }
        state.withLock { $0.verified = anchor }
    }

    /// The checkpoint of `head`, made in the token now.
    func sign(_ head: AuditHead) async throws -> AuditCheckpoint {
        let key = try await key(unanchoredRecords: false)
        let results = try await token.perform([
            .mac(key: key, message: AuditCheckpoint.message(sequence: head.sequence, hash: head.hash))
        ])
        guard case .mac(let mac) = results.first else {
            if case .failed(let error) = results.first { throw error }
            throw KeyServiceError(.internalError, "unexpected token result")
        }
        let checkpoint = AuditCheckpoint(
            sequence: head.sequence, hash: head.hash, keyID: key.id, mac: mac, time: .now())
        state.withLock { state in
            state.verified = checkpoint
            state.adopting = false
        }
        return checkpoint
    }

    /// Whether the checkpoint of a head moved from `previous` to `next` is kept in the history:
    /// the first one, and then one each time the head crosses a multiple of `checkpointInterval`.
    func keepsCheckpoint(from previous: AnchoredAuditHead, to next: AuditHead) -> Bool {
        previous.anchor == nil || previous.head.sequence / checkpointInterval < next.sequence / checkpointInterval
    }

    /// For each checkpoint, whether its MAC verifies with the audit key `key` (recomputed in the
    /// token and compared in constant time). Checkpoints made by another key do not verify, nor
    /// does anything when `key` names no audit key in the token.
    func macs(_ checkpoints: [AuditCheckpoint], key: TokenKeyReference) async throws -> [Bool] {
        let operations = checkpoints.map {
            TokenOperation.mac(key: key, message: AuditCheckpoint.message(sequence: $0.sequence, hash: $0.hash))
        }
        let results = operations.isEmpty ? [] : try await token.perform(operations)
        return try zip(checkpoints, results).map { checkpoint, result in
            switch result {
            case .mac(let mac): return checkpoint.keyID == key.id && Self.constantTimeEquals(mac, checkpoint.mac)
            // The object the checkpoint names is no audit key of this token: it cannot verify.
            case .failed(let error) where error.kind == .keyNotFound || error.kind == .bindingViolation: return false
            case .failed(let error): throw error
            default: throw KeyServiceError(.internalError, "unexpected token result")
            }
        }
    }

    static func integrityError(_ detail: String) -> KeyServiceError {
        KeyServiceError(
            .dataLoss,
            "the audit log failed its integrity check; key operations are refused until an operator restores it",
            underlying: detail
        )
    }

    private static func constantTimeEquals(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var difference: UInt8 = 0
        for (x, y) in zip(a, b) { difference |= x ^ y }
        return difference == 0
    }
}
