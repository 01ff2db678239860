// Audit records of refused authentications that the caller writes on a path of its own: the
// gateway sends the records of refused Hellos (unauthenticated peers, who can make as many as they
// like) through a bounded, low-priority writer instead of the group committer's queue, so that a
// flood of bad credentials never waits in front of key operations.

/// Where ``KeyService/authenticate(apiToken:now:requestID:refusalAudit:)`` and its certificate
/// twin put the audit record of a refusal.
public enum RefusalAudit: Sendable {
    /// Appended through the group committer before `authenticate` returns (the default). When it
    /// cannot be written, `authenticate` throws `unavailable` if the store cannot be reached, and
    /// otherwise logs the failure and returns the refusal all the same.
    case committed
    /// Handed to the closure, which must return at once; whoever passes it owns writing the record
    /// (for example with ``KeyService/appendAuditRecordsApart(_:)``).
    case handedOff(@Sendable (AuditEvent) -> Void)
}

extension KeyService {
    /// The audit record of an access failure the caller decided itself, exactly as
    /// ``recordAccessFailure(_:principal:tenant:operation:reason:request:)`` writes it.
    public static func accessFailureEvent(
        _ kind: AccessFailureKind,
        principal: Principal,
        tenant: TenantID?,
        operation: String,
        reason: String,
        request: RequestContext
    ) -> AuditEvent {
        AuditEvent(
            principal: principal,
            tenant: tenant,
            operation: kind == .authentication ? .authenticate : .authorize,
            outcome: .failure(kind == .authentication ? unauthenticatedOutcome : permissionDeniedOutcome),
            requestID: request.requestID,
            detail: "method=\(operation) reason=\(reason)"
        )
    }

    /// Appends `events` to the audit chain in a transaction of their own, outside the group
    /// committer's queue: they never share a batch with key operations and never wait behind
    /// them in that queue. Like any writer of the chain (another gateway instance, say) the
    /// transaction takes the audit head's lock, checks the head's anchor in the HSM and anchors
    /// the new head, so the chain stays one verifiable sequence. Only for records that no state
    /// change depends on (refusals); the caller bounds how many it sends and how often.
    public func appendAuditRecordsApart(_ events: [AuditEvent]) async throws(KeyServiceError) {
        guard !events.isEmpty else { return }
        try await mapErrors {
            // A committer of its own: the same transaction, anchoring and conflict retries as the
            // shared one, with a queue nobody else uses.
            let apart = GroupCommitter(repository: repository, maximumBatch: 1, anchoring: anchoring)
            _ = try await apart.commit { _ in UnitOutcome((), audit: events) }
        }
    }
}
