import GatewayWire
import KeyHierarchy
import Testing

@testable import GatewayServer

/// One registration per method: every method of the method table (but Hello, which the
/// handshake answers) has exactly one route, with an access decision that fits the method's
/// documented scope and the request message the protocol names. Handlers take a `Request` or
/// `TenantRequest`, which only a route's chain can make (their initialisers are private to
/// Routes.swift), so a handler cannot be reached without decoding and authorisation.
@Suite("Route table")
struct RouteTableTests {
    /// Methods sharing one request message (and one handler) instead of `<Name>Request`.
    static let sharedRequests: [String: String] = [
        "DisableDataKey": "DataKeyStateRequest", "EnableDataKey": "DataKeyStateRequest",
        "DestroyDataKey": "DataKeyStateRequest", "DisableTenant": "TenantStateRequest",
        "EnableTenant": "TenantStateRequest", "ActivateMasterKey": "MasterKeyVersionRequest",
        "SetMasterKeyState": "MasterKeyVersionRequest", "ScheduleMasterKeyDestruction": "MasterKeyVersionRequest",
        "CancelMasterKeyDestruction": "MasterKeyVersionRequest", "StartRewrapJob": "RewrapJobRequest",
        "GetRewrapJob": "RewrapJobRequest", "GrantRole": "RoleRequest", "RevokeRole": "RoleRequest",
    ]

    @Test("every method after Hello has exactly one route; Hello has none")
    func oneRoutePerMethod() {
        let counts = Dictionary(GatewayHandler.routeList.map { ($0.method, 1) }, uniquingKeysWith: +)
        #expect(counts.values.allSatisfy { $0 == 1 }, "methods routed twice: \(counts.filter { $0.value > 1 }.keys)")
        for method in Method.all {
            if method.scope == .handshake {
                #expect(counts[method] == nil, "\(method) is answered by the handshake, not a route")
            } else {
                #expect(counts[method] == 1, "\(method) has no route")
            }
        }
        #expect(Set(counts.keys).isSubset(of: Set(Method.all)), "a route for a method the table does not define")
    }

    @Test("each route's access fits the method's scope, and it decodes the message the protocol names")
    func accessAndRequestTypes() throws {
        for route in GatewayHandler.routeList {
            let name = try #require(route.method.name)
            let expected = "hsmgw.v1." + (Self.sharedRequests[name] ?? name + "Request")
            #expect(route.requestType == expected, "\(name)")
            switch (route.method.scope, route.access) {
            case (.tenant, .requires(let action)):
                #expect(!action.requiresGatewayAdmin, "\(name): a tenant method needs a tenant action")
                #expect(route.tenantScoped, "\(name): authorised on the request's tenant")
                #expect(route.admitted, "\(name): tenant work runs under fair admission")
            case (.gatewayAdmin, .requires(let action)):
                #expect(action.requiresGatewayAdmin, "\(name): a gateway-admin method needs a global action")
                #expect(!route.admitted, "\(name): admin work is outside the tenants' queues")
            case (.anyPrincipal, .anyCaller), (.anyPrincipal, .filtered):
                #expect(!route.tenantScoped)
            default:
                Issue.record("\(name): scope \(String(describing: route.method.scope)) with access \(route.access)")
            }
        }
    }
}
