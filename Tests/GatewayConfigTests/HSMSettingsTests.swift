import Foundation
import GatewayConfig
import PKCS11
import Testing

@Suite("Gateway configuration: hsm section")
struct HSMSettingsTests {
    static let repositoryRoot = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    @Test("both example configurations in hsm-config/ parse", arguments: ["softhsm2", "production"])
    func examplesParse(name: String) throws {
        let path = Self.repositoryRoot.appendingPathComponent("hsm-config/gateway.\(name).example.yaml").path
        let settings = try HSMSettings.load(fromFile: path)
        #expect(!settings.modulePath.isEmpty)
        #expect(!settings.tokenLabel.isEmpty)
        #expect(settings.maximumSessions >= 1)
        if name == "softhsm2" {
            #expect(settings.modulePath == "/usr/lib/softhsm/libsofthsm2.so")
            #expect(settings.pin == .file(".hsm-dev/user.pin"))
            #expect(settings.softHSM2ConfigPath == ".hsm-dev/softhsm2.conf")
        } else {
            #expect(settings.softHSM2ConfigPath == nil)
        }
    }

    @Test("the docker compose configuration parses")
    func composeParses() throws {
        let path = Self.repositoryRoot.appendingPathComponent("docker/gateway.compose.yaml").path
        let settings = try HSMSettings.load(fromFile: path)
        #expect(settings.tokenLabel == "hsmgw")
    }

    @Test("hsm.gcm_iv: gateway by default, token or message when set, anything else refused naming the values")
    func gcmIVSource() throws {
        let base = "hsm:\n  module: /m.so\n  token_label: t\n  pin:\n    env: P\n"
        #expect(try HSMSettings.parse(yaml: base).gcmIV == .gateway)
        #expect(try HSMSettings.parse(yaml: base + "  gcm_iv: token\n").gcmIV == .token)
        #expect(try HSMSettings.parse(yaml: base + "  gcm_iv: message\n").gcmIV == .message)
        #expect {
            _ = try HSMSettings.parse(yaml: base + "  gcm_iv: hsm\n", source: "g.yaml")
        } throws: { error in
            "\(error)" == "g.yaml: `hsm.gcm_iv` must be one of gateway, token, message, not `hsm`"
        }
    }

    @Test("a full section with every key")
    func fullSection() throws {
        let settings = try HSMSettings.parse(
            yaml: """
                listen: ignored-by-this-section
                hsm:
                  module: /opt/hsm/lib/libvendor.so
                  token_label: prod
                  pin:
                    env: HSM_PIN
                  sessions:
                    max: 32
                    acquire_timeout_ms: 250
                """
        )
        #expect(
            settings
                == HSMSettings(
                    modulePath: "/opt/hsm/lib/libvendor.so",
                    tokenLabel: "prod",
                    pin: .environment("HSM_PIN"),
                    maximumSessions: 32,
                    acquireTimeout: .milliseconds(250)
                )
        )
    }

    @Test(
        "precise errors for bad sections",
        arguments: [
            ("hsm: [1, 2]", "`hsm` must be a mapping"),
            ("listen: x", "no `hsm:` section"),
            ("hsm:\n  token_label: a\n  pin: {file: p}", "`hsm.module` is required"),
            ("hsm:\n  module: m\n  token_label: a\n  pin: {file: p, env: E}", "exactly one of `file` or `env`"),
            ("hsm:\n  module: m\n  token_label: a\n  pin: {}", "exactly one of `file` or `env`"),
            (
                "hsm:\n  module: m\n  token_label: a\n  pin: {file: p}\n  sesions: {max: 2}",
                "unknown key in `hsm`: sesions"
            ),
            ("hsm:\n  module: m\n  token_label: a\n  pin: {file: p, pin: x}", "unknown key in `hsm.pin`: pin"),
            (
                "hsm:\n  module: m\n  token_label: a\n  pin: {file: p}\n  sessions: {max: 0}",
                "`hsm.sessions.max` must be"
            ),
            ("hsm:\n  module: m\n  token_label: a\n  pin: {file: p}\n  sessions: {max: 99999}", "from 1 to 1024"),
            (
                "hsm:\n  module: m\n  token_label: a\n  pin: {file: p}\n  sessions: {acquire_timeout_ms: -1}",
                "acquire_timeout_ms"
            ),
            (
                "hsm:\n  module: m\n  token_label: a-label-that-is-longer-than-32-bytes\n  pin: {file: p}",
                "longer than 32 bytes"
            ),
            ("hsm:\n  module: [a]\n  token_label: a\n  pin: {file: p}", "`hsm.module` must be a single value"),
            ("hsm:\n  module: ''\n  token_label: a\n  pin: {file: p}", "`hsm.module` is empty"),
            ("hsm: {module: m\n", "not valid YAML"),
        ]
    )
    func errors(yaml: String, expected: String) {
        let error = #expect(throws: ConfigurationError.self) { try HSMSettings.parse(yaml: yaml) }
        #expect(error?.description.contains(expected) == true, "\(error?.description ?? "no error")")
    }

    @Test("a configuration file over the size limit is refused before it is parsed")
    func fileSizeLimit() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("big-\(getpid()).yaml").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        let big = String(repeating: "# padding\n", count: HSMSettings.maximumFileByteCount / 10 + 1)
        try big.write(toFile: path, atomically: true, encoding: .utf8)
        let error = #expect(throws: ConfigurationError.self) { try HSMSettings.load(fromFile: path) }
        #expect(error?.description.contains("larger than") == true)
        let missing = #expect(throws: ConfigurationError.self) { try HSMSettings.load(fromFile: path + ".missing") }
        #expect(missing?.description.contains("cannot open") == true)
    }

    @Test("hsm.initialize_args: read as given; over the limit an error that never quotes it")
    func initializeArguments() throws {
        let arguments = "configdir='sql:/var/lib/hsmgw/nssdb' certPrefix='' keyPrefix='' flags= dbTokenDescription='gw'"
        let yaml = { (value: String) in
            "hsm:\n  module: /usr/lib/x86_64-linux-gnu/libsoftokn3.so\n  token_label: gw\n  pin: {file: p}\n"
                + "  initialize_args: \"\(value)\"\n"
        }
        let settings = try HSMSettings.parse(yaml: yaml(arguments))
        #expect(settings.initializeArguments == arguments)
        #expect(
            try HSMSettings.parse(yaml: "hsm:\n  module: m\n  token_label: a\n  pin: {file: p}").initializeArguments
                == nil)

        let long =
            "secret-looking-marker" + String(repeating: "x", count: HSMSettings.maximumInitializeArgumentsByteCount)
        let error = #expect(throws: ConfigurationError.self) { try HSMSettings.parse(yaml: yaml(long)) }
        #expect(error?.description.contains("`hsm.initialize_args` is longer than 8192 bytes") == true)
        #expect(error?.description.contains("secret-looking-marker") == false)
    }
}
