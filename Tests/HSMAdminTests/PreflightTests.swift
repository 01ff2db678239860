import Foundation
import GatewayConfig
import HSMAdmin
import PKCS11
import SoftHSMTestSupport
import Testing

/// `hsm-admin preflight` on real SoftHSM2 tokens, in-process and as the built executable.
@Suite("hsm-admin preflight", .serialized)
struct PreflightTests {
    let fixture: SoftHSMFixture
    let good: TestToken
    let weak: TestToken

    init() throws {
        fixture = try SoftHSMFixture.shared()
        good = try fixture.makeToken("preflight-good")
        weak = try fixture.makeToken("preflight-weak")
        try fixture.module.withSession(slot: good.slot) { session in
            try session.login(.user, pin: good.pin)
            if try session.findMasterKeys().isEmpty {
                _ = try session.generateMasterKey(label: MasterKeyPolicy.labelPrefix + "tenant-a:v1", id: [1])
                _ = try session.generateMasterKey(label: MasterKeyPolicy.labelPrefix + "tenant-b:v1", id: [2])
            }
        }
        try fixture.module.withSession(slot: weak.slot) { session in
            try session.login(.user, pin: weak.pin)
            if try session.findMasterKeys().isEmpty {
                _ = try session.generateMasterKey(label: MasterKeyPolicy.labelPrefix + "tenant-a:v1", id: [1])
                var template = MasterKeyPolicy.template(label: MasterKeyPolicy.labelPrefix + "tenant-x:v1", id: [0xEE])
                template.removeAll { if case .extractable = $0 { true } else { false } }
                _ = try session.generateKey(.aesKeyGen, template: template + [.extractable(true)])
            }
        }
    }

    func settings(_ token: TestToken) -> HSMSettings {
        HSMSettings(modulePath: SoftHSMFixture.modulePath, tokenLabel: token.label, pin: .file(token.pinFile))
    }

    @Test("a good token passes every check, lists its master keys and times AES-GCM")
    func goodToken() throws {
        let report = Preflight(options: .init(settings: settings(good), rounds: 200)).run()
        #expect(report.passed, "\(report.text)")
        #expect(report.token?.label == good.label)
        #expect(report.module?.entryPoint == "C_GetFunctionList")
        #expect(report.masterKeys.count == 2)
        #expect(report.masterKeys.allSatisfy { $0.compliant })
        let names = report.checks.map(\.name)
        for name in [
            "load module", "find token", "log in", "mechanism CKM_AES_KEY_GEN", "mechanism CKM_AES_GCM", "random",
            "key wrap with padding", "master keys", "AES-GCM round trip",
        ] {
            #expect(report.checks.contains { $0.name == name && $0.status == .pass }, "\(name) in \(names)")
        }
        let timing = try #require(report.roundTrip)
        #expect(timing.rounds == 200)
        #expect(timing.encryptOperationsPerSecond > 0)
        #expect(timing.decryptOperationsPerSecond > 0)
        // Preflight leaves no objects behind on the token.
        let objects = try fixture.module.withSession(slot: good.slot) { session in
            try session.login(.user, pin: good.pin)
            return try session.findObjects([]).count
        }
        #expect(objects == 2)
    }

    @Test("a token with an extractable master key fails, naming the key and the violation")
    func weakToken() {
        let report = Preflight(options: .init(settings: settings(weak), rounds: 10)).run()
        #expect(!report.passed)
        let failed = report.checks.filter { $0.status == .fail }
        #expect(failed.count == 1)
        #expect(failed.first?.name == "master key \"\(MasterKeyPolicy.labelPrefix)tenant-x:v1\"")
        #expect(failed.first?.detail.contains("CKA_EXTRACTABLE is true") == true)
        let weakKey = report.masterKeys.first { $0.id == "ee" }
        #expect(weakKey?.compliant == false)
        #expect(weakKey?.violations.contains("extractable") == true)
        #expect(report.text.contains("preflight FAILED"))
    }

    @Test("a wrong PIN, a wrong label, a missing module and an open PIN file each fail clearly")
    func setupFailures() throws {
        let wrongPINFile = fixture.directory + "/wrong.pin"
        _ = FileManager.default.createFile(
            atPath: wrongPINFile, contents: Data("wrong-pin-7f3a9c".utf8), attributes: [.posixPermissions: 0o600])
        var settings = settings(good)
        settings.pin = .file(wrongPINFile)
        var report = Preflight(options: .init(settings: settings, rounds: 0)).run()
        #expect(!report.passed)
        #expect(report.checks.last?.name == "log in")
        #expect(report.checks.last?.detail.contains("CKR_PIN_INCORRECT") == true)
        #expect(report.text.contains("wrong-pin-7f3a9c") == false)

        settings = self.settings(good)
        settings.tokenLabel = "no-such-token"
        report = Preflight(options: .init(settings: settings, rounds: 0)).run()
        #expect(report.checks.last?.name == "find token")
        #expect(report.checks.last?.status == .fail)

        settings = self.settings(good)
        settings.modulePath = "/nonexistent/module.so"
        report = Preflight(options: .init(settings: settings, rounds: 0)).run()
        #expect(report.checks.map(\.name) == ["load module"])
        #expect(report.checks.first?.detail.contains("moduleNotFound") == true)

        let openPINFile = fixture.directory + "/open.pin"
        _ = FileManager.default.createFile(
            atPath: openPINFile, contents: Data(good.userPIN.utf8), attributes: [.posixPermissions: 0o644])
        settings = self.settings(good)
        settings.pin = .file(openPINFile)
        report = Preflight(options: .init(settings: settings, rounds: 0)).run()
        #expect(report.checks.last?.name == "read PIN")
        #expect(report.checks.last?.detail.contains("chmod 600") == true)
        #expect(report.text.contains(good.userPIN) == false)
    }

    // MARK: The executable

    /// Runs the built `hsm-admin` with `arguments`; returns exit status, stdout and stderr.
    func runAdmin(_ arguments: [String], environment extra: [String: String] = [:]) throws -> (
        status: Int32, output: String, error: String
    ) {
        try Self.runAdmin(arguments, fixture: fixture, environment: extra)
    }

    /// Runs the built `hsm-admin` with `arguments` on `fixture`'s tokens.
    static func runAdmin(_ arguments: [String], fixture: SoftHSMFixture, environment extra: [String: String] = [:])
        throws -> (status: Int32, output: String, error: String)
    {
        let executable = buildDirectory.appendingPathComponent("hsm-admin")
        try #require(
            FileManager.default.isExecutableFile(atPath: executable.path),
            "build hsm-admin first (make test does)"
        )
        let process = Process()
        process.executableURL = executable
        process.arguments = arguments
        var environment = ProcessInfo.processInfo.environment
        environment["SOFTHSM2_CONF"] = fixture.configPath
        environment.merge(extra) { $1 }
        process.environment = environment
        let output = Pipe()
        let error = Pipe()
        process.standardOutput = output
        process.standardError = error
        try process.run()
        let outputData = output.fileHandleForReading.readDataToEndOfFile()
        let errorData = error.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (
            process.terminationStatus, String(decoding: outputData, as: UTF8.self),
            String(decoding: errorData, as: UTF8.self)
        )
    }

    /// The directory of the test binary, where SwiftPM also puts the executables.
    static let buildDirectory: URL = {
        let executable = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? ""
        return URL(fileURLWithPath: executable).deletingLastPathComponent()
    }()

    @Test("hsm-admin preflight exits 0 on the good token and 1 on the weak one")
    func executableExitCodes() throws {
        let passing = try runAdmin([
            "preflight", "--module", SoftHSMFixture.modulePath, "--token", good.label, "--pin-file", good.pinFile,
            "--rounds", "50",
        ])
        #expect(passing.status == 0, "\(passing.output)\(passing.error)")
        #expect(passing.output.contains("preflight passed"))
        #expect(passing.output.contains("PASS  AES-GCM round trip"))

        let failing = try runAdmin([
            "preflight", "--module", SoftHSMFixture.modulePath, "--token", weak.label, "--pin-file", weak.pinFile,
            "--rounds", "0",
        ])
        #expect(failing.status == 1)
        #expect(failing.output.contains("FAIL  master key \"\(MasterKeyPolicy.labelPrefix)tenant-x:v1\""))
        #expect(failing.output.contains("CKA_EXTRACTABLE is true"))
        #expect(failing.output.contains(weak.userPIN) == false)
    }

    @Test("--json prints a machine-readable report")
    func executableJSON() throws {
        let result = try runAdmin(
            [
                "preflight", "--json", "--module", SoftHSMFixture.modulePath, "--token", weak.label, "--pin-env",
                "HSMGW_PIN", "--rounds", "0",
            ], environment: ["HSMGW_PIN": weak.userPIN])
        #expect(result.status == 1)
        let report = try JSONDecoder().decode(PreflightReport.self, from: Data(result.output.utf8))
        #expect(report.passed == false)
        #expect(report.token?.label == weak.label)
        let object = try JSONSerialization.jsonObject(with: Data(result.output.utf8)) as? [String: Any]
        #expect(object?["passed"] as? Bool == false)
    }

    @Test("--config reads the hsm section, including softhsm2_conf")
    func executableConfig() throws {
        let config = fixture.directory + "/gateway-\(good.label).yaml"
        try """
        hsm:
          module: \(SoftHSMFixture.modulePath)
          token_label: \(good.label)
          pin:
            file: \(good.pinFile)
          softhsm2_conf: \(fixture.configPath)
        """.write(toFile: config, atomically: true, encoding: .utf8)
        let result = try runAdmin(
            ["preflight", "--config", config, "--rounds", "10"],
            environment: ["SOFTHSM2_CONF": "/nonexistent/softhsm2.conf"]
        )
        #expect(result.status == 0, "\(result.output)\(result.error)")
    }

    @Test("bad usage exits 64 with a message")
    func executableUsage() throws {
        let missing = try runAdmin(["preflight", "--module", SoftHSMFixture.modulePath])
        #expect(missing.status == 64)
        #expect(missing.error.contains("--config"))
        let badConfig = try runAdmin(["preflight", "--config", "/nonexistent/gateway.yaml"])
        #expect(badConfig.status == 64)
        #expect(badConfig.error.contains("cannot open configuration file"))
        let rounds = try runAdmin([
            "preflight", "--module", "m", "--token", "t", "--pin-file", "p", "--rounds", "1000001",
        ])
        #expect(rounds.status == 64)
    }
}
