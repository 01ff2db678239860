import GatewayTransport
import GatewayWire
import KeyHierarchy
import SwiftProtobuf

/// Who may call a method.
enum RouteAccess: Sendable, Hashable {
    /// The caller's roles must allow the action, on the request's tenant for a tenant-scoped
    /// method; a refusal is audited and answered PERMISSION_DENIED.
    case requires(AccessAction)
    /// Any authenticated caller; the handler shows only what the caller's roles allow for the
    /// action (ListTenants: the tenants the caller holds a role on).
    case filtered(AccessAction)
    /// Any authenticated caller: the answer says nothing about tenants or keys (ServerInfo).
    case anyCaller
}

/// A request that went through the route's chain: decoded, its caller authenticated and
/// authorised. Only the chain makes one (the initialiser is private to this file), so a handler,
/// which takes one, cannot be reached any other way.
struct Request<Message: SwiftProtobuf.Message & Sendable>: Sendable {
    let call: GatewayHandler.Call
    let message: Message

    fileprivate init(call: GatewayHandler.Call, message: Message) {
        self.call = call
        self.message = message
    }
}

/// A tenant-scoped request that went through the chain: its tenant parsed and the caller
/// authorised on it (and admitted under it when the route says so).
struct TenantRequest<Message: SwiftProtobuf.Message & Sendable>: Sendable {
    let call: GatewayHandler.Call
    let message: Message
    let tenant: TenantID

    fileprivate init(call: GatewayHandler.Call, message: Message, tenant: TenantID) {
        self.call = call
        self.message = message
        self.tenant = tenant
    }
}

/// One method's registration: its request type, who may call it, whether it is tenant-scoped
/// and runs under the tenant's fair admission, and its handler, run through one chain: decode →
/// (authenticate: done before, per request) → authorise → admit → handle → map errors (in
/// `GatewayHandler.handle` and `admitted`).
struct Route: Sendable {
    let method: Method
    /// The request message's protobuf name.
    let requestType: String
    let access: RouteAccess
    /// Tenant-scoped: the request names a tenant, authorisation is on it.
    let tenantScoped: Bool
    /// Runs under the tenant's fair admission (`TenantFairScheduler`).
    let admitted: Bool
    fileprivate let run: @Sendable (GatewayHandler, GatewayHandler.Call) async throws -> OutgoingResponse

    /// A method whose request names a tenant (`tenant` reads it): authorised on that tenant and,
    /// unless `admitted` is false, run under its fair admission.
    static func tenant<Message: SwiftProtobuf.Message & Sendable>(
        _ method: Method,
        _ type: Message.Type,
        _ action: AccessAction,
        tenant: @escaping @Sendable (Message) -> String,
        admitted: Bool = true,
        _ handle: @escaping @Sendable (GatewayHandler) -> (TenantRequest<Message>) async throws -> OutgoingResponse
    ) -> Route {
        Route(
            method: method, requestType: Message.protoMessageName, access: .requires(action), tenantScoped: true,
            admitted: admitted
        ) { handler, call in
            let message = try handler.decode(Message.self, call)
            let tenant = try handler.tenantID(tenant(message))
            try await handler.authorize(action, tenant: tenant, call)
            let request = TenantRequest(call: call, message: message, tenant: tenant)
            guard admitted else { return try await handle(handler)(request) }
            return await handler.admitted(tenant) { try await handle(handler)(request) }
        }
    }

    /// A method not about one tenant.
    static func global<Message: SwiftProtobuf.Message & Sendable>(
        _ method: Method,
        _ type: Message.Type,
        _ access: RouteAccess,
        _ handle: @escaping @Sendable (GatewayHandler) -> (Request<Message>) async throws -> OutgoingResponse
    ) -> Route {
        Route(
            method: method, requestType: Message.protoMessageName, access: access, tenantScoped: false, admitted: false
        ) { handler, call in
            let message = try handler.decode(Message.self, call)
            if case .requires(let action) = access { try await handler.authorize(action, tenant: nil, call) }
            return try await handle(handler)(Request(call: call, message: message))
        }
    }
}

extension GatewayHandler {
    /// Every method the gateway serves after Hello, one registration each.
    static let routeList: [Route] = [
        .global(.serverInfo, Hsmgw_V1_ServerInfoRequest.self, .anyCaller, GatewayHandler.serverInfo),

        .tenant(
            .generateDataKey, Hsmgw_V1_GenerateDataKeyRequest.self, .generateDataKey, tenant: \.tenant,
            GatewayHandler.generateDataKey),
        .tenant(
            .generateDataKeys, Hsmgw_V1_GenerateDataKeysRequest.self, .generateDataKey, tenant: \.tenant,
            GatewayHandler.generateDataKeys),
        .tenant(
            .decryptDataKey, Hsmgw_V1_DecryptDataKeyRequest.self, .decrypt, tenant: \.tenant,
            GatewayHandler.decryptDataKey),
        .tenant(
            .decryptDataKeys, Hsmgw_V1_DecryptDataKeysRequest.self, .decrypt, tenant: \.tenant,
            GatewayHandler.decryptDataKeys),
        .tenant(.encrypt, Hsmgw_V1_EncryptRequest.self, .encrypt, tenant: \.tenant, GatewayHandler.encrypt),
        .tenant(.decrypt, Hsmgw_V1_DecryptRequest.self, .decrypt, tenant: \.tenant, GatewayHandler.decrypt),
        .tenant(
            .rewrapDataKey, Hsmgw_V1_RewrapDataKeyRequest.self, .rewrapDataKey, tenant: \.tenant,
            GatewayHandler.rewrapDataKey),
        .tenant(
            .getDataKey, Hsmgw_V1_GetDataKeyRequest.self, .readDataKey, tenant: \.tenant, GatewayHandler.getDataKey),
        .tenant(
            .listDataKeys, Hsmgw_V1_ListDataKeysRequest.self, .listDataKeys, tenant: \.tenant,
            GatewayHandler.listDataKeys),
        .tenant(
            .disableDataKey, Hsmgw_V1_DataKeyStateRequest.self, .manageDataKeys, tenant: \.tenant,
            GatewayHandler.setDataKeyState),
        .tenant(
            .enableDataKey, Hsmgw_V1_DataKeyStateRequest.self, .manageDataKeys, tenant: \.tenant,
            GatewayHandler.setDataKeyState),
        .tenant(
            .destroyDataKey, Hsmgw_V1_DataKeyStateRequest.self, .manageDataKeys, tenant: \.tenant,
            GatewayHandler.setDataKeyState),

        // Creating and shredding a tenant are the gateway admin's, outside any tenant's queue.
        .tenant(
            .createTenant, Hsmgw_V1_CreateTenantRequest.self, .createTenant, tenant: \.tenant, admitted: false,
            GatewayHandler.createTenant),
        .tenant(.getTenant, Hsmgw_V1_GetTenantRequest.self, .readTenant, tenant: \.tenant, GatewayHandler.getTenant),
        .global(.listTenants, Hsmgw_V1_ListTenantsRequest.self, .filtered(.readTenant), GatewayHandler.listTenants),
        .tenant(
            .disableTenant, Hsmgw_V1_TenantStateRequest.self, .manageTenant, tenant: \.tenant,
            GatewayHandler.setTenantState),
        .tenant(
            .enableTenant, Hsmgw_V1_TenantStateRequest.self, .manageTenant, tenant: \.tenant,
            GatewayHandler.setTenantState),
        .tenant(
            .shredTenant, Hsmgw_V1_ShredTenantRequest.self, .shredTenant, tenant: \.tenant, admitted: false,
            GatewayHandler.shredTenant),

        .tenant(
            .listMasterKeys, Hsmgw_V1_ListMasterKeysRequest.self, .manageTenant, tenant: \.tenant,
            GatewayHandler.listMasterKeys),
        .tenant(
            .rotateMasterKey, Hsmgw_V1_RotateMasterKeyRequest.self, .manageTenant, tenant: \.tenant,
            GatewayHandler.rotateMasterKey),
        .tenant(
            .activateMasterKey, Hsmgw_V1_MasterKeyVersionRequest.self, .manageTenant, tenant: \.tenant,
            GatewayHandler.changeMasterKey),
        .tenant(
            .setMasterKeyState, Hsmgw_V1_MasterKeyVersionRequest.self, .manageTenant, tenant: \.tenant,
            GatewayHandler.changeMasterKey),
        .tenant(
            .scheduleMasterKeyDestruction, Hsmgw_V1_MasterKeyVersionRequest.self, .manageTenant, tenant: \.tenant,
            GatewayHandler.changeMasterKey),
        .tenant(
            .cancelMasterKeyDestruction, Hsmgw_V1_MasterKeyVersionRequest.self, .manageTenant, tenant: \.tenant,
            GatewayHandler.changeMasterKey),
        .tenant(
            .startRewrapJob, Hsmgw_V1_RewrapJobRequest.self, .manageTenant, tenant: \.tenant,
            GatewayHandler.rewrapJob),
        .tenant(
            .getRewrapJob, Hsmgw_V1_RewrapJobRequest.self, .manageTenant, tenant: \.tenant, GatewayHandler.rewrapJob),

        .global(
            .createPrincipal, Hsmgw_V1_CreatePrincipalRequest.self, .requires(.manageAccess),
            GatewayHandler.createPrincipal),
        .global(
            .listPrincipals, Hsmgw_V1_ListPrincipalsRequest.self, .requires(.manageAccess),
            GatewayHandler.listPrincipals),
        .global(.grantRole, Hsmgw_V1_RoleRequest.self, .requires(.manageAccess), GatewayHandler.changeRole),
        .global(.revokeRole, Hsmgw_V1_RoleRequest.self, .requires(.manageAccess), GatewayHandler.changeRole),
        .global(
            .createAPIToken, Hsmgw_V1_CreateAPITokenRequest.self, .requires(.manageAccess),
            GatewayHandler.createAPIToken),
        .global(
            .listAPITokens, Hsmgw_V1_ListAPITokensRequest.self, .requires(.manageAccess),
            GatewayHandler.listAPITokens),
        .global(
            .revokeAPIToken, Hsmgw_V1_RevokeAPITokenRequest.self, .requires(.manageAccess),
            GatewayHandler.revokeAPIToken),

        .global(
            .listAuditRecords, Hsmgw_V1_ListAuditRecordsRequest.self, .requires(.readAudit),
            GatewayHandler.listAuditRecords),
        .global(
            .verifyAuditLog, Hsmgw_V1_VerifyAuditLogRequest.self, .requires(.readAudit),
            GatewayHandler.verifyAuditLog),

        // The gateway admin's (the domain has no separate action: every gateway-admin action is
        // allowed to `admin` on `*` alone). Served while sealed.
        .global(
            .unsealSubmitShare, Hsmgw_V1_UnsealSubmitShareRequest.self, .requires(.manageAccess),
            GatewayHandler.unsealSubmitShare),
        .global(
            .unsealReset, Hsmgw_V1_UnsealResetRequest.self, .requires(.manageAccess), GatewayHandler.unsealReset),
        .global(.seal, Hsmgw_V1_SealRequest.self, .requires(.manageAccess), GatewayHandler.seal),
    ]

    /// What a sealed gateway serves besides Hello: its status and the seal's own methods.
    static let servedWhileSealed: Set<Method> = [.serverInfo, .unsealSubmitShare, .unsealReset, .seal]

    /// `routeList` by method. Two registrations of one method stop the process at start.
    static let routes: [Method: Route] = Dictionary(routeList.map { ($0.method, $0) }) { first, _ in
        preconditionFailure("two routes for method \(first.method)")
    }

    /// Runs `call` through its method's route; a method without one is UNIMPLEMENTED.
    func dispatch(_ call: Call) async throws -> OutgoingResponse {
        guard let route = Self.routes[call.request.method] else {
            return RequestFailure(.unimplemented, "method \(call.request.method) is not implemented").response
        }
        if seal?.isSealed == true, !Self.servedWhileSealed.contains(call.request.method) {
            return RequestFailure.sealed.response
        }
        return try await route.run(self, call)
    }
}
