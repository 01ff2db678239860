import Foundation
import GatewayConfig
import GatewayTransport
import Logging
import PKCS11
import PostgresKeyStore

extension GatewayConfiguration {
    /// The longest path accepted in any setting (PATH_MAX).
    static let maximumPathByteCount = HSMSettings.maximumPathByteCount

    /// Reads the configuration: the YAML `file` (if any), then `HSMGW_*` variables from
    /// `environment`, then `overrides` (the flags); later sources win. Validates every setting
    /// and the rules between them; an error names the setting and where its value came from.
    ///
    /// - Returns: the configuration and warnings to log (unknown `HSMGW_*` variables).
    public static func load(
        file: String?,
        environment: [String: String] = ProcessInfo.processInfo.environment,
        overrides: ConfigurationOverrides = ConfigurationOverrides()
    ) throws(ConfigurationError) -> (configuration: GatewayConfiguration, warnings: [String]) {
        var raw: [String: RawSetting] = [:]
        if let file {
            let text = try readConfigurationFile(file)
            raw = try SettingsSources.flatten(yaml: text, source: file)
        }
        let fromEnvironment = SettingsSources.environment(environment)
        raw.merge(fromEnvironment.settings) { $1 }
        raw.merge(overrides.values) { $1 }
        var reader = SettingsReader(raw: raw)
        let configuration = try reader.configuration()
        // The PIN's own variable is expected to start with HSMGW_ too; it is not a setting.
        var ignored: Set<String> = ["HSMGW_TEST_PKCS11_MODULE", "HSMGW_DEV_PKCS11_MODULE"]
        if case .environment(let name) = configuration.hsm.pin { ignored.insert(name) }
        let warnings = fromEnvironment.unknown.filter { !ignored.contains($0) }.map {
            "environment variable \($0) names no setting (see docs/configuration.md); ignored"
        }
        return (configuration, warnings)
    }

    /// Reads a regular file of at most 1 MiB as UTF-8.
    static func readConfigurationFile(_ path: String) throws(ConfigurationError) -> String {
        let data: Data
        do {
            let handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
            defer { try? handle.close() }
            data = try handle.read(upToCount: SettingsSources.maximumFileByteCount + 1) ?? Data()
        } catch {
            throw ConfigurationError("cannot read configuration file \(path): \(Self.describe(error))")
        }
        guard data.count <= SettingsSources.maximumFileByteCount else {
            throw ConfigurationError(
                "configuration file \(path) is larger than \(SettingsSources.maximumFileByteCount) bytes")
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw ConfigurationError("configuration file \(path) is not UTF-8 text")
        }
        return text
    }

    static func describe(_ error: any Error) -> String {
        let nsError = error as NSError
        if let posix = nsError.userInfo[NSUnderlyingErrorKey] as? NSError, posix.domain == NSPOSIXErrorDomain {
            return String(cString: strerror(Int32(posix.code)))
        }
        return nsError.localizedDescription
    }
}

/// Typed, validated access to the merged raw settings.
struct SettingsReader {
    let raw: [String: RawSetting]

    func origin(_ key: String) -> String { raw[key]?.origin ?? key }

    func string(_ key: String, maximumBytes: Int = 4096) throws(ConfigurationError) -> String? {
        guard let setting = raw[key] else { return nil }
        let value = setting.values.first ?? ""
        guard !value.isEmpty else { throw ConfigurationError("\(setting.origin): the value is empty") }
        guard value.utf8.count <= maximumBytes else {
            throw ConfigurationError("\(setting.origin): longer than \(maximumBytes) bytes")
        }
        return value
    }

    func required(_ key: String, maximumBytes: Int = 4096, because reason: String) throws(ConfigurationError)
        -> String
    {
        guard let value = try string(key, maximumBytes: maximumBytes) else {
            throw ConfigurationError("\(key) is required \(reason)")
        }
        return value
    }

    func integer(_ key: String, in range: ClosedRange<Int>, default value: Int) throws(ConfigurationError) -> Int {
        guard let text = try string(key) else { return value }
        guard let parsed = Int(text), range.contains(parsed) else {
            throw ConfigurationError(
                "\(origin(key)): must be a whole number from \(range.lowerBound) to \(range.upperBound), not `\(text)`"
            )
        }
        return parsed
    }

    func duration(
        _ key: String,
        unit: Duration,
        in range: ClosedRange<Int>,
        default value: Duration
    ) throws(ConfigurationError) -> Duration {
        guard raw[key] != nil else { return value }
        return unit * (try integer(key, in: range, default: 0))
    }

    func boolean(_ key: String, default value: Bool) throws(ConfigurationError) -> Bool {
        guard let text = try string(key) else { return value }
        switch text.lowercased() {
        case "true", "yes", "on", "1": return true
        case "false", "no", "off", "0": return false
        default: throw ConfigurationError("\(origin(key)): must be true or false, not `\(text)`")
        }
    }

    func choice<T: RawRepresentable & CaseIterable>(_ key: String, default value: T) throws(ConfigurationError) -> T
    where T.RawValue == String {
        guard let text = try string(key) else { return value }
        guard let parsed = T(rawValue: text) else {
            let allowed = T.allCases.map(\.rawValue).joined(separator: ", ")
            throw ConfigurationError("\(origin(key)): must be one of \(allowed), not `\(text)`")
        }
        return parsed
    }

    /// A path that must name a regular file readable by this process.
    func existingFile(_ key: String, secret: Bool) throws(ConfigurationError) -> String? {
        guard let path = try string(key, maximumBytes: GatewayConfiguration.maximumPathByteCount) else { return nil }
        try FileChecks.checkReadableFile(path, secret: secret, setting: origin(key))
        return path
    }

    func address(_ key: String, default value: ListenAddress?) throws(ConfigurationError) -> ListenAddress? {
        guard let text = try string(key) else { return value }
        if text == "off" { return nil }
        do {
            return try ListenAddress(parsing: text)
        } catch {
            throw ConfigurationError("\(origin(key)): \(error.description)")
        }
    }

    mutating func configuration() throws(ConfigurationError) -> GatewayConfiguration {
        var configuration = GatewayConfiguration(hsm: try hsm(), store: try store())
        if let listen = raw["listen"] {
            guard !listen.values.isEmpty else { throw ConfigurationError("\(listen.origin): no address given") }
            var addresses: [ListenAddress] = []
            for text in listen.values {
                do {
                    addresses.append(try ListenAddress(parsing: text))
                } catch {
                    throw ConfigurationError("\(listen.origin): \(error.description)")
                }
            }
            configuration.listen = addresses
        }
        configuration.metricsListen = try address("metrics_listen", default: configuration.metricsListen)
        configuration.allowPlaintext = try boolean("allow_plaintext", default: false)
        if let id = try string("instance_id", maximumBytes: AuthSettings.maximumInstanceIDLength) {
            configuration.instanceID = id
        }
        configuration.tls = try tls()
        configuration.limits = try limits()
        configuration.fairQueue = try fairQueue()
        configuration.auth = try auth()
        configuration.rewrap = try rewrap()
        let level = try string("log.level") ?? "info"
        guard let parsedLevel = Logger.Level(rawValue: level) else {
            let allowed = Logger.Level.allCases.map(\.rawValue).joined(separator: ", ")
            throw ConfigurationError("\(origin("log.level")): must be one of \(allowed), not `\(level)`")
        }
        configuration.logLevel = parsedLevel
        do {
            try configuration.validate()
        } catch {
            throw error
        }
        return configuration
    }

    func hsm() throws(ConfigurationError) -> HSMSettings {
        let module = try required(
            "hsm.module", maximumBytes: GatewayConfiguration.maximumPathByteCount, because: "(the PKCS#11 module path)")
        let label = try required(
            "hsm.token_label",
            maximumBytes: HSMSettings.maximumTokenLabelByteCount,
            because: "(the token's label)"
        )
        enum UnsealKind: String, CaseIterable {
            case auto, shamir
        }
        if try choice("hsm.unseal", default: UnsealKind.auto) == .shamir {
            // A PIN kept beside a sealed gateway would make the shares pointless.
            for key in ["hsm.pin.file", "hsm.pin.env"] where raw[key] != nil {
                throw ConfigurationError(
                    "\(origin(key)): hsm.unseal is shamir, so the PIN comes from operators' shares, never from "
                        + "a file or the environment; remove \(key)")
            }
            guard let checkFile = try existingFile("hsm.unseal_check_file", secret: false) else {
                throw ConfigurationError(
                    "hsm.unseal_check_file is required with hsm.unseal: shamir (the file `hsm-admin operator init` "
                        + "wrote)")
            }
            // `pin` is not read in this mode.
            var settings = HSMSettings(modulePath: module, tokenLabel: label, pin: .environment(""))
            settings.unseal = .shamir(checkFile: checkFile)
            return try sessionSettings(settings)
        }
        if raw["hsm.unseal_check_file"] != nil {
            throw ConfigurationError(
                "\(origin("hsm.unseal_check_file")): only used with hsm.unseal: shamir (the mode is auto)")
        }
        let pin: PINSource
        switch (raw["hsm.pin.file"], raw["hsm.pin.env"]) {
        case (.some, .some):
            throw ConfigurationError(
                "hsm.pin: give exactly one of hsm.pin.file (\(origin("hsm.pin.file"))) and hsm.pin.env "
                    + "(\(origin("hsm.pin.env"))), not both"
            )
        case (.some, nil):
            pin = .file(try existingFile("hsm.pin.file", secret: true)!)
        case (nil, .some):
            let name = try string("hsm.pin.env", maximumBytes: 255)!
            pin = .environment(name)
        case (nil, nil):
            throw ConfigurationError("hsm.pin.file or hsm.pin.env is required (where the user PIN comes from)")
        }
        return try sessionSettings(HSMSettings(modulePath: module, tokenLabel: label, pin: pin))
    }

    /// The `hsm.sessions.*`, `hsm.softhsm2_conf`, `hsm.gcm_iv` and `hsm.initialize_args` settings,
    /// whatever the unseal mode.
    func sessionSettings(_ settings: HSMSettings) throws(ConfigurationError) -> HSMSettings {
        var settings = settings
        settings.maximumSessions = try integer(
            "hsm.sessions.max", in: 1...HSMSettings.maximumSessionsLimit, default: settings.maximumSessions)
        settings.acquireTimeout = try duration(
            "hsm.sessions.acquire_timeout_ms",
            unit: .milliseconds(1),
            in: 1...HSMSettings.maximumAcquireTimeoutMilliseconds,
            default: settings.acquireTimeout
        )
        settings.softHSM2ConfigPath = try existingFile("hsm.softhsm2_conf", secret: false)
        settings.gcmIV = try choice("hsm.gcm_iv", default: GCMIVSource.gateway)
        // Never quoted in an error: it is configuration, but vendor options are not for the log.
        settings.initializeArguments = try string(
            "hsm.initialize_args", maximumBytes: HSMSettings.maximumInitializeArgumentsByteCount)
        if settings.initializeArguments?.utf8.contains(0) == true {
            throw ConfigurationError("\(origin("hsm.initialize_args")): holds a NUL byte")
        }
        return settings
    }

    func store() throws(ConfigurationError) -> StoreSettings {
        enum Kind: String, CaseIterable {
            case sqlite, postgres
        }
        let kind = try choice("store.kind", default: Kind.sqlite)
        let sqliteKeys = raw.keys.filter { $0.hasPrefix("store.sqlite.") }
        let postgresKeys = raw.keys.filter { $0.hasPrefix("store.postgres.") }
        switch kind {
        case .sqlite:
            if let stray = postgresKeys.sorted().first {
                throw ConfigurationError("\(origin(stray)): store.kind is sqlite; remove the postgres settings")
            }
            let path = try required(
                "store.sqlite.path",
                maximumBytes: GatewayConfiguration.maximumPathByteCount,
                because: "when store.kind is sqlite (the database file)"
            )
            let parent = (path as NSString).deletingLastPathComponent
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: parent.isEmpty ? "." : parent, isDirectory: &isDirectory),
                isDirectory.boolValue
            else {
                throw ConfigurationError("\(origin("store.sqlite.path")): directory \(parent) does not exist")
            }
            return .sqlite(path: path)
        case .postgres:
            if let stray = sqliteKeys.sorted().first {
                throw ConfigurationError("\(origin(stray)): store.kind is postgres; remove the sqlite settings")
            }
            var settings = PostgresSettings(
                user: try required("store.postgres.user", maximumBytes: 63, because: "when store.kind is postgres"),
                database: try required(
                    "store.postgres.database", maximumBytes: 63, because: "when store.kind is postgres")
            )
            settings.host = try string("store.postgres.host", maximumBytes: 255) ?? settings.host
            settings.port = try integer("store.postgres.port", in: 1...65_535, default: settings.port)
            settings.unixSocketPath = try string(
                "store.postgres.unix_socket", maximumBytes: GatewayConfiguration.maximumPathByteCount)
            settings.passwordFile = try existingFile("store.postgres.password_file", secret: true)
            settings.maximumConnections = try integer(
                "store.postgres.max_connections", in: 1...256, default: settings.maximumConnections)
            settings.tls = try postgresTLS(overUnixSocket: settings.unixSocketPath != nil)
            settings.failoverServers = try failoverServers(defaultPort: settings.port)
            if !settings.failoverServers.isEmpty, settings.unixSocketPath != nil {
                throw ConfigurationError(
                    "\(origin("store.postgres.failover_hosts")): failover servers need TCP (store.postgres.host), "
                        + "not store.postgres.unix_socket")
            }
            settings.standbyDurability = try choice(
                "store.postgres.standby_durability", default: PostgresSettings.StandbyDurability.warn)
            return .postgres(settings)
        }
    }

    /// `store.postgres.failover_hosts`: `HOST` or `HOST:PORT` (`[V6]:PORT`) each, the port
    /// defaulting to `store.postgres.port`; at most `maximumServers - 1` of them.
    func failoverServers(defaultPort: Int) throws(ConfigurationError) -> [PostgresKeyStoreConfiguration.Server] {
        guard let setting = raw["store.postgres.failover_hosts"] else { return [] }
        let limit = PostgresKeyStoreConfiguration.maximumServers - 1
        guard setting.values.count <= limit else {
            throw ConfigurationError("\(setting.origin): at most \(limit) hosts, not \(setting.values.count)")
        }
        var servers: [PostgresKeyStoreConfiguration.Server] = []
        for text in setting.values {
            guard !text.isEmpty, text.utf8.count <= 261 else {
                throw ConfigurationError("\(setting.origin): `\(text.prefix(64))` is not HOST or HOST:PORT")
            }
            var host = text
            var port = defaultPort
            if text.hasPrefix("["), let close = text.firstIndex(of: "]") {
                host = String(text[text.index(after: text.startIndex)..<close])
                let rest = text[text.index(after: close)...]
                if !rest.isEmpty {
                    guard rest.hasPrefix(":"), let parsed = Int(rest.dropFirst()) else {
                        throw ConfigurationError("\(setting.origin): `\(text)` is not HOST or HOST:PORT")
                    }
                    port = parsed
                }
            } else if let colon = text.lastIndex(of: ":") {
                guard text.firstIndex(of: ":") == colon, let parsed = Int(text[text.index(after: colon)...]) else {
                    throw ConfigurationError(
                        "\(setting.origin): `\(text)` is not HOST or HOST:PORT (write an IPv6 address as [ADDRESS]:PORT)"
                    )
                }
                host = String(text[..<colon])
                port = parsed
            }
            guard !host.isEmpty, host.utf8.count <= 255, (1...65_535).contains(port) else {
                throw ConfigurationError("\(setting.origin): `\(text)` is not HOST or HOST:PORT (port 1 to 65535)")
            }
            servers.append(.init(host: host, port: port))
        }
        return servers
    }

    /// `store.postgres.tls` (`disable` or `verify-full`) with its CA file and server name.
    func postgresTLS(overUnixSocket: Bool) throws(ConfigurationError) -> PostgresSettings.TLS {
        enum Mode: String, CaseIterable {
            case disable
            case verifyFull = "verify-full"
        }
        let mode = try choice("store.postgres.tls", default: Mode.disable)
        let caFile = try existingFile("store.postgres.tls_ca_file", secret: false)
        let serverName = try string("store.postgres.tls_server_name", maximumBytes: 255)
        switch mode {
        case .disable:
            for stray in ["store.postgres.tls_ca_file", "store.postgres.tls_server_name"] where raw[stray] != nil {
                throw ConfigurationError("\(origin(stray)): store.postgres.tls is disable; set it to verify-full")
            }
            return .disable
        case .verifyFull:
            if overUnixSocket {
                throw ConfigurationError(
                    "\(origin("store.postgres.tls")): verify-full is for TCP; a Unix socket "
                        + "(store.postgres.unix_socket) does not use TLS")
            }
            return .verifyFull(caFile: caFile, serverName: serverName)
        }
    }

    func tls() throws(ConfigurationError) -> ServerConfiguration.TLS? {
        let certificate = try existingFile("tls.certificate", secret: false)
        let key = try existingFile("tls.private_key", secret: true)
        let clientCA = try existingFile("tls.client_ca", secret: false)
        switch (certificate, key) {
        case (nil, nil):
            for stray in ["tls.client_ca", "tls.client_certificates"] where raw[stray] != nil {
                throw ConfigurationError(
                    "\(origin(stray)): needs tls.certificate and tls.private_key (client certificates need TLS)")
            }
            return nil
        case (.some, nil):
            throw ConfigurationError("tls.private_key is required with tls.certificate (\(origin("tls.certificate")))")
        case (nil, .some):
            throw ConfigurationError("tls.certificate is required with tls.private_key (\(origin("tls.private_key")))")
        case (let certificate?, let key?):
            let mode = try choice(
                "tls.client_certificates",
                default: clientCA == nil ? ClientCertificateMode.none : .required
            )
            if mode != .none, clientCA == nil {
                throw ConfigurationError(
                    "\(origin("tls.client_certificates")): is \(mode.rawValue) but tls.client_ca is not set")
            }
            if mode == .none, clientCA != nil {
                throw ConfigurationError(
                    "\(origin("tls.client_ca")): set, but tls.client_certificates is none; remove one of them")
            }
            return ServerConfiguration.TLS(
                certificateChainPath: certificate,
                privateKeyPath: key,
                clientCAPath: clientCA,
                clientCertificates: mode.transport
            )
        }
    }

    /// `tls.client_certificates` as written in the file.
    enum ClientCertificateMode: String, CaseIterable {
        case none, optional, required

        var transport: ServerConfiguration.TLS.ClientCertificates {
            switch self {
            case .none: return .none
            case .optional: return .optional
            case .required: return .required
            }
        }
    }

    func limits() throws(ConfigurationError) -> ServerLimits {
        var limits = ServerLimits()
        limits.maxFrameBytes = try integer(
            "limits.max_frame_bytes", in: ServerLimits.maxFrameBytesRange, default: limits.maxFrameBytes)
        limits.maxRequestsInFlightPerConnection = try integer(
            "limits.max_requests_in_flight",
            in: ServerLimits.maxRequestsInFlightPerConnectionRange,
            default: limits.maxRequestsInFlightPerConnection
        )
        limits.maxConnections = try integer(
            "limits.max_connections", in: ServerLimits.maxConnectionsRange, default: limits.maxConnections)
        limits.maxConnectionsPerAddress = try integer(
            "limits.max_connections_per_address",
            in: ServerLimits.maxConnectionsPerAddressRange,
            default: limits.maxConnectionsPerAddress
        )
        limits.handshakeTimeout = try duration(
            "limits.handshake_timeout_ms", unit: .milliseconds(1), in: 10...86_400_000, default: limits.handshakeTimeout
        )
        limits.idleTimeout = try duration(
            "limits.idle_timeout_seconds", unit: .seconds(1), in: 1...86_400, default: limits.idleTimeout)
        limits.readTimeout = try duration(
            "limits.read_timeout_ms", unit: .milliseconds(1), in: 10...86_400_000, default: limits.readTimeout)
        limits.keepaliveInterval = try duration(
            "limits.keepalive_seconds", unit: .seconds(1), in: 1...86_400, default: limits.keepaliveInterval)
        limits.keepaliveTimeout = try duration(
            "limits.keepalive_timeout_seconds", unit: .seconds(1), in: 1...86_400, default: limits.keepaliveTimeout)
        limits.drainTimeout = try duration(
            "limits.drain_timeout_seconds", unit: .seconds(1), in: 0...3600, default: limits.drainTimeout)
        limits.maxQueuedRequestsPerTenant = try integer(
            "fair_queue.max_waiting_per_tenant",
            in: ServerLimits.maxQueuedRequestsPerTenantRange,
            default: limits.maxQueuedRequestsPerTenant
        )
        limits.maxTenantQueueWait = try duration(
            "fair_queue.max_wait_ms", unit: .milliseconds(1), in: 1...300_000, default: limits.maxTenantQueueWait)
        return limits
    }

    func fairQueue() throws(ConfigurationError) -> FairQueueSettings {
        var settings = FairQueueSettings()
        settings.maximumConcurrent = try integer(
            "fair_queue.max_concurrent", in: 1...100_000, default: settings.maximumConcurrent)
        settings.minimumConcurrent = try integer(
            "fair_queue.min_concurrent", in: 1...settings.maximumConcurrent,
            default: min(settings.minimumConcurrent, settings.maximumConcurrent))
        return settings
    }

    func auth() throws(ConfigurationError) -> AuthSettings {
        var settings = AuthSettings()
        if let path = try string("auth.bootstrap_token_file", maximumBytes: GatewayConfiguration.maximumPathByteCount) {
            let parent = (path as NSString).deletingLastPathComponent
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: parent.isEmpty ? "." : parent, isDirectory: &isDirectory),
                isDirectory.boolValue
            else {
                throw ConfigurationError("\(origin("auth.bootstrap_token_file")): directory \(parent) does not exist")
            }
            settings.bootstrapTokenFile = path
        }
        settings.accessCacheTTL = try duration(
            "auth.access_cache_ttl_ms", unit: .milliseconds(1), in: 0...2000, default: settings.accessCacheTTL)
        let defaults = AuthSettings.FailureLimit()
        let range = AuthSettings.FailureLimit.range
        let burst = try integer("auth.failure_burst", in: 0...range.upperBound, default: defaults.burst)
        let perMinute = try integer("auth.failures_per_minute", in: range, default: defaults.perMinute)
        if burst == 0 {
            settings.failedAuthentications = nil
        } else {
            var limit = defaults
            limit.burst = burst
            limit.perMinute = perMinute
            settings.failedAuthentications = limit
        }
        return settings
    }

    func rewrap() throws(ConfigurationError) -> RewrapSettings {
        var settings = RewrapSettings()
        settings.batchSize = try integer("rewrap.batch_size", in: 1...1000, default: settings.batchSize)
        let perSecond = try integer("rewrap.keys_per_second", in: 0...1_000_000, default: settings.keysPerSecond ?? 0)
        settings.keysPerSecond = perSecond == 0 ? nil : perSecond
        return settings
    }
}

/// Checks on files named by settings.
enum FileChecks {
    /// The path names a regular file this process can read; with `secret`, one that group and
    /// others cannot access (a PIN, a password or a private key must not be world-readable).
    static func checkReadableFile(_ path: String, secret: Bool, setting: String) throws(ConfigurationError) {
        var status = stat()
        guard stat(path, &status) == 0 else {
            throw ConfigurationError("\(setting): \(path): \(String(cString: strerror(errno)))")
        }
        guard (status.st_mode & S_IFMT) == S_IFREG else {
            throw ConfigurationError("\(setting): \(path) is not a regular file")
        }
        if secret, status.st_mode & 0o077 != 0 {
            throw ConfigurationError(
                "\(setting): \(path) has mode \(String(status.st_mode & 0o777, radix: 8)); group and others "
                    + "must have no access (chmod 600)"
            )
        }
        guard access(path, R_OK) == 0 else {
            throw ConfigurationError("\(setting): \(path) is not readable by this user")
        }
    }
}
