import Foundation
import GatewayServer
import PostgresTestSupport
import Testing

/// `/readyz` reflects the store: a gateway whose PostgreSQL goes away stops being ready.
@Suite("Readiness follows the dependencies")
struct ReadinessTests {
    @Test("/readyz is 200 with the store up and turns 503, naming the store, when PostgreSQL stops")
    func readinessFollowsTheStore() async throws {
        // A cluster of its own: the process-wide one serves the other tests.
        let cluster = try PostgresTestCluster.startOwn()
        defer { cluster.stop() }
        let own: (inout GatewayConfiguration) -> Void = {
            $0.store = .postgres(
                PostgresSettings(
                    port: cluster.port, user: cluster.username, database: "postgres",
                    passwordFile: cluster.directory + "/password", maximumConnections: 4))
        }
        try await withGateway(.postgres, "readiness", configure: own) { gateway in
            let metricsPort = try #require(gateway.metricsPort)
            let before = try await HTTPProbe.get("127.0.0.1", metricsPort, "/readyz")
            #expect(before.status == 200, "\(before.body)")

            cluster.stop()
            // The probe caches for 1 s and gives a check 2 s: within 30 s it must have seen it.
            var after = before
            for _ in 0..<120 where after.status == 200 {
                try await Task.sleep(for: .milliseconds(250))
                after = try await HTTPProbe.get("127.0.0.1", metricsPort, "/readyz")
            }
            #expect(after.status == 503)
            #expect(after.body.contains(#""store":{"ready":false"#), "\(after.body)")
            #expect(after.body.contains(#""hsm":{"ready":true"#), "\(after.body)")
            // Liveness is not readiness: the process still serves.
            #expect(try await HTTPProbe.get("127.0.0.1", metricsPort, "/livez").status == 200)
        }
    }
}
