import Foundation
import GatewayConfig
import GatewayServer
import ProcessTestSupport
import Testing

/// Loading and validating the configuration: file, environment and flags, in that order of
/// precedence; precise errors naming the setting and where its value came from.
@Suite("Gateway configuration")
struct ConfigurationTests {
    /// A directory with an owner-only PIN file and a minimal valid file around `extra`.
    struct Files {
        let directory: String
        var pinFile: String { directory + "/pin" }
        var configFile: String { directory + "/gateway.yaml" }

        init(_ name: String) throws {
            directory = try makeTemporaryDirectory("config-\(name)")
            _ = FileManager.default.createFile(
                atPath: pinFile, contents: Data("1234".utf8), attributes: [.posixPermissions: 0o600])
        }

        func write(_ yaml: String) throws -> String {
            try yaml.write(toFile: configFile, atomically: true, encoding: .utf8)
            return configFile
        }

        var minimal: String {
            """
            hsm:
              module: /usr/lib/softhsm/libsofthsm2.so
              token_label: test
              pin:
                file: \(pinFile)
            store:
              sqlite:
                path: \(directory)/gateway.sqlite

            """
        }
    }

    func loadError(
        file: String?,
        environment: [String: String] = [:],
        overrides: ConfigurationOverrides = ConfigurationOverrides()
    ) -> String? {
        do {
            _ = try GatewayConfiguration.load(file: file, environment: environment, overrides: overrides)
            return nil
        } catch {
            return error.description
        }
    }

    @Test func exampleFileIsValid() throws {
        let files = try Files("example")
        let pki = try TestCertificates.shared()
        let passwordFile = files.directory + "/pg"
        _ = FileManager.default.createFile(
            atPath: passwordFile, contents: Data("pw".utf8), attributes: [.posixPermissions: 0o600])
        // The example's paths do not exist here: flags point them at real files, so every other
        // value (and every key) of the example is what gets checked.
        var overrides = ConfigurationOverrides()
        try overrides.set("tls.certificate", pki.serverCertificate, origin: "--tls-certificate")
        try overrides.set("tls.private_key", pki.serverKey, origin: "--tls-private-key")
        try overrides.set("hsm.pin.file", files.pinFile, origin: "--pin-file")
        try overrides.set("store.postgres.password_file", passwordFile, origin: "--set")
        try overrides.set("auth.bootstrap_token_file", files.directory + "/bootstrap", origin: "--set")
        let (configuration, warnings) = try GatewayConfiguration.load(
            file: PackagePaths.root + "/hsm-config/gateway.example.yaml", environment: [:], overrides: overrides)
        #expect(warnings.isEmpty)
        #expect(configuration.listen == [.tcp(host: "0.0.0.0", port: 7700)])
        #expect(configuration.metricsListen == .tcp(host: "127.0.0.1", port: 7701))
        #expect(configuration.store.kind == "postgres")
        #expect(configuration.hsm.maximumSessions == 8)
        #expect(configuration.limits.maxRequestsInFlightPerConnection == 128)
        #expect(configuration.limits.maxConnectionsPerAddress == 64)
        #expect(configuration.limits.maxTenantQueueWait == .seconds(5))
        #expect(configuration.fairQueue.maximumConcurrent == 64)
        #expect(configuration.fairQueue.minimumConcurrent == 4)
        #expect(configuration.logLevel == .info)
    }

    @Test func flagsBeatEnvironmentBeatFile() throws {
        let files = try Files("precedence")
        let file = try files.write(files.minimal + "listen: [\"127.0.0.1:1000\"]\nlog:\n  level: error\n")
        var flags = ConfigurationOverrides()
        try flags.append("listen", "127.0.0.1:3000", origin: "--listen")
        try flags.append("listen", "unix:/tmp/gw.sock", origin: "--listen")
        let environment = ["HSMGW_LISTEN": "127.0.0.1:2000", "HSMGW_LOG_LEVEL": "debug"]

        let fromFile = try GatewayConfiguration.load(file: file, environment: [:]).configuration
        #expect(fromFile.listen == [.tcp(host: "127.0.0.1", port: 1000)])
        #expect(fromFile.logLevel == .error)
        let fromEnvironment = try GatewayConfiguration.load(file: file, environment: environment).configuration
        #expect(fromEnvironment.listen == [.tcp(host: "127.0.0.1", port: 2000)])
        #expect(fromEnvironment.logLevel == .debug)
        let fromFlags = try GatewayConfiguration.load(file: file, environment: environment, overrides: flags)
            .configuration
        #expect(fromFlags.listen == [.tcp(host: "127.0.0.1", port: 3000), .unix(path: "/tmp/gw.sock")])
        #expect(fromFlags.logLevel == .debug)
    }

    @Test func errorsNameTheSettingAndItsSource() throws {
        let files = try Files("errors")
        let typo = try files.write(files.minimal + "tls:\n  certficate: /x\n")
        #expect(loadError(file: typo)?.contains("unknown setting `tls.certficate`") == true)
        #expect(loadError(file: typo)?.contains(typo) == true)

        let file = try files.write(files.minimal)
        let badLimit = loadError(file: file, environment: ["HSMGW_LIMITS_MAX_CONNECTIONS": "0"])
        #expect(badLimit?.contains("HSMGW_LIMITS_MAX_CONNECTIONS") == true)
        #expect(badLimit?.contains("1 to 65536") == true)
        let badCap = loadError(file: file, environment: ["HSMGW_LIMITS_MAX_CONNECTIONS_PER_ADDRESS": "0"])
        #expect(
            badCap?.contains(
                "HSMGW_LIMITS_MAX_CONNECTIONS_PER_ADDRESS: must be a whole number from 1 to 65536, not `0`") == true,
            "\(String(describing: badCap))")
        let cap = try GatewayConfiguration.load(
            file: file, environment: ["HSMGW_LIMITS_MAX_CONNECTIONS_PER_ADDRESS": "8"]
        ).configuration
        #expect(cap.limits.maxConnectionsPerAddress == 8)

        var flags = ConfigurationOverrides()
        try flags.append("listen", "nonsense", origin: "--listen")
        #expect(loadError(file: file, overrides: flags)?.contains("--listen") == true)
        var unknown = ConfigurationOverrides()
        #expect(throws: ConfigurationError.self) { try unknown.set(assignment: "limits.nope=1", origin: "--set") }

        let notYAML = try files.write("hsm: [unclosed")
        #expect(loadError(file: notYAML)?.contains("not valid YAML") == true)
        #expect(loadError(file: files.directory + "/missing.yaml")?.contains("cannot read configuration file") == true)
        let noPIN = try files.write(
            files.minimal.replacingOccurrences(of: "  pin:\n    file: \(files.pinFile)\n", with: ""))
        #expect(loadError(file: noPIN)?.contains("hsm.pin.file or hsm.pin.env is required") == true)
    }

    @Test func initializeArgumentsFromFileEnvironmentOrFlag() throws {
        let files = try Files("initialize-args")
        let arguments = "configdir='sql:/var/lib/hsmgw/nssdb' flags= dbTokenDescription='gw'"
        let file = try files.write(files.minimal + "")
        #expect(
            try GatewayConfiguration.load(file: file, environment: [:]).configuration.hsm.initializeArguments == nil)
        let fromEnvironment = try GatewayConfiguration.load(
            file: file, environment: ["HSMGW_HSM_INITIALIZE_ARGS": arguments]
        ).configuration
        #expect(fromEnvironment.hsm.initializeArguments == arguments)
        var flags = ConfigurationOverrides()
        try flags.set(assignment: "hsm.initialize_args=\(arguments)", origin: "--set")
        let fromFlag = try GatewayConfiguration.load(file: file, environment: [:], overrides: flags).configuration
        #expect(fromFlag.hsm.initializeArguments == arguments)
        let long =
            "secret-looking-marker" + String(repeating: "x", count: HSMSettings.maximumInitializeArgumentsByteCount)
        let error = loadError(file: file, environment: ["HSMGW_HSM_INITIALIZE_ARGS": long])
        #expect(error?.contains("HSMGW_HSM_INITIALIZE_ARGS") == true, "\(String(describing: error))")
        #expect(error?.contains("longer than 8192 bytes") == true, "\(String(describing: error))")
        #expect(error?.contains("secret-looking-marker") == false)
    }

    @Test func secretFilesMustBeOwnerOnly() throws {
        let files = try Files("secrets")
        let file = try files.write(files.minimal)
        chmod(files.pinFile, 0o640)
        let error = loadError(file: file)
        #expect(error?.contains("hsm.pin.file") == true)
        #expect(error?.contains("chmod 600") == true)
        chmod(files.pinFile, 0o600)
        #expect(loadError(file: file) == nil)
        let both = loadError(file: file, environment: ["HSMGW_HSM_PIN_ENV": "HSMGW_HSM_PIN"])
        #expect(both?.contains("not both") == true)
    }

    @Test func plaintextOnlyOnLoopbackOrWhenAllowed() throws {
        let files = try Files("plaintext")
        let file = try files.write(files.minimal)
        let refused = loadError(file: file, environment: ["HSMGW_LISTEN": "0.0.0.0:7700"])
        #expect(refused?.contains("not a loopback address and no TLS") == true)
        #expect(
            loadError(file: file, environment: ["HSMGW_LISTEN": "0.0.0.0:7700", "HSMGW_ALLOW_PLAINTEXT": "true"]) == nil
        )
        #expect(loadError(file: file, environment: ["HSMGW_LISTEN": "[::1]:7700,unix:/tmp/x.sock"]) == nil)
        let pki = try TestCertificates.shared()
        let withTLS = [
            "HSMGW_LISTEN": "0.0.0.0:7700", "HSMGW_TLS_CERTIFICATE": pki.serverCertificate,
            "HSMGW_TLS_PRIVATE_KEY": pki.serverKey,
        ]
        #expect(loadError(file: file, environment: withTLS) == nil)
        var required = withTLS
        required["HSMGW_TLS_CLIENT_CERTIFICATES"] = "required"
        #expect(loadError(file: file, environment: required)?.contains("tls.client_ca is not set") == true)
        var mutual = withTLS
        mutual["HSMGW_TLS_CLIENT_CA"] = pki.caCertificate
        let configuration = try GatewayConfiguration.load(file: file, environment: mutual).configuration
        #expect(configuration.tls?.clientCertificates == .required)
    }

    @Test func storeSettings() throws {
        let files = try Files("store")
        let file = try files.write(files.minimal)
        let mixed = loadError(file: file, environment: ["HSMGW_STORE_POSTGRES_USER": "x"])
        #expect(mixed?.contains("store.kind is sqlite") == true)
        let postgres: [String: String] = [
            "HSMGW_STORE_KIND": "postgres", "HSMGW_STORE_POSTGRES_USER": "u", "HSMGW_STORE_POSTGRES_DATABASE": "d",
        ]
        #expect(
            loadError(file: try files.write(files.minimal.components(separatedBy: "store:")[0]), environment: postgres)
                == nil)
        let noStore = try files.write(files.minimal.components(separatedBy: "store:")[0])
        func with(_ extra: [String: String]) -> [String: String] { postgres.merging(extra) { $1 } }

        // TLS to PostgreSQL: disable (the default) or verify-full, nothing weaker.
        let unknown = loadError(file: noStore, environment: with(["HSMGW_STORE_POSTGRES_TLS": "require"]))
        #expect(unknown?.contains("HSMGW_STORE_POSTGRES_TLS") == true, "\(unknown ?? "")")
        #expect(unknown?.contains("must be one of disable, verify-full, not `require`") == true)

        let caFile = files.directory + "/pg-ca.pem"
        _ = FileManager.default.createFile(atPath: caFile, contents: Data("-----BEGIN CERTIFICATE-----\n".utf8))
        let verified = try GatewayConfiguration.load(
            file: noStore,
            environment: with([
                "HSMGW_STORE_POSTGRES_TLS": "verify-full", "HSMGW_STORE_POSTGRES_TLS_CA_FILE": caFile,
                "HSMGW_STORE_POSTGRES_TLS_SERVER_NAME": "db.internal",
            ])
        ).configuration
        guard case .postgres(let settings) = verified.store else {
            Issue.record("not a postgres store: \(verified.store)")
            return
        }
        #expect(settings.tls == .verifyFull(caFile: caFile, serverName: "db.internal"))
        let systemRoots = try GatewayConfiguration.load(
            file: noStore, environment: with(["HSMGW_STORE_POSTGRES_TLS": "verify-full"])
        ).configuration
        guard case .postgres(let rootsSettings) = systemRoots.store else {
            Issue.record("not a postgres store: \(systemRoots.store)")
            return
        }
        #expect(rootsSettings.tls == .verifyFull(caFile: nil, serverName: nil))

        let missingCA = loadError(
            file: noStore,
            environment: with([
                "HSMGW_STORE_POSTGRES_TLS": "verify-full",
                "HSMGW_STORE_POSTGRES_TLS_CA_FILE": files.directory + "/none.pem",
            ]))
        #expect(missingCA?.contains("HSMGW_STORE_POSTGRES_TLS_CA_FILE") == true, "\(missingCA ?? "")")
        let strayCA = loadError(file: noStore, environment: with(["HSMGW_STORE_POSTGRES_TLS_CA_FILE": caFile]))
        #expect(strayCA?.contains("store.postgres.tls is disable") == true, "\(strayCA ?? "")")
        let overSocket = loadError(
            file: noStore,
            environment: with([
                "HSMGW_STORE_POSTGRES_TLS": "verify-full",
                "HSMGW_STORE_POSTGRES_UNIX_SOCKET": "/run/postgresql/.s.PGSQL.5432",
            ]))
        #expect(overSocket?.contains("a Unix socket") == true, "\(overSocket ?? "")")

        // Standbys: HOST or HOST:PORT (IPv6 in brackets), the port defaulting to store.postgres.port.
        let standbys = try GatewayConfiguration.load(
            file: noStore,
            environment: with([
                "HSMGW_STORE_POSTGRES_PORT": "6432",
                "HSMGW_STORE_POSTGRES_FAILOVER_HOSTS": "db-2.internal, db-3.internal:5433,[::1]:7000",
                "HSMGW_STORE_POSTGRES_STANDBY_DURABILITY": "refuse",
            ])
        ).configuration
        guard case .postgres(let standbySettings) = standbys.store else {
            Issue.record("not a postgres store: \(standbys.store)")
            return
        }
        #expect(
            standbySettings.failoverServers == [
                .init(host: "db-2.internal", port: 6432), .init(host: "db-3.internal", port: 5433),
                .init(host: "::1", port: 7000),
            ])
        #expect(standbySettings.standbyDurability == .refuse)
        for (bad, reason) in [
            ("db:0", "port 1 to 65535"), ("::1", "[ADDRESS]:PORT"), ("db:x", "HOST:PORT"), ("[::1]x", "HOST:PORT"),
        ] {
            let error = loadError(file: noStore, environment: with(["HSMGW_STORE_POSTGRES_FAILOVER_HOSTS": bad]))
            #expect(error?.contains("HSMGW_STORE_POSTGRES_FAILOVER_HOSTS") == true, "\(bad): \(error ?? "")")
            #expect(error?.contains(reason) == true, "\(bad): \(error ?? "")")
        }
        let tooMany = loadError(
            file: noStore,
            environment: with([
                "HSMGW_STORE_POSTGRES_FAILOVER_HOSTS": (1...16).map { "db-\($0)" }.joined(separator: ",")
            ]))
        #expect(tooMany?.contains("at most 15 hosts") == true, "\(tooMany ?? "")")
        let standbysOverSocket = loadError(
            file: noStore,
            environment: with([
                "HSMGW_STORE_POSTGRES_FAILOVER_HOSTS": "db-2",
                "HSMGW_STORE_POSTGRES_UNIX_SOCKET": "/run/postgresql/.s.PGSQL.5432",
            ]))
        #expect(standbysOverSocket?.contains("need TCP") == true, "\(standbysOverSocket ?? "")")
        let durability = loadError(
            file: noStore, environment: with(["HSMGW_STORE_POSTGRES_STANDBY_DURABILITY": "ignore"]))
        #expect(durability?.contains("must be one of warn, refuse") == true, "\(durability ?? "")")
    }

    @Test func failedAuthenticationLimit() throws {
        let files = try Files("authlimit")
        let file = try files.write(files.minimal)
        let defaults = try GatewayConfiguration.load(file: file, environment: [:]).configuration
        #expect(defaults.auth.failedAuthentications == AuthSettings.FailureLimit())
        let set = try GatewayConfiguration.load(
            file: file, environment: ["HSMGW_AUTH_FAILURE_BURST": "5", "HSMGW_AUTH_FAILURES_PER_MINUTE": "10"]
        ).configuration
        #expect(set.auth.failedAuthentications?.burst == 5)
        #expect(set.auth.failedAuthentications?.perMinute == 10)
        let off = try GatewayConfiguration.load(file: file, environment: ["HSMGW_AUTH_FAILURE_BURST": "0"])
        #expect(off.configuration.auth.failedAuthentications == nil)
        let tooMany = loadError(file: file, environment: ["HSMGW_AUTH_FAILURES_PER_MINUTE": "0"])
        #expect(tooMany?.contains("HSMGW_AUTH_FAILURES_PER_MINUTE") == true, "\(tooMany ?? "")")
    }

    @Test func unknownEnvironmentVariablesAreReported() throws {
        let files = try Files("env")
        let file = try files.write(
            files.minimal.replacingOccurrences(of: "file: \(files.pinFile)", with: "env: HSMGW_HSM_PIN"))
        let (_, warnings) = try GatewayConfiguration.load(
            file: file, environment: ["HSMGW_HSM_PIN": "1234", "HSMGW_LISTN": "x"])
        #expect(warnings.count == 1)
        #expect(warnings.first?.contains("HSMGW_LISTN") == true)
    }

    @Test func listenAddresses() throws {
        #expect(try ListenAddress(parsing: "127.0.0.1:7700") == .tcp(host: "127.0.0.1", port: 7700))
        #expect(try ListenAddress(parsing: "[::1]:0") == .tcp(host: "::1", port: 0))
        #expect(try ListenAddress(parsing: "unix:/run/gw.sock") == .unix(path: "/run/gw.sock"))
        #expect(throws: ConfigurationError.self) { try ListenAddress(parsing: "127.0.0.1") }
        #expect(throws: ConfigurationError.self) { try ListenAddress(parsing: "127.0.0.1:70000") }
        #expect(throws: ConfigurationError.self) { try ListenAddress(parsing: "unix:relative") }
        #expect(try ListenAddress(parsing: "localhost:1").isLoopbackOrLocal)
        #expect(!(try ListenAddress(parsing: "10.0.0.1:1").isLoopbackOrLocal))
    }
}
