import Foundation
import GatewayConfig
import HSMAdmin
import PKCS11
import ProcessTestSupport
import Testing

@testable import GatewayServer

/// Every `hsm-config/gateway.<family>.example.yaml` and the production example load through the
/// gateway's own configuration loader (the one `hsm-gateway --config` uses) and through
/// `hsm-admin preflight`'s, so the shapes the docs point at cannot rot. Paths that do not exist
/// here (TLS files, PIN and password files) are pointed at real files by flags, as an operator's
/// would be; every other key and value is the file's.
@Suite("hsm-config/ examples per HSM family")
struct FamilyExampleTests {
    /// Each example, with the module path and `hsm.gcm_iv` its page prescribes.
    static let examples: [(name: String, module: String, gcmIV: GCMIVSource)] = [
        ("aws-cloudhsm", "/opt/cloudhsm/lib/libcloudhsm_pkcs11.so", .token),
        ("thales-luna", "/usr/safenet/lunaclient/lib/libCryptoki2_64.so", .token),
        ("entrust-nshield", "/opt/nfast/toolkits/pkcs11/libcknfast.so", .gateway),
        ("yubihsm2", "/usr/lib/x86_64-linux-gnu/pkcs11/yubihsm_pkcs11.so", .gateway),
        ("google-kmsp11", "/opt/kmsp11/libkmsp11.so", .token),
        ("azure", "/opt/azurecloudhsm/lib64/libazcloudhsm_pkcs11.so", .gateway),
        ("utimaco", "/opt/utimaco/lib/libcs_pkcs11_R3.so", .gateway),
        ("production", "/opt/hsm/lib/libvendorpkcs11.so", .gateway),
    ]

    @Test("each example loads through the gateway's loader and preflight's", arguments: examples.map(\.name))
    func loads(name: String) throws {
        let expected = try #require(Self.examples.first { $0.name == name })
        let path = PackagePaths.root + "/hsm-config/gateway.\(name).example.yaml"
        let directory = try makeTemporaryDirectory("family-\(name)")
        let pki = try TestCertificates.shared()
        for file in ["pin", "pg"] {
            _ = FileManager.default.createFile(
                atPath: directory + "/" + file, contents: Data("secret".utf8), attributes: [.posixPermissions: 0o600])
        }
        var overrides = ConfigurationOverrides()
        try overrides.set("tls.certificate", pki.serverCertificate, origin: "--tls-certificate")
        try overrides.set("tls.private_key", pki.serverKey, origin: "--tls-private-key")
        try overrides.set("hsm.pin.file", directory + "/pin", origin: "--pin-file")
        try overrides.set("store.postgres.password_file", directory + "/pg", origin: "--set")
        try overrides.set("auth.bootstrap_token_file", directory + "/bootstrap", origin: "--set")
        let (configuration, warnings) = try GatewayConfiguration.load(
            file: path, environment: [:], overrides: overrides)
        #expect(warnings.isEmpty)
        #expect(configuration.hsm.modulePath == expected.module)
        #expect(configuration.hsm.gcmIV == expected.gcmIV)
        #expect(!configuration.hsm.tokenLabel.isEmpty)
        #expect(configuration.hsm.softHSM2ConfigPath == nil)
        #expect(configuration.store.kind == "postgres")
        #expect(configuration.tls != nil)

        // hsm-admin preflight --config reads the same file's hsm section.
        let settings = try HSMSettings.load(fromFile: path)
        #expect(settings.modulePath == expected.module)
        #expect(settings.gcmIV == expected.gcmIV)
        #expect(settings.tokenLabel == configuration.hsm.tokenLabel)
        #expect(settings.maximumSessions == configuration.hsm.maximumSessions)

        // Its text points at the family's page, and the page exists.
        let text = try String(contentsOfFile: path, encoding: .utf8)
        if let family = HSMFamily(rawValue: name) {
            #expect(text.contains(family.docsPage))
            #expect(FileManager.default.fileExists(atPath: PackagePaths.root + "/" + family.docsPage))
        }
    }

    @Test("hsm.gcm_iv through the gateway's loader: from the environment, and a bad value named with its source")
    func gcmIVSetting() throws {
        let directory = try makeTemporaryDirectory("gcm-iv-setting")
        _ = FileManager.default.createFile(
            atPath: directory + "/pin", contents: Data("1234".utf8), attributes: [.posixPermissions: 0o600])
        let file = directory + "/gateway.yaml"
        try """
        hsm:
          module: /usr/lib/softhsm/libsofthsm2.so
          token_label: t
          pin:
            file: \(directory)/pin
        store:
          sqlite:
            path: \(directory)/gateway.sqlite
        """.write(toFile: file, atomically: true, encoding: .utf8)
        #expect(try GatewayConfiguration.load(file: file, environment: [:]).configuration.hsm.gcmIV == .gateway)
        let fromEnvironment = try GatewayConfiguration.load(file: file, environment: ["HSMGW_HSM_GCM_IV": "token"])
        #expect(fromEnvironment.configuration.hsm.gcmIV == .token)
        #expect {
            _ = try GatewayConfiguration.load(file: file, environment: ["HSMGW_HSM_GCM_IV": "fips"])
        } throws: { error in
            "\(error)".contains("HSMGW_HSM_GCM_IV") && "\(error)".contains("gateway, token, message")
        }
    }

    @Test("every family but the generic one has an example and a page, and the index links each page")
    func everyFamilyDocumented() throws {
        let index = try String(contentsOfFile: PackagePaths.root + "/docs/hsm/README.md", encoding: .utf8)
        for family in HSMFamily.allCases where family != .generic {
            let page = family.docsPage
            #expect(FileManager.default.fileExists(atPath: PackagePaths.root + "/" + page), "\(page)")
            #expect(index.contains("(\(family.rawValue).md)"), "docs/hsm/README.md links \(page)")
            let hasExample = FileManager.default.fileExists(
                atPath: PackagePaths.root + "/hsm-config/gateway.\(family.rawValue).example.yaml")
            // SoftHSM2 has its own development example; NSS and openCryptoki are test modules.
            #expect(
                hasExample || [.softHSM2, .nssSoftoken, .openCryptoki].contains(family),
                "hsm-config/gateway.\(family.rawValue).example.yaml")
        }
    }
}
