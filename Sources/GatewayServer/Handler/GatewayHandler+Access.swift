import Foundation
import GatewayTransport
import GatewayWire
import KeyHierarchy

extension GatewayHandler {
    /// Listings without paging in the protocol (principals, tokens) return at most this many:
    /// one store page, and well inside the frame limit.
    static let maximumUnpagedListing = PageRequest.maximumPageSize

    func createPrincipal(_ request: Request<Hsmgw_V1_CreatePrincipalRequest>) async throws -> OutgoingResponse {
        let (message, call) = (request.message, request.call)
        let name = try PrincipalName(message.name)
        let commonName =
            message.certificateCommonName.isEmpty ? nil : try CertificateCommonName(message.certificateCommonName)
        guard message.roles.count <= PrincipalRecord.maximumRoleBindings else {
            throw RequestFailure(
                .invalidArgument, "roles must hold at most \(PrincipalRecord.maximumRoleBindings) bindings")
        }
        let roles = try message.roles.map { try KeyHierarchy.RoleBinding(scope: $0.tenant, role: $0.role) }
        let record = try await service.createPrincipal(
            name, certificateCommonName: commonName, roles: roles, request: call.context)
        var response = Hsmgw_V1_PrincipalResponse()
        response.principal = WireMapping.principalInfo(record)
        return WireMapping.ok(response)
    }

    func listPrincipals(_ request: Request<Hsmgw_V1_ListPrincipalsRequest>) async throws -> OutgoingResponse {
        let page = try await service.listPrincipals(PageRequest(limit: Self.maximumUnpagedListing))
        var response = Hsmgw_V1_ListPrincipalsResponse()
        response.principals = page.items.map(WireMapping.principalInfo)
        return WireMapping.ok(response)
    }

    /// Grant and revoke; the principal's cached roles are dropped at once on this instance.
    func changeRole(_ request: Request<Hsmgw_V1_RoleRequest>) async throws -> OutgoingResponse {
        let (message, call) = (request.message, request.call)
        let name = try PrincipalName(message.principal)
        guard message.hasRole else { throw RequestFailure(.invalidArgument, "role is required") }
        let binding = try KeyHierarchy.RoleBinding(scope: message.role.tenant, role: message.role.role)
        let record =
            call.request.method == .grantRole
            ? try await service.grantRole(binding, to: name, request: call.context)
            : try await service.revokeRole(binding, from: name, request: call.context)
        accessCache.invalidate(principal: name.rawValue)
        var response = Hsmgw_V1_PrincipalResponse()
        response.principal = WireMapping.principalInfo(record)
        return WireMapping.ok(response)
    }

    func createAPIToken(_ request: Request<Hsmgw_V1_CreateAPITokenRequest>) async throws -> OutgoingResponse {
        let (message, call) = (request.message, request.call)
        let name = try PrincipalName(message.principal)
        guard message.description_p.utf8.count <= ServerLimits.maxTokenDescriptionBytes else {
            throw RequestFailure(
                .invalidArgument, "description must be at most \(ServerLimits.maxTokenDescriptionBytes) bytes")
        }
        let created = try await service.createAPIToken(
            for: name,
            description: message.description_p,
            timeToLiveSeconds: message.ttlSeconds == 0 ? nil : Int64(clamping: message.ttlSeconds),
            request: call.context
        )
        var response = Hsmgw_V1_CreateAPITokenResponse()
        response.info = WireMapping.apiTokenInfo(created.record)
        response.token = created.token
        return WireMapping.ok(response)
    }

    func listAPITokens(_ request: Request<Hsmgw_V1_ListAPITokensRequest>) async throws -> OutgoingResponse {
        let message = request.message
        let principal = message.principal.isEmpty ? nil : try PrincipalName(message.principal)
        let page = try await service.listAPITokens(
            principal: principal, PageRequest(limit: Self.maximumUnpagedListing))
        var response = Hsmgw_V1_ListAPITokensResponse()
        response.tokens = page.items.map(WireMapping.apiTokenInfo)
        return WireMapping.ok(response)
    }

    /// Revokes a token; connections using it are refused from their next request on this
    /// instance, within the access cache's lifetime on others.
    func revokeAPIToken(_ request: Request<Hsmgw_V1_RevokeAPITokenRequest>) async throws -> OutgoingResponse {
        let (message, call) = (request.message, request.call)
        let id = try APITokenID(message.id)
        let record = try await service.revokeAPIToken(id, request: call.context)
        accessCache.invalidate(tokenID: id.rawValue)
        var response = Hsmgw_V1_RevokeAPITokenResponse()
        response.info = WireMapping.apiTokenInfo(record)
        return WireMapping.ok(response)
    }

    // MARK: Audit

    func listAuditRecords(_ request: Request<Hsmgw_V1_ListAuditRecordsRequest>) async throws -> OutgoingResponse {
        let message = request.message
        guard message.after >= 0 else { throw RequestFailure(.invalidArgument, "after must be 0 or more") }
        let limit = try pageSize(message.limit)
        let records = try await service.auditRecords(after: message.after, limit: limit)
        var response = Hsmgw_V1_ListAuditRecordsResponse()
        response.records = records.map(WireMapping.auditRecordInfo)
        return WireMapping.ok(response)
    }

    func verifyAuditLog(_ request: Request<Hsmgw_V1_VerifyAuditLogRequest>) async throws -> OutgoingResponse {
        var response = Hsmgw_V1_VerifyAuditLogResponse()
        let verification = try await service.verifyAuditLog()
        response.checkpointsChecked = Int64(verification.checkpointsChecked)
        switch verification.result {
        case .verified(let records, let head):
            response.intact = true
            response.recordsChecked = records
            response.headSequence = head.sequence
            response.headHash = Data(head.hash)
            response.anchoredThrough = verification.anchoredThrough ?? 0
        case .broken(let problem):
            response.intact = false
            response.recordsChecked = max(0, problem.sequence - 1)
            response.problemSequence = problem.sequence
            response.problem = "\(problem.kind.rawValue): \(problem.explanation)"
            response.problemKind = problem.kind.rawValue
        }
        return WireMapping.ok(response)
    }
}
