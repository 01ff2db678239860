import Foundation
import KeyHierarchy
import PKCS11
import PKCS11KeyToken
import SQLiteKeyStore
import SoftHSMTestSupport
import Synchronization
import Testing

/// Principals, role bindings and API tokens: the repository methods on both stores, and the key
/// service's access API (authentication, its refusals and their audit records, grants, the
/// bootstrap race) on both stores.
@Suite("Access control conformance")
struct AccessConformanceTests {
    // MARK: Repository: principals

    @Test(arguments: StoreKind.allCases)
    func principalRoundTripAndUniqueness(kind: StoreKind) async throws {
        try await withStore(kind, "access_principal_round_trip") { store in
            let record = PrincipalRecord(
                name: PrincipalName(trusted: "billing@prod"),
                certificateCommonName: CertificateCommonName(trusted: "billing.prod.example.com"),
                roles: [
                    RoleBinding(scope: .tenant(TenantID(trusted: "acme")), role: .keyUser),
                    RoleBinding(scope: .all, role: .decryptOnly),
                    RoleBinding(scope: .tenant(TenantID(trusted: "acme")), role: .admin),
                ],
                createdAt: t0,
                disabled: false
            )
            try await store.transaction { try await $0.insertPrincipal(record) }
            var expected = record
            expected.roles.sort()
            #expect(try await store.read { try await $0.principal(record.name) } == expected)
            #expect(
                try await store.read {
                    try await $0.principal(
                        certificateCommonName: CertificateCommonName(trusted: "billing.prod.example.com"))
                } == expected)
            #expect(try await store.read { try await $0.principal(PrincipalName(trusted: "nobody")) } == nil)
            #expect(
                try await store.read {
                    try await $0.principal(
                        certificateCommonName: CertificateCommonName(trusted: "BILLING.prod.example.com"))
                } == nil)

            // No certificate and no roles; two principals without a certificate are fine.
            let bare = PrincipalRecord(name: PrincipalName(trusted: "bare"), createdAt: later, disabled: true)
            let bare2 = PrincipalRecord(name: PrincipalName(trusted: "bare2"), createdAt: later)
            try await store.transaction { transaction in
                try await transaction.insertPrincipal(bare)
                try await transaction.insertPrincipal(bare2)
            }
            #expect(try await store.read { try await $0.principal(bare.name) } == bare)
            #expect(try await store.read { try await $0.countPrincipals() } == 3)

            await expectStorageError(.uniqueViolation) {
                try await store.transaction {
                    try await $0.insertPrincipal(PrincipalRecord(name: record.name, createdAt: t0))
                }
            }
            await expectStorageError(.uniqueViolation) {
                try await store.transaction {
                    try await $0.insertPrincipal(
                        PrincipalRecord(
                            name: PrincipalName(trusted: "impostor"),
                            certificateCommonName: record.certificateCommonName,
                            createdAt: t0
                        )
                    )
                }
            }
            #expect(try await store.read { try await $0.countPrincipals() } == 3)
        }
    }

    @Test(arguments: StoreKind.allCases)
    func principalsAreListedInByteOrderWithTheirBindings(kind: StoreKind) async throws {
        try await withStore(kind, "access_principal_paging") { store in
            // '-' < '.' < '0'-'9' < '@' < '_' < 'a'-'z' in byte order.
            let names = ["b", "a_b", "a-b", "a.b", "a@b", "ab", "a", "0x", "9", "z-z"]
            try await store.transaction { transaction in
                for (index, name) in names.enumerated() {
                    let roles: [RoleBinding] =
                        index % 3 == 0
                        ? []
                        : [RoleBinding(scope: .tenant(TenantID(trusted: "t\(index)")), role: .keyUser)]
                            + (index % 2 == 0 ? [RoleBinding(scope: .all, role: .decryptOnly)] : [])
                    try await transaction.insertPrincipal(
                        PrincipalRecord(name: PrincipalName(trusted: name), roles: roles, createdAt: t0))
                }
            }
            var listed: [PrincipalRecord] = []
            var after: PrincipalName?
            while true {
                let page = try await store.read { [after] in try await $0.principals(after: after, limit: 3) }
                #expect(page.count <= 3)
                listed += page
                guard let last = page.last, page.count == 3 else { break }
                after = last.name
            }
            #expect(
                listed.map(\.name.rawValue) == names.sorted { Array($0.utf8).lexicographicallyPrecedes(Array($1.utf8)) }
            )
            for record in listed {
                let single = try await store.read { try await $0.principal(record.name) }
                #expect(single == record)
                #expect(record.roles == record.roles.sorted())
            }
            #expect(listed.map(\.roles.count).reduce(0, +) == 6 + 3)
            #expect(try await store.read { try await $0.principals(after: nil, limit: 0) }.isEmpty)
        }
    }

    @Test(arguments: StoreKind.allCases)
    func roleBindingsAndDisabledFlag(kind: StoreKind) async throws {
        try await withStore(kind, "access_bindings") { store in
            let name = PrincipalName(trusted: "ops")
            try await store.transaction { try await $0.insertPrincipal(PrincipalRecord(name: name, createdAt: t0)) }
            let acmeAdmin = RoleBinding(scope: .tenant(TenantID(trusted: "acme")), role: .admin)
            let everywhere = RoleBinding(scope: .all, role: .keyUser)
            #expect(try await store.transaction { try await $0.insertRoleBinding(name, acmeAdmin) })
            #expect(try await store.transaction { try await $0.insertRoleBinding(name, everywhere) })
            #expect(try await store.transaction { try await $0.insertRoleBinding(name, acmeAdmin) } == false)
            #expect(try await store.read { try await $0.principal(name) }?.roles == [everywhere, acmeAdmin])

            #expect(try await store.transaction { try await $0.deleteRoleBinding(name, acmeAdmin) })
            #expect(try await store.transaction { try await $0.deleteRoleBinding(name, acmeAdmin) } == false)
            #expect(try await store.read { try await $0.principal(name) }?.roles == [everywhere])

            await expectStorageError(.foreignKeyViolation) {
                _ = try await store.transaction {
                    try await $0.insertRoleBinding(PrincipalName(trusted: "ghost"), everywhere)
                }
            }

            #expect(try await store.transaction { try await $0.setPrincipalDisabled(name, true) })
            #expect(try await store.read { try await $0.principal(name) }?.disabled == true)
            #expect(try await store.transaction { try await $0.setPrincipalDisabled(name, false) })
            #expect(try await store.read { try await $0.principal(name) }?.disabled == false)
            #expect(
                try await store.transaction { try await $0.setPrincipalDisabled(PrincipalName(trusted: "ghost"), true) }
                    == false)

            // The lock is a write: refused inside read, fine inside a transaction.
            try await store.transaction { try await $0.lockPrincipals() }
            await expectStorageError(.other) { try await store.read { try await $0.lockPrincipals() } }

            // A failed transaction leaves nothing behind.
            await #expect(throws: TestFailure.self) {
                try await store.transaction { transaction in
                    try await transaction.insertPrincipal(
                        PrincipalRecord(name: PrincipalName(trusted: "rolled-back"), roles: [everywhere], createdAt: t0)
                    )
                    _ = try await transaction.insertRoleBinding(name, acmeAdmin)
                    throw TestFailure()
                }
            }
            #expect(try await store.read { try await $0.principal(PrincipalName(trusted: "rolled-back")) } == nil)
            #expect(try await store.read { try await $0.principal(name) }?.roles == [everywhere])
        }
    }

    // MARK: Repository: API tokens

    @Test(arguments: StoreKind.allCases)
    func tokenRoundTripLookupAndRevocation(kind: StoreKind) async throws {
        try await withStore(kind, "access_tokens") { store in
            let alice = PrincipalName(trusted: "alice")
            let bob = PrincipalName(trusted: "bob")
            try await store.transaction { transaction in
                try await transaction.insertPrincipal(PrincipalRecord(name: alice, createdAt: t0))
                try await transaction.insertPrincipal(PrincipalRecord(name: bob, createdAt: t0))
            }
            var records: [APITokenRecord] = []
            for index in 0..<7 {
                records.append(
                    APITokenRecord(
                        id: APITokenID.random(),
                        principal: index % 2 == 0 ? alice : bob,
                        hash: APIToken.generate().hash,
                        description: index == 0 ? "" : "token \(index) — ci",
                        createdAt: t0,
                        expiresAt: index % 3 == 0 ? nil : later,
                        revokedAt: index == 5 ? later : nil
                    )
                )
            }
            try await store.transaction { transaction in
                for record in records { try await transaction.insertAPIToken(record) }
            }
            for record in records {
                #expect(try await store.read { try await $0.apiToken(hash: record.hash) } == record)
                #expect(try await store.read { try await $0.apiToken(record.id) } == record)
            }
            #expect(try await store.read { try await $0.apiToken(hash: APIToken.generate().hash) } == nil)
            #expect(try await store.read { try await $0.apiToken(APITokenID.random()) } == nil)

            await expectStorageError(.uniqueViolation) {
                var duplicate = records[0]
                duplicate.id = APITokenID.random()
                try await store.transaction { [duplicate] in try await $0.insertAPIToken(duplicate) }
            }
            await expectStorageError(.uniqueViolation) {
                var duplicate = records[0]
                duplicate.hash = APIToken.generate().hash
                try await store.transaction { [duplicate] in try await $0.insertAPIToken(duplicate) }
            }
            await expectStorageError(.foreignKeyViolation) {
                var orphan = records[0]
                orphan.id = APITokenID.random()
                orphan.hash = APIToken.generate().hash
                orphan.principal = PrincipalName(trusted: "ghost")
                try await store.transaction { [orphan] in try await $0.insertAPIToken(orphan) }
            }

            // Listing: all, and per principal, in id order with keyset paging.
            func list(_ principal: PrincipalName?) async throws -> [APITokenRecord] {
                var listed: [APITokenRecord] = []
                var after: APITokenID?
                while true {
                    let page = try await store.read { [after] in
                        try await $0.apiTokens(principal: principal, after: after, limit: 2)
                    }
                    listed += page
                    guard let last = page.last, page.count == 2 else { return listed }
                    after = last.id
                }
            }
            #expect(try await list(nil) == records.sorted { $0.id < $1.id })
            #expect(try await list(alice) == records.filter { $0.principal == alice }.sorted { $0.id < $1.id })
            #expect(try await list(bob) == records.filter { $0.principal == bob }.sorted { $0.id < $1.id })
            #expect(try await list(PrincipalName(trusted: "ghost")).isEmpty)

            // Revocation sets revokedAt once.
            let target = records[1]
            let revokedAt = Timestamp(millisecondsSinceEpoch: later.millisecondsSinceEpoch + 5)
            #expect(try await store.transaction { try await $0.revokeAPIToken(target.id, at: revokedAt) })
            #expect(try await store.transaction { try await $0.revokeAPIToken(target.id, at: t0) } == false)
            #expect(try await store.read { try await $0.apiToken(target.id) }?.revokedAt == revokedAt)
            #expect(try await store.transaction { try await $0.revokeAPIToken(records[5].id, at: t0) } == false)
            #expect(try await store.read { try await $0.apiToken(records[5].id) }?.revokedAt == later)
            #expect(try await store.transaction { try await $0.revokeAPIToken(APITokenID.random(), at: t0) } == false)
        }
    }

    // MARK: Service: principals and tokens

    @Test(arguments: StoreKind.allCases)
    func createPrincipalAndTokenThenAuthenticate(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "access_authenticate")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("acme")
        _ = try await service.createTenant(tenant, request: admin)

        let name = try PrincipalName("billing@prod")
        let roles = [RoleBinding(scope: .tenant(tenant), role: .keyUser)]
        let created = try await service.createPrincipal(name, roles: roles, request: admin)
        #expect(created.name == name)
        #expect(created.roles == roles)
        #expect(!created.disabled)
        #expect(try await service.principal(name) == created)

        let (record, token) = try await service.createAPIToken(
            for: name, description: "billing service", timeToLiveSeconds: 3600, request: admin)
        #expect(APIToken.isWellFormed(token))
        #expect(record.principal == name)
        #expect(record.hash == APIToken.lookupHash(of: token))
        #expect(record.description == "billing service")
        let expiresAt = try #require(record.expiresAt)
        #expect(expiresAt.millisecondsSinceEpoch - record.createdAt.millisecondsSinceEpoch == 3_600_000)
        #expect(try await service.apiToken(record.id) == record)

        let result = try await service.authenticate(apiToken: token, requestID: "r-ok")
        guard case .authenticated(let caller) = result else {
            Issue.record("expected authenticated, got \(result)")
            return
        }
        #expect(caller.principal == created)
        #expect(caller.token == record)
        #expect(AccessPolicy.allows(caller.principal.roles, .encrypt, tenant: tenant))
        #expect(!AccessPolicy.allows(caller.principal.roles, .encrypt, tenant: tenantID("other")))

        // The audit names the principal and the token id; never the token or its hash.
        let records = try await harness.auditRecords()
        let createPrincipal = try #require(records.first { $0.event.operation == .createPrincipal })
        #expect(createPrincipal.event.principal == admin.principal)
        #expect(createPrincipal.event.detail.contains("principal=billing@prod"))
        #expect(createPrincipal.event.detail.contains("key-user@acme"))
        let createToken = try #require(records.first { $0.event.operation == .createAPIToken })
        #expect(createToken.event.keyIDs == [record.id.rawValue])
        #expect(createToken.event.outcome == .success)
        try expectNoTokenIn(records, token: token, hash: record.hash)
        // A successful authentication is not a change: no record for it.
        #expect(!records.contains { $0.event.operation == .authenticate })
        #expect(try await service.verifyAuditLog().isVerified)
    }

    @Test(arguments: StoreKind.allCases)
    func handedOffRefusalsAreWrittenApartIntoTheSameAnchoredChain(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "access_refusal_apart")
        defer { Task { await harness.close() } }
        let service = harness.service
        _ = try await service.createTenant(tenantID("acme"), request: admin)
        let before = try await harness.auditRecords().count

        // Handed off: `authenticate` refuses without writing anything itself.
        let taken = Mutex<[AuditEvent]>([])
        let handOff = RefusalAudit.handedOff { event in taken.withLock { $0.append(event) } }
        for requestID in ["r-a", "r-b"] {
            let result = try await service.authenticate(
                apiToken: APIToken.generate().secret, requestID: requestID, refusalAudit: handOff)
            guard case .refused(.unknownToken) = result else {
                Issue.record("expected unknownToken, got \(result)")
                return
            }
        }
        _ = try await service.authenticate(certificateCommonName: "nobody", requestID: "r-c", refusalAudit: handOff)
        let events = taken.withLock { $0 }
        #expect(events.map(\.requestID) == ["r-a", "r-b", "r-c"])
        #expect(events.first?.detail == "reason=unknown-token")
        #expect(try await harness.auditRecords().count == before)

        // Written apart from the group committer, while key operations go on: one chain that
        // verifies against the HSM anchor.
        async let keys = withThrowingTaskGroup(of: Void.self) { group in
            for _ in 0..<20 {
                group.addTask { _ = try await service.generateDataKey(tenantID("acme"), request: admin) }
            }
            try await group.waitForAll()
        }
        try await service.appendAuditRecordsApart(events)
        try await service.appendAuditRecordsApart([])
        try await keys
        let records = try await harness.auditRecords()
        #expect(records.filter { ["r-a", "r-b", "r-c"].contains($0.event.requestID) }.count == 3)
        #expect(records.count == before + 3 + 20)
        #expect(try await service.verifyAuditLog().isVerified)
    }

    @Test(arguments: StoreKind.allCases)
    func refusalsCarryTheirReasonAndAreAudited(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "access_refusals")
        defer { Task { await harness.close() } }
        let service = harness.service
        let name = try PrincipalName("worker")
        _ = try await service.createPrincipal(
            name, roles: [RoleBinding(scope: .all, role: .decryptOnly)], request: admin)
        let (short, shortToken) = try await service.createAPIToken(for: name, timeToLiveSeconds: 60, request: admin)
        let (revoked, revokedToken) = try await service.createAPIToken(for: name, request: admin)
        let (lasting, lastingToken) = try await service.createAPIToken(for: name, request: admin)

        func refusal(_ token: String, now: Timestamp = .now(), _ requestID: String) async throws
            -> AuthenticationFailure?
        {
            if case .refused(let failure) = try await service.authenticate(
                apiToken: token, now: now, requestID: requestID)
            {
                return failure
            }
            return nil
        }

        // Unknown but well formed; malformed (including ten megabytes).
        #expect(try await refusal(APIToken.generate().secret, "r-unknown") == .unknownToken)
        #expect(try await refusal("not a token", "r-malformed") == .malformedToken)
        #expect(try await refusal(String(repeating: "x", count: 10 * 1024 * 1024), "r-huge") == .malformedToken)

        // Expired: fine just before its end, refused from its end on.
        let end = try #require(short.expiresAt)
        #expect(
            try await refusal(shortToken, now: Timestamp(millisecondsSinceEpoch: end.millisecondsSinceEpoch - 1), "r-1")
                == nil)
        #expect(try await refusal(shortToken, now: end, "r-expired") == .expiredToken)

        // Revoked: refused at once; revoking again changes nothing.
        #expect(try await refusal(revokedToken, "r-2") == nil)
        let revocation = try await service.revokeAPIToken(revoked.id, request: admin)
        let revokedAt = try #require(revocation.revokedAt)
        #expect(try await refusal(revokedToken, "r-revoked") == .revokedToken)
        #expect(try await service.revokeAPIToken(revoked.id, request: admin).revokedAt == revokedAt)
        #expect(
            await serviceError { try await service.revokeAPIToken(APITokenID.random(), request: admin) }?.code
                == .notFound)

        // Disabled principal: every token refused until enabled again.
        _ = try await service.disablePrincipal(name, request: admin)
        #expect(try await refusal(lastingToken, "r-disabled") == .principalDisabled)
        _ = try await service.enablePrincipal(name, request: admin)
        #expect(try await refusal(lastingToken, "r-3") == nil)

        // Each refusal is one access.authenticate record with its reason, naming the token id
        // when the token was known, under the token's principal (or "(unauthenticated)").
        let records = try await harness.auditRecords()
        let refusals = records.filter { $0.event.operation == .authenticate }
        let byRequest = Dictionary(refusals.map { ($0.event.requestID, $0.event) }, uniquingKeysWith: { a, _ in a })
        #expect(refusals.count == 6)
        for record in refusals { #expect(record.event.outcome == .failure("unauthenticated")) }
        #expect(byRequest["r-unknown"]?.detail == "reason=unknown-token")
        #expect(byRequest["r-unknown"]?.principal == .unauthenticated)
        #expect(byRequest["r-unknown"]?.keyIDs == [])
        #expect(byRequest["r-malformed"]?.detail == "reason=malformed-token")
        #expect(byRequest["r-huge"]?.detail == "reason=malformed-token")
        #expect(byRequest["r-expired"]?.detail == "reason=expired-token")
        #expect(byRequest["r-expired"]?.keyIDs == [short.id.rawValue])
        #expect(byRequest["r-expired"]?.principal == name.principal)
        #expect(byRequest["r-revoked"]?.detail == "reason=revoked-token")
        #expect(byRequest["r-revoked"]?.keyIDs == [revoked.id.rawValue])
        #expect(byRequest["r-disabled"]?.detail == "reason=principal-disabled")
        #expect(byRequest["r-disabled"]?.keyIDs == [lasting.id.rawValue])
        let revokes = records.filter { $0.event.operation == .revokeAPIToken }
        #expect(revokes.map(\.event.outcome) == [.success, .success, .failure("not found")])
        #expect(revokes.last?.event.detail == "")
        #expect(revokes[1].event.detail.contains("already-revoked"))
        #expect(records.filter { $0.event.operation == .disablePrincipal }.count == 1)
        #expect(records.filter { $0.event.operation == .enablePrincipal }.count == 1)
        for (token, record) in [(shortToken, short), (revokedToken, revoked), (lastingToken, lasting)] {
            try expectNoTokenIn(records, token: token, hash: record.hash)
        }
        #expect(try await service.verifyAuditLog().isVerified)
    }

    @Test(arguments: StoreKind.allCases)
    func duplicatesAndBadArgumentsAreRefused(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "access_duplicates")
        defer { Task { await harness.close() } }
        let service = harness.service
        let commonName = try CertificateCommonName("billing.prod.example.com")
        _ = try await service.createPrincipal(
            try PrincipalName("billing"), certificateCommonName: commonName, request: admin)

        let duplicateName = await serviceError {
            try await service.createPrincipal(try PrincipalName("billing"), request: admin)
        }
        #expect(duplicateName?.code == .alreadyExists)
        let duplicateCN = await serviceError {
            try await service.createPrincipal(
                try PrincipalName("other"), certificateCommonName: commonName, request: admin)
        }
        #expect(duplicateCN?.code == .alreadyExists)
        #expect(duplicateCN?.message.contains(commonName.rawValue) == false)
        let unknownTenant = await serviceError {
            try await service.createPrincipal(
                try PrincipalName("third"),
                roles: [RoleBinding(scope: .tenant(tenantID("nowhere")), role: .keyUser)],
                request: admin
            )
        }
        #expect(unknownTenant?.code == .notFound)
        #expect(try await harness.store.read { try await $0.countPrincipals() } == 1)

        let billing = try PrincipalName("billing")
        for ttl: Int64 in [0, -1, APITokenRecord.maximumTimeToLiveSeconds + 1] {
            let error = await serviceError {
                try await service.createAPIToken(for: billing, timeToLiveSeconds: ttl, request: admin)
            }
            #expect(error?.code == .invalidArgument)
        }
        let longDescription = await serviceError {
            try await service.createAPIToken(
                for: billing, description: String(repeating: "d", count: 257), request: admin)
        }
        #expect(longDescription?.code == .invalidArgument)
        let ghost = await serviceError {
            try await service.createAPIToken(for: try PrincipalName("ghost"), request: admin)
        }
        #expect(ghost?.code == .notFound)
        #expect(await serviceError { try await service.principal(try PrincipalName("ghost")) }?.code == .notFound)
        #expect(try await service.listAPITokens().items.isEmpty)

        // Refused calls are audited as failures, like every other call.
        let records = try await harness.auditRecords()
        #expect(
            records.filter { $0.event.operation == .createPrincipal }.map(\.event.outcome) == [
                .success, .failure("already exists"), .failure("already exists"), .failure("not found"),
            ])
        #expect(records.filter { $0.event.operation == .createAPIToken }.count == 5)
    }

    @Test(arguments: StoreKind.allCases)
    func grantAndRevokeRoles(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "access_grants")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("acme")
        _ = try await service.createTenant(tenant, request: admin)
        let root = try PrincipalName("root")
        let ops = try PrincipalName("ops")
        let gatewayAdmin = RoleBinding(scope: .all, role: .admin)
        let acmeAdmin = RoleBinding(scope: .tenant(tenant), role: .admin)
        _ = try await service.createPrincipal(root, roles: [gatewayAdmin], request: admin)
        _ = try await service.createPrincipal(ops, request: admin)

        #expect(try await service.grantRole(acmeAdmin, to: ops, request: admin).roles == [acmeAdmin])
        #expect(try await service.grantRole(acmeAdmin, to: ops, request: admin).roles == [acmeAdmin])
        #expect(try await service.grantRole(gatewayAdmin, to: ops, request: admin).roles == [gatewayAdmin, acmeAdmin])
        #expect(try await service.revokeRole(acmeAdmin, from: ops, request: admin).roles == [gatewayAdmin])
        #expect(
            await serviceError { try await service.revokeRole(acmeAdmin, from: ops, request: admin) }?.code == .notFound
        )
        let ghost = try PrincipalName("ghost")
        #expect(
            await serviceError { try await service.grantRole(acmeAdmin, to: ghost, request: admin) }?.code == .notFound)
        let missingTenant = RoleBinding(scope: .tenant(tenantID("nowhere")), role: .keyUser)
        #expect(
            await serviceError { try await service.grantRole(missingTenant, to: ops, request: admin) }?.code
                == .notFound)

        // Two gateway admins: either can go, but not the last enabled one.
        _ = try await service.revokeRole(gatewayAdmin, from: ops, request: admin)
        let lastRevoke = await serviceError { try await service.revokeRole(gatewayAdmin, from: root, request: admin) }
        #expect(lastRevoke?.code == .failedPrecondition)
        let lastDisable = await serviceError { try await service.disablePrincipal(root, request: admin) }
        #expect(lastDisable?.code == .failedPrecondition)
        _ = try await service.grantRole(gatewayAdmin, to: ops, request: admin)
        _ = try await service.disablePrincipal(ops, request: admin)
        // A disabled administrator does not count.
        #expect(
            await serviceError { try await service.revokeRole(gatewayAdmin, from: root, request: admin) }?.code
                == .failedPrecondition)
        _ = try await service.enablePrincipal(ops, request: admin)
        #expect(try await service.revokeRole(gatewayAdmin, from: root, request: admin).roles == [])
        #expect(try await service.principal(root).roles == [])

        let records = try await harness.auditRecords()
        let grants = records.filter { $0.event.operation == .grantRole }
        #expect(grants.first?.event.tenant == tenant)
        #expect(grants.first?.event.detail == "principal=ops role=admin@acme")
        #expect(grants[1].event.detail == "principal=ops role=admin@acme unchanged")
        #expect(grants[2].event.tenant == nil)
        #expect(grants.filter { $0.event.outcome == .success }.count == 4)
        let revokes = records.filter { $0.event.operation == .revokeRole }
        #expect(
            revokes.map(\.event.outcome) == [
                .success, .failure("not found"), .success, .failure("failed precondition"),
                .failure("failed precondition"), .success,
            ])
        #expect(try await service.verifyAuditLog().isVerified)
    }

    @Test(arguments: StoreKind.allCases)
    func listingsPage(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "access_listings")
        defer { Task { await harness.close() } }
        let service = harness.service
        let names = try (0..<5).map { try PrincipalName("p\($0)") }
        for name in names {
            _ = try await service.createPrincipal(name, request: admin)
            _ = try await service.createAPIToken(for: name, description: "one", request: admin)
            _ = try await service.createAPIToken(for: name, description: "two", request: admin)
        }
        var principals: [PrincipalRecord] = []
        var page = PageRequest(limit: 2)
        while true {
            let listed = try await service.listPrincipals(page)
            principals += listed.items
            guard let next = listed.nextPage else { break }
            page.after = next
        }
        #expect(principals.map(\.name) == names)

        var tokens: [APITokenRecord] = []
        page = PageRequest(limit: 3)
        while true {
            let listed = try await service.listAPITokens(page)
            tokens += listed.items
            guard let next = listed.nextPage else { break }
            page.after = next
        }
        #expect(tokens.count == 10)
        #expect(tokens.map(\.id) == tokens.map(\.id).sorted())
        let mine = try await service.listAPITokens(principal: names[2])
        #expect(mine.items.count == 2)
        #expect(mine.items.allSatisfy { $0.principal == names[2] })
        #expect(mine.nextPage == nil)
        #expect(
            await serviceError { try await service.listPrincipals(PageRequest(limit: 0)) }?.code == .invalidArgument)
        #expect(
            await serviceError { try await service.listAPITokens(PageRequest(after: "tok_nothex", limit: 5)) }?.code
                == .invalidArgument)
    }

    @Test(arguments: StoreKind.allCases)
    func certificateCommonNames(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "access_certificates")
        defer { Task { await harness.close() } }
        let service = harness.service
        let name = try PrincipalName("billing")
        let commonName = try CertificateCommonName("billing.prod.example.com")
        let created = try await service.createPrincipal(name, certificateCommonName: commonName, request: admin)
        #expect(try await service.principal(forCertificateCommonName: commonName) == created)
        #expect(try await service.principal(forCertificateCommonName: CertificateCommonName("other")) == nil)

        #expect(
            try await service.authenticate(certificateCommonName: commonName.rawValue, requestID: "c-ok")
                == .authenticated(AuthenticatedCaller(principal: created, token: nil)))
        #expect(
            try await service.authenticate(certificateCommonName: "someone.else", requestID: "c-unknown")
                == .refused(.unknownCertificate))
        #expect(
            try await service.authenticate(certificateCommonName: "bad\ncn", requestID: "c-bad")
                == .refused(.unknownCertificate))
        _ = try await service.disablePrincipal(name, request: admin)
        #expect(
            try await service.authenticate(certificateCommonName: commonName.rawValue, requestID: "c-disabled")
                == .refused(.principalDisabled))

        let refusals = try await harness.auditRecords().filter { $0.event.operation == .authenticate }
        #expect(refusals.map(\.event.requestID) == ["c-unknown", "c-bad", "c-disabled"])
        #expect(refusals[0].event.detail == "reason=unknown-certificate certificate-cn=someone.else")
        // A common name that is not valid is never written to the audit log.
        #expect(refusals[1].event.detail == "reason=unknown-certificate")
        #expect(refusals[2].event.principal == name.principal)
    }

    @Test(arguments: StoreKind.allCases)
    func recordAccessFailureAppendsAnAuditRecord(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "access_record_failure")
        defer { Task { await harness.close() } }
        let service = harness.service
        let tenant = tenantID("acme")
        try await service.recordAccessFailure(
            .authorization,
            principal: Principal("reader"),
            tenant: tenant,
            operation: "ShredTenant",
            reason: "role",
            request: RequestContext(principal: Principal("reader"), requestID: "a-1")
        )
        try await service.recordAccessFailure(
            .authentication,
            principal: .unauthenticated,
            tenant: nil,
            operation: "Hello",
            reason: "certificate-and-token-disagree",
            request: RequestContext(principal: .unauthenticated, requestID: "a-2")
        )
        let records = try await harness.auditRecords()
        #expect(records.count == 2)
        #expect(records[0].event.operation == .authorize)
        #expect(records[0].event.tenant == tenant)
        #expect(records[0].event.principal == Principal("reader"))
        #expect(records[0].event.outcome == .failure("permission denied"))
        #expect(records[0].event.detail == "method=ShredTenant reason=role")
        #expect(records[0].event.requestID == "a-1")
        #expect(records[1].event.operation == .authenticate)
        #expect(records[1].event.outcome == .failure("unauthenticated"))
        #expect(records[1].event.tenant == nil)
        #expect(try await service.verifyAuditLog().isVerified)
    }

    // MARK: Bootstrap

    /// Eight gateway instances (each its own key service and group committer, on one store)
    /// start at once on an empty database, each with its own admin name: exactly one creates
    /// its administrator and token.
    @Test(arguments: StoreKind.allCases)
    func bootstrapRaceHasExactlyOneWinner(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "access_bootstrap")
        defer { Task { await harness.close() } }
        let instances = try (0..<8).map { _ in try harness.restarted() }
        let results = try await withThrowingTaskGroup(of: (Int, String?).self) { group in
            for (index, instance) in instances.enumerated() {
                group.addTask {
                    let won = try await instance.bootstrapAdmin(name: try PrincipalName("admin-\(index)"))
                    return (index, won?.token)
                }
            }
            var results: [(Int, String?)] = []
            for try await result in group { results.append(result) }
            return results
        }
        let winners = results.filter { $0.1 != nil }
        #expect(winners.count == 1)
        let (index, token) = try #require(winners.first)
        let winnerName = try PrincipalName("admin-\(index)")
        #expect(try await harness.store.read { try await $0.countPrincipals() } == 1)

        let result = try await harness.service.authenticate(apiToken: try #require(token), requestID: "boot")
        guard case .authenticated(let caller) = result else {
            Issue.record("the bootstrap token does not authenticate: \(result)")
            return
        }
        #expect(caller.principal.name == winnerName)
        #expect(caller.principal.roles == [RoleBinding(scope: .all, role: .admin)])
        #expect(AccessPolicy.isGatewayAdmin(caller.principal.roles))

        // Later starts find a principal and do nothing.
        #expect(try await harness.service.bootstrapAdmin(name: try PrincipalName("late")) == nil)
        let records = try await harness.auditRecords()
        #expect(records.map(\.event.operation) == [.createPrincipal, .createAPIToken])
        #expect(records[0].event.principal == .system)
        try expectNoTokenIn(records, token: try #require(token), hash: try #require(caller.token).hash)
    }

    // MARK: At rest

    /// Security invariant 4 for tokens: the SQLite file and its WAL never hold an API token,
    /// only its SHA-256.
    @Test func sqliteFileHoldsTokenHashesNotTokens() async throws {
        let fixture = try SoftHSMFixture.shared()
        let testToken = try fixture.makeToken("tokens-at-rest")
        let pool = try await SessionPool(module: fixture.module, tokenLabel: testToken.label, pin: testToken.pin)
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent(
            "hsmgw-tokens-at-rest-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        )
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("keys.sqlite").path
        let store = try await SQLiteKeyStore.open(path: path)
        let service = try KeyService(token: PKCS11KeyToken(pool: pool), repository: store)

        var tokens: [String] = []
        var hashes: [[UInt8]] = []
        let bootstrap = try #require(try await service.bootstrapAdmin(name: PrincipalName("root")))
        tokens.append(bootstrap.token)
        hashes.append(try #require(APIToken.lookupHash(of: bootstrap.token)))
        let name = try PrincipalName("app")
        _ = try await service.createPrincipal(name, request: admin)
        for index in 0..<20 {
            let (record, token) = try await service.createAPIToken(for: name, description: "t\(index)", request: admin)
            tokens.append(token)
            hashes.append(record.hash)
            _ = try await service.authenticate(apiToken: token, requestID: "at-rest-\(index)")
        }
        // Refused tokens are not stored either.
        let refused = APIToken.generate().secret
        _ = try await service.authenticate(apiToken: refused, requestID: "at-rest-refused")
        #expect(tokens.count == 21)

        var bytes: [UInt8] = []
        for suffix in ["", "-wal"] {
            if let data = FileManager.default.contents(atPath: path + suffix) { bytes += data }
        }
        #expect(bytes.count > 0)
        let secrets = (tokens + [refused]).flatMap { token in
            // The whole token, and its random part alone.
            [Array(token.utf8), Array(token.utf8.dropFirst(APIToken.prefix.utf8.count))]
        }
        #expect(bytes.occurrences(of: secrets).isEmpty)
        // The hashes are there: the scan does find what is stored.
        #expect(bytes.occurrences(of: hashes).count == hashes.count)
        await store.close()
        await pool.shutdown()
    }
}

/// Expects neither `token` (nor its random part) nor its hash (bytes or hex) in any field of
/// `records`.
private func expectNoTokenIn(
    _ records: [AuditRecord],
    token: String,
    hash: [UInt8],
    sourceLocation: SourceLocation = #_sourceLocation
) throws {
    let hex = hash.map { byte in (byte < 16 ? "0" : "") + String(byte, radix: 16) }.joined()
    let needles = [token, String(token.dropFirst(APIToken.prefix.count)), hex]
    for record in records {
        let event = record.event
        let fields = [event.principal.name, event.detail, event.requestID, event.outcome.description] + event.keyIDs
        for field in fields {
            for needle in needles {
                #expect(
                    !field.contains(needle), "audit record \(record.sequence) holds a token",
                    sourceLocation: sourceLocation)
            }
        }
        let canonical = AuditChain.canonicalEncoding(sequence: record.sequence, event: event)
        #expect(canonical.occurrences(of: [hash]).isEmpty, sourceLocation: sourceLocation)
    }
}

private let t0 = Timestamp(millisecondsSinceEpoch: 1_700_000_000_123)
private let later = Timestamp(millisecondsSinceEpoch: 1_700_000_360_456)

private struct TestFailure: Error {}
