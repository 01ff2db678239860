import GatewayWire

// Tenants, master keys, rewrap jobs, principals, tokens and audit (numbers 30 to 71). Every
// method takes an optional `deadline`: how long the call, retries included, may take.
extension GatewayClient {
    // MARK: Tenants

    /// Method 30, CreateTenant (gateway admin): the tenant and its first master-key version.
    public func createTenant(_ tenant: String, idempotencyKey: String? = nil, deadline: Duration? = nil)
        async throws(GatewayError) -> Hsmgw_V1_TenantInfo
    {
        var request = Hsmgw_V1_CreateTenantRequest()
        request.tenant = tenant
        request.idempotencyKey = idempotencyKey ?? ""
        let response: Hsmgw_V1_CreateTenantResponse = try await call(
            method: .createTenant,
            request: request,
            hasIdempotencyKey: idempotencyKey != nil,
            deadline: deadline
        )
        return response.tenant
    }

    /// Method 31, GetTenant.
    public func getTenant(_ tenant: String, deadline: Duration? = nil) async throws(GatewayError) -> Hsmgw_V1_TenantInfo
    {
        var request = Hsmgw_V1_GetTenantRequest()
        request.tenant = tenant
        let response: Hsmgw_V1_GetTenantResponse = try await call(
            method: .getTenant, request: request, deadline: deadline)
        return response.tenant
    }

    /// Method 32, ListTenants: one page of the tenants the caller may see.
    public func listTenants(pageSize: Int = 0, pageToken: String = "", deadline: Duration? = nil)
        async throws(GatewayError) -> Hsmgw_V1_ListTenantsResponse
    {
        var request = Hsmgw_V1_ListTenantsRequest()
        request.pageSize = UInt32(clamping: max(pageSize, 0))
        request.pageToken = pageToken
        return try await call(method: .listTenants, request: request, deadline: deadline)
    }

    /// Method 33, DisableTenant.
    public func disableTenant(_ tenant: String, deadline: Duration? = nil) async throws(GatewayError)
        -> Hsmgw_V1_TenantInfo
    {
        try await tenantState(.disableTenant, tenant, deadline: deadline)
    }

    /// Method 34, EnableTenant.
    public func enableTenant(_ tenant: String, deadline: Duration? = nil) async throws(GatewayError)
        -> Hsmgw_V1_TenantInfo
    {
        try await tenantState(.enableTenant, tenant, deadline: deadline)
    }

    private func tenantState(_ method: Method, _ tenant: String, deadline: Duration?) async throws(GatewayError)
        -> Hsmgw_V1_TenantInfo
    {
        var request = Hsmgw_V1_TenantStateRequest()
        request.tenant = tenant
        let response: Hsmgw_V1_TenantStateResponse = try await call(
            method: method, request: request, deadline: deadline)
        return response.tenant
    }

    /// Method 35, ShredTenant (gateway admin): destroys the tenant's master keys and data keys.
    /// Irreversible. `confirm` must repeat the tenant id.
    public func shredTenant(_ tenant: String, confirm: String, deadline: Duration? = nil) async throws(GatewayError)
        -> Hsmgw_V1_ShredTenantResponse
    {
        var request = Hsmgw_V1_ShredTenantRequest()
        request.tenant = tenant
        request.confirm = confirm
        return try await call(method: .shredTenant, request: request, deadline: deadline)
    }

    // MARK: Master keys

    /// Method 40, ListMasterKeys: the tenant's master-key versions.
    public func listMasterKeys(tenant: String, deadline: Duration? = nil) async throws(GatewayError)
        -> [Hsmgw_V1_MasterKeyInfo]
    {
        var request = Hsmgw_V1_ListMasterKeysRequest()
        request.tenant = tenant
        let response: Hsmgw_V1_ListMasterKeysResponse = try await call(
            method: .listMasterKeys,
            request: request,
            deadline: deadline
        )
        return response.versions
    }

    /// Method 41, RotateMasterKey: adds a version; with `activate`, it becomes the primary.
    public func rotateMasterKey(
        tenant: String,
        activate: Bool = true,
        idempotencyKey: String? = nil,
        deadline: Duration? = nil
    ) async throws(GatewayError) -> Hsmgw_V1_MasterKeyInfo {
        var request = Hsmgw_V1_RotateMasterKeyRequest()
        request.tenant = tenant
        request.activate = activate
        request.idempotencyKey = idempotencyKey ?? ""
        let response: Hsmgw_V1_MasterKeyResponse = try await call(
            method: .rotateMasterKey,
            request: request,
            hasIdempotencyKey: idempotencyKey != nil,
            deadline: deadline
        )
        return response.version
    }

    /// Method 42, ActivateMasterKey: makes `version` the primary.
    public func activateMasterKey(tenant: String, version: UInt32, deadline: Duration? = nil)
        async throws(GatewayError) -> Hsmgw_V1_MasterKeyInfo
    {
        try await masterKeyVersion(.activateMasterKey, tenant: tenant, version: version, deadline: deadline)
    }

    /// Method 43, SetMasterKeyState: "active", "suspended", "deactivated", "compromised".
    public func setMasterKeyState(tenant: String, version: UInt32, state: String, deadline: Duration? = nil)
        async throws(GatewayError) -> Hsmgw_V1_MasterKeyInfo
    {
        try await masterKeyVersion(.setMasterKeyState, tenant: tenant, version: version, deadline: deadline) {
            $0.state = state
        }
    }

    /// Method 44, ScheduleMasterKeyDestruction: after 7 to 365 days (0: the server's default, 30).
    public func scheduleMasterKeyDestruction(
        tenant: String,
        version: UInt32,
        waitingPeriodDays: Int = 0,
        deadline: Duration? = nil
    ) async throws(GatewayError) -> Hsmgw_V1_MasterKeyInfo {
        try await masterKeyVersion(.scheduleMasterKeyDestruction, tenant: tenant, version: version, deadline: deadline)
        {
            $0.waitingPeriodDays = UInt32(clamping: max(waitingPeriodDays, 0))
        }
    }

    /// Method 45, CancelMasterKeyDestruction.
    public func cancelMasterKeyDestruction(tenant: String, version: UInt32, deadline: Duration? = nil)
        async throws(GatewayError) -> Hsmgw_V1_MasterKeyInfo
    {
        try await masterKeyVersion(.cancelMasterKeyDestruction, tenant: tenant, version: version, deadline: deadline)
    }

    private func masterKeyVersion(
        _ method: Method,
        tenant: String,
        version: UInt32,
        deadline: Duration?,
        configure: (inout Hsmgw_V1_MasterKeyVersionRequest) -> Void = { _ in }
    ) async throws(GatewayError) -> Hsmgw_V1_MasterKeyInfo {
        var request = Hsmgw_V1_MasterKeyVersionRequest()
        request.tenant = tenant
        request.version = version
        configure(&request)
        let response: Hsmgw_V1_MasterKeyResponse = try await call(method: method, request: request, deadline: deadline)
        return response.version
    }

    // MARK: Rewrap job

    /// Method 50, StartRewrapJob: moves every data key of the tenant to the primary version, in
    /// the background.
    public func startRewrapJob(tenant: String, deadline: Duration? = nil) async throws(GatewayError)
        -> Hsmgw_V1_RewrapJobInfo
    {
        var request = Hsmgw_V1_RewrapJobRequest()
        request.tenant = tenant
        let response: Hsmgw_V1_RewrapJobResponse = try await call(
            method: .startRewrapJob,
            request: request,
            deadline: deadline
        )
        return response.job
    }

    /// Method 51, GetRewrapJob: the tenant's latest job; nil when it never had one.
    public func getRewrapJob(tenant: String, deadline: Duration? = nil) async throws(GatewayError)
        -> Hsmgw_V1_RewrapJobInfo?
    {
        var request = Hsmgw_V1_RewrapJobRequest()
        request.tenant = tenant
        let response: Hsmgw_V1_RewrapJobResponse = try await call(
            method: .getRewrapJob, request: request, deadline: deadline)
        return response.hasJob ? response.job : nil
    }

    // MARK: Principals, roles, tokens

    /// Method 60, CreatePrincipal (gateway admin).
    public func createPrincipal(
        name: String,
        certificateCommonName: String = "",
        roles: [RoleBinding] = [],
        deadline: Duration? = nil
    ) async throws(GatewayError) -> Hsmgw_V1_PrincipalInfo {
        var request = Hsmgw_V1_CreatePrincipalRequest()
        request.name = name
        request.certificateCommonName = certificateCommonName
        request.roles = roles.map(\.message)
        let response: Hsmgw_V1_PrincipalResponse = try await call(
            method: .createPrincipal,
            request: request,
            deadline: deadline
        )
        return response.principal
    }

    /// Method 61, ListPrincipals (gateway admin).
    public func listPrincipals(deadline: Duration? = nil) async throws(GatewayError) -> [Hsmgw_V1_PrincipalInfo] {
        let response: Hsmgw_V1_ListPrincipalsResponse = try await call(
            method: .listPrincipals,
            request: Hsmgw_V1_ListPrincipalsRequest(),
            deadline: deadline
        )
        return response.principals
    }

    /// Method 62, GrantRole (gateway admin).
    public func grantRole(principal: String, role: RoleBinding, deadline: Duration? = nil) async throws(GatewayError)
        -> Hsmgw_V1_PrincipalInfo
    {
        try await roleChange(.grantRole, principal: principal, role: role, deadline: deadline)
    }

    /// Method 63, RevokeRole (gateway admin).
    public func revokeRole(principal: String, role: RoleBinding, deadline: Duration? = nil) async throws(GatewayError)
        -> Hsmgw_V1_PrincipalInfo
    {
        try await roleChange(.revokeRole, principal: principal, role: role, deadline: deadline)
    }

    private func roleChange(_ method: Method, principal: String, role: RoleBinding, deadline: Duration?)
        async throws(GatewayError) -> Hsmgw_V1_PrincipalInfo
    {
        var request = Hsmgw_V1_RoleRequest()
        request.principal = principal
        request.role = role.message
        let response: Hsmgw_V1_PrincipalResponse = try await call(method: method, request: request, deadline: deadline)
        return response.principal
    }

    /// Method 64, CreateAPIToken (gateway admin): the token is returned once, here.
    ///
    /// - Parameter timeToLive: How long the token is valid, in whole seconds; nil for no expiry.
    public func createAPIToken(
        principal: String,
        description: String = "",
        timeToLive: Duration? = nil,
        deadline: Duration? = nil
    ) async throws(GatewayError) -> CreatedAPIToken {
        var request = Hsmgw_V1_CreateAPITokenRequest()
        request.principal = principal
        request.description_p = description
        request.ttlSeconds = timeToLive.map { UInt64(clamping: max($0.components.seconds, 0)) } ?? 0
        let response: Hsmgw_V1_CreateAPITokenResponse = try await call(
            method: .createAPIToken,
            request: request,
            deadline: deadline
        )
        return CreatedAPIToken(info: response.info, token: APIToken(response.token))
    }

    /// Method 65, ListAPITokens (gateway admin): metadata only; `principal` empty for all.
    public func listAPITokens(principal: String = "", deadline: Duration? = nil) async throws(GatewayError)
        -> [Hsmgw_V1_APITokenInfo]
    {
        var request = Hsmgw_V1_ListAPITokensRequest()
        request.principal = principal
        let response: Hsmgw_V1_ListAPITokensResponse = try await call(
            method: .listAPITokens,
            request: request,
            deadline: deadline
        )
        return response.tokens
    }

    /// Method 66, RevokeAPIToken (gateway admin).
    public func revokeAPIToken(id: String, deadline: Duration? = nil) async throws(GatewayError)
        -> Hsmgw_V1_APITokenInfo
    {
        var request = Hsmgw_V1_RevokeAPITokenRequest()
        request.id = id
        let response: Hsmgw_V1_RevokeAPITokenResponse = try await call(
            method: .revokeAPIToken,
            request: request,
            deadline: deadline
        )
        return response.info
    }

    // MARK: Audit

    /// Method 70, ListAuditRecords (gateway admin): records with sequence > `after`, oldest
    /// first; `limit` 1 to 1,000 (0: the server's default, 100).
    public func listAuditRecords(after: Int64 = 0, limit: Int = 0, deadline: Duration? = nil)
        async throws(GatewayError) -> [Hsmgw_V1_AuditRecordInfo]
    {
        var request = Hsmgw_V1_ListAuditRecordsRequest()
        request.after = after
        request.limit = UInt32(clamping: max(limit, 0))
        let response: Hsmgw_V1_ListAuditRecordsResponse = try await call(
            method: .listAuditRecords,
            request: request,
            deadline: deadline
        )
        return response.records
    }

    /// Method 71, VerifyAuditLog (gateway admin): replays the hash chain.
    public func verifyAuditLog(deadline: Duration? = nil) async throws(GatewayError) -> Hsmgw_V1_VerifyAuditLogResponse
    {
        try await call(method: .verifyAuditLog, request: Hsmgw_V1_VerifyAuditLogRequest(), deadline: deadline)
    }
}
