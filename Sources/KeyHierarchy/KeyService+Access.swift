// Principals, role bindings and API tokens: stored through the key repository and audited in
// the same transaction as each change, like every other write of the key service. The wire
// layer authenticates with `authenticate`, decides with `AccessPolicy`, and records refusals it
// makes itself with `recordAccessFailure`.

extension KeyService {
    // MARK: Principals

    /// Creates a principal with its role bindings. Throws `alreadyExists` when the name or the
    /// certificate common name is taken, `notFound` when a binding names a tenant that does not
    /// exist.
    public func createPrincipal(
        _ name: PrincipalName,
        certificateCommonName: CertificateCommonName? = nil,
        roles: [RoleBinding] = [],
        request: RequestContext
    ) async throws(KeyServiceError) -> PrincipalRecord {
        try await audited(.createPrincipal, tenant: nil, request: request) { () async throws -> PrincipalRecord in
            let roles = try Self.normalized(roles)
            return try await self.committer.commit { transaction in
                try await Self.requireTenants(of: roles, in: transaction)
                let record = PrincipalRecord(
                    name: name,
                    certificateCommonName: certificateCommonName,
                    roles: roles,
                    createdAt: .now()
                )
                try await Self.insertNew(record, in: transaction)
                return UnitOutcome(
                    record,
                    audit: [
                        AuditEvent(
                            time: record.createdAt,
                            principal: request.principal,
                            tenant: nil,
                            operation: .createPrincipal,
                            requestID: request.requestID,
                            detail: Self.principalDetail(record)
                        )
                    ]
                )
            }.value
        }
    }

    /// One principal with its role bindings.
    public func principal(_ name: PrincipalName) async throws(KeyServiceError) -> PrincipalRecord {
        try await mapErrors {
            guard let record = try await self.repository.read({ try await $0.principal(name) }) else {
                throw KeyServiceError(.notFound, "principal \(name) not found")
            }
            return record
        }
    }

    /// The principal that client certificates with this subject common name authenticate as,
    /// or nil. A lookup only: `authenticate(certificateCommonName:requestID:)` also refuses
    /// disabled principals and audits refusals.
    public func principal(
        forCertificateCommonName commonName: CertificateCommonName
    ) async throws(KeyServiceError) -> PrincipalRecord? {
        try await mapErrors {
            try await self.repository.read { try await $0.principal(certificateCommonName: commonName) }
        }
    }

    /// Principals ordered by name, a page at a time.
    public func listPrincipals(
        _ page: PageRequest = PageRequest()
    ) async throws(KeyServiceError) -> Page<PrincipalRecord> {
        try await mapErrors {
            let limit = try Self.checkedLimit(page.limit)
            let after = try page.after.map { (value: String) throws(KeyServiceError) in try PrincipalName(value) }
            let items = try await self.repository.read { try await $0.principals(after: after, limit: limit + 1) }
            let pageItems = Array(items.prefix(limit))
            return Page(items: pageItems, nextPage: items.count > limit ? pageItems.last?.name.rawValue : nil)
        }
    }

    /// Gives `name` a role. Granting a binding it already holds changes nothing (and succeeds).
    /// Throws `notFound` for an unknown principal or tenant, `resourceExhausted` past
    /// `PrincipalRecord.maximumRoleBindings`.
    public func grantRole(
        _ binding: RoleBinding,
        to name: PrincipalName,
        request: RequestContext
    ) async throws(KeyServiceError) -> PrincipalRecord {
        try await audited(.grantRole, tenant: binding.scope.tenant, request: request) {
            () async throws -> PrincipalRecord in
            try await self.committer.commit { transaction in
                guard let existing = try await transaction.principal(name) else {
                    throw KeyServiceError(.notFound, "principal \(name) not found")
                }
                try await Self.requireTenants(of: [binding], in: transaction)
                var changed = false
                if !existing.roles.contains(binding) {
                    guard existing.roles.count < PrincipalRecord.maximumRoleBindings else {
                        throw KeyServiceError(
                            .resourceExhausted,
                            "a principal holds at most \(PrincipalRecord.maximumRoleBindings) role bindings"
                        )
                    }
                    changed = try await transaction.insertRoleBinding(name, binding)
                }
                guard let updated = try await transaction.principal(name) else {
                    throw KeyServiceError(.notFound, "principal \(name) not found")
                }
                return UnitOutcome(
                    updated,
                    audit: [
                        AuditEvent(
                            principal: request.principal,
                            tenant: binding.scope.tenant,
                            operation: .grantRole,
                            requestID: request.requestID,
                            detail: "principal=\(name) role=\(binding)" + (changed ? "" : " unchanged")
                        )
                    ]
                )
            }.value
        }
    }

    /// Takes a role from `name`. Throws `notFound` when it does not hold it, and
    /// `failedPrecondition` when it would leave no enabled gateway administrator.
    public func revokeRole(
        _ binding: RoleBinding,
        from name: PrincipalName,
        request: RequestContext
    ) async throws(KeyServiceError) -> PrincipalRecord {
        try await audited(.revokeRole, tenant: binding.scope.tenant, request: request) {
            () async throws -> PrincipalRecord in
            // Isolated: it may lock the principals table, unlike the units it could share with.
            try await self.committer.commit(isolated: binding == Self.gatewayAdmin) { transaction in
                if binding == Self.gatewayAdmin {
                    try await Self.keepAnotherGatewayAdmin(besides: name, in: transaction)
                }
                guard try await transaction.principal(name) != nil else {
                    throw KeyServiceError(.notFound, "principal \(name) not found")
                }
                guard try await transaction.deleteRoleBinding(name, binding) else {
                    throw KeyServiceError(.notFound, "principal \(name) does not hold \(binding)")
                }
                guard let updated = try await transaction.principal(name) else {
                    throw KeyServiceError(.notFound, "principal \(name) not found")
                }
                return UnitOutcome(
                    updated,
                    audit: [
                        AuditEvent(
                            principal: request.principal,
                            tenant: binding.scope.tenant,
                            operation: .revokeRole,
                            requestID: request.requestID,
                            detail: "principal=\(name) role=\(binding)"
                        )
                    ]
                )
            }.value
        }
    }

    /// Refuses every authentication of `name` (tokens and certificate) until enabled again.
    /// Throws `failedPrecondition` when it would leave no enabled gateway administrator.
    public func disablePrincipal(
        _ name: PrincipalName,
        request: RequestContext
    ) async throws(KeyServiceError) -> PrincipalRecord {
        try await setPrincipalDisabled(name, true, operation: .disablePrincipal, request: request)
    }

    /// Allows `name` to authenticate again after `disablePrincipal`.
    public func enablePrincipal(
        _ name: PrincipalName,
        request: RequestContext
    ) async throws(KeyServiceError) -> PrincipalRecord {
        try await setPrincipalDisabled(name, false, operation: .enablePrincipal, request: request)
    }

    private func setPrincipalDisabled(
        _ name: PrincipalName,
        _ disabled: Bool,
        operation: AuditOperation,
        request: RequestContext
    ) async throws(KeyServiceError) -> PrincipalRecord {
        try await audited(operation, tenant: nil, request: request) { () async throws -> PrincipalRecord in
            // Isolated when it may lock the principals table, unlike the units it could share with.
            try await self.committer.commit(isolated: disabled) { transaction in
                if disabled {
                    try await Self.keepAnotherGatewayAdmin(besides: name, in: transaction)
                }
                guard try await transaction.setPrincipalDisabled(name, disabled),
                    let updated = try await transaction.principal(name)
                else {
                    throw KeyServiceError(.notFound, "principal \(name) not found")
                }
                return UnitOutcome(
                    updated,
                    audit: [
                        AuditEvent(
                            principal: request.principal,
                            tenant: nil,
                            operation: operation,
                            requestID: request.requestID,
                            detail: "principal=\(name)"
                        )
                    ]
                )
            }.value
        }
    }

    // MARK: API tokens

    /// Issues an API token for `principal`: returns its record and the token string, which is
    /// shown here once and never stored (storage keeps its SHA-256). `timeToLiveSeconds` nil:
    /// the token never expires.
    public func createAPIToken(
        for principal: PrincipalName,
        description: String = "",
        timeToLiveSeconds: Int64? = nil,
        request: RequestContext
    ) async throws(KeyServiceError) -> (record: APITokenRecord, token: String) {
        try await audited(.createAPIToken, tenant: nil, request: request) {
            () async throws -> (record: APITokenRecord, token: String) in
            try APITokenRecord.validateDescription(description)
            if let ttl = timeToLiveSeconds {
                guard ttl >= 1, ttl <= APITokenRecord.maximumTimeToLiveSeconds else {
                    throw KeyServiceError(
                        .invalidArgument,
                        "token lifetime must be 1 to \(APITokenRecord.maximumTimeToLiveSeconds) seconds"
                    )
                }
            }
            let token = APIToken.generate()
            let record = try await self.committer.commit { transaction in
                guard try await transaction.principal(principal) != nil else {
                    throw KeyServiceError(.notFound, "principal \(principal) not found")
                }
                let now = Timestamp.now()
                let record = APITokenRecord(
                    id: .random(),
                    principal: principal,
                    hash: token.hash,
                    description: description,
                    createdAt: now,
                    expiresAt: timeToLiveSeconds.map {
                        Timestamp(millisecondsSinceEpoch: now.millisecondsSinceEpoch + $0 * 1000)
                    }
                )
                try await transaction.insertAPIToken(record)
                return UnitOutcome(record, audit: [Self.tokenCreatedEvent(record, request: request)])
            }.value
            return (record, token.secret)
        }
    }

    /// One token's record (never the token).
    public func apiToken(_ id: APITokenID) async throws(KeyServiceError) -> APITokenRecord {
        try await mapErrors {
            guard let record = try await self.repository.read({ try await $0.apiToken(id) }) else {
                throw KeyServiceError(.notFound, "API token \(id) not found")
            }
            return record
        }
    }

    /// Token records ordered by id, of one principal or of all, a page at a time.
    public func listAPITokens(
        principal: PrincipalName? = nil,
        _ page: PageRequest = PageRequest()
    ) async throws(KeyServiceError) -> Page<APITokenRecord> {
        try await mapErrors {
            let limit = try Self.checkedLimit(page.limit)
            let after = try page.after.map { (value: String) throws(KeyServiceError) in try APITokenID(value) }
            let items = try await self.repository.read {
                try await $0.apiTokens(principal: principal, after: after, limit: limit + 1)
            }
            let pageItems = Array(items.prefix(limit))
            return Page(items: pageItems, nextPage: items.count > limit ? pageItems.last?.id.rawValue : nil)
        }
    }

    /// Revokes a token: it is refused from now on. Revoking a revoked token changes nothing and
    /// returns it with its first revocation time.
    public func revokeAPIToken(
        _ id: APITokenID,
        request: RequestContext
    ) async throws(KeyServiceError) -> APITokenRecord {
        try await audited(.revokeAPIToken, tenant: nil, keyIDs: [id.rawValue], request: request) {
            () async throws -> APITokenRecord in
            try await self.committer.commit { transaction in
                let now = Timestamp.now()
                guard try await transaction.apiToken(id) != nil else {
                    throw KeyServiceError(.notFound, "API token \(id) not found")
                }
                let changed = try await transaction.revokeAPIToken(id, at: now)
                guard let record = try await transaction.apiToken(id) else {
                    throw KeyServiceError(.notFound, "API token \(id) not found")
                }
                return UnitOutcome(
                    record,
                    audit: [
                        AuditEvent(
                            time: now,
                            principal: request.principal,
                            tenant: nil,
                            operation: .revokeAPIToken,
                            keyIDs: [id.rawValue],
                            requestID: request.requestID,
                            detail: "principal=\(record.principal)" + (changed ? "" : " already-revoked")
                        )
                    ]
                )
            }.value
        }
    }

    // MARK: Authentication

    /// Checks an API token: its shape (before hashing, so oversized input costs nothing), then
    /// its SHA-256 against storage, its revocation and expiry at `now`, and its principal's
    /// state. A refusal is audited (`access.authenticate`, naming the token id when the token
    /// is known, never the token) and returned with its reason; only storage failures throw.
    /// `refusalAudit` says where the refusal's record goes (``RefusalAudit``).
    public func authenticate(
        apiToken presented: String,
        now: Timestamp = .now(),
        requestID: String,
        refusalAudit: RefusalAudit = .committed
    ) async throws(KeyServiceError) -> AuthenticationResult {
        try await mapErrors { () async throws -> AuthenticationResult in
            guard let hash = APIToken.lookupHash(of: presented) else {
                return try await self.refuse(
                    .malformedToken, principal: .unauthenticated, requestID: requestID, audit: refusalAudit)
            }
            let (token, principal) = try await self.repository.read { transaction in
                guard let token = try await transaction.apiToken(hash: hash) else {
                    return (APITokenRecord?.none, PrincipalRecord?.none)
                }
                return (token, try await transaction.principal(token.principal))
            }
            guard let token else {
                return try await self.refuse(
                    .unknownToken, principal: .unauthenticated, requestID: requestID, audit: refusalAudit)
            }
            if let failure = token.failure(at: now) {
                return try await self.refuse(
                    failure, principal: token.principal.principal, token: token.id, requestID: requestID,
                    audit: refusalAudit)
            }
            guard let principal else {
                throw KeyServiceError(.dataLoss, "an API token's principal is missing")
            }
            guard !principal.disabled else {
                return try await self.refuse(
                    .principalDisabled, principal: principal.name.principal, token: token.id, requestID: requestID,
                    audit: refusalAudit)
            }
            return .authenticated(AuthenticatedCaller(principal: principal, token: token))
        }
    }

    /// Maps a TLS client certificate's subject common name to its principal. Unknown (or not a
    /// valid common name) and disabled are refused, audited, and returned with their reason.
    /// `refusalAudit` says where the refusal's record goes (``RefusalAudit``).
    public func authenticate(
        certificateCommonName: String,
        requestID: String,
        refusalAudit: RefusalAudit = .committed
    ) async throws(KeyServiceError) -> AuthenticationResult {
        try await mapErrors { () async throws -> AuthenticationResult in
            guard let commonName = try? CertificateCommonName(certificateCommonName) else {
                return try await self.refuse(
                    .unknownCertificate, principal: .unauthenticated, requestID: requestID, audit: refusalAudit)
            }
            guard
                let principal = try await self.repository.read({
                    try await $0.principal(certificateCommonName: commonName)
                })
            else {
                return try await self.refuse(
                    .unknownCertificate,
                    principal: .unauthenticated,
                    requestID: requestID,
                    detail: "certificate-cn=\(commonName)",
                    audit: refusalAudit
                )
            }
            guard !principal.disabled else {
                return try await self.refuse(
                    .principalDisabled, principal: principal.name.principal, requestID: requestID,
                    audit: refusalAudit)
            }
            return .authenticated(AuthenticatedCaller(principal: principal, token: nil))
        }
    }

    /// Appends an audit record for an access failure the caller decided itself: credentials
    /// refused outside `authenticate` (a token and a certificate naming different principals)
    /// or an action the caller's roles do not allow. `operation` names what was asked (the
    /// wire method), `reason` why it was refused; neither may hold a secret.
    public func recordAccessFailure(
        _ kind: AccessFailureKind,
        principal: Principal,
        tenant: TenantID?,
        operation: String,
        reason: String,
        request: RequestContext
    ) async throws(KeyServiceError) {
        let event = Self.accessFailureEvent(
            kind, principal: principal, tenant: tenant, operation: operation, reason: reason, request: request)
        try await mapErrors {
            _ = try await self.committer.commit { _ in UnitOutcome((), audit: [event]) }
        }
    }

    // MARK: Bootstrap

    /// Creates the first gateway administrator, `name` with `admin` on `*`, and an API token for
    /// it, in one transaction, only if no principal exists yet. Returns nil when one does.
    /// Several gateway instances starting at once on one database: exactly one creates it.
    public func bootstrapAdmin(
        name: PrincipalName,
        request: RequestContext = .system()
    ) async throws(KeyServiceError) -> (principal: PrincipalRecord, token: String)? {
        try await mapErrors { () async throws -> (principal: PrincipalRecord, token: String)? in
            let token = APIToken.generate()
            // Isolated: it locks the principals table first, unlike the units it could share with.
            let record = try await self.committer.commit(isolated: true) {
                transaction -> UnitOutcome<PrincipalRecord?> in
                try await transaction.lockPrincipals()
                guard try await transaction.countPrincipals() == 0 else { return UnitOutcome(nil, audit: []) }
                let now = Timestamp.now()
                let principal = PrincipalRecord(name: name, roles: [Self.gatewayAdmin], createdAt: now)
                try await transaction.insertPrincipal(principal)
                let tokenRecord = APITokenRecord(
                    id: .random(),
                    principal: name,
                    hash: token.hash,
                    description: "bootstrap",
                    createdAt: now
                )
                try await transaction.insertAPIToken(tokenRecord)
                return UnitOutcome(
                    principal,
                    audit: [
                        AuditEvent(
                            time: now,
                            principal: request.principal,
                            tenant: nil,
                            operation: .createPrincipal,
                            requestID: request.requestID,
                            detail: Self.principalDetail(principal) + " bootstrap"
                        ),
                        Self.tokenCreatedEvent(tokenRecord, request: request),
                    ]
                )
            }.value
            return record.map { ($0, token.secret) }
        }
    }

    // MARK: Helpers

    /// `admin` on `*`.
    static let gatewayAdmin = RoleBinding(scope: .all, role: .admin)
    /// The audit outcome of a refused authentication.
    static let unauthenticatedOutcome = "unauthenticated"
    /// The audit outcome of a refused authorization.
    static let permissionDeniedOutcome = "permission denied"

    private static func normalized(_ roles: [RoleBinding]) throws(KeyServiceError) -> [RoleBinding] {
        let unique = Array(Set(roles)).sorted()
        guard unique.count <= PrincipalRecord.maximumRoleBindings else {
            throw KeyServiceError(
                .invalidArgument, "a principal holds at most \(PrincipalRecord.maximumRoleBindings) role bindings")
        }
        return unique
    }

    private static func requireTenants(of roles: [RoleBinding], in transaction: any KeyRepositoryTransaction)
        async throws
    {
        for case .tenant(let id) in Set(roles.map(\.scope)) {
            guard try await transaction.tenant(id, forUpdate: false) != nil else {
                throw KeyServiceError(.notFound, "tenant \(id) not found")
            }
        }
    }

    private static func insertNew(_ record: PrincipalRecord, in transaction: any KeyRepositoryTransaction)
        async throws
    {
        if try await transaction.principal(record.name) != nil {
            throw KeyServiceError(.alreadyExists, "principal \(record.name) exists")
        }
        if let commonName = record.certificateCommonName,
            try await transaction.principal(certificateCommonName: commonName) != nil
        {
            throw KeyServiceError(.alreadyExists, "the certificate common name belongs to another principal")
        }
        do {
            try await transaction.insertPrincipal(record)
        } catch let error as StorageError where error.kind == .uniqueViolation {
            // Another instance inserted the same name or common name first.
            throw KeyServiceError(
                .alreadyExists, "principal \(record.name) or its certificate common name exists",
                underlying: error.description)
        }
    }

    /// Refuses a change that would leave no enabled principal with `admin` on `*` (nobody could
    /// manage access any more). Locks the principals first, so two instances removing two
    /// different administrators at once cannot both pass.
    private static func keepAnotherGatewayAdmin(
        besides name: PrincipalName,
        in transaction: any KeyRepositoryTransaction
    ) async throws {
        guard let target = try await transaction.principal(name), !target.disabled,
            target.roles.contains(gatewayAdmin)
        else { return }
        try await transaction.lockPrincipals()
        var after: PrincipalName?
        while true {
            let page = try await transaction.principals(after: after, limit: PageRequest.maximumPageSize)
            if page.contains(where: { $0.name != name && !$0.disabled && $0.roles.contains(gatewayAdmin) }) {
                return
            }
            guard page.count == PageRequest.maximumPageSize, let last = page.last else { break }
            after = last.name
        }
        throw KeyServiceError(.failedPrecondition, "this would leave no enabled gateway administrator")
    }

    private static func principalDetail(_ record: PrincipalRecord) -> String {
        var detail = "principal=\(record.name) roles=\(record.roles.map(\.description).joined(separator: ","))"
        if let commonName = record.certificateCommonName { detail += " certificate-cn=\(commonName)" }
        return detail
    }

    private static func tokenCreatedEvent(_ record: APITokenRecord, request: RequestContext) -> AuditEvent {
        AuditEvent(
            time: record.createdAt,
            principal: request.principal,
            tenant: nil,
            operation: .createAPIToken,
            keyIDs: [record.id.rawValue],
            requestID: request.requestID,
            detail: "principal=\(record.principal) expires-at="
                + (record.expiresAt.map { "\($0.millisecondsSinceEpoch)" } ?? "never")
        )
    }

    /// Audits a refused authentication (or hands its record to `audit`'s taker) and returns the
    /// refusal. When a record committed here cannot be written, the caller is refused all the
    /// same, unless the store cannot be reached: then `unavailable` (retry later), since the
    /// refusal could not be recorded. Any other failure (a broken audit log, a storage error) is
    /// logged and not told to a caller that has not authenticated.
    private func refuse(
        _ failure: AuthenticationFailure,
        principal: Principal,
        token: APITokenID? = nil,
        requestID: String,
        detail: String = "",
        audit: RefusalAudit
    ) async throws -> AuthenticationResult {
        let event = AuditEvent(
            principal: principal,
            tenant: nil,
            operation: .authenticate,
            keyIDs: token.map { [$0.rawValue] } ?? [],
            outcome: .failure(Self.unauthenticatedOutcome),
            requestID: RequestContext(principal: principal, requestID: requestID).requestID,
            detail: "reason=\(failure.name)" + (detail.isEmpty ? "" : " \(detail)")
        )
        switch audit {
        case .committed:
            do {
                _ = try await committer.commit { _ in UnitOutcome((), audit: [event]) }
            } catch {
                let mapped = Self.map(error)
                // A Hello abandoned meanwhile (cancelled) has nobody to answer.
                guard mapped.code != .unavailable, !(error is CancellationError) else { throw mapped }
                logger.error(
                    "could not audit a refused authentication; refused all the same",
                    metadata: ["reason": "\(failure.name)", "error": "\(mapped.logDescription)"]
                )
            }
        case .handedOff(let take):
            take(event)
        }
        return .refused(failure)
    }
}

extension TenantScope {
    /// The tenant of a tenant scope; nil for `*`.
    public var tenant: TenantID? {
        if case .tenant(let id) = self { return id }
        return nil
    }
}
