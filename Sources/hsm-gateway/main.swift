import ArgumentParser
import Foundation
import GatewayConfig
import GatewayServer
import HSMAdmin
import Logging

/// `hsm-gateway`: serve HSM-held keys to backend services. Flags map onto configuration settings
/// (docs/configuration.md); everything else lives in GatewayServer.
struct HSMGateway: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hsm-gateway",
        abstract: "Serve HSM-held keys to backend services over the hsm-gateway protocol.",
        discussion: """
            Production: hsm-gateway --config /etc/hsm-gateway/gateway.yaml
            Development: hsm-gateway --dev   (SoftHSM2 token and SQLite file under ./.hsm-dev, \
            plaintext on 127.0.0.1:7700; the first start prints an admin API token)

            Settings come from the --config file, then HSMGW_* environment variables, then flags \
            (flags win); see docs/configuration.md. The HSM PIN is never taken from a flag.

            Exit codes: 0 stopped cleanly (SIGTERM/SIGINT); 64 bad usage; 69 the token or the \
            store could not be opened; 70 an internal error; 77 the token refused the PIN (do not \
            restart with the same PIN); 78 an invalid configuration.
            """,
        version: HSMGatewayVersion.current
    )

    @Option(help: "Configuration file (YAML).")
    var config: String?

    @Flag(help: "Development mode: a SoftHSM2 token, SQLite and plaintext on loopback under --data-dir.")
    var dev = false

    @Option(help: "Data directory of --dev mode.")
    var dataDir: String = DevelopmentEnvironment.defaultDataDirectory

    @Option(help: "Listen address (host:port, [v6]:port or unix:/path); repeat for several. Setting: listen.")
    var listen: [String] = []

    @Option(help: "Health and metrics HTTP address, or `off`. Setting: metrics_listen.")
    var metricsListen: String?

    @Flag(help: "Allow plaintext TCP on non-loopback addresses. Setting: allow_plaintext.")
    var allowPlaintext = false

    @Option(help: "Server certificate chain (PEM). Setting: tls.certificate.")
    var tlsCertificate: String?

    @Option(help: "Server private key (PEM, mode 0600). Setting: tls.private_key.")
    var tlsPrivateKey: String?

    @Option(help: "CA bundle for client certificates (PEM). Setting: tls.client_ca.")
    var tlsClientCA: String?

    @Option(help: "none, optional or required. Setting: tls.client_certificates.")
    var clientCertificates: String?

    @Option(help: "PKCS#11 module path. Setting: hsm.module.")
    var hsmModule: String?

    @Option(help: "Token label. Setting: hsm.token_label.")
    var tokenLabel: String?

    @Option(help: "File holding the HSM user PIN (mode 0600 or 0400). Setting: hsm.pin.file.")
    var pinFile: String?

    @Option(help: "Environment variable holding the HSM user PIN. Setting: hsm.pin.env.")
    var pinEnv: String?

    @Option(help: "sqlite or postgres. Setting: store.kind.")
    var store: String?

    @Option(help: "SQLite database file. Setting: store.sqlite.path.")
    var sqlitePath: String?

    @Option(help: "Where the first admin token is written on an empty database. Setting: auth.bootstrap_token_file.")
    var bootstrapTokenFile: String?

    @Option(help: "trace, debug, info, notice, warning, error or critical. Setting: log.level.")
    var logLevel: String?

    @Option(help: "Any setting, as key=value (e.g. limits.max_connections=2048); repeatable.")
    var set: [String] = []

    @Flag(help: "Validate the configuration and exit (0 when valid).")
    var check = false

    func validate() throws {
        if dev, config != nil {
            throw ValidationError("--dev and --config cannot be combined: --dev makes its own configuration")
        }
        let environment = ProcessInfo.processInfo.environment
        if !dev, config == nil, set.isEmpty, hsmModule == nil,
            !environment.keys.contains(where: { $0.hasPrefix("HSMGW_") })
        {
            throw ValidationError("give --config FILE (production) or --dev (development); see --help")
        }
    }

    /// The flags as configuration overrides (production mode).
    func overrides() throws(ConfigurationError) -> ConfigurationOverrides {
        var overrides = ConfigurationOverrides()
        for address in listen { try overrides.append("listen", address, origin: "--listen") }
        let named: [(String, String?, String)] = [
            ("metrics_listen", metricsListen, "--metrics-listen"),
            ("allow_plaintext", allowPlaintext ? "true" : nil, "--allow-plaintext"),
            ("tls.certificate", tlsCertificate, "--tls-certificate"),
            ("tls.private_key", tlsPrivateKey, "--tls-private-key"),
            ("tls.client_ca", tlsClientCA, "--tls-client-ca"),
            ("tls.client_certificates", clientCertificates, "--client-certificates"),
            ("hsm.module", hsmModule, "--hsm-module"),
            ("hsm.token_label", tokenLabel, "--token-label"),
            ("hsm.pin.file", pinFile, "--pin-file"),
            ("hsm.pin.env", pinEnv, "--pin-env"),
            ("store.kind", store, "--store"),
            ("store.sqlite.path", sqlitePath, "--sqlite-path"),
            ("auth.bootstrap_token_file", bootstrapTokenFile, "--bootstrap-token-file"),
            ("log.level", logLevel, "--log-level"),
        ]
        for (key, value, flag) in named {
            if let value { try overrides.set(key, value, origin: flag) }
        }
        for assignment in set { try overrides.set(assignment: assignment, origin: "--set") }
        return overrides
    }

    func launch() throws(ConfigurationError) -> (GatewayLaunch, [String]) {
        guard dev else {
            let loaded = try GatewayConfiguration.load(file: config, overrides: try overrides())
            return (
                GatewayLaunch(configuration: loaded.configuration, serverVersion: HSMGatewayVersion.current),
                loaded.warnings
            )
        }
        let stray: [(String, Bool)] = [
            ("--tls-certificate", tlsCertificate != nil), ("--tls-private-key", tlsPrivateKey != nil),
            ("--tls-client-ca", tlsClientCA != nil), ("--client-certificates", clientCertificates != nil),
            ("--hsm-module", hsmModule != nil), ("--token-label", tokenLabel != nil), ("--pin-file", pinFile != nil),
            ("--pin-env", pinEnv != nil), ("--store", store != nil), ("--sqlite-path", sqlitePath != nil),
            ("--bootstrap-token-file", bootstrapTokenFile != nil), ("--allow-plaintext", allowPlaintext),
            ("--set", !set.isEmpty),
        ]
        if let flag = stray.first(where: \.1)?.0 {
            throw ConfigurationError("\(flag) cannot be used with --dev (it makes its own token, store and listeners)")
        }
        guard listen.count <= 1 else { throw ConfigurationError("--dev takes one --listen address") }
        let environment = DevelopmentEnvironment(dataDirectory: dataDir)
        let listenAddress = try ListenAddress(parsing: listen.first ?? "127.0.0.1:\(ListenAddress.defaultPort)")
        let metrics =
            metricsListen == "off"
            ? nil : try ListenAddress(parsing: metricsListen ?? "127.0.0.1:\(ListenAddress.defaultMetricsPort)")
        var configuration = try environment.prepare(listen: listenAddress, metricsListen: metrics)
        if let logLevel {
            guard let level = Logger.Level(rawValue: logLevel) else {
                throw ConfigurationError("--log-level: `\(logLevel)` is not a log level")
            }
            configuration.logLevel = level
        }
        return (
            GatewayLaunch(
                configuration: configuration, development: environment, serverVersion: HSMGatewayVersion.current),
            []
        )
    }

    func run() async throws {
        // A PKCS#11 module that talks to a network HSM over a socket (p11-kit's client, vendor
        // clients) writes to it from inside C calls; when the HSM end goes away, the write raises
        // SIGPIPE, whose default action would kill the gateway instead of failing the call.
        signal(SIGPIPE, SIG_IGN)
        try await serve()
    }

    /// Configures, then serves until SIGTERM/SIGINT.
    func serve() async throws {
        let launch: GatewayLaunch
        let warnings: [String]
        do {
            (launch, warnings) = try self.launch()
        } catch {
            FileHandle.standardError.write(Data("hsm-gateway: configuration error: \(error)\n".utf8))
            throw ExitCode(78)  // EX_CONFIG
        }
        if check {
            print("hsm-gateway: configuration is valid")
            return
        }
        let level = launch.configuration.logLevel
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "hsm-gateway")
        for warning in warnings { logger.warning("\(warning)") }
        do {
            try await GatewayServerApp.serve(launch, logger: logger)
        } catch {
            logger.critical("cannot start: \(error)")
            FileHandle.standardError.write(Data("hsm-gateway: cannot start: \(error)\n".utf8))
            throw ExitCode(error.exitCode)
        }
    }
}

// Parsed and run by hand: in top-level code `HSMGateway.main()` and `run()` resolve to the
// synchronous entry points of `ParsableCommand` (which refuse, or print help), not the async ones.
do {
    var command = try HSMGateway.parseAsRoot()
    if let gateway = command as? HSMGateway {
        try await gateway.serve()
    } else {
        try command.run()
    }
} catch {
    HSMGateway.exit(withError: error)
}
