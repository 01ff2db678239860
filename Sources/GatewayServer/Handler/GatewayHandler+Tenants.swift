import GatewayTransport
import GatewayWire
import KeyHierarchy

extension GatewayHandler {
    func createTenant(_ request: TenantRequest<Hsmgw_V1_CreateTenantRequest>) async throws -> OutgoingResponse {
        let (message, tenant, call) = (request.message, request.tenant, request.call)
        let idempotencyKey = try idempotencyKey(message.idempotencyKey)
        let record = try await service.createTenant(tenant, idempotencyKey: idempotencyKey, request: call.context)
        var response = Hsmgw_V1_CreateTenantResponse()
        response.tenant = WireMapping.tenantInfo(record)
        return WireMapping.ok(response)
    }

    func getTenant(_ request: TenantRequest<Hsmgw_V1_GetTenantRequest>) async throws -> OutgoingResponse {
        let tenant = request.tenant
        var response = Hsmgw_V1_GetTenantResponse()
        response.tenant = WireMapping.tenantInfo(try await service.tenant(tenant))
        return WireMapping.ok(response)
    }

    /// A gateway admin (or any binding on `*`) sees every tenant; others see the tenants they
    /// hold a role on, and nothing about the rest.
    func listTenants(_ request: Request<Hsmgw_V1_ListTenantsRequest>) async throws -> OutgoingResponse {
        let (message, call) = (request.message, request.call)
        let limit = try pageSize(message.pageSize)
        var after: TenantID?
        if !message.pageToken.isEmpty { after = try tenantID(message.pageToken) }
        var response = Hsmgw_V1_ListTenantsResponse()
        switch AccessPolicy.tenants(call.roles, allowing: .readTenant) {
        case .all:
            let page = try await service.listTenants(PageRequest(after: after?.rawValue, limit: limit))
            response.tenants = page.items.map(WireMapping.tenantInfo)
            response.nextPageToken = page.nextPage ?? ""
        case .listed(let tenants):
            // Bounded by the principal's role bindings (at most 256): paged here, in id order.
            let candidates = tenants.sorted().filter { after == nil || $0 > after! }
            var records: [TenantRecord] = []
            var index = candidates.startIndex
            while index < candidates.endIndex, records.count < limit {
                // A binding on a tenant that no longer exists shows nothing.
                if let record = try await existingTenant(candidates[index]) { records.append(record) }
                index += 1
            }
            response.tenants = records.map(WireMapping.tenantInfo)
            if index < candidates.endIndex, let last = records.last {
                response.nextPageToken = last.id.rawValue
            }
        }
        return WireMapping.ok(response)
    }

    /// The tenant, or nil when it does not exist.
    private func existingTenant(_ id: TenantID) async throws -> TenantRecord? {
        let result: Result<TenantRecord, KeyServiceError>
        do {
            result = .success(try await service.tenant(id))
        } catch {
            result = .failure(error)
        }
        switch result {
        case .success(let record): return record
        case .failure(let error) where error.code == .notFound: return nil
        case .failure(let error): throw error
        }
    }

    func setTenantState(_ request: TenantRequest<Hsmgw_V1_TenantStateRequest>) async throws -> OutgoingResponse {
        let (tenant, call) = (request.tenant, request.call)
        let disable = call.request.method == .disableTenant
        let record =
            disable
            ? try await service.disableTenant(tenant, request: call.context)
            : try await service.enableTenant(tenant, request: call.context)
        var response = Hsmgw_V1_TenantStateResponse()
        response.tenant = WireMapping.tenantInfo(record)
        return WireMapping.ok(response)
    }

    func shredTenant(_ request: TenantRequest<Hsmgw_V1_ShredTenantRequest>) async throws -> OutgoingResponse {
        let (message, tenant, call) = (request.message, request.tenant, request.call)
        guard message.confirm == message.tenant else {
            throw RequestFailure(.invalidArgument, "confirm must repeat the tenant id exactly")
        }
        await rewrapJobs.stop(tenant)
        let receipt = try await service.shredTenant(tenant, request: call.context)
        var response = Hsmgw_V1_ShredTenantResponse()
        response.tenant = receipt.tenant.rawValue
        response.destroyedMasterKeyVersions = receipt.destroyedVersions.map { UInt32(clamping: $0) }
        response.deletedDataKeys = UInt64(clamping: receipt.dataKeysDeleted)
        response.shreddedAtMs = receipt.time.millisecondsSinceEpoch
        response.auditSequence = receipt.auditSequence
        return WireMapping.ok(response)
    }

    // MARK: Master keys

    func listMasterKeys(_ request: TenantRequest<Hsmgw_V1_ListMasterKeysRequest>) async throws -> OutgoingResponse {
        let tenant = request.tenant
        let versions = try await service.masterKeyVersions(tenant)
        let primary = try await service.tenant(tenant).primaryVersion
        var response = Hsmgw_V1_ListMasterKeysResponse()
        response.versions = versions.map { WireMapping.masterKeyInfo($0, primary: primary) }
        return WireMapping.ok(response)
    }

    func rotateMasterKey(_ request: TenantRequest<Hsmgw_V1_RotateMasterKeyRequest>) async throws -> OutgoingResponse {
        let (message, tenant, call) = (request.message, request.tenant, request.call)
        let idempotencyKey = try idempotencyKey(message.idempotencyKey)
        let record = try await service.rotateMasterKey(
            tenant, activate: message.activate, idempotencyKey: idempotencyKey, request: call.context)
        let primary = try? await service.tenant(tenant).primaryVersion
        var response = Hsmgw_V1_MasterKeyResponse()
        response.version = WireMapping.masterKeyInfo(record, primary: primary)
        return WireMapping.ok(response)
    }

    /// Activate, set state, schedule and cancel destruction.
    func changeMasterKey(_ request: TenantRequest<Hsmgw_V1_MasterKeyVersionRequest>) async throws -> OutgoingResponse {
        let (message, tenant, call) = (request.message, request.tenant, request.call)
        guard message.version >= 1 else { throw RequestFailure(.invalidArgument, "version must be 1 or more") }
        let version = Int(message.version)
        let method = call.request.method
        var state: MasterKeyState?
        if method == .setMasterKeyState {
            guard let parsed = MasterKeyState(rawValue: message.state) else {
                let allowed = MasterKeyState.allCases.map(\.rawValue).joined(separator: ", ")
                throw RequestFailure(.invalidArgument, "state must be one of \(allowed)")
            }
            state = parsed
        }
        let days = message.waitingPeriodDays == 0 ? nil : Int(message.waitingPeriodDays)
        let record: MasterKeyVersionRecord
        switch method {
        case .activateMasterKey:
            record = try await service.activateMasterKey(tenant, version: version, request: call.context)
        case .setMasterKeyState:
            record = try await service.setMasterKeyState(
                tenant, version: version, to: state!, request: call.context)
        case .scheduleMasterKeyDestruction:
            record = try await service.scheduleMasterKeyDestruction(
                tenant, version: version, waitingPeriodDays: days, request: call.context)
        default:
            record = try await service.cancelMasterKeyDestruction(tenant, version: version, request: call.context)
        }
        let primary = try? await service.tenant(tenant).primaryVersion
        var response = Hsmgw_V1_MasterKeyResponse()
        response.version = WireMapping.masterKeyInfo(record, primary: primary)
        return WireMapping.ok(response)
    }

    // MARK: Rewrap job

    /// Start (the server then runs the job in the background) and status.
    func rewrapJob(_ request: TenantRequest<Hsmgw_V1_RewrapJobRequest>) async throws -> OutgoingResponse {
        let (tenant, call) = (request.tenant, request.call)
        let start = call.request.method == .startRewrapJob
        var response = Hsmgw_V1_RewrapJobResponse()
        if start {
            let job = try await service.startRewrapJob(tenant, request: call.context)
            rewrapJobs.run(tenant)
            response.job = WireMapping.rewrapJobInfo(job)
        } else if let job = try await service.rewrapJob(tenant) {
            response.job = WireMapping.rewrapJobInfo(job)
        }
        return WireMapping.ok(response)
    }
}
