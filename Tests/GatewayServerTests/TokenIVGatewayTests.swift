import Foundation
import GatewayClient
import PKCS11
import ProcessTestSupport
import SoftHSMTestSupport
import Testing

@testable import GatewayServer

// The gateway on an HSM in FIPS mode that generates AES-GCM IVs itself: the fault module
// emulates it (`model gcm_iv=writeback`, AWS CloudHSM's documented behaviour). Nested in the
// suite that owns this process's fault module, so its rules never meet another test's.
extension HSMLoginRefusedTests {
    @Test("hsm.gcm_iv: gateway on an HSM that generates IVs: exit 69 naming the fix, hsm.gcm_iv: token")
    func gatewayIVsRefusedAtStart() throws {
        let fixture = try SoftHSMFixture.shared()
        let fault = try FaultInjectingModule.shared()
        let token = try fixture.makeToken("gcm-iv-refused")
        let directory = try makeTemporaryDirectory("gcm-iv-refused")
        try "model gcm_iv=writeback\n".write(toFile: directory + "/control", atomically: true, encoding: .utf8)
        let result = try ChildProcess.run(
            PackagePaths.gatewayBinary,
            [
                "--hsm-module", fault.libraryPath, "--token-label", token.label, "--pin-env", "HSMGW_TEST_PIN",
                "--sqlite-path", directory + "/keys.db", "--listen", "127.0.0.1:0", "--metrics-listen", "off",
            ],
            environment: fault.environment(control: directory + "/control", trace: directory + "/trace").merging(
                ["HSMGW_TEST_PIN": token.userPIN], uniquingKeysWith: { $1 }),
            timeout: .seconds(60)
        )
        #expect(result.status == 69, "\(result)")
        #expect(result.error.contains("CKR_MECHANISM_PARAM_INVALID"), "\(result.error)")
        #expect(result.error.contains("set hsm.gcm_iv: token"), "\(result.error)")
        #expect(!result.error.contains(token.userPIN))
    }

    @Test("a token that does not list CKM_AES_GCM: exit 69 naming it and docs/hsm/README.md, nothing made on it")
    func tokenWithoutGCMRefusedAtStart() throws {
        let fixture = try SoftHSMFixture.shared()
        let fault = try FaultInjectingModule.shared()
        let token = try fixture.makeToken("gcm-hidden")
        let directory = try makeTemporaryDirectory("gcm-hidden")
        try "model hide_mechanism=CKM_AES_GCM\n".write(
            toFile: directory + "/control", atomically: true, encoding: .utf8)
        let trace = directory + "/trace"
        let result = try ChildProcess.run(
            PackagePaths.gatewayBinary,
            [
                "--hsm-module", fault.libraryPath, "--token-label", token.label, "--pin-env", "HSMGW_TEST_PIN",
                "--sqlite-path", directory + "/keys.db", "--listen", "127.0.0.1:0", "--metrics-listen", "off",
            ],
            environment: fault.environment(control: directory + "/control", trace: trace).merging(
                ["HSMGW_TEST_PIN": token.userPIN], uniquingKeysWith: { $1 }),
            timeout: .seconds(60)
        )
        #expect(result.status == 69, "\(result)")
        #expect(result.error.contains("does not list CKM_AES_GCM"), "\(result.error)")
        #expect(result.error.contains("docs/hsm/README.md"), "\(result.error)")
        // Refused before the probe key (or anything else) was generated on the token.
        #expect(FaultInjectingModule.calls(of: "C_GenerateKey", tracePath: trace).isEmpty)
    }

    @Test("hsm.gcm_iv: token on a module that takes caller IVs (SoftHSM2): exit 69 naming hsm.gcm_iv: gateway")
    func tokenIVsRefusedOnSoftHSM() throws {
        let fixture = try SoftHSMFixture.shared()
        let token = try fixture.makeToken("gcm-iv-softhsm")
        let directory = try makeTemporaryDirectory("gcm-iv-softhsm")
        let result = try ChildProcess.run(
            PackagePaths.gatewayBinary,
            [
                "--hsm-module", SoftHSMFixture.modulePath, "--token-label", token.label, "--pin-env", "HSMGW_TEST_PIN",
                "--sqlite-path", directory + "/keys.db", "--listen", "127.0.0.1:0", "--metrics-listen", "off",
            ],
            environment: ["HSMGW_TEST_PIN": token.userPIN, "HSMGW_HSM_GCM_IV": "token"],
            timeout: .seconds(60)
        )
        #expect(result.status == 69, "\(result)")
        #expect(result.error.contains("ivNotGenerated"), "\(result.error)")
        #expect(result.error.contains("set hsm.gcm_iv: gateway"), "\(result.error)")
    }

    @Test("hsm.gcm_iv: token end to end: data keys generated, decrypted and rewrapped with IVs from the module")
    func tokenIVsEndToEnd() async throws {
        let fixture = try SoftHSMFixture.shared()
        let fault = try FaultInjectingModule.shared()
        try fault.setRules("model gcm_iv=writeback")
        defer { try? fault.clearRules() }
        let token = try fixture.makeToken("gcm-iv-token")
        let useTokenIVs: (inout GatewayConfiguration) -> Void = {
            $0.hsm.tokenLabel = token.label
            $0.hsm.pin = .file(token.pinFile)
            $0.hsm.gcmIV = .token
        }
        try await withGateway(
            .sqlite, "gcm-iv-token", security: .plaintext, module: fault.module, configure: useTokenIVs
        ) { gateway in
            let admin = try gateway.client(token: gateway.adminToken)
            defer { Task { await admin.shutdown() } }
            _ = try await admin.createTenant("fips")
            var keys: [DataKey] = []
            for index in 0..<10 {
                keys.append(try await admin.generateDataKey(tenant: "fips", context: ["n": "\(index)"]))
            }
            // The IV sits at bytes 23..<35 of a wrapped key (docs/key-hierarchy.md): one per key.
            let ivs = Set(keys.map { Array($0.wrapped[23..<35]) })
            #expect(ivs.count == keys.count)
            #expect(!ivs.contains([UInt8](repeating: 0, count: 12)))
            _ = try await admin.rotateMasterKey(tenant: "fips")
            for (index, key) in keys.enumerated() {
                let opened = try await admin.decryptDataKey(tenant: "fips", id: key.id, context: ["n": "\(index)"])
                let expected = try #require(key.plaintext?.copyBytes())
                #expect(opened.plaintext?.constantTimeEquals(expected) == true)
                let rewrapped = try await admin.rewrapDataKey(tenant: "fips", id: key.id, context: ["n": "\(index)"])
                #expect(rewrapped.masterKeyVersion == 2)
                let again = try await admin.decryptDataKey(tenant: "fips", id: key.id, context: ["n": "\(index)"])
                #expect(again.plaintext?.constantTimeEquals(expected) == true)
            }
        }
    }

    @Test("hsm-gateway as its own process with hsm.gcm_iv: token on the FIPS-mode emulation: generate, decrypt, rewrap")
    func tokenIVsGatewayProcess() async throws {
        let fixture = try SoftHSMFixture.shared()
        let fault = try FaultInjectingModule.shared()
        let token = try fixture.makeToken("gcm-iv-process")
        let directory = try makeTemporaryDirectory("gcm-iv-process")
        try "model gcm_iv=writeback\n".write(toFile: directory + "/control", atomically: true, encoding: .utf8)
        let trace = directory + "/trace"
        let process = try SpawnedProcess(
            PackagePaths.gatewayBinary,
            [
                "--hsm-module", fault.libraryPath, "--token-label", token.label, "--pin-env", "HSMGW_TEST_PIN",
                "--sqlite-path", directory + "/keys.db", "--listen", "127.0.0.1:0", "--metrics-listen", "off",
                "--set", "auth.bootstrap_token_file=\(directory)/admin.token",
            ],
            environment: fault.environment(control: directory + "/control", trace: trace).merging(
                ["HSMGW_TEST_PIN": token.userPIN, "HSMGW_HSM_GCM_IV": "token"], uniquingKeysWith: { $1 }),
            outputPath: directory + "/gateway.log"
        )
        defer { process.send(SIGKILL) }
        let port = try await process.servingPort()
        let adminToken = try String(contentsOfFile: directory + "/admin.token", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        var configuration = GatewayClientConfiguration(
            target: .host("127.0.0.1", port: port), transportSecurity: .plaintext, apiToken: APIToken(adminToken),
            poolSize: 1)
        configuration.retryPolicy = .none
        let admin = try GatewayClient(configuration: configuration, logger: quietLogger)
        defer { Task { await admin.shutdown() } }
        _ = try await admin.createTenant("fips")
        var keys: [DataKey] = []
        for _ in 0..<5 { keys.append(try await admin.generateDataKey(tenant: "fips")) }
        #expect(Set(keys.map { Array($0.wrapped[23..<35]) }).count == keys.count)
        _ = try await admin.rotateMasterKey(tenant: "fips")
        for key in keys {
            let expected = try #require(key.plaintext?.copyBytes())
            #expect(
                try await admin.decryptDataKey(tenant: "fips", id: key.id).plaintext?.constantTimeEquals(expected)
                    == true)
            #expect(try await admin.rewrapDataKey(tenant: "fips", id: key.id).masterKeyVersion == 2)
            #expect(
                try await admin.decryptDataKey(tenant: "fips", id: key.id).plaintext?.constantTimeEquals(expected)
                    == true)
        }
        // Every encryption the gateway asked for was in the module's own form: none was refused.
        let inits = FaultInjectingModule.calls(of: "C_EncryptInit", tracePath: trace)
        #expect(inits.count >= 10)
        #expect(inits.allSatisfy { $0.returnValue == .ok }, "\(inits)")
    }
}
