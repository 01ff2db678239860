import Foundation
import GatewayConfig
import HSMAdmin
import PKCS11
import SoftHSMTestSupport
import Testing

/// `hsm-admin preflight`'s HSM-family rules, on SoftHSM2 and on the fault module made to look
/// like other families (`model …` lines: manufacturer, model, session limit, FIPS-mode IVs,
/// mechanisms hidden). The only suite of this target that loads the fault module.
@Suite("hsm-admin preflight: HSM family rules", .serialized)
struct PreflightFamilyTests {
    let fixture: SoftHSMFixture
    let fault: FaultInjectingModule
    let token: TestToken

    init() throws {
        fixture = try SoftHSMFixture.shared()
        fault = try FaultInjectingModule.shared()
        try fault.clearRules()
        token = try fixture.makeToken("preflight-family")
    }

    func settings(module: String? = nil, _ change: (inout HSMSettings) -> Void = { _ in }) -> HSMSettings {
        var settings = HSMSettings(
            modulePath: module ?? fault.libraryPath, tokenLabel: token.label, pin: .file(token.pinFile))
        change(&settings)
        return settings
    }

    func check(_ report: PreflightReport, _ name: String) -> PreflightReport.Check? {
        report.checks.first { $0.name == name }
    }

    @Test("families are told apart by what modules and tokens call themselves")
    func detection() {
        #expect(
            HSMFamily.detect(["SoftHSM", "Implementation of PKCS11", "SoftHSM project", "SoftHSM v2"]) == .softHSM2)
        #expect(HSMFamily.detect(["Safenet, Inc.", "Chrystoki", "Safenet, Inc.", "LunaSA"]) == .thalesLuna)
        #expect(HSMFamily.detect(["Marvell Semiconductors, Inc.", "", "", "CloudHSM"]) == .awsCloudHSM)
        #expect(HSMFamily.detect(["Yubico (www.yubico.com)", "YubiHSM PKCS#11 Library"]) == .yubiHSM2)
        #expect(HSMFamily.detect(["nCipher Corp. Ltd", "nFast PKCS#11"]) == .entrustNShield)
        #expect(HSMFamily.detect(["Google", "Cloud KMS PKCS #11 Library"]) == .googleKMSP11)
        #expect(HSMFamily.detect(["Utimaco IS GmbH", "CryptoServer PKCS#11"]) == .utimaco)
        #expect(HSMFamily.detect(["IBM", "Meta-PKCS11 LIBRARY", "IBM Corp.", "IBM SoftTok"]) == .openCryptoki)
        #expect(HSMFamily.detect(["Mozilla Foundation", "NSS Internal Crypto Services"]) == .nssSoftoken)
        #expect(HSMFamily.detect(["Acme HSM Co."]) == .generic)
        for family in HSMFamily.allCases {
            #expect(family.docsPage.hasPrefix("docs/hsm/"))
        }
    }

    @Test("SoftHSM2 is detected and meets every family rule")
    func softHSM2() {
        let report = Preflight(options: .init(settings: settings(module: SoftHSMFixture.modulePath), rounds: 20)).run()
        #expect(report.passed, "\(report.text)")
        #expect(report.family?.name == .softHSM2)
        #expect(report.family?.forced == false)
        for name in [
            "HSM family", "token RNG", "session limit", "CKA_SENSITIVE/CKA_EXTRACTABLE", "GCM IV source (hsm.gcm_iv)",
            "AES-GCM round trip",
        ] {
            #expect(check(report, name)?.status == .pass, "\(name): \(report.text)")
        }
    }

    @Test("an HSM in FIPS mode that generates IVs (CloudHSM's form): gateway IVs fail naming the fix; token IVs pass")
    func fipsModeCloudHSM() throws {
        try fault.setRules("model gcm_iv=writeback manufacturer=Marvell_Semiconductors,_Inc. token_model=CloudHSM")
        defer { try? fault.clearRules() }
        let refused = Preflight(options: .init(settings: settings(), rounds: 10)).run()
        #expect(!refused.passed)
        #expect(refused.family?.name == .awsCloudHSM)
        let iv = try #require(check(refused, "GCM IV source (hsm.gcm_iv)"), "\(refused.text)")
        #expect(iv.status == .fail)
        #expect(iv.detail.contains("set hsm.gcm_iv: token"))
        #expect(iv.docs == "docs/hsm/aws-cloudhsm.md")
        #expect(check(refused, "GCM IV convention")?.status == .warn)
        // CloudHSM PINs are <user>:<password>; the token's is not: a warning, and the PIN unprinted.
        #expect(check(refused, "login convention")?.status == .warn)
        #expect(!refused.text.contains(token.userPIN))
        #expect(refused.text.contains("read docs/hsm/aws-cloudhsm.md"))

        let accepted = Preflight(options: .init(settings: settings { $0.gcmIV = .token }, rounds: 50)).run()
        #expect(accepted.passed, "\(accepted.text)")
        #expect(check(accepted, "GCM IV source (hsm.gcm_iv)")?.detail.contains("FIPS mode") == true)
        #expect(check(accepted, "AES-GCM round trip")?.detail.contains("IVs from the token") == true)
        #expect(accepted.roundTrip?.rounds == 50)
    }

    @Test("hsm.gcm_iv: token on a module that takes caller IVs fails, naming hsm.gcm_iv: gateway")
    func tokenIVsOnSoftHSM2() {
        let report = Preflight(
            options: .init(settings: settings(module: SoftHSMFixture.modulePath) { $0.gcmIV = .token }, rounds: 10)
        ).run()
        #expect(!report.passed)
        let iv = check(report, "GCM IV source (hsm.gcm_iv)")
        #expect(iv?.status == .fail)
        #expect(iv?.detail.contains("set hsm.gcm_iv: gateway") == true, "\(report.text)")
        #expect(check(report, "AES-GCM round trip") == nil)
    }

    @Test("a token without CKM_AES_GCM is refused, naming the mechanism and the page")
    func noGCM() {
        try? fault.setRules("model hide_mechanism=CKM_AES_GCM")
        defer { try? fault.clearRules() }
        let report = Preflight(options: .init(settings: settings(), rounds: 10)).run()
        #expect(!report.passed)
        let gcm = check(report, "mechanism CKM_AES_GCM")
        #expect(gcm?.status == .fail)
        #expect(gcm?.detail.contains("docs/hsm/README.md") == true)
        #expect(check(report, "GCM IV source (hsm.gcm_iv)") == nil)
        #expect(check(report, "AES-GCM round trip") == nil)
    }

    @Test("session limits: the token's own, and YubiHSM 2's documented 16; its PIN convention")
    func sessionLimitsAndPINs() throws {
        try fault.setRules("model max_sessions=4")
        var report = Preflight(options: .init(settings: settings { $0.maximumSessions = 8 }, rounds: 0)).run()
        #expect(check(report, "session limit")?.status == .warn)
        #expect(check(report, "session limit")?.detail.contains("(4)") == true)
        #expect(report.passed, "warnings only: \(report.text)")

        try fault.setRules("model manufacturer=Yubico_(www.yubico.com) token_model=YubiHSM")
        defer { try? fault.clearRules() }
        report = Preflight(options: .init(settings: settings { $0.maximumSessions = 20 }, rounds: 0)).run()
        #expect(report.family?.name == .yubiHSM2)
        #expect(check(report, "session limit")?.detail.contains("(16)") == true)
        // The test token's PIN is 32 hex digits: it has the shape (key id 4 hex digits, then more).
        #expect(check(report, "login convention")?.status == .pass)

        // A PIN without the key id in front: a warning naming the page before the login fails,
        // and the PIN is never printed.
        let shapeless = fixture.directory + "/yubihsm-shapeless.pin"
        _ = FileManager.default.createFile(
            atPath: shapeless, contents: Data("password-only".utf8), attributes: [.posixPermissions: 0o600])
        report = Preflight(options: .init(settings: settings { $0.pin = .file(shapeless) }, rounds: 0)).run()
        #expect(check(report, "login convention")?.status == .warn)
        #expect(check(report, "login convention")?.docs == "docs/hsm/yubihsm2.md")
        #expect(check(report, "log in")?.status == .fail)
        #expect(!report.text.contains("password-only"))
    }

    @Test(
        "hsm-admin preflight --family thales-luna on Luna's FIPS-mode IVs: exit 1 naming the fix, exit 0 with --gcm-iv token"
    )
    func executable() throws {
        let directory = fixture.directory + "/preflight-family-exe"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        try "model gcm_iv=append\n".write(toFile: directory + "/control", atomically: true, encoding: .utf8)
        let environment = fault.environment(control: directory + "/control", trace: directory + "/trace")
        let arguments = [
            "preflight", "--family", "thales-luna", "--module", fault.libraryPath, "--token", token.label,
            "--pin-file", token.pinFile, "--rounds", "20",
        ]
        let refused = try PreflightTests.runAdmin(arguments, fixture: fixture, environment: environment)
        #expect(refused.status == 1, "\(refused.output)\(refused.error)")
        #expect(refused.output.contains("FAIL  GCM IV source (hsm.gcm_iv)"), "\(refused.output)")
        #expect(refused.output.contains("set hsm.gcm_iv: token"))
        #expect(refused.output.contains("read docs/hsm/thales-luna.md"))
        #expect(refused.output.contains("Thales Luna (--family)"))

        let accepted = try PreflightTests.runAdmin(
            arguments + ["--gcm-iv", "token"], fixture: fixture, environment: environment)
        #expect(accepted.status == 0, "\(accepted.output)\(accepted.error)")
        #expect(accepted.output.contains("PASS  GCM IV source (hsm.gcm_iv)"))

        let usage = try PreflightTests.runAdmin(
            [
                "preflight", "--family", "acme", "--module", fault.libraryPath, "--token", token.label, "--pin-file",
                token.pinFile,
            ],
            fixture: fixture)
        #expect(usage.status == 64)
    }
}
