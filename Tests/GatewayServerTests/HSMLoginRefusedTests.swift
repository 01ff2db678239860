import Foundation
import GatewayClient
import GatewayWire
import PKCS11
import ProcessTestSupport
import SoftHSMTestSupport
import Testing

@testable import GatewayServer

/// A PIN the HSM refuses stops every login of a running gateway until an operator acts. The
/// gateway runs on the tests' fault-injecting module (forwarding to SoftHSM2), whose trace
/// counts every real `C_Login`.
@Suite("Through the fault-injecting module: a refused PIN, HSM faults under load", .serialized)
struct HSMLoginRefusedTests {
    @Test("PIN changed under a running gateway: one failed C_Login, /readyz 503 naming the login, UNAVAILABLE, metric")
    func pinChangedUnderRunningGateway() async throws {
        let fixture = try SoftHSMFixture.shared()
        let fault = try FaultInjectingModule.shared()
        try fault.clearRules()
        let token = try fixture.makeToken("login-refused")
        let useToken: (inout GatewayConfiguration) -> Void = {
            $0.hsm.tokenLabel = token.label
            $0.hsm.pin = .file(token.pinFile)
        }
        try await withGateway(
            .sqlite, "login-refused", security: .plaintext, module: fault.module, configure: useToken
        ) { gateway in
            let metricsPort = try #require(gateway.metricsPort)
            let admin = try gateway.client(token: gateway.adminToken)
            defer { Task { await admin.shutdown() } }
            _ = try await admin.createTenant("acme")
            let before = try await admin.generateDataKey(tenant: "acme")

            // The PIN changes on the token (a second session: SoftHSM2 would not see a change made
            // by another process), and the gateway's sessions, and so its login, are lost.
            let newPIN = "new-pin-\(UInt32.random(in: 0...UInt32.max))"
            try fixture.module.withSession(slot: token.slot) { session in
                try session.login(.user, pin: token.pin)
                try session.setPIN(old: token.pin, new: SecretBytes(utf8: newPIN))
            }
            try fixture.module.closeAllSessions(slot: token.slot)
            let mark = fault.traceMark()

            await expectStatus(.unavailable) { try await admin.generateDataKey(tenant: "acme") }
            var ready = try await HTTPProbe.get("127.0.0.1", metricsPort, "/readyz")
            for _ in 0..<40 where ready.status == 200 {
                try await Task.sleep(for: .milliseconds(250))
                ready = try await HTTPProbe.get("127.0.0.1", metricsPort, "/readyz")
            }
            #expect(ready.status == 503)
            #expect(ready.body.contains(#""hsm":{"ready":false"#), "\(ready.body)")
            #expect(ready.body.contains("refused the login PIN"), "\(ready.body)")
            #expect(!ready.body.contains(token.userPIN) && !ready.body.contains(newPIN))
            #expect(try await metric(metricsPort, "hsmgw_hsm_login_refused", expecting: 1) == 1)

            // Ordinary traffic goes on failing fast, and never tries the PIN again.
            for _ in 0..<20 {
                await expectStatus(.unavailable) { try await admin.decryptDataKey(tenant: "acme", id: before.id) }
            }
            let logins = fault.calls(of: "C_Login", since: mark)
            #expect(logins == [.init(returnValue: .pinIncorrect, injected: false)], "\(logins)")

            // The operator supplies the new PIN (what unsealing will do): service resumes.
            try await gateway.app.pool.resumeLogin(pin: SecretBytes(utf8: newPIN))
            let after = try await admin.decryptDataKey(tenant: "acme", id: before.id)
            let expected = try #require(before.plaintext?.copyBytes())
            #expect(after.plaintext?.constantTimeEquals(expected) == true)
            var recovered = ready
            for _ in 0..<40 where recovered.status != 200 {
                try await Task.sleep(for: .milliseconds(250))
                recovered = try await HTTPProbe.get("127.0.0.1", metricsPort, "/readyz")
            }
            #expect(recovered.status == 200, "\(recovered.body)")
            #expect(try await metric(metricsPort, "hsmgw_hsm_login_refused", expecting: 0) == 0)
        }
    }

    @Test("hsm-gateway started with a wrong PIN: exactly one C_Login, exit 77, no PIN in the output")
    func wrongPINAtStartExits77() throws {
        let fixture = try SoftHSMFixture.shared()
        let fault = try FaultInjectingModule.shared()
        let token = try fixture.makeToken("login-start")
        let directory = try makeTemporaryDirectory("login-start")
        let trace = directory + "/trace"
        let wrong = "wrong-pin-\(UInt32.random(in: 0...UInt32.max))"
        let result = try ChildProcess.run(
            PackagePaths.gatewayBinary,
            [
                "--hsm-module", fault.libraryPath, "--token-label", token.label, "--pin-env", "HSMGW_TEST_PIN",
                "--sqlite-path", directory + "/keys.db", "--listen", "127.0.0.1:0", "--metrics-listen", "off",
            ],
            // SOFTHSM2_CONF is inherited: the child sees this process's tokens.
            environment: fault.environment(control: directory + "/control", trace: trace).merging(
                ["HSMGW_TEST_PIN": wrong], uniquingKeysWith: { $1 })
        )
        #expect(result.status == 77, "\(result)")
        #expect(result.error.contains("refused the user PIN"), "\(result)")
        #expect(!result.output.contains(wrong) && !result.error.contains(wrong))
        #expect(
            FaultInjectingModule.calls(of: "C_Login", tracePath: trace)
                == [.init(returnValue: .pinIncorrect, injected: false)])
    }

    /// The value of an unlabelled gauge on `/metrics`; polls until it is `expected` (the sampler
    /// runs every second) or five seconds pass, then returns what it saw last.
    func metric(_ port: Int, _ name: String, expecting expected: Double) async throws -> Double? {
        var value: Double?
        for _ in 0..<20 {
            let body = try await HTTPProbe.get("127.0.0.1", port, "/metrics").body
            value = body.split(separator: "\n").first { $0.hasPrefix(name + " ") }
                .flatMap { Double($0.split(separator: " ").last ?? "") }
            if value == expected { return value }
            try await Task.sleep(for: .milliseconds(250))
        }
        return value
    }

    /// The fault-injecting module switched to a fault for 3 s under load (16 callers, 2 s
    /// deadline), then back: errors are UNAVAILABLE (or DEADLINE_EXCEEDED for a hung HSM), never
    /// DATA_LOSS or INTERNAL; service resumes by itself; every acknowledged key decrypts.
    @Test(
        "HSM faults under load, then recovery",
        arguments: [
            "* rv=CKR_DEVICE_ERROR", "* rv=CKR_TOKEN_NOT_PRESENT", "C_Encrypt rv=CKR_SESSION_HANDLE_INVALID",
            "C_Encrypt delay_ms=3000",
        ])
    func faultUnderLoad(rule: String) async throws {
        let fixture = try SoftHSMFixture.shared()
        let fault = try FaultInjectingModule.shared()
        try fault.clearRules()
        defer { try? fault.clearRules() }
        let token = try fixture.makeToken("hsm-fault")
        let useToken: (inout GatewayConfiguration) -> Void = {
            $0.hsm.tokenLabel = token.label
            $0.hsm.pin = .file(token.pinFile)
        }
        try await withGateway(
            .sqlite, "hsm-fault", security: .plaintext, module: fault.module, configure: useToken
        ) { gateway in
            let admin = try gateway.client(token: gateway.adminToken)
            defer { Task { await admin.shutdown() } }
            _ = try await admin.createTenant("acme")
            let timeline = PostgresFaultTests.Timeline()
            let stop = PostgresFaultTests.Flag()
            let load = Task {
                await PostgresFaultTests.load(
                    admin, tenant: "acme", deadline: .seconds(2), timeline: timeline, stop: stop)
            }
            try await Task.sleep(for: .seconds(1))
            let faultAt = ContinuousClock.now
            try fault.setRules(rule)
            try await Task.sleep(for: .seconds(3))
            let healAt = ContinuousClock.now
            try fault.clearRules()
            var recovered: ContinuousClock.Instant?
            while ContinuousClock.now - healAt < .seconds(30) {
                if let first = timeline.events.first(where: { $0.ok && $0.at > healAt }) {
                    recovered = first.at
                    break
                }
                try await Task.sleep(for: .milliseconds(50))
            }
            try await Task.sleep(for: .seconds(1))
            stop.set()
            await load.value

            let (firstError, codes) = timeline.failures(since: faultAt)
            let lost = await timeline.lostKeys(admin, tenant: "acme")
            print(
                "HSM fault \(rule) for 3 s: first error \(firstError.map { "\($0.at - faultAt)" } ?? "none") "
                    + "(\(firstError?.code ?? "-")), errors \(codes), first success "
                    + "\(recovered.map { "\($0 - healAt)" } ?? "never") after it ended, "
                    + "acknowledged \(timeline.keys.count), lost \(lost)")
            #expect(lost == 0)
            #expect(firstError != nil, "the fault was never seen")
            #expect(codes["\(StatusCode.dataLoss)"] == nil, "\(codes)")
            #expect(codes["\(StatusCode.internalError)"] == nil, "\(codes)")
            #expect(recovered != nil, "service never resumed")
            #expect(try await admin.verifyAuditLog().intact)
        }
    }
}
