import Foundation
import GatewayServer
import Testing

/// `/readyz` reflects the store: a gateway whose PostgreSQL goes away stops being ready.
@Suite("Readiness follows the dependencies")
struct ReadinessTests {
    @Test("/readyz is 200 with the store up and turns 503, naming the store, when PostgreSQL stops")
    func readinessFollowsTheStore() async throws {
        // A cluster of its own: the process-wide one serves the other tests.
        // Directly under /tmp: the postgres user must reach it (the script's rule when root).
        let cluster = "/tmp/hsmgw-readiness-pg-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let script = PackagePaths.root + "/scripts/throwaway-postgres.sh"
        let started = try Processes.run("/bin/bash", [script, "start", cluster, "--watch-pid", "\(getpid())"])
        try #require(started.status == 0, "the cluster did not start: \(started.output)")
        defer { _ = try? Processes.run("/bin/bash", [script, "stop", cluster]) }
        let portLine = started.output.split(separator: "\n").first { $0.hasPrefix("port=") }
        let port = try #require(portLine.flatMap { Int($0.dropFirst("port=".count)) })
        let own: (inout GatewayConfiguration) -> Void = {
            $0.store = .postgres(
                PostgresSettings(
                    port: port, user: "hsmgw", database: "postgres", passwordFile: cluster + "/password",
                    maximumConnections: 4))
        }
        try await withGateway(.postgres, "readiness", configure: own) { gateway in
            let metricsPort = try #require(gateway.metricsPort)
            let before = try await HTTPProbe.get("127.0.0.1", metricsPort, "/readyz")
            #expect(before.status == 200, "\(before.body)")

            let stopped = try Processes.run("/bin/bash", [script, "stop", cluster])
            try #require(stopped.status == 0, "the cluster did not stop: \(stopped.output)")
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
