/// A method number, carried in the frame header. Numbers are stable: a method is never
/// renumbered and a retired number is never reused. A server answers a number it does not know
/// with `UNIMPLEMENTED`. The payload messages are in `proto/hsmgw/v1/gateway.proto`.
public struct Method: RawRepresentable, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    /// What a server needs from the caller, before any per-tenant role is checked.
    public enum Scope: Sendable, Hashable {
        /// Needs no authentication (the handshake itself).
        case handshake
        /// Any authenticated principal.
        case anyPrincipal
        /// A role on the tenant named in the request.
        case tenant
        /// The gateway-wide admin role (`admin` on tenant `*`).
        case gatewayAdmin
    }

    /// Whether a retry of a call that may have reached the server cannot do anything twice:
    /// reads, and writes that carry an idempotency key or set an absolute state. Clients retry
    /// these after `UNAVAILABLE`; others only when the request never left the client.
    public var isIdempotent: Bool { Self.table[self]?.idempotent ?? false }

    /// The method's scope; nil for numbers this build does not know.
    public var scope: Scope? { Self.table[self]?.scope }

    /// The method's name as in the protocol document, e.g. `GenerateDataKey`.
    public var name: String? { Self.table[self]?.name }

    public var description: String { name ?? "method(\(rawValue))" }

    // Connection.
    public static let hello = Method(rawValue: 1)
    public static let serverInfo = Method(rawValue: 2)
    // Data keys.
    public static let generateDataKey = Method(rawValue: 10)
    public static let generateDataKeys = Method(rawValue: 11)
    public static let decryptDataKey = Method(rawValue: 12)
    public static let decryptDataKeys = Method(rawValue: 13)
    public static let encrypt = Method(rawValue: 14)
    public static let decrypt = Method(rawValue: 15)
    public static let rewrapDataKey = Method(rawValue: 16)
    public static let getDataKey = Method(rawValue: 17)
    public static let listDataKeys = Method(rawValue: 18)
    public static let disableDataKey = Method(rawValue: 19)
    public static let enableDataKey = Method(rawValue: 20)
    public static let destroyDataKey = Method(rawValue: 21)
    // Tenants.
    public static let createTenant = Method(rawValue: 30)
    public static let getTenant = Method(rawValue: 31)
    public static let listTenants = Method(rawValue: 32)
    public static let disableTenant = Method(rawValue: 33)
    public static let enableTenant = Method(rawValue: 34)
    public static let shredTenant = Method(rawValue: 35)
    // Master keys.
    public static let listMasterKeys = Method(rawValue: 40)
    public static let rotateMasterKey = Method(rawValue: 41)
    public static let activateMasterKey = Method(rawValue: 42)
    public static let setMasterKeyState = Method(rawValue: 43)
    public static let scheduleMasterKeyDestruction = Method(rawValue: 44)
    public static let cancelMasterKeyDestruction = Method(rawValue: 45)
    // Rewrap job.
    public static let startRewrapJob = Method(rawValue: 50)
    public static let getRewrapJob = Method(rawValue: 51)
    // Principals, roles, API tokens.
    public static let createPrincipal = Method(rawValue: 60)
    public static let listPrincipals = Method(rawValue: 61)
    public static let grantRole = Method(rawValue: 62)
    public static let revokeRole = Method(rawValue: 63)
    public static let createAPIToken = Method(rawValue: 64)
    public static let listAPITokens = Method(rawValue: 65)
    public static let revokeAPIToken = Method(rawValue: 66)
    // Audit.
    public static let listAuditRecords = Method(rawValue: 70)
    public static let verifyAuditLog = Method(rawValue: 71)
    // Seal (served while the gateway is sealed).
    public static let unsealSubmitShare = Method(rawValue: 80)
    public static let unsealReset = Method(rawValue: 81)
    public static let seal = Method(rawValue: 82)

    private struct Entry: Sendable {
        var name: String
        var scope: Scope
        var idempotent: Bool
    }

    private static let table: [Method: Entry] = {
        var table: [Method: Entry] = [:]
        func add(_ method: Method, _ name: String, _ scope: Scope, idempotent: Bool) {
            precondition(table[method] == nil, "method \(method.rawValue) defined twice")
            table[method] = Entry(name: name, scope: scope, idempotent: idempotent)
        }
        add(.hello, "Hello", .handshake, idempotent: true)
        add(.serverInfo, "ServerInfo", .anyPrincipal, idempotent: true)
        // Generate without an idempotency key is not idempotent; clients decide per call.
        add(.generateDataKey, "GenerateDataKey", .tenant, idempotent: false)
        add(.generateDataKeys, "GenerateDataKeys", .tenant, idempotent: false)
        add(.decryptDataKey, "DecryptDataKey", .tenant, idempotent: true)
        add(.decryptDataKeys, "DecryptDataKeys", .tenant, idempotent: true)
        // Encrypt counts an invocation and returns a new ciphertext each time: not idempotent.
        add(.encrypt, "Encrypt", .tenant, idempotent: false)
        add(.decrypt, "Decrypt", .tenant, idempotent: true)
        add(.rewrapDataKey, "RewrapDataKey", .tenant, idempotent: true)
        add(.getDataKey, "GetDataKey", .tenant, idempotent: true)
        add(.listDataKeys, "ListDataKeys", .tenant, idempotent: true)
        add(.disableDataKey, "DisableDataKey", .tenant, idempotent: false)
        add(.enableDataKey, "EnableDataKey", .tenant, idempotent: false)
        add(.destroyDataKey, "DestroyDataKey", .tenant, idempotent: false)
        add(.createTenant, "CreateTenant", .gatewayAdmin, idempotent: false)
        add(.getTenant, "GetTenant", .tenant, idempotent: true)
        add(.listTenants, "ListTenants", .anyPrincipal, idempotent: true)
        add(.disableTenant, "DisableTenant", .tenant, idempotent: false)
        add(.enableTenant, "EnableTenant", .tenant, idempotent: false)
        add(.shredTenant, "ShredTenant", .gatewayAdmin, idempotent: false)
        add(.listMasterKeys, "ListMasterKeys", .tenant, idempotent: true)
        add(.rotateMasterKey, "RotateMasterKey", .tenant, idempotent: false)
        add(.activateMasterKey, "ActivateMasterKey", .tenant, idempotent: false)
        add(.setMasterKeyState, "SetMasterKeyState", .tenant, idempotent: false)
        add(.scheduleMasterKeyDestruction, "ScheduleMasterKeyDestruction", .tenant, idempotent: false)
        add(.cancelMasterKeyDestruction, "CancelMasterKeyDestruction", .tenant, idempotent: false)
        add(.startRewrapJob, "StartRewrapJob", .tenant, idempotent: false)
        add(.getRewrapJob, "GetRewrapJob", .tenant, idempotent: true)
        add(.createPrincipal, "CreatePrincipal", .gatewayAdmin, idempotent: false)
        add(.listPrincipals, "ListPrincipals", .gatewayAdmin, idempotent: true)
        add(.grantRole, "GrantRole", .gatewayAdmin, idempotent: true)
        add(.revokeRole, "RevokeRole", .gatewayAdmin, idempotent: true)
        add(.createAPIToken, "CreateAPIToken", .gatewayAdmin, idempotent: false)
        add(.listAPITokens, "ListAPITokens", .gatewayAdmin, idempotent: true)
        add(.revokeAPIToken, "RevokeAPIToken", .gatewayAdmin, idempotent: true)
        add(.listAuditRecords, "ListAuditRecords", .gatewayAdmin, idempotent: true)
        add(.verifyAuditLog, "VerifyAuditLog", .gatewayAdmin, idempotent: true)
        // A share given twice is refused as a duplicate: a retry could only fail.
        add(.unsealSubmitShare, "UnsealSubmitShare", .gatewayAdmin, idempotent: false)
        add(.unsealReset, "UnsealReset", .gatewayAdmin, idempotent: true)
        add(.seal, "Seal", .gatewayAdmin, idempotent: true)
        return table
    }()

    /// Every method this build defines, by number.
    public static var all: [Method] { table.keys.sorted { $0.rawValue < $1.rawValue } }
}
