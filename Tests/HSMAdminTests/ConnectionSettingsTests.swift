import Foundation
import GatewayClient
import Testing

@testable import HSMAdmin

/// Where hsm-admin connects and with what: precedence, defaults and refusals.
@Suite("hsm-admin connection settings")
struct ConnectionSettingsTests {
    func flags(_ values: [ConnectionSettingKey: String]) -> SettingsLayer {
        SettingsLayer(kind: .flags, values: values.mapValues { SettingValue($0, origin: "flag") })
    }

    func resolve(
        flags values: [ConnectionSettingKey: String] = [:],
        environment: [String: String] = [:],
        file: String? = nil,
        devTokenExists: Bool = false
    ) throws(AdminError) -> ConnectionSettings {
        let layer = try file.map { (text: String) throws(AdminError) in
            try AdminConfigFile(parsing: text, path: "/etc/hsm/admin.conf").layer
        }
        return try ConnectionSettings.resolve(
            flags: SettingsLayer(
                kind: .flags,
                values: Dictionary(
                    uniqueKeysWithValues: values.map { ($0.key, SettingValue($0.value, origin: $0.key.flag)) })
            ),
            environment: environment,
            file: layer,
            fileExists: { $0 == ConnectionSettings.defaultTokenFile && devTokenExists }
        )
    }

    @Test("defaults: 127.0.0.1:7700, plaintext, the dev token file when it exists")
    func defaults() throws {
        let settings = try resolve(devTokenExists: true)
        #expect(settings.target == .tcp(host: "127.0.0.1", port: 7700))
        #expect(settings.targetOrigin == "default")
        #expect(settings.security == .plaintext)
        #expect(settings.credential == .tokenFile(path: ".hsm-dev/admin.token", origin: "default"))
        #expect(settings.timeout == .seconds(30))
        #expect(settings.summary == "127.0.0.1:7700 (plaintext)")
        let none = #expect(throws: AdminError.self) { try resolve() }
        #expect(none?.exitCode == 77)
        #expect(none?.message.contains("--token-file") == true)
    }

    @Test("flags win over the environment, the environment over the file")
    func precedence() throws {
        let file = "server = file.example:1\ntoken_file = file.token\ntimeout = 1m\n"
        let environment = [
            "HSMGW_SERVER": "env.example:2", "HSMGW_TOKEN_FILE": "/env.token", "HSMGW_CA_FILE": "/ca.pem",
        ]
        let fromFile = try resolve(file: file)
        #expect(fromFile.target == .tcp(host: "file.example", port: 1))
        #expect(fromFile.targetOrigin == "/etc/hsm/admin.conf:1")
        #expect(fromFile.credential == .tokenFile(path: "/etc/hsm/file.token", origin: "/etc/hsm/admin.conf:2"))
        #expect(fromFile.timeout == .seconds(60))
        #expect(fromFile.security == .tls(caFile: nil, certFile: nil, keyFile: nil, serverName: nil))

        let fromEnvironment = try resolve(environment: environment, file: file)
        #expect(fromEnvironment.target == .tcp(host: "env.example", port: 2))
        #expect(fromEnvironment.credential == .tokenFile(path: "/env.token", origin: "HSMGW_TOKEN_FILE"))
        #expect(fromEnvironment.security == .tls(caFile: "/ca.pem", certFile: nil, keyFile: nil, serverName: nil))

        let fromFlags = try resolve(
            flags: [.server: "flag.example:3", .tokenFile: "flag.token", .timeout: "5s"],
            environment: environment,
            file: file
        )
        #expect(fromFlags.target == .tcp(host: "flag.example", port: 3))
        #expect(fromFlags.targetOrigin == "--server")
        #expect(fromFlags.credential == .tokenFile(path: "flag.token", origin: "--token-file"))
        #expect(fromFlags.timeout == .seconds(5))
    }

    @Test("HSMGW_TOKEN gives the token itself; two credentials in one source are refused")
    func environmentToken() throws {
        let settings = try resolve(environment: ["HSMGW_TOKEN": "hsmgw_x"])
        #expect(settings.credential == .environment(variable: "HSMGW_TOKEN"))
        let token = try settings.loadToken(environment: ["HSMGW_TOKEN": " hsmgw_x\n"])
        #expect(token?.value == "hsmgw_x")
        let both = #expect(throws: AdminError.self) {
            try resolve(environment: ["HSMGW_TOKEN": "t", "HSMGW_TOKEN_FILE": "/f"])
        }
        #expect(both?.exitCode == 78)
        // A flag still wins over both.
        #expect(
            try resolve(flags: [.tokenFile: "/f"], environment: ["HSMGW_TOKEN": "t"]).credential
                == .tokenFile(path: "/f", origin: "--token-file"))
    }

    @Test("server forms: host:port, [v6]:port, bare host, unix:path, --socket")
    func serverForms() throws {
        let cases: [(String, ConnectionSettings.Target)] = [
            ("gw.example:7443", .tcp(host: "gw.example", port: 7443)),
            ("gw.example", .tcp(host: "gw.example", port: 7700)),
            ("[::1]:9000", .tcp(host: "::1", port: 9000)),
            ("[::1]", .tcp(host: "::1", port: 7700)),
            ("::1", .tcp(host: "::1", port: 7700)),
            ("unix:/run/hsmgw.sock", .unixSocket(path: "/run/hsmgw.sock")),
        ]
        for (text, target) in cases {
            #expect(try resolve(flags: [.server: text, .tokenFile: "/t"]).target == target, "\(text)")
        }
        #expect(ConnectionSettings.Target.tcp(host: "::1", port: 1).description == "[::1]:1")
        #expect(try resolve(flags: [.socket: "/run/s", .tokenFile: "/t"]).target == .unixSocket(path: "/run/s"))
        for bad in ["gw:0", "gw:70000", "gw:x", ":7700", "[::1", "[::1]x", "a b:1", "unix:", "user@gw:1"] {
            let error = #expect(throws: AdminError.self, "\(bad)") {
                try resolve(flags: [.server: bad, .tokenFile: "/t"])
            }
            #expect(error?.exitCode == 64)
        }
        let both = #expect(throws: AdminError.self) {
            try resolve(flags: [.server: "a:1", .socket: "/s", .tokenFile: "/t"])
        }
        #expect(both?.message.contains("not both") == true)
        let long = "/" + String(repeating: "s", count: 200)
        #expect(throws: AdminError.self) { try resolve(flags: [.socket: long, .tokenFile: "/t"]) }
    }

    @Test("plaintext: the default for loopback and sockets, refused elsewhere unless insecure")
    func plaintextRules() throws {
        for local in ["127.0.0.1:1", "127.8.9.10:1", "localhost:1", "[::1]:1", "unix:/s"] {
            #expect(try resolve(flags: [.server: local, .tokenFile: "/t"]).security == .plaintext, "\(local)")
            #expect(try resolve(flags: [.server: local, .tokenFile: "/t", .plaintext: "true"]).security == .plaintext)
        }
        let remote = #expect(throws: AdminError.self) {
            try resolve(flags: [.server: "10.0.0.5:7700", .tokenFile: "/t", .plaintext: "true"])
        }
        #expect(remote?.exitCode == 64)
        #expect(remote?.message.contains("--insecure-plaintext") == true)
        let insecure = try resolve(flags: [.server: "gw.example:1", .tokenFile: "/t", .insecurePlaintext: "true"])
        #expect(insecure.security == .plaintext)
        let fromEnvironment = #expect(throws: AdminError.self) {
            try resolve(flags: [.server: "gw.example:1", .tokenFile: "/t"], environment: ["HSMGW_PLAINTEXT": "1"])
        }
        #expect(fromEnvironment?.exitCode == 64)
        // TLS on loopback when asked.
        #expect(
            try resolve(flags: [.tokenFile: "/t", .tls: "true"]).security
                == .tls(caFile: nil, certFile: nil, keyFile: nil, serverName: nil))
        let contradiction = #expect(throws: AdminError.self) {
            try resolve(flags: [.tokenFile: "/t", .plaintext: "true", .caFile: "/ca"])
        }
        #expect(contradiction?.message.contains("contradicts") == true)
        let badBoolean = #expect(throws: AdminError.self) {
            try resolve(flags: [.tokenFile: "/t"], environment: ["HSMGW_PLAINTEXT": "maybe"])
        }
        #expect(badBoolean?.exitCode == 78)
    }

    @Test("mutual TLS: certificate and key together; they alone may authenticate")
    func mutualTLS() throws {
        let settings = try resolve(flags: [.server: "gw.example:1", .certFile: "/c.pem", .keyFile: "/k.pem"])
        #expect(settings.credential == .clientCertificateOnly)
        #expect(settings.security == .tls(caFile: nil, certFile: "/c.pem", keyFile: "/k.pem", serverName: nil))
        #expect(try settings.loadToken(environment: [:]) == nil)
        #expect(settings.summary == "gw.example:1 (TLS, client certificate)")
        let half = #expect(throws: AdminError.self) { try resolve(flags: [.certFile: "/c.pem", .tokenFile: "/t"]) }
        #expect(half?.message.contains("--key") == true)
    }

    @Test("the dev token is never sent to a remote gateway implicitly")
    func devTokenOnlyLocal() {
        let error = #expect(throws: AdminError.self) {
            try resolve(flags: [.server: "gw.example:7700"], devTokenExists: true)
        }
        #expect(error?.exitCode == 77)
    }

    @Test("timeouts: a duration up to the client's longest deadline")
    func timeouts() throws {
        #expect(try resolve(flags: [.tokenFile: "/t", .timeout: "2m"]).timeout == .seconds(120))
        #expect(throws: AdminError.self) { try resolve(flags: [.tokenFile: "/t", .timeout: "2h"]) }
        #expect(throws: AdminError.self) { try resolve(flags: [.tokenFile: "/t", .timeout: "30"]) }
        let configuration = try resolve(flags: [.tokenFile: "/t", .timeout: "10m"])
            .clientConfiguration(token: APIToken("hsmgw_x"), clientName: "hsm-admin/test")
        #expect(configuration.defaultDeadline == .seconds(600))
        #expect(configuration.connectTimeout == .seconds(300))
        #expect(configuration.poolSize == 1)
        #expect(configuration.transportSecurity == .plaintext)
    }

    @Test("the admin config file: comments, quotes, relative paths, precise errors")
    func configFile() throws {
        let file = try AdminConfigFile(
            parsing: """
                # comment
                server = "gw.example:7443"

                ca_file = certs/ca.pem
                cert_file = /abs/c.pem\r
                socket = s.sock
                """,
            path: "/etc/hsm/admin.conf"
        )
        #expect(file.layer.values[.server]?.value == "gw.example:7443")
        #expect(file.layer.values[.caFile]?.value == "/etc/hsm/certs/ca.pem")
        #expect(file.layer.values[.caFile]?.origin == "/etc/hsm/admin.conf:4")
        #expect(file.layer.values[.certFile]?.value == "/abs/c.pem")
        #expect(file.layer.values[.socket]?.value == "/etc/hsm/s.sock")

        let cases: [(String, String)] = [
            ("server", "admin.conf:1: expected `key = value`"),
            ("colour = red", "unknown setting `colour`"),
            ("token = hsmgw_x", "the token belongs in its own file"),
            ("server = a\nserver = b", "admin.conf:2: `server` is set twice"),
            ("server =", "`server` has no value"),
        ]
        for (text, message) in cases {
            let error = #expect(throws: AdminError.self) { try AdminConfigFile(parsing: text, path: "/x/admin.conf") }
            #expect(error?.exitCode == 78)
            #expect(error?.message.contains(message) == true, "\(error?.message ?? "")")
            #expect(error?.message.contains("hsmgw_x") == false)
        }
    }

    @Test("which config file: flag, then HSMGW_ADMIN_CONFIG, then XDG or ~/.config when present")
    func locate() {
        #expect(AdminConfigFile.locate(flag: "/f", environment: ["HSMGW_ADMIN_CONFIG": "/e"]) == "/f")
        #expect(AdminConfigFile.locate(flag: nil, environment: ["HSMGW_ADMIN_CONFIG": "/e"]) == "/e")
        let exists: (String) -> Bool = {
            $0 == "/home/u/.config/hsm-admin/admin.conf" || $0 == "/xdg/hsm-admin/admin.conf"
        }
        #expect(
            AdminConfigFile.locate(flag: nil, environment: ["HOME": "/home/u"], fileExists: exists)
                == "/home/u/.config/hsm-admin/admin.conf")
        #expect(
            AdminConfigFile.locate(
                flag: nil, environment: ["HOME": "/home/u", "XDG_CONFIG_HOME": "/xdg"], fileExists: exists)
                == "/xdg/hsm-admin/admin.conf")
        #expect(AdminConfigFile.locate(flag: nil, environment: ["HOME": "/nobody"], fileExists: exists) == nil)
        #expect(AdminConfigFile.locate(flag: nil, environment: [:], fileExists: exists) == nil)
    }

    @Test("loopback detection")
    func loopback() {
        for host in ["127.0.0.1", "127.255.0.1", "localhost", "LOCALHOST", "::1", "0:0:0:0:0:0:0:1"] {
            #expect(ConnectionSettings.isLoopback(host), "\(host)")
        }
        for host in ["128.0.0.1", "10.0.0.1", "::2", "gw.example", "127.0.0.1.example", "::ffff:127.0.0.1x"] {
            #expect(!ConnectionSettings.isLoopback(host), "\(host)")
        }
    }
}
