import Foundation
import GatewayClient
import GatewayWire
import KeyHierarchy
import Synchronization
import Testing

/// Authentication and authorisation end to end: every refusal gets the right status and leaves
/// an audit record.
@Suite("Authentication and authorisation", .serialized)
struct AccessTests {
    /// Audit records of `operation` (as stored), read through the protocol by the admin.
    static func auditRecords(_ admin: GatewayClient, operation: String) async throws -> [Hsmgw_V1_AuditRecordInfo] {
        try await admin.listAuditRecords(limit: 1000).filter { $0.operation == operation }
    }

    @Test(arguments: StoreKind.allCases)
    func refusedCredentials(_ kind: StoreKind) async throws {
        try await withGateway(kind, "auth-\(kind)") { gateway in
            let admin = try gateway.client(token: gateway.adminToken)
            defer { Task { await admin.shutdown() } }
            _ = try await admin.createTenant("acme")

            // No credentials at all.
            let anonymous = try gateway.client(token: nil)
            await expectStatus(.unauthenticated) { try await anonymous.serverInfo() }
            await anonymous.shutdown()

            // A well-formed token nobody issued, and a malformed one.
            let forged = "hsmgw_" + String(repeating: "A", count: 43)
            let stranger = try gateway.client(token: forged)
            await expectStatus(.unauthenticated) { try await stranger.serverInfo() }
            await stranger.shutdown()
            let garbage = try gateway.client(token: "not-a-token")
            await expectStatus(.unauthenticated) { try await garbage.serverInfo() }
            await garbage.shutdown()

            // Refused Hellos are audited after they are answered, off the key operations' path.
            await gateway.app.handler.flushRefusedHelloAudit()
            let refusals = try await Self.auditRecords(admin, operation: "access.authenticate")
            #expect(refusals.contains { $0.detail.contains("reason=no-credentials") })
            #expect(refusals.contains { $0.detail.contains("reason=unknown-token") })
            #expect(refusals.contains { $0.detail.contains("reason=malformed-token") })
            #expect(refusals.allSatisfy { $0.outcome == "error:unauthenticated" })
            // The presented token never reaches the audit log.
            #expect(refusals.allSatisfy { !$0.detail.contains(forged) })
        }
    }

    @Test(arguments: StoreKind.allCases)
    func revokedTokenStopsOnAnOpenConnection(_ kind: StoreKind) async throws {
        try await withGateway(kind, "revoke-\(kind)") { gateway in
            let admin = try gateway.client(token: gateway.adminToken)
            defer { Task { await admin.shutdown() } }
            _ = try await admin.createTenant("acme")
            _ = try await admin.createPrincipal(name: "app", roles: [RoleBinding(tenant: "acme", role: "key-user")])
            let token = try await admin.createAPIToken(principal: "app")
            let app = try gateway.client(token: token.token.value)
            defer { Task { await app.shutdown() } }
            _ = try await app.generateDataKey(tenant: "acme")
            let connectionsBefore = await app.connections.count

            _ = try await admin.revokeAPIToken(id: token.info.id)
            // The same connection, at once (this instance revoked it).
            await expectStatus(.unauthenticated, reason: StatusReason.tokenRevoked) {
                try await app.generateDataKey(tenant: "acme")
            }
            #expect(connectionsBefore == 1)
            let refusals = try await Self.auditRecords(admin, operation: "access.authenticate")
            #expect(
                refusals.contains {
                    $0.principal == "app" && $0.detail.contains("reason=revoked-token")
                        && $0.detail.contains(token.info.id)
                })
            // And a new connection is refused at the handshake.
            let again = try gateway.client(token: token.token.value)
            await expectStatus(.unauthenticated) { try await again.serverInfo() }
            await again.shutdown()
        }
    }

    @Test(arguments: StoreKind.allCases)
    func expiredToken(_ kind: StoreKind) async throws {
        // The gateway's wall clock, moved by the test instead of waiting for the token to expire.
        let skew = Mutex(Int64(0))
        let clock: @Sendable () -> Timestamp = {
            Timestamp(millisecondsSinceEpoch: Timestamp.now().millisecondsSinceEpoch + skew.withLock { $0 })
        }
        try await withGateway(kind, "expiry-\(kind)", wallClock: clock) { gateway in
            let admin = try gateway.client(token: gateway.adminToken)
            defer { Task { await admin.shutdown() } }
            _ = try await admin.createTenant("acme")
            _ = try await admin.createPrincipal(name: "app", roles: [RoleBinding(tenant: "acme", role: "key-user")])
            let token = try await admin.createAPIToken(principal: "app", timeToLive: .seconds(2))
            let app = try gateway.client(token: token.token.value)
            defer { Task { await app.shutdown() } }
            _ = try await app.generateDataKey(tenant: "acme")
            skew.withLock { $0 = 2_001 }
            await expectStatus(.unauthenticated, reason: StatusReason.tokenExpired) {
                try await app.generateDataKey(tenant: "acme")
            }
            let fresh = try gateway.client(token: token.token.value)
            await expectStatus(.unauthenticated) { try await fresh.serverInfo() }
            await fresh.shutdown()
            await gateway.app.handler.flushRefusedHelloAudit()
            let refusals = try await Self.auditRecords(admin, operation: "access.authenticate")
            #expect(refusals.filter { $0.detail.contains("reason=expired-token") }.count >= 2)
        }
    }

    @Test(arguments: StoreKind.allCases)
    func tenantIsolationAndRoles(_ kind: StoreKind) async throws {
        try await withGateway(kind, "roles-\(kind)") { gateway in
            let admin = try gateway.client(token: gateway.adminToken)
            defer { Task { await admin.shutdown() } }
            _ = try await admin.createTenant("acme")
            _ = try await admin.createTenant("globex")
            let globexKey = try await admin.generateDataKey(tenant: "globex")
            let acmeKey = try await admin.generateDataKey(tenant: "acme", context: ["a": "b"])

            _ = try await admin.createPrincipal(name: "user", roles: [RoleBinding(tenant: "acme", role: "key-user")])
            _ = try await admin.createPrincipal(
                name: "reader", roles: [RoleBinding(tenant: "acme", role: "decrypt-only")])
            let user = try gateway.client(token: try await admin.createAPIToken(principal: "user").token.value)
            let reader = try gateway.client(token: try await admin.createAPIToken(principal: "reader").token.value)
            defer {
                Task {
                    await user.shutdown()
                    await reader.shutdown()
                }
            }

            // Another tenant's key: refused without touching it, and without saying whether the
            // tenant exists (the same answer for a tenant that does not).
            guard
                let other = await gatewayError({
                    try await user.decryptDataKey(tenant: "globex", id: globexKey.id)
                }),
                let missing = await gatewayError({
                    try await user.decryptDataKey(tenant: "nowhere", id: globexKey.id)
                })
            else { return }
            #expect(other.code == .permissionDenied)
            #expect(missing.code == other.code && missing.message == other.message && missing.reason == other.reason)
            // Asked under its own tenant, another tenant's key id is simply not there.
            await expectStatus(.notFound) { try await user.decryptDataKey(tenant: "acme", id: globexKey.id) }
            await expectStatus(.permissionDenied) { try await user.listDataKeys(tenant: "globex") }
            #expect(try await user.listTenants().tenants.map(\.id) == ["acme"])

            // key-user: generates and decrypts, but does not rotate or administer.
            _ = try await user.generateDataKey(tenant: "acme")
            await expectStatus(.permissionDenied) { try await user.rotateMasterKey(tenant: "acme") }
            await expectStatus(.permissionDenied) { try await user.createTenant("initech") }
            await expectStatus(.permissionDenied) { try await user.listPrincipals() }
            await expectStatus(.permissionDenied) { try await user.disableDataKey(tenant: "acme", id: acmeKey.id) }

            // decrypt-only: decrypts, never generates or encrypts.
            let plaintext = try await reader.decryptDataKey(tenant: "acme", id: acmeKey.id, context: ["a": "b"])
            let expected = try #require(acmeKey.plaintext).copyBytes()
            #expect(try #require(plaintext.plaintext).copyBytes() == expected)
            await expectStatus(.permissionDenied) { try await reader.generateDataKey(tenant: "acme") }
            await expectStatus(.permissionDenied) {
                try await reader.encrypt(tenant: "acme", dataKeyID: acmeKey.id, plaintext: [1], context: ["a": "b"])
            }

            // A role taken away stops working on the open connection (at once on this instance).
            _ = try await admin.revokeRole(principal: "user", role: RoleBinding(tenant: "acme", role: "key-user"))
            await expectStatus(.permissionDenied) { try await user.generateDataKey(tenant: "acme") }

            let denials = try await Self.auditRecords(admin, operation: "access.authorize")
            #expect(
                denials.contains {
                    $0.principal == "user" && $0.tenant == "globex" && $0.detail.contains("method=DecryptDataKey")
                })
            #expect(denials.contains { $0.principal == "user" && $0.tenant == "nowhere" })
            #expect(denials.contains { $0.principal == "user" && $0.detail.contains("method=RotateMasterKey") })
            #expect(denials.contains { $0.principal == "reader" && $0.detail.contains("method=GenerateDataKey") })
            #expect(denials.allSatisfy { $0.outcome == "error:permission denied" })
        }
    }
}
