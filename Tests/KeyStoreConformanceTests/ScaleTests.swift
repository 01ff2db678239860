import KeyHierarchy
import Testing

/// Data keys never become token objects; IVs never repeat under one master-key version.
@Suite("Scale invariants")
struct ScaleTests {
    @Test(arguments: StoreKind.allCases)
    func tenThousandDataKeysLeaveTheTokenUnchanged(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "objects")
        defer { Task { await harness.close() } }
        let tenant = tenantID("objects")
        _ = try await harness.service.createTenant(tenant, request: admin)
        let before = try await harness.tokenObjectCount()
        // The tenant's master key and the audit-anchor key.
        #expect(before == 2)
        for _ in 0..<10 {
            _ = try await harness.service.generateDataKeys(tenant, count: 1000, includePlaintext: false, request: app)
        }
        #expect(try await harness.tokenObjectCount() == before)
        #expect(try await harness.store.read { try await $0.countLiveDataKeys(tenant, version: nil) } == 10_000)
    }

    /// 100,000 wraps under one version from two service instances at once (two gateways on
    /// one database): every IV distinct, and the invocation count is exactly the number of wraps
    /// stored (wraps are counted with the keys they store).
    @Test(arguments: StoreKind.allCases)
    func hundredThousandWrapsNeverRepeatAnIV(kind: StoreKind) async throws {
        let harness = try await ServiceHarness.make(kind, "ivs")
        defer { Task { await harness.close() } }
        let tenant = tenantID("ivs")
        _ = try await harness.service.createTenant(tenant, request: admin)
        let services = [harness.service, try harness.restarted()]
        let ivs = try await withThrowingTaskGroup(of: [[UInt8]].self) { group in
            for worker in 0..<4 {
                group.addTask {
                    var ivs: [[UInt8]] = []
                    for round in 0..<26 {
                        // Mixed batch sizes exercise partial use of reserved blocks.
                        let count = round % 5 == 0 ? 993 : 1000
                        let keys = try await services[worker % 2].generateDataKeys(
                            tenant,
                            count: count,
                            includePlaintext: false,
                            request: app
                        )
                        ivs += keys.map { WrappedDataKey(encoded: $0.wrapped)!.iv }
                    }
                    return ivs
                }
            }
            return try await group.reduce(into: [[UInt8]]()) { $0 += $1 }
        }
        #expect(ivs.count >= 100_000)
        #expect(Set(ivs).count == ivs.count)
        let version = try #require(try await harness.service.masterKeyVersions(tenant).first)
        #expect(version.version == 1)
        #expect(version.invocationsReserved == Int64(ivs.count))
        // The stored blobs carry the same IVs (what was returned is what was stored).
        var stored = 0
        var after: DataKeyID?
        while true {
            let page = try await harness.store.read {
                try await $0.dataKeys(tenant, state: nil, after: after, limit: 1000)
            }
            stored += page.count
            guard let last = page.last else { break }
            after = last.id
        }
        #expect(stored == ivs.count)
    }
}
