import Foundation
import GatewayClient
import GatewayServer
import GatewayWire
import Testing

/// Many requests multiplexed on one connection: every answer is the right one.
@Suite("Concurrency end to end", .serialized)
struct ConcurrencyTests {
    /// Requests sent at once on one connection.
    static let requestCount = 1000

    @Test(arguments: StoreKind.allCases)
    func thousandConcurrentRequestsOnOneConnection(_ kind: StoreKind) async throws {
        // The admission wait bound is raised: this test is about multiplexing, and under the
        // whole suite on two cores 1,000 queued requests can wait longer than the default 5 s.
        let patient: (inout GatewayConfiguration) -> Void = { $0.limits.maxTenantQueueWait = .seconds(300) }
        try await withGateway(kind, "concurrent-\(kind)", configure: patient) { gateway in
            let client = try gateway.client(token: gateway.adminToken, poolSize: 1)
            defer { Task { await client.shutdown() } }
            _ = try await client.createTenant("acme")

            let generated = try await withThrowingTaskGroup(of: (Int, DataKey).self) { group in
                for index in 0..<Self.requestCount {
                    group.addTask {
                        let key = try await client.generateDataKey(tenant: "acme", context: ["n": "\(index)"])
                        return (index, key)
                    }
                }
                var keys: [Int: DataKey] = [:]
                for try await (index, key) in group { keys[index] = key }
                return keys
            }
            #expect(generated.count == Self.requestCount)
            #expect(Set(generated.values.map(\.id)).count == Self.requestCount)
            #expect(await client.connections.count == 1)

            let mismatches = try await withThrowingTaskGroup(of: Bool.self) { group in
                for (index, key) in generated {
                    group.addTask {
                        let decrypted = try await client.decryptDataKey(
                            tenant: "acme", id: key.id, context: ["n": "\(index)"])
                        let expected = key.plaintext?.copyBytes() ?? []
                        return decrypted.id == key.id && decrypted.plaintext?.copyBytes() == expected
                            && expected.count == 32
                    }
                }
                var mismatches = 0
                for try await matched in group where !matched { mismatches += 1 }
                return mismatches
            }
            #expect(mismatches == 0)
            #expect(await client.connections.count == 1)
        }
    }
}
