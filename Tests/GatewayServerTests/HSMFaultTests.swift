import Foundation
import GatewayClient
import GatewayServer
import GatewayWire
import ProcessTestSupport
import SoftHSMTestSupport
import Testing

/// A gateway whose HSM goes away under load and comes back: while it is gone, calls fail with
/// UNAVAILABLE (never DATA_LOSS: a key is only missing when a token that holds the gateway's
/// other objects says so), `/readyz` names the HSM; when it is back, service resumes without a
/// restart, and every acknowledged key still decrypts. Times are printed, not asserted.
@Suite("HSM faults under load", .serialized)
struct HSMFaultTests {
    /// `hsm-gateway --dev` as a child process (it owns its PKCS#11 module, as in production), with
    /// health and metrics on a port of its own.
    struct DevGateway {
        let process: SpawnedProcess
        let port: Int
        let metricsPort: Int
        let data: String

        static func start(_ name: String) async throws -> DevGateway {
            let root = try makeTemporaryDirectory(name)
            let metricsPort = try freeLoopbackPort()
            let process = try SpawnedProcess(
                PackagePaths.gatewayBinary,
                [
                    "--dev", "--data-dir", root + "/data", "--listen", "127.0.0.1:0", "--metrics-listen",
                    "127.0.0.1:\(metricsPort)",
                ],
                outputPath: root + "/gateway.log"
            )
            let port = try await process.servingPort(SpawnedProcess.devServingLine, name: "hsm-gateway --dev")
            return DevGateway(process: process, port: port, metricsPort: metricsPort, data: root + "/data")
        }

        func client() throws -> GatewayClient {
            let token = try String(contentsOfFile: data + "/admin.token", encoding: .utf8)
                .trimmingCharacters(in: .whitespacesAndNewlines)
            var configuration = GatewayClientConfiguration(
                target: .host("127.0.0.1", port: port), transportSecurity: .plaintext, apiToken: APIToken(token),
                poolSize: 2)
            configuration.retryPolicy = .none
            return try GatewayClient(configuration: configuration)
        }

        /// The dev token's directory (one token under `data/tokens`).
        func tokenDirectory() throws -> String {
            let tokens = data + "/tokens"
            let entries = try FileManager.default.contentsOfDirectory(atPath: tokens).filter { !$0.hasPrefix(".") }
            guard entries.count == 1 else { throw TestSetupError("expected one token in \(tokens): \(entries)") }
            return tokens + "/" + entries[0]
        }
    }

    /// A port nobody listens on now.
    static func freeLoopbackPort() throws -> Int {
        let socketDescriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(socketDescriptor) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(socketDescriptor, $0, length) == 0 && getsockname(socketDescriptor, $0, &length) == 0
            }
        }
        guard bound else { throw TestSetupError("no free port: errno \(errno)") }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    @Test("the token's directory moved away for 5 s and back: UNAVAILABLE, not DATA_LOSS; it resumes by itself")
    func tokenDirectoryMovedAway() async throws {
        let gateway = try await DevGateway.start("hsm-moved")
        defer { gateway.process.send(SIGKILL) }
        let admin = try gateway.client()
        defer { Task { await admin.shutdown() } }
        _ = try await admin.createTenant("acme")
        let directory = try gateway.tokenDirectory()
        let timeline = PostgresFaultTests.Timeline()
        let stop = PostgresFaultTests.Flag()
        let load = Task {
            await PostgresFaultTests.load(admin, tenant: "acme", deadline: .seconds(8), timeline: timeline, stop: stop)
        }
        try await Task.sleep(for: .seconds(2))
        let faultAt = ContinuousClock.now
        // Out of the token directory: SoftHSM2 takes every directory in it for a token.
        let away = gateway.data + "/token-moved-away"
        try FileManager.default.moveItem(atPath: directory, toPath: away)
        var ready = try await HTTPProbe.get("127.0.0.1", gateway.metricsPort, "/readyz")
        var notReadyAfter: Duration?
        // ServerInfo's token_reachable and the metric say it too.
        var serverInfoAfter: Duration?
        var metricAfter: Duration?
        while ContinuousClock.now - faultAt < .seconds(5) {
            let now = ContinuousClock.now - faultAt
            if notReadyAfter == nil, ready.status == 503 { notReadyAfter = now }
            if serverInfoAfter == nil, let info = try? await admin.serverInfo(), !info.tokenReachable {
                serverInfoAfter = now
            }
            let metrics = try await HTTPProbe.get("127.0.0.1", gateway.metricsPort, "/metrics").body
            let reachable = metrics.split(separator: "\n").first { $0.hasPrefix("hsmgw_hsm_token_reachable ") }
                .flatMap { Double($0.split(separator: " ").last ?? "") }
            if metricAfter == nil, reachable == 0 {
                metricAfter = now
            }
            try await Task.sleep(for: .milliseconds(200))
            ready = try await HTTPProbe.get("127.0.0.1", gateway.metricsPort, "/readyz")
        }
        let healAt = ContinuousClock.now
        try FileManager.default.moveItem(atPath: away, toPath: directory)
        var readyAgainAfter: Duration?
        while ContinuousClock.now - healAt < .seconds(30) {
            ready = try await HTTPProbe.get("127.0.0.1", gateway.metricsPort, "/readyz")
            if ready.status == 200 {
                readyAgainAfter = ContinuousClock.now - healAt
                break
            }
            try await Task.sleep(for: .milliseconds(200))
        }
        try await Task.sleep(for: .seconds(3))
        stop.set()
        await load.value

        let (firstError, codes) = timeline.failures(since: faultAt)
        let recovered = timeline.events.first { $0.ok && $0.at > healAt }
        let lost = await timeline.lostKeys(admin, tenant: "acme")
        print(
            "HSM token directory moved away for 5 s: first error \(firstError.map { "\($0.at - faultAt)" } ?? "none") "
                + "(\(firstError?.code ?? "-")), errors \(codes), /readyz 503 after \(notReadyAfter.map { "\($0)" } ?? "never"), "
                + "ServerInfo token_reachable=false after \(serverInfoAfter.map { "\($0)" } ?? "never"), metric 0 after "
                + "\(metricAfter.map { "\($0)" } ?? "never"), "
                + "ready again \(readyAgainAfter.map { "\($0)" } ?? "never") after it came back, first success "
                + "\(recovered.map { "\($0.at - healAt)" } ?? "never") after, acknowledged \(timeline.keys.count), lost \(lost)"
        )
        #expect(lost == 0)
        #expect(codes["\(StatusCode.dataLoss)"] == nil, "\(codes)")
        #expect(codes["\(StatusCode.internalError)"] == nil, "\(codes)")
        #expect(notReadyAfter != nil, "/readyz never said the HSM was gone")
        #expect(serverInfoAfter != nil, "ServerInfo never said the token was unreachable")
        #expect(metricAfter != nil, "hsmgw_hsm_token_reachable never went to 0")
        #expect(readyAgainAfter != nil, "/readyz never recovered")
        #expect(recovered != nil, "service never resumed")
        #expect(try await admin.verifyAuditLog().intact)
        #expect(await gateway.terminate() == 0)
    }
}

extension HSMFaultTests.DevGateway {
    /// SIGTERM, then the exit status.
    func terminate() async -> Int32? {
        process.send(SIGTERM)
        return await process.wait(timeout: .seconds(60))
    }
}
