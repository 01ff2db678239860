import Foundation
import GatewayClient
import GatewayWire
import ProcessTestSupport
import Testing

/// The real `hsm-gateway` binary: dev mode from an empty directory and again, SIGTERM drain,
/// configuration errors.
@Suite("hsm-gateway executable", .serialized)
struct ExecutableTests {
    /// Starts `hsm-gateway --dev` on a free port and waits for its banner.
    struct DevServer {
        let process: SpawnedProcess
        let port: Int

        static func start(dataDirectory: String, log: String) async throws -> DevServer {
            let binary = PackagePaths.gatewayBinary
            guard FileManager.default.isExecutableFile(atPath: binary) else {
                throw TestSetupError("\(binary) is missing: swift build --product hsm-gateway")
            }
            let process = try SpawnedProcess(
                binary,
                ["--dev", "--data-dir", dataDirectory, "--listen", "127.0.0.1:0", "--metrics-listen", "off"],
                outputPath: log
            )
            let port = try await process.servingPort(SpawnedProcess.devServingLine, name: "hsm-gateway --dev")
            return DevServer(process: process, port: port)
        }

        func client(token: String, poolSize: Int = 1) throws -> GatewayClient {
            var configuration = GatewayClientConfiguration(
                target: .host("127.0.0.1", port: port),
                transportSecurity: .plaintext,
                apiToken: APIToken(token),
                poolSize: poolSize
            )
            configuration.retryPolicy = .none
            return try GatewayClient(configuration: configuration, logger: quietLogger)
        }

        /// SIGTERM, then the exit status.
        func terminate() async -> Int32? {
            process.send(SIGTERM)
            return await process.wait(timeout: .seconds(60))
        }
    }

    @Test func devModeFirstStartAndRestart() async throws {
        let root = try makeTemporaryDirectory("dev")
        let data = root + "/data"
        let first = try await DevServer.start(dataDirectory: data, log: root + "/first.log")
        let tokenFile = data + "/admin.token"
        var status = stat()
        #expect(stat(tokenFile, &status) == 0)
        #expect(status.st_mode & 0o777 == 0o600)
        let token = try String(contentsOfFile: tokenFile, encoding: .utf8)
        #expect(token.hasPrefix("hsmgw_"))
        #expect(first.process.output().contains(token))  // printed once, on the first start
        let client = try first.client(token: token)
        #expect(try await client.hello().principal == "admin")
        _ = try await client.createTenant("acme")
        let key = try await client.generateDataKey(tenant: "acme", context: ["app": "dev"])
        await client.shutdown()
        #expect(await first.terminate() == 0)

        let second = try await DevServer.start(dataDirectory: data, log: root + "/second.log")
        #expect(!second.process.output().contains(token))
        #expect(second.process.output().contains(tokenFile))
        #expect(try String(contentsOfFile: tokenFile, encoding: .utf8) == token)
        let again = try second.client(token: token)
        let decrypted = try await again.decryptDataKey(tenant: "acme", id: key.id, context: ["app": "dev"])
        #expect(decrypted.plaintext?.copyBytes() == key.plaintext?.copyBytes())
        #expect(try await again.listTenants().tenants.map(\.id) == ["acme"])
        await again.shutdown()
        #expect(await second.terminate() == 0)
        // Everything stays under the data directory, private to this user.
        #expect(stat(data, &status) == 0 && status.st_mode & 0o077 == 0)
        #expect(FileManager.default.fileExists(atPath: data + "/gateway.sqlite"))
        #expect(FileManager.default.fileExists(atPath: data + "/softhsm2.conf"))
        try? FileManager.default.removeItem(atPath: root)
    }

    @Test func sigtermDrainsRequestsInFlight() async throws {
        let root = try makeTemporaryDirectory("drain")
        let server = try await DevServer.start(dataDirectory: root + "/data", log: root + "/server.log")
        let token = try String(contentsOfFile: root + "/data/admin.token", encoding: .utf8)
        let client = try server.client(token: token, poolSize: 2)
        _ = try await client.createTenant("acme")

        // Each outcome with when it arrived; SIGTERM goes out as soon as the first answer is in,
        // while most of the 400 requests are still in flight or queued.
        let started = ContinuousClock.now
        let (outcomes, signalledAt) = try await withThrowingTaskGroup(
            of: (Result<String, GatewayError>, Duration).self
        ) { group in
            for index in 0..<400 {
                group.addTask {
                    do {
                        let key = try await client.generateDataKey(tenant: "acme", context: ["i": "\(index)"])
                        return (.success("\(index) \(key.id)"), ContinuousClock.now - started)
                    } catch let error as GatewayError {
                        return (.failure(error), ContinuousClock.now - started)
                    }
                }
            }
            var outcomes: [(Result<String, GatewayError>, Duration)] = []
            var signalledAt: Duration?
            for try await outcome in group {
                outcomes.append(outcome)
                if signalledAt == nil {
                    server.process.send(SIGTERM)
                    signalledAt = ContinuousClock.now - started
                }
            }
            return (outcomes, signalledAt ?? .zero)
        }
        await client.shutdown()
        #expect(await server.process.wait(timeout: .seconds(60)) == 0)

        let answered = outcomes.compactMap { try? $0.0.get() }
        let refused = outcomes.compactMap { outcome -> GatewayError? in
            if case .failure(let error) = outcome.0 { return error }
            return nil
        }
        #expect(answered.count + refused.count == 400)
        // Requests already received when SIGTERM arrived were answered, not dropped.
        let answeredAfterSignal = outcomes.filter { (try? $0.0.get()) != nil && $0.1 > signalledAt }
        #expect(answeredAfterSignal.count > 0, "answered \(answered.count), refused \(refused.count)")
        // Every request is answered OK or UNAVAILABLE; none wrongly.
        #expect(refused.allSatisfy { $0.code == .unavailable }, "\(Set(refused.map(\.description)))")

        // Nothing acknowledged is lost: every key answered OK decrypts after a restart.
        let restarted = try await DevServer.start(dataDirectory: root + "/data", log: root + "/restart.log")
        let check = try restarted.client(token: token, poolSize: 1)
        for entry in answered {
            let parts = entry.split(separator: " ")
            _ = try await check.decryptDataKey(tenant: "acme", id: String(parts[1]), context: ["i": String(parts[0])])
        }
        await check.shutdown()
        #expect(await restarted.terminate() == 0)
        try? FileManager.default.removeItem(atPath: root)
    }

    @Test func configurationErrorsExitWith78() throws {
        let missing = try ChildProcess.run(PackagePaths.gatewayBinary, ["--config", "/nonexistent/gateway.yaml"])
        #expect(missing.status == 78)
        #expect(missing.error.contains("cannot read configuration file /nonexistent/gateway.yaml"))
        let dir = try makeTemporaryDirectory("badflag")
        let bad = try ChildProcess.run(
            PackagePaths.gatewayBinary,
            [
                "--hsm-module", "/x.so", "--token-label", "t", "--pin-env", "P", "--sqlite-path", dir + "/s.db",
                "--listen", "0.0.0.0:7700",
            ]
        )
        #expect(bad.status == 78)
        #expect(bad.error.contains("not a loopback address"))
        let usage = try ChildProcess.run(PackagePaths.gatewayBinary, ["--dev", "--config", "x.yaml"])
        #expect(usage.status == 64)
    }
}
