import Crypto
import Foundation
import KeyHierarchy
import Testing

@Suite("Access: policy, principal names, API token shape")
struct AccessTests {
    // MARK: Policy

    static let acme = TenantID(trusted: "acme")
    static let other = TenantID(trusted: "other")

    /// The rules written out by hand, independently of `AccessPolicy.tenantActions`.
    static let keyUserActions: Set<AccessAction> = [
        .generateDataKey, .encrypt, .decrypt, .rewrapDataKey, .readDataKey, .listDataKeys, .readTenant,
    ]
    static let decryptOnlyActions: Set<AccessAction> = [.decrypt, .readDataKey, .readTenant]
    static let tenantAdminActions: Set<AccessAction> = [
        .generateDataKey, .encrypt, .decrypt, .rewrapDataKey, .readDataKey, .listDataKeys, .manageDataKeys,
        .readTenant, .manageTenant,
    ]
    static let gatewayAdminOnly: Set<AccessAction> = [.createTenant, .shredTenant, .manageAccess, .readAudit]

    static func expected(_ binding: RoleBinding, _ action: AccessAction, tenant: TenantID?) -> Bool {
        if gatewayAdminOnly.contains(action) { return binding == RoleBinding(scope: .all, role: .admin) }
        let actions: Set<AccessAction> =
            switch binding.role {
            case .admin: tenantAdminActions
            case .keyUser: keyUserActions
            case .decryptOnly: decryptOnlyActions
            }
        guard actions.contains(action) else { return false }
        switch binding.scope {
        case .all: return true
        case .tenant(let bound): return tenant == bound
        }
    }

    @Test("the hand-written action sets partition every action")
    func actionSetsAreComplete() {
        #expect(Self.tenantAdminActions.union(Self.gatewayAdminOnly) == Set(AccessAction.allCases))
        #expect(Self.tenantAdminActions.isDisjoint(with: Self.gatewayAdminOnly))
        #expect(Self.keyUserActions.isSubset(of: Self.tenantAdminActions))
        #expect(Self.decryptOnlyActions.isSubset(of: Self.keyUserActions))
        #expect(Set(AccessAction.allCases.filter(\.requiresGatewayAdmin)) == Self.gatewayAdminOnly)
    }

    @Test(
        "every (role, scope, action, asked tenant) combination",
        arguments: Role.allCases, [TenantScope.all, .tenant(AccessTests.acme)]
    )
    func policyTable(role: Role, scope: TenantScope) {
        let binding = RoleBinding(scope: scope, role: role)
        for action in AccessAction.allCases {
            for tenant in [Self.acme, Self.other, nil] as [TenantID?] {
                let allowed = AccessPolicy.allows([binding], action, tenant: tenant)
                #expect(
                    allowed == Self.expected(binding, action, tenant: tenant),
                    "\(binding) \(action) on \(tenant?.rawValue ?? "none")"
                )
                #expect(AccessPolicy.allows(binding, action, tenant: tenant) == allowed)
            }
        }
    }

    @Test("spot checks of the rules, row by row")
    func spotChecks() {
        let tenantAdmin = RoleBinding(scope: .tenant(Self.acme), role: .admin)
        let gatewayAdmin = RoleBinding(scope: .all, role: .admin)
        let keyUser = RoleBinding(scope: .tenant(Self.acme), role: .keyUser)
        let everywhereDecrypt = RoleBinding(scope: .all, role: .decryptOnly)
        #expect(AccessPolicy.allows([tenantAdmin], .manageTenant, tenant: Self.acme))
        #expect(AccessPolicy.allows([tenantAdmin], .manageDataKeys, tenant: Self.acme))
        #expect(!AccessPolicy.allows([tenantAdmin], .manageTenant, tenant: Self.other))
        #expect(!AccessPolicy.allows([tenantAdmin], .shredTenant, tenant: Self.acme))
        #expect(!AccessPolicy.allows([tenantAdmin], .createTenant, tenant: nil))
        #expect(!AccessPolicy.allows([tenantAdmin], .manageAccess, tenant: nil))
        #expect(!AccessPolicy.allows([tenantAdmin], .readAudit, tenant: Self.acme))
        #expect(AccessPolicy.allows([gatewayAdmin], .shredTenant, tenant: Self.other))
        #expect(AccessPolicy.allows([gatewayAdmin], .manageAccess, tenant: nil))
        #expect(AccessPolicy.allows([gatewayAdmin], .readAudit, tenant: nil))
        #expect(AccessPolicy.allows([keyUser], .encrypt, tenant: Self.acme))
        #expect(!AccessPolicy.allows([keyUser], .encrypt, tenant: Self.other))
        #expect(!AccessPolicy.allows([keyUser], .manageDataKeys, tenant: Self.acme))
        #expect(!AccessPolicy.allows([keyUser], .readTenant, tenant: nil))
        #expect(AccessPolicy.allows([everywhereDecrypt], .decrypt, tenant: Self.other))
        #expect(AccessPolicy.allows([everywhereDecrypt], .readTenant, tenant: nil))
        #expect(!AccessPolicy.allows([everywhereDecrypt], .encrypt, tenant: Self.acme))
        #expect(!AccessPolicy.allows([], .readTenant, tenant: Self.acme))
        // Bindings add up: key-user on acme and decrypt-only on other.
        let mixed = [keyUser, RoleBinding(scope: .tenant(Self.other), role: .decryptOnly)]
        #expect(AccessPolicy.allows(mixed, .generateDataKey, tenant: Self.acme))
        #expect(AccessPolicy.allows(mixed, .decrypt, tenant: Self.other))
        #expect(!AccessPolicy.allows(mixed, .generateDataKey, tenant: Self.other))
    }

    @Test("the tenants a principal may read, for filtering listings")
    func tenantSets() {
        let mixed = [
            RoleBinding(scope: .tenant(Self.acme), role: .keyUser),
            RoleBinding(scope: .tenant(Self.other), role: .decryptOnly),
        ]
        #expect(AccessPolicy.tenants(mixed, allowing: .readTenant) == .listed([Self.acme, Self.other]))
        #expect(AccessPolicy.tenants(mixed, allowing: .encrypt) == .listed([Self.acme]))
        #expect(AccessPolicy.tenants(mixed, allowing: .manageTenant) == .listed([]))
        #expect(
            AccessPolicy.tenants(mixed + [RoleBinding(scope: .all, role: .decryptOnly)], allowing: .readTenant) == .all)
        #expect(AccessPolicy.tenants([RoleBinding(scope: .all, role: .decryptOnly)], allowing: .encrypt) == .listed([]))
        #expect(TenantSet.all.contains(Self.other))
        #expect(!TenantSet.listed([Self.acme]).contains(Self.other))
        #expect(AccessPolicy.isGatewayAdmin([RoleBinding(scope: .all, role: .admin)]))
        #expect(!AccessPolicy.isGatewayAdmin([RoleBinding(scope: .tenant(Self.acme), role: .admin)]))
    }

    @Test("roles and scopes parse their wire form and nothing else")
    func bindingParsing() throws {
        #expect(try RoleBinding(scope: "*", role: "admin") == RoleBinding(scope: .all, role: .admin))
        #expect(
            try RoleBinding(scope: "acme", role: "key-user") == RoleBinding(scope: .tenant(Self.acme), role: .keyUser))
        #expect(try Role(parsing: "decrypt-only") == .decryptOnly)
        for (scope, role) in [
            ("*", "Admin"), ("*", "keyUser"), ("*", ""), ("", "admin"), ("**", "admin"), ("A", "admin"),
        ] {
            #expect(throws: KeyServiceError.self) { try RoleBinding(scope: scope, role: role) }
        }
        #expect(RoleBinding(scope: .tenant(Self.acme), role: .keyUser).description == "key-user@acme")
        // `*` sorts before every tenant id, as storage returns it.
        #expect(TenantScope.all < .tenant(TenantID(trusted: "0")))
        #expect(TenantScope.tenant(Self.acme).tenant == Self.acme)
        #expect(TenantScope.all.tenant == nil)
        #expect(TenantScope.all.covers(Self.other))
        #expect(!TenantScope.tenant(Self.acme).covers(Self.other))
    }

    // MARK: Names

    @Test(
        "PrincipalName accepts",
        arguments: [
            "a", "0", "billing@prod", "ci.deploy", "svc_1", "a-b", "x.", String(repeating: "a", count: 128),
            "systems", "admin",
        ]
    )
    func principalNameAccepted(raw: String) throws {
        #expect(try PrincipalName(raw).rawValue == raw)
    }

    @Test(
        "PrincipalName refuses",
        arguments: [
            "", String(repeating: "a", count: 129), "A", "Bob", ".a", "@a", "-a", "_a", "a b", "a:b", "a/b", "a\n",
            "caf\u{e9}", "a\u{0}", "(unauthenticated)", "system", "a+b", "a*",
        ]
    )
    func principalNameRefused(raw: String) {
        let error = #expect(throws: KeyServiceError.self) { try PrincipalName(raw) }
        #expect(error?.code == .invalidArgument)
    }

    @Test("certificate common names: printable UTF-8 up to 256 bytes")
    func commonNames() throws {
        for raw in ["billing.prod.example.com", "Jürgen Müller", "svc (eu-1)", String(repeating: "c", count: 256)] {
            #expect(try CertificateCommonName(raw).rawValue == raw)
        }
        for raw in [
            "", String(repeating: "c", count: 257), "a\nb", "a\u{0}", "evil\u{202E}moc.", "tab\there", "\u{7F}",
        ] {
            let error = #expect(throws: KeyServiceError.self) { try CertificateCommonName(raw) }
            #expect(error?.code == .invalidArgument)
        }
    }

    // MARK: API tokens

    @Test("a generated token is hsmgw_ and 43 base64url characters of 32 random bytes; its hash is its SHA-256")
    func generatedTokenShape() throws {
        let token = APIToken.generate()
        #expect(token.secret.hasPrefix("hsmgw_"))
        #expect(token.secret.utf8.count == 49)
        #expect(APIToken.isWellFormed(token.secret))
        #expect(token.hash == Array(SHA256.hash(data: Array(token.secret.utf8))))
        #expect(APIToken.lookupHash(of: token.secret) == token.hash)
        // Decoded independently (Foundation's base64 after mapping the alphabet): 32 bytes.
        let encoded = token.secret.dropFirst(6).replacingOccurrences(of: "-", with: "+")
            .replacingOccurrences(of: "_", with: "/")
        let decoded = try #require(Data(base64Encoded: encoded + "="))
        #expect(decoded.count == 32)
        let again = APIToken.generate()
        #expect(again.secret != token.secret)
        #expect(again.hash != token.hash)
    }

    @Test("base64url is canonical across many tokens: Foundation's encoding of the bytes gives the same string")
    func encodingMatchesFoundation() throws {
        for _ in 0..<200 {
            let token = APIToken.generate()
            let body = String(token.secret.dropFirst(6))
            let standard = body.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
            let bytes = try #require(Data(base64Encoded: standard + "="))
            let reencoded = bytes.base64EncodedString().replacingOccurrences(of: "+", with: "-")
                .replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
            #expect(reencoded == body)
        }
    }

    @Test("a token never shows in its description, debug description or mirror")
    func tokenIsRedacted() {
        let token = APIToken.generate()
        for shown in [String(describing: token), String(reflecting: token), "\(token)", dumped(token)] {
            #expect(!shown.contains(token.secret))
            #expect(!shown.contains(String(token.secret.dropFirst(6))))
        }
        #expect(Mirror(reflecting: token).children.isEmpty)
    }

    private func dumped(_ value: some Any) -> String {
        var out = ""
        Swift.dump(value, to: &out)
        return out
    }

    @Test("anything not of the exact token shape is refused before hashing")
    func malformedTokens() {
        let good = APIToken.generate().secret
        let body = String(good.dropFirst(6))
        let lastCanonical = String(body.dropLast())
        var refused = [
            "", "hsmgw_", "hsmgw", body, "HSMGW_" + body, "hsmgw-" + body, "xsmgw_" + body, good + "A",
            String(good.dropLast()), " " + good, good + "\n", "hsmgw_" + String(repeating: "A", count: 42) + "=",
            "hsmgw_" + String(repeating: "+", count: 43), "hsmgw_" + String(repeating: "/", count: 43),
            "hsmgw_" + String(repeating: "é", count: 21) + "A",
            // 43 characters hold 258 bits: the last character's two low bits must be zero.
            "hsmgw_" + lastCanonical + "B", "hsmgw_" + lastCanonical + "_",
        ]
        // Ten megabytes: refused on length alone.
        refused.append("hsmgw_" + String(repeating: "A", count: 10 * 1024 * 1024))
        for presented in refused {
            #expect(!APIToken.isWellFormed(presented), "\(presented.prefix(60))")
            #expect(APIToken.lookupHash(of: presented) == nil)
        }
        #expect(APIToken.isWellFormed("hsmgw_" + lastCanonical + "A"))
        #expect(APIToken.isWellFormed("hsmgw_" + lastCanonical + "w"))
    }

    @Test("token ids are tok_ and 16 lowercase hex digits, random")
    func tokenIDs() throws {
        var seen: Set<APITokenID> = []
        for _ in 0..<100 {
            let id = APITokenID.random()
            #expect(try APITokenID(id.rawValue) == id)
            #expect(id.rawValue.utf8.count == 20)
            seen.insert(id)
        }
        #expect(seen.count == 100)
        for raw in [
            "", "tok_", "tok_0123456789abcde", "tok_0123456789abcdef0", "tok_0123456789ABCDEF", "TOK_0123456789abcdef",
            "tok-0123456789abcdef", "tok_0123456789abcdeg",
        ] {
            #expect(throws: KeyServiceError.self) { try APITokenID(raw) }
        }
        #expect(try APITokenID("tok_0123456789abcdef").rawValue == "tok_0123456789abcdef")
    }

    @Test("a token record's debug description and mirror leave the hash out; expiry and revocation decide failure")
    func tokenRecord() throws {
        let token = APIToken.generate()
        let hex = token.hash.map {
            String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16)
        }
        .joined()
        let created = Timestamp(millisecondsSinceEpoch: 1_700_000_000_000)
        var record = APITokenRecord(
            id: APITokenID.random(),
            principal: try PrincipalName("ci"),
            hash: token.hash,
            description: "ci deploys",
            createdAt: created,
            expiresAt: created.adding(days: 1)
        )
        for shown in [String(describing: record), String(reflecting: record), "\(record)"] {
            #expect(shown.contains(record.id.rawValue))
            #expect(!shown.contains(hex))
            #expect(!shown.contains("\(token.hash)"))
        }
        #expect(!Mirror(reflecting: record).children.contains { $0.label == "hash" })
        #expect(record.failure(at: created) == nil)
        #expect(
            record.failure(at: Timestamp(millisecondsSinceEpoch: created.adding(days: 1).millisecondsSinceEpoch - 1))
                == nil)
        #expect(record.failure(at: created.adding(days: 1)) == .expiredToken)
        record.revokedAt = created
        #expect(record.failure(at: created) == .revokedToken)
        record.expiresAt = nil
        record.revokedAt = nil
        #expect(record.failure(at: created.adding(days: 100_000)) == nil)
    }

    @Test("token descriptions: at most 256 bytes, printable")
    func tokenDescriptions() {
        #expect(throws: Never.self) { try APITokenRecord.validateDescription("") }
        #expect(throws: Never.self) { try APITokenRecord.validateDescription(String(repeating: "d", count: 256)) }
        #expect(throws: Never.self) { try APITokenRecord.validateDescription("ci déploie") }
        for bad in [String(repeating: "d", count: 257), "two\nlines", "nul\u{0}", "\u{202E}"] {
            #expect(throws: KeyServiceError.self) { try APITokenRecord.validateDescription(bad) }
        }
    }

    @Test("authentication failure reasons have distinct stable names and one client message")
    func failureReasons() {
        let all: [AuthenticationFailure] = [
            .malformedToken, .unknownToken, .revokedToken, .expiredToken, .principalDisabled, .unknownCertificate,
        ]
        #expect(Set(all.map(\.name)).count == all.count)
        #expect(AuthenticationFailure.revokedToken.name == "revoked-token")
        #expect(AuthenticationFailure.clientMessage == "authentication failed")
    }
}
