import Crypto
import Foundation

// Access control: who a caller is (principals, API tokens, certificate common names) and what
// a caller may do (roles bound to one tenant or to every tenant, and the policy that reads
// them). The policy is pure; storage and auditing live in `KeyService+Access.swift`.

// MARK: - Principals

/// A principal's name: 1–128 bytes of `a-z`, `0-9`, `.`, `_`, `@` and `-`, starting with a letter
/// or digit, so it is safe in log lines, audit records and listings, and an e-mail-like or
/// service name (`billing@prod`, `ci.deploy`) fits. `system` is reserved for the gateway itself.
public struct PrincipalName: Hashable, Sendable, Comparable, CustomStringConvertible, Codable {
    /// The longest name: the wire limit (protocol rules, "principal name ≤ 128 bytes"), well
    /// inside the 256 bytes an audit record keeps for its principal.
    public static let maximumLength = 128

    /// Names no caller can take, because the audit log already uses them for the gateway's own
    /// work (`Principal.system`).
    public static let reservedNames: Set<String> = [Principal.system.name]

    public let rawValue: String

    /// Validates `rawValue`; throws `KeyServiceError.invalidArgument` naming the rule broken.
    public init(_ rawValue: String) throws(KeyServiceError) {
        guard !rawValue.isEmpty, rawValue.utf8.count <= Self.maximumLength else {
            throw KeyServiceError(.invalidArgument, "principal name must be 1 to \(Self.maximumLength) bytes")
        }
        for (index, byte) in rawValue.utf8.enumerated() {
            let isLower = byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z")
            let isDigit = byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9")
            let isPunctuation =
                byte == UInt8(ascii: ".") || byte == UInt8(ascii: "_") || byte == UInt8(ascii: "@")
                || byte == UInt8(ascii: "-")
            guard isLower || isDigit || (isPunctuation && index > 0) else {
                throw KeyServiceError(
                    .invalidArgument,
                    "principal name may hold only a-z, 0-9, '.', '_', '@' and '-', and must start with a letter or digit"
                )
            }
        }
        guard !Self.reservedNames.contains(rawValue) else {
            throw KeyServiceError(.invalidArgument, "principal name '\(rawValue)' is reserved")
        }
        self.rawValue = rawValue
    }

    /// For values read back from storage, which were validated when written.
    public init(trusted rawValue: String) {
        self.rawValue = rawValue
    }

    /// The name as audit records and `RequestContext` carry it.
    public var principal: Principal { Principal(rawValue) }

    public var description: String { rawValue }
    public static func < (lhs: PrincipalName, rhs: PrincipalName) -> Bool { lhs.rawValue < rhs.rawValue }
}

/// The subject common name of the TLS client certificates that authenticate as a principal:
/// 1–256 bytes of UTF-8 without control or format characters (no line breaks or bidirectional
/// overrides that could forge a log line). Compared exactly; unique across principals.
public struct CertificateCommonName: Hashable, Sendable, CustomStringConvertible, Codable {
    /// The longest common name kept: X.509's upper bound for `commonName` is 64 characters
    /// (RFC 5280, `ub-common-name`), which is at most 256 bytes of UTF-8.
    public static let maximumLength = 256

    public let rawValue: String

    /// Validates `rawValue`; throws `KeyServiceError.invalidArgument` naming the rule broken.
    public init(_ rawValue: String) throws(KeyServiceError) {
        guard !rawValue.isEmpty, rawValue.utf8.count <= Self.maximumLength else {
            throw KeyServiceError(
                .invalidArgument, "certificate common name must be 1 to \(Self.maximumLength) bytes")
        }
        for scalar in rawValue.unicodeScalars {
            switch scalar.properties.generalCategory {
            case .control, .format, .lineSeparator, .paragraphSeparator, .surrogate, .unassigned, .privateUse:
                throw KeyServiceError(.invalidArgument, "certificate common name holds a non-printable character")
            default:
                continue
            }
        }
        self.rawValue = rawValue
    }

    /// For values read back from storage, which were validated when written.
    public init(trusted rawValue: String) {
        self.rawValue = rawValue
    }

    public var description: String { rawValue }
}

/// A principal as stored: a name, optionally a certificate common name that authenticates as
/// it, and its role bindings.
public struct PrincipalRecord: Sendable, Hashable {
    /// The most role bindings one principal holds: every request evaluates them, and the
    /// handshake answer lists them.
    public static let maximumRoleBindings = 256

    public var name: PrincipalName
    /// TLS client certificates with this subject CN authenticate as this principal.
    public var certificateCommonName: CertificateCommonName?
    /// Ordered by scope (`*` first, then tenant ids) and role.
    public var roles: [RoleBinding]
    public var createdAt: Timestamp
    /// A disabled principal is refused at authentication, whatever its credentials.
    public var disabled: Bool

    public init(
        name: PrincipalName,
        certificateCommonName: CertificateCommonName? = nil,
        roles: [RoleBinding] = [],
        createdAt: Timestamp,
        disabled: Bool = false
    ) {
        self.name = name
        self.certificateCommonName = certificateCommonName
        self.roles = roles
        self.createdAt = createdAt
        self.disabled = disabled
    }
}

// MARK: - Roles and policy

/// What a principal may do on a tenant; see `AccessPolicy` for the exact rules.
public enum Role: String, Sendable, Hashable, CaseIterable, Codable, CustomStringConvertible {
    /// Administration of the tenant (data keys, master keys, rewrap job, tenant state); on `*`,
    /// also tenants, principals, tokens and audit: a gateway administrator.
    case admin
    /// Key use: generate, encrypt, decrypt, rewrap, read and list data keys.
    case keyUser = "key-user"
    /// Decrypt and read data keys only.
    case decryptOnly = "decrypt-only"

    /// Parses the stored and wire form (`admin`, `key-user`, `decrypt-only`).
    public init(parsing string: String) throws(KeyServiceError) {
        guard let role = Role(rawValue: string) else {
            throw KeyServiceError(.invalidArgument, "role must be one of admin, key-user, decrypt-only")
        }
        self = role
    }

    public var description: String { rawValue }
}

/// Where a role binding applies: one tenant, or every tenant (`*`, including tenants created
/// later).
public enum TenantScope: Hashable, Sendable, Comparable, CustomStringConvertible {
    case all
    case tenant(TenantID)

    /// The stored and wire form of `.all`.
    public static let allMarker = "*"

    /// Parses `*` or a tenant id.
    public init(parsing string: String) throws(KeyServiceError) {
        if string == Self.allMarker {
            self = .all
        } else {
            self = .tenant(try TenantID(string))
        }
    }

    /// `*` or the tenant id: what storage and the wire hold.
    public var rawValue: String {
        switch self {
        case .all: return Self.allMarker
        case .tenant(let id): return id.rawValue
        }
    }

    /// Whether a binding with this scope applies to `tenant`.
    public func covers(_ tenant: TenantID) -> Bool {
        switch self {
        case .all: return true
        case .tenant(let id): return id == tenant
        }
    }

    public var description: String { rawValue }

    /// `*` first, then tenant ids in byte order (the order storage returns them in).
    public static func < (lhs: TenantScope, rhs: TenantScope) -> Bool { lhs.rawValue < rhs.rawValue }
}

/// A role on a scope: `admin` on `acme`, `key-user` on `*`.
public struct RoleBinding: Hashable, Sendable, Comparable, CustomStringConvertible {
    public var scope: TenantScope
    public var role: Role

    public init(scope: TenantScope, role: Role) {
        self.scope = scope
        self.role = role
    }

    /// Parses the wire form: a tenant id or `*`, and a role name.
    public init(scope: String, role: String) throws(KeyServiceError) {
        self.scope = try TenantScope(parsing: scope)
        self.role = try Role(parsing: role)
    }

    /// `role@scope`, for logs and audit details.
    public var description: String { "\(role.rawValue)@\(scope.rawValue)" }

    public static func < (lhs: RoleBinding, rhs: RoleBinding) -> Bool {
        (lhs.scope.rawValue, lhs.role.rawValue) < (rhs.scope.rawValue, rhs.role.rawValue)
    }
}

/// What a caller asks to do; the server maps each wire method to one action.
public enum AccessAction: String, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    /// GenerateDataKey(s).
    case generateDataKey = "generate-data-key"
    /// Encrypt under a stored data key.
    case encrypt
    /// DecryptDataKey(s) and Decrypt.
    case decrypt
    /// RewrapDataKey.
    case rewrapDataKey = "rewrap-data-key"
    /// GetDataKey (metadata only).
    case readDataKey = "read-data-key"
    /// ListDataKeys.
    case listDataKeys = "list-data-keys"
    /// Disable, enable and destroy data keys.
    case manageDataKeys = "manage-data-keys"
    /// GetTenant; ListTenants shows the tenants this action is allowed on.
    case readTenant = "read-tenant"
    /// Disable/enable the tenant; list, rotate, activate, change state of, schedule and cancel
    /// destruction of master keys; the rewrap job.
    case manageTenant = "manage-tenant"
    /// CreateTenant (gateway admin).
    case createTenant = "create-tenant"
    /// ShredTenant (gateway admin).
    case shredTenant = "shred-tenant"
    /// Principals, role bindings and API tokens (gateway admin).
    case manageAccess = "manage-access"
    /// Reading and verifying the audit log (gateway admin).
    case readAudit = "read-audit"

    /// Actions only a gateway administrator (`admin` on `*`) may take, whatever the tenant.
    public var requiresGatewayAdmin: Bool {
        switch self {
        case .createTenant, .shredTenant, .manageAccess, .readAudit: return true
        default: return false
        }
    }

    public var description: String { rawValue }
}

/// The tenants a principal may take an action on: used to filter listings (ListTenants).
public enum TenantSet: Hashable, Sendable {
    /// Every tenant (a binding on `*` allows the action).
    case all
    /// Only these (possibly none).
    case listed(Set<TenantID>)

    /// Whether `tenant` is in the set.
    public func contains(_ tenant: TenantID) -> Bool {
        switch self {
        case .all: return true
        case .listed(let tenants): return tenants.contains(tenant)
        }
    }
}

/// The access rules, as a pure function of a principal's bindings.
///
/// | role         | on a tenant                                                         | on `*`                      |
/// |--------------|---------------------------------------------------------------------|-----------------------------|
/// | admin        | every action on that tenant except the gateway-admin ones           | every action                |
/// | key-user     | generate, encrypt, decrypt, rewrap, read/list data keys, read tenant | the same, on every tenant  |
/// | decrypt-only | decrypt, read data keys, read tenant                                | the same, on every tenant   |
///
/// Gateway-admin actions (`createTenant`, `shredTenant`, `manageAccess`, `readAudit`) need
/// `admin` on `*`. A binding on `*` applies to every tenant; a binding on a tenant applies to
/// that tenant only. Tenant-scoped actions asked without a tenant (`tenant: nil`) are allowed
/// only by bindings on `*`.
public enum AccessPolicy {
    /// The actions a role allows within its scope, gateway-admin actions aside.
    public static func tenantActions(of role: Role) -> Set<AccessAction> {
        switch role {
        case .admin:
            return Set(AccessAction.allCases.filter { !$0.requiresGatewayAdmin })
        case .keyUser:
            return [.generateDataKey, .encrypt, .decrypt, .rewrapDataKey, .readDataKey, .listDataKeys, .readTenant]
        case .decryptOnly:
            return [.decrypt, .readDataKey, .readTenant]
        }
    }

    /// Whether one binding allows `action` on `tenant`.
    public static func allows(_ binding: RoleBinding, _ action: AccessAction, tenant: TenantID?) -> Bool {
        if action.requiresGatewayAdmin {
            return binding.role == .admin && binding.scope == .all
        }
        guard tenantActions(of: binding.role).contains(action) else { return false }
        switch (binding.scope, tenant) {
        case (.all, _): return true
        case (.tenant(let bound), .some(let asked)): return bound == asked
        case (.tenant, .none): return false
        }
    }

    /// Whether any of `bindings` allows `action` on `tenant` (nil for calls outside a tenant).
    public static func allows(_ bindings: [RoleBinding], _ action: AccessAction, tenant: TenantID?) -> Bool {
        bindings.contains { allows($0, action, tenant: tenant) }
    }

    /// The tenants on which `bindings` allow `action`.
    public static func tenants(_ bindings: [RoleBinding], allowing action: AccessAction) -> TenantSet {
        var listed: Set<TenantID> = []
        for binding in bindings {
            switch binding.scope {
            case .all:
                if allows(binding, action, tenant: nil) { return .all }
            case .tenant(let id):
                if allows(binding, action, tenant: id) { listed.insert(id) }
            }
        }
        return .listed(listed)
    }

    /// Whether `bindings` make a gateway administrator (`admin` on `*`).
    public static func isGatewayAdmin(_ bindings: [RoleBinding]) -> Bool {
        bindings.contains(RoleBinding(scope: .all, role: .admin))
    }
}

// MARK: - API tokens

/// An API token's id: `tok_` and 16 lowercase hex digits (64 random bits). Not secret: it names
/// the token in listings, logs and audit records, so revoking it never needs the token itself.
public struct APITokenID: Hashable, Sendable, Comparable, CustomStringConvertible, Codable {
    /// What every id starts with.
    public static let prefix = "tok_"
    /// Hex digits after the prefix.
    public static let hexDigits = 16
    /// The length of every id.
    public static let length = prefix.utf8.count + hexDigits

    public let rawValue: String

    /// Parses an id; throws `invalidArgument` for anything not of the exact shape.
    public init(_ rawValue: String) throws(KeyServiceError) {
        let bytes = rawValue.utf8
        guard bytes.count == Self.length, rawValue.hasPrefix(Self.prefix),
            bytes.dropFirst(Self.prefix.utf8.count).allSatisfy({
                ($0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9"))
                    || ($0 >= UInt8(ascii: "a") && $0 <= UInt8(ascii: "f"))
            })
        else {
            throw KeyServiceError(.invalidArgument, "API token id must be 'tok_' and 16 lowercase hex digits")
        }
        self.rawValue = rawValue
    }

    /// For values read back from storage, which were validated when written.
    public init(trusted rawValue: String) {
        self.rawValue = rawValue
    }

    /// A new random id.
    public static func random() -> APITokenID {
        var generator = SystemRandomNumberGenerator()
        let value = generator.next() as UInt64
        return APITokenID(trusted: prefix + String(value, radix: 16).leftPadded(to: hexDigits))
    }

    public var description: String { rawValue }
    public static func < (lhs: APITokenID, rhs: APITokenID) -> Bool { lhs.rawValue < rhs.rawValue }
}

/// A new API token: the secret string, handed to its owner once, and its SHA-256, the only thing
/// stored. Its `description` and mirror never show the secret.
public struct APIToken: Sendable, CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    /// What every token starts with: recognisable in a leaked file or a secret scanner.
    public static let prefix = "hsmgw_"
    /// Random bytes in a token: 256 bits, beyond guessing.
    public static let secretByteCount = 32
    /// Base64url characters (no padding) for `secretByteCount` bytes.
    public static let encodedSecretLength = 43
    /// The exact length of every token. Anything else is refused before hashing, so a caller
    /// cannot make the gateway hash megabytes per attempt.
    public static let length = prefix.utf8.count + encodedSecretLength

    /// The token: show it to its owner once, never store or log it.
    public let secret: String
    /// SHA-256 of the token's UTF-8 bytes: what storage keeps and lookups use.
    public let hash: [UInt8]

    private init(secret: String) {
        self.secret = secret
        self.hash = Self.digest(secret)
    }

    /// A new token from the system's CSPRNG.
    public static func generate() -> APIToken {
        var generator = SystemRandomNumberGenerator()
        var bytes = [UInt8](repeating: 0, count: secretByteCount)
        for index in bytes.indices { bytes[index] = UInt8.random(in: 0...255, using: &generator) }
        defer { for index in bytes.indices { bytes[index] = 0 } }
        return APIToken(secret: prefix + Base64URL.encode(bytes))
    }

    /// The SHA-256 to look `presented` up by, or nil when it is not of the exact token shape
    /// (prefix, 43 base64url characters, canonical last character). Checks the length first,
    /// so an oversized string costs nothing.
    public static func lookupHash(of presented: String) -> [UInt8]? {
        guard isWellFormed(presented) else { return nil }
        return digest(presented)
    }

    /// Whether `presented` has the exact shape of a token (it may still be unknown).
    public static func isWellFormed(_ presented: String) -> Bool {
        let bytes = presented.utf8
        guard bytes.count == length, presented.hasPrefix(prefix) else { return false }
        var last: UInt8 = 0
        for byte in bytes.dropFirst(prefix.utf8.count) {
            guard Base64URL.value(of: byte) != nil else { return false }
            last = byte
        }
        // 43 characters carry 258 bits for 256: the last character's two low bits must be zero,
        // so every secret has exactly one spelling.
        guard let value = Base64URL.value(of: last) else { return false }
        return value & 0b11 == 0
    }

    private static func digest(_ token: String) -> [UInt8] {
        Array(SHA256.hash(data: Array(token.utf8)))
    }

    public var description: String { "APIToken(redacted)" }
    public var debugDescription: String { description }
    public var customMirror: Mirror { Mirror(self, children: [:]) }
}

/// Base64url without padding (RFC 4648 §5), the alphabet of API tokens.
enum Base64URL {
    static let alphabet: [UInt8] = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".utf8)

    static func encode(_ bytes: [UInt8]) -> String {
        var out: [UInt8] = []
        out.reserveCapacity((bytes.count * 4 + 2) / 3)
        var index = 0
        while index < bytes.count {
            let b0 = UInt32(bytes[index])
            let b1 = index + 1 < bytes.count ? UInt32(bytes[index + 1]) : 0
            let b2 = index + 2 < bytes.count ? UInt32(bytes[index + 2]) : 0
            let group = b0 << 16 | b1 << 8 | b2
            let characters = min(4, (bytes.count - index) * 8 / 6 + 1)
            for position in 0..<characters {
                out.append(alphabet[Int((group >> (18 - 6 * UInt32(position))) & 0x3F)])
            }
            index += 3
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func value(of character: UInt8) -> UInt8? {
        switch character {
        case UInt8(ascii: "A")...UInt8(ascii: "Z"): return character - UInt8(ascii: "A")
        case UInt8(ascii: "a")...UInt8(ascii: "z"): return character - UInt8(ascii: "a") + 26
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return character - UInt8(ascii: "0") + 52
        case UInt8(ascii: "-"): return 62
        case UInt8(ascii: "_"): return 63
        default: return nil
        }
    }
}

/// An API token as stored: never the token, only its SHA-256. Its debug description and mirror
/// leave the hash out.
public struct APITokenRecord: Sendable, Hashable, CustomDebugStringConvertible, CustomReflectable {
    /// The longest description: the wire limit ("token description ≤ 256 bytes").
    public static let maximumDescriptionLength = 256
    /// The longest lifetime a token can be given: ten years, far beyond any sane rotation, and
    /// far from overflowing a millisecond timestamp.
    public static let maximumTimeToLiveSeconds: Int64 = 10 * 366 * 86_400

    public var id: APITokenID
    public var principal: PrincipalName
    /// SHA-256 of the token string (32 bytes).
    public var hash: [UInt8]
    /// For people ("ci deploys"); never the token.
    public var description: String
    public var createdAt: Timestamp
    /// Nil: never expires.
    public var expiresAt: Timestamp?
    /// Nil: not revoked.
    public var revokedAt: Timestamp?

    public init(
        id: APITokenID,
        principal: PrincipalName,
        hash: [UInt8],
        description: String,
        createdAt: Timestamp,
        expiresAt: Timestamp? = nil,
        revokedAt: Timestamp? = nil
    ) {
        self.id = id
        self.principal = principal
        self.hash = hash
        self.description = description
        self.createdAt = createdAt
        self.expiresAt = expiresAt
        self.revokedAt = revokedAt
    }

    /// Checks a description: at most 256 bytes, no control or format characters.
    public static func validateDescription(_ text: String) throws(KeyServiceError) {
        guard text.utf8.count <= maximumDescriptionLength else {
            throw KeyServiceError(
                .invalidArgument, "token description must be at most \(maximumDescriptionLength) bytes")
        }
        for scalar in text.unicodeScalars {
            switch scalar.properties.generalCategory {
            case .control, .format, .lineSeparator, .paragraphSeparator, .surrogate, .unassigned, .privateUse:
                throw KeyServiceError(.invalidArgument, "token description holds a non-printable character")
            default:
                continue
            }
        }
    }

    /// Why the token does not authenticate at `now`, or nil when it does (the principal's
    /// state aside).
    public func failure(at now: Timestamp) -> AuthenticationFailure? {
        if revokedAt != nil { return .revokedToken }
        if let expiresAt, now >= expiresAt { return .expiredToken }
        return nil
    }

    public var debugDescription: String {
        "APITokenRecord(id: \(id), principal: \(principal), createdAt: \(createdAt.millisecondsSinceEpoch), "
            + "expiresAt: \(expiresAt.map { "\($0.millisecondsSinceEpoch)" } ?? "never"), "
            + "revokedAt: \(revokedAt.map { "\($0.millisecondsSinceEpoch)" } ?? "no"))"
    }

    public var customMirror: Mirror {
        Mirror(
            self,
            children: [
                "id": id, "principal": principal, "description": description, "createdAt": createdAt,
                "expiresAt": expiresAt as Any, "revokedAt": revokedAt as Any,
            ]
        )
    }
}

// MARK: - Authentication

/// Why an authentication was refused. For the server log, the audit log and the wire `reason`;
/// the client-facing message stays `clientMessage`, the same for every reason, so a caller
/// cannot tell a revoked token from an unknown one.
public struct AuthenticationFailure: Hashable, Sendable, CustomStringConvertible {
    private enum Value: String, Sendable {
        case malformedToken = "malformed-token"
        case unknownToken = "unknown-token"
        case revokedToken = "revoked-token"
        case expiredToken = "expired-token"
        case principalDisabled = "principal-disabled"
        case unknownCertificate = "unknown-certificate"
    }

    private let value: Value
    private init(_ value: Value) { self.value = value }

    /// Not of the token shape (wrong prefix, length or alphabet): refused before any lookup.
    public static let malformedToken = AuthenticationFailure(.malformedToken)
    /// Well formed, but no stored token has its hash.
    public static let unknownToken = AuthenticationFailure(.unknownToken)
    /// The token was revoked.
    public static let revokedToken = AuthenticationFailure(.revokedToken)
    /// The token's lifetime is over.
    public static let expiredToken = AuthenticationFailure(.expiredToken)
    /// The credentials are valid but their principal is disabled.
    public static let principalDisabled = AuthenticationFailure(.principalDisabled)
    /// No principal has the client certificate's common name.
    public static let unknownCertificate = AuthenticationFailure(.unknownCertificate)

    /// The stable name, as recorded in audit details (`reason=<name>`).
    public var name: String { value.rawValue }

    /// What a client may be told, whatever the reason.
    public static let clientMessage = "authentication failed"

    public var description: String { value.rawValue }
}

/// A caller whose credentials were accepted.
public struct AuthenticatedCaller: Sendable, Hashable {
    public var principal: PrincipalRecord
    /// The token presented; nil when the caller was authenticated by its certificate.
    public var token: APITokenRecord?

    public init(principal: PrincipalRecord, token: APITokenRecord?) {
        self.principal = principal
        self.token = token
    }
}

/// The answer to an authentication: accepted, or refused with the reason (already audited).
/// Storage failures are thrown as `KeyServiceError` instead, so "the database is down" is
/// never mistaken for "bad credentials".
public enum AuthenticationResult: Sendable, Hashable {
    case authenticated(AuthenticatedCaller)
    case refused(AuthenticationFailure)
}

/// How an access failure is recorded (`KeyService.recordAccessFailure`).
public enum AccessFailureKind: Sendable, Hashable {
    /// The caller's credentials were refused (audited as `access.authenticate`).
    case authentication
    /// The caller is known but may not take the action (audited as `access.authorize`).
    case authorization
}

extension Principal {
    /// Who an audit record names when the caller's credentials named nobody. The parentheses
    /// keep it apart from every `PrincipalName`.
    public static let unauthenticated = Principal("(unauthenticated)")
}
