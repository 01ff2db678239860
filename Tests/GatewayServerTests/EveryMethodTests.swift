import Foundation
import GatewayClient
import GatewayWire
import Testing

/// Every method of the protocol, through the Swift client, over TLS, against a real SoftHSM2
/// token and each store.
@Suite("Every method end to end", .serialized)
struct EveryMethodTests {
    @Test(arguments: StoreKind.allCases)
    func everyMethod(_ kind: StoreKind) async throws {
        try await withGateway(kind, "every-\(kind)") { gateway in
            let admin = try gateway.client(token: gateway.adminToken)
            defer { Task { await admin.shutdown() } }

            // Connection.
            let hello = try await admin.hello()
            #expect(hello.principal == "admin")
            #expect(hello.roles.map { "\($0.role)@\($0.tenant)" } == ["admin@*"])
            #expect(hello.maxRequestsInFlight == 128)
            let info = try await admin.serverInfo()
            #expect(info.store == kind.rawValue)
            #expect(info.ready && info.tokenReachable && info.storeReachable)
            #expect(info.principal == "admin")
            #expect(info.openConnections == 1)
            #expect(info.instanceID == "test-every-\(kind)")

            // Tenants.
            let created = try await admin.createTenant("acme", idempotencyKey: "create-acme")
            #expect(created.id == "acme" && created.state == "enabled" && created.primaryMasterKeyVersion == 1)
            let again = try await admin.createTenant("acme", idempotencyKey: "create-acme")
            #expect(again.createdAtMs == created.createdAtMs)
            await expectStatus(.alreadyExists) { try await admin.createTenant("acme") }
            #expect(try await admin.getTenant("acme").id == "acme")
            _ = try await admin.createTenant("globex")
            #expect(try await admin.listTenants().tenants.map(\.id) == ["acme", "globex"])

            // Data keys.
            let context = ["purpose": "invoices", "region": "eu"]
            let key = try await admin.generateDataKey(tenant: "acme", context: context)
            #expect(key.masterKeyVersion == 1)
            #expect(key.wrapped.count == 83)
            let plaintext = try #require(key.plaintext).copyBytes()
            #expect(plaintext.count == 32)
            let decrypted = try await admin.decryptDataKey(tenant: "acme", id: key.id, context: context)
            #expect(try #require(decrypted.plaintext).copyBytes() == plaintext)
            await expectStatus(.invalidArgument, reason: StatusReason.decryptionFailed) {
                try await admin.decryptDataKey(tenant: "acme", id: key.id, context: ["purpose": "other"])
            }
            let withoutPlaintext = try await admin.generateDataKey(tenant: "acme", includePlaintext: false)
            #expect(withoutPlaintext.plaintext == nil || withoutPlaintext.plaintext?.count == 0)
            let batch = try await admin.generateDataKeys(tenant: "acme", count: 5, context: context)
            #expect(batch.count == 5 && Set(batch.map(\.id)).count == 5)
            let results = try await admin.decryptDataKeys(
                tenant: "acme",
                keys: batch.map { DataKeyReference(id: $0.id, context: context) }
                    + [DataKeyReference(id: batch[0].id, context: [:])]
            )
            #expect(results.count == 6)
            for (index, result) in results.prefix(5).enumerated() {
                let expected = try #require(batch[index].plaintext).copyBytes()
                #expect(try #require(try result.get().plaintext).copyBytes() == expected)
            }
            if case .failure(let error) = results[5] {
                #expect(error.code == .invalidArgument && error.reason == StatusReason.decryptionFailed)
            } else {
                Issue.record("a wrong context decrypted")
            }

            // Encrypt / Decrypt.
            let message = Array("the quarterly numbers".utf8)
            let ciphertext = try await admin.encrypt(
                tenant: "acme", dataKeyID: key.id, plaintext: message, context: context)
            let opened = try await admin.decrypt(tenant: "acme", ciphertext: ciphertext, context: context)
            #expect(opened.plaintext.copyBytes() == message)
            #expect(opened.dataKeyID == key.id)
            await expectStatus(.invalidArgument, reason: StatusReason.decryptionFailed) {
                try await admin.decrypt(tenant: "acme", ciphertext: ciphertext, context: [:])
            }
            await expectStatus(.invalidArgument) {
                try await admin.encrypt(
                    tenant: "acme", dataKeyID: key.id, plaintext: [UInt8](repeating: 1, count: 64 * 1024 + 1))
            }

            // Metadata and state.
            let metadata = try await admin.getDataKey(tenant: "acme", id: key.id)
            #expect(metadata.state == "enabled" && metadata.encryptions == 1 && metadata.tenant == "acme")
            let listed = try await admin.listDataKeys(tenant: "acme", pageSize: 3)
            #expect(listed.keys.count == 3 && !listed.nextPageToken.isEmpty)
            let rest = try await admin.listDataKeys(tenant: "acme", pageSize: 100, pageToken: listed.nextPageToken)
            #expect(listed.keys.count + rest.keys.count == 7)
            #expect(try await admin.disableDataKey(tenant: "acme", id: key.id).state == "disabled")
            await expectStatus(.failedPrecondition) {
                try await admin.decryptDataKey(tenant: "acme", id: key.id, context: context)
            }
            #expect(try await admin.listDataKeys(tenant: "acme", state: "disabled").keys.map(\.id) == [key.id])
            #expect(try await admin.enableDataKey(tenant: "acme", id: key.id).state == "enabled")
            #expect(try await admin.destroyDataKey(tenant: "acme", id: batch[4].id).state == "destroyed")
            await expectStatus(.notFound) {
                try await admin.getDataKey(tenant: "acme", id: UUID().uuidString.lowercased())
            }
            await expectStatus(.invalidArgument) { try await admin.getDataKey(tenant: "acme", id: "not-a-uuid") }

            // Master keys, rewrap.
            let rotated = try await admin.rotateMasterKey(tenant: "acme")
            #expect(rotated.version == 2 && rotated.primary && rotated.state == "active")
            let versions = try await admin.listMasterKeys(tenant: "acme")
            #expect(versions.map(\.version) == [1, 2])
            #expect(versions.map(\.primary) == [false, true])
            let rewrapped = try await admin.rewrapDataKey(tenant: "acme", id: key.id, context: context)
            #expect(rewrapped.masterKeyVersion == 2)
            #expect(try await admin.getRewrapJob(tenant: "acme") == nil)
            let job = try await admin.startRewrapJob(tenant: "acme")
            #expect(job.targetVersion == 2 && job.state == "running")
            var finished: Hsmgw_V1_RewrapJobInfo?
            for _ in 0..<100 {
                if let current = try await admin.getRewrapJob(tenant: "acme"), current.state == "completed" {
                    finished = current
                    break
                }
                try await Task.sleep(for: .milliseconds(100))
            }
            #expect(finished?.moved == 5)  // six live keys, one already moved
            #expect(
                try await admin.decryptDataKey(tenant: "acme", id: batch[0].id, context: context).masterKeyVersion == 2)
            #expect(
                try await admin.setMasterKeyState(tenant: "acme", version: 1, state: "deactivated").state
                    == "deactivated")
            let scheduled = try await admin.scheduleMasterKeyDestruction(
                tenant: "acme", version: 1, waitingPeriodDays: 7)
            #expect(scheduled.destroyAfterMs > 0)
            #expect(try await admin.cancelMasterKeyDestruction(tenant: "acme", version: 1).destroyAfterMs == 0)
            let preActive = try await admin.rotateMasterKey(tenant: "acme", activate: false)
            #expect(preActive.version == 3 && preActive.state == "pre-active" && !preActive.primary)
            let activated = try await admin.activateMasterKey(tenant: "acme", version: 3)
            #expect(activated.primary && activated.state == "active")
            await expectStatus(.invalidArgument) {
                try await admin.setMasterKeyState(tenant: "acme", version: 2, state: "bogus")
            }

            // Tenant state.
            #expect(try await admin.disableTenant("globex").state == "disabled")
            await expectStatus(.failedPrecondition) { try await admin.generateDataKey(tenant: "globex") }
            #expect(try await admin.enableTenant("globex").state == "enabled")

            // Principals, roles, tokens.
            let app = try await admin.createPrincipal(
                name: "billing", roles: [RoleBinding(tenant: "acme", role: "key-user")])
            #expect(app.roles.map { "\($0.role)@\($0.tenant)" } == ["key-user@acme"])
            let granted = try await admin.grantRole(
                principal: "billing", role: RoleBinding(tenant: "globex", role: "decrypt-only"))
            #expect(granted.roles.count == 2)
            let revoked = try await admin.revokeRole(
                principal: "billing", role: RoleBinding(tenant: "globex", role: "decrypt-only"))
            #expect(revoked.roles.count == 1)
            #expect(try await admin.listPrincipals().map(\.name).sorted() == ["admin", "billing"])
            let token = try await admin.createAPIToken(
                principal: "billing", description: "ci", timeToLive: .seconds(3600))
            #expect(token.info.principal == "billing" && token.info.expiresAtMs > 0)
            #expect(try await admin.listAPITokens(principal: "billing").map(\.id) == [token.info.id])
            #expect(try await admin.listAPITokens().count == 2)

            let billing = try gateway.client(token: token.token.value)
            let billingKey = try await billing.generateDataKey(tenant: "acme")
            #expect(billingKey.masterKeyVersion == 3)
            #expect(try await billing.listTenants().tenants.map(\.id) == ["acme"])
            await billing.shutdown()
            #expect(try await admin.revokeAPIToken(id: token.info.id).revokedAtMs > 0)

            // Shred.
            await expectStatus(.invalidArgument) { try await admin.shredTenant("globex", confirm: "acme") }
            let shredded = try await admin.shredTenant("globex", confirm: "globex")
            #expect(shredded.tenant == "globex" && shredded.destroyedMasterKeyVersions == [1])
            #expect(try await admin.getTenant("globex").state == "shredded")

            // Audit.
            let records = try await admin.listAuditRecords(limit: 1000)
            #expect(records.contains { $0.operation == "tenant.shred" && $0.tenant == "globex" })
            #expect(records.contains { $0.operation == "data-key.generate" && $0.principal == "billing" })
            #expect(records.allSatisfy { !$0.requestID.isEmpty })
            let verified = try await admin.verifyAuditLog()
            #expect(verified.intact && verified.recordsChecked == Int64(records.count))
        }
    }
}
