import Foundation
import GatewayConfig
import GatewayTransport
import Logging
import PostgresKeyStore
import SQLiteKeyStore

/// Everything the gateway needs to start, validated. Built by `load(file:environment:overrides:)`
/// from a YAML file, `HSMGW_*` environment variables and command-line flags, in that order of
/// precedence (flags win), or by `development(...)` for `--dev`. Every setting is documented in
/// docs/configuration.md; `hsm-config/gateway.example.yaml` shows them all.
public struct GatewayConfiguration: Sendable {
    /// Where the gateway accepts connections (TCP or Unix socket).
    public var listen: [ListenAddress]
    /// The plain-HTTP health and metrics endpoint; nil turns it off.
    public var metricsListen: ListenAddress?
    /// Serve plaintext on non-loopback TCP addresses (only behind a TLS-terminating proxy).
    public var allowPlaintext: Bool
    /// Names this instance in `Hello` and `ServerInfo` (several may share one database).
    public var instanceID: String
    /// TLS for the TCP listeners; nil for plaintext.
    public var tls: ServerConfiguration.TLS?
    /// The token holding the master keys.
    public var hsm: HSMSettings
    /// Where wrapped data keys, metadata and the audit log live.
    public var store: StoreSettings
    /// Transport limits (docs/protocol-rules.md, "Limits"), the tenant queues' bounds included.
    public var limits: ServerLimits
    /// Per-tenant fair admission of tenant-scoped work.
    public var fairQueue: FairQueueSettings
    /// Authentication settings.
    public var auth: AuthSettings
    /// How fast the background rewrap job goes.
    public var rewrap: RewrapSettings
    /// The least severe log level written.
    public var logLevel: Logger.Level

    /// A configuration with every default; `hsm` and `store` have none and must be given.
    public init(hsm: HSMSettings, store: StoreSettings) {
        self.listen = [.tcp(host: "127.0.0.1", port: ListenAddress.defaultPort)]
        self.metricsListen = .tcp(host: "127.0.0.1", port: ListenAddress.defaultMetricsPort)
        self.allowPlaintext = false
        self.instanceID = Self.defaultInstanceID()
        self.tls = nil
        self.hsm = hsm
        self.store = store
        self.limits = ServerLimits()
        self.fairQueue = FairQueueSettings()
        self.auth = AuthSettings()
        self.rewrap = RewrapSettings()
        self.logLevel = .info
    }

    /// The host name and a random suffix: readable, and unique when two instances share a host.
    static func defaultInstanceID() -> String {
        let host = ProcessInfo.processInfo.hostName.split(separator: ".").first.map(String.init) ?? "gateway"
        let suffix = String(UInt32.random(in: 0...UInt32.max), radix: 36)
        return String("\(host)-\(suffix)".prefix(AuthSettings.maximumInstanceIDLength))
    }

    /// Checks the rules that tie settings together: plaintext only on loopback, Unix sockets or
    /// with `allow_plaintext`; client certificates only with TLS. `load` calls it; call it again
    /// after changing fields by hand.
    public func validate() throws(ConfigurationError) {
        guard !listen.isEmpty else { throw ConfigurationError("listen: at least one address is required") }
        if tls == nil, !allowPlaintext {
            for address in listen where !address.isLoopbackOrLocal {
                throw ConfigurationError(
                    "listen: \(address) is not a loopback address and no TLS is configured; set "
                        + "tls.certificate and tls.private_key, or allow_plaintext: true behind a TLS proxy"
                )
            }
        }
        do {
            try limits.validate()
        } catch {
            throw ConfigurationError("limits: \(error.message)")
        }
        if let tls, tls.clientCertificates != .none, tls.clientCAPath == nil {
            throw ConfigurationError(
                "tls.client_certificates asks for client certificates but tls.client_ca is not set")
        }
        if case .unix = metricsListen {
            throw ConfigurationError("metrics_listen: must be host:port (HTTP over a Unix socket is not served)")
        }
        if let metricsListen, metricsListen.port != 0, listen.contains(metricsListen) {
            throw ConfigurationError("metrics_listen: \(metricsListen) is also a gateway listen address")
        }
    }
}

extension GatewayConfiguration {
    /// The transport's configuration: listeners, TLS, plaintext rule and limits.
    public var transportConfiguration: ServerConfiguration {
        ServerConfiguration(
            listeners: listen.map(\.transportListener),
            tls: tls,
            allowPlaintext: allowPlaintext,
            limits: limits
        )
    }
}

/// A listening address: `host:port` (`127.0.0.1:7700`, `[::1]:7700`, `0.0.0.0:7700`) or
/// `unix:/path/to/socket`.
public enum ListenAddress: Sendable, Hashable, CustomStringConvertible {
    /// TCP on `host` (an address or `localhost`) and `port` (0: any free port).
    case tcp(host: String, port: Int)
    /// A Unix domain socket at `path` (always plaintext).
    case unix(path: String)

    /// The protocol's default port.
    public static let defaultPort = 7700
    /// The default port of the health and metrics endpoint.
    public static let defaultMetricsPort = 7701
    /// The longest Unix socket path (`sun_path` is 108 bytes on Linux, with its NUL).
    public static let maximumUnixPathLength = 107

    /// Parses `host:port`, `[v6]:port` or `unix:/path`; port 0 asks for any free port.
    public init(parsing text: String) throws(ConfigurationError) {
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst("unix:".count))
            guard path.hasPrefix("/") || path.hasPrefix("."), path.utf8.count <= Self.maximumUnixPathLength else {
                throw ConfigurationError(
                    "`\(text)`: a Unix socket path must be absolute (or ./relative) and at most "
                        + "\(Self.maximumUnixPathLength) bytes"
                )
            }
            self = .unix(path: path)
            return
        }
        let host: Substring
        let portText: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]"), text[text.index(after: close)...].hasPrefix(":") else {
                throw ConfigurationError("`\(text)` is not [ipv6]:port")
            }
            host = text[text.index(after: text.startIndex)..<close]
            portText = text[text.index(close, offsetBy: 2)...]
        } else {
            guard let colon = text.lastIndex(of: ":") else {
                throw ConfigurationError("`\(text)` is not host:port or unix:/path")
            }
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
        }
        guard !host.isEmpty, !host.contains(" ") else { throw ConfigurationError("`\(text)` has no host") }
        guard let port = Int(portText), (0...65_535).contains(port) else {
            throw ConfigurationError("`\(text)`: the port must be 0 to 65535")
        }
        self = .tcp(host: String(host), port: port)
    }

    /// The TCP port; nil for a Unix socket.
    public var port: Int? {
        if case .tcp(_, let port) = self { return port }
        return nil
    }

    /// Loopback TCP or a Unix socket: where plaintext is allowed without `allow_plaintext`.
    public var isLoopbackOrLocal: Bool {
        switch self {
        case .unix: return true
        case .tcp(let host, _):
            return host == "localhost" || host == "::1" || host.hasPrefix("127.")
        }
    }

    /// The transport's form of the address.
    public var transportListener: ServerConfiguration.Listener {
        switch self {
        case .tcp(let host, let port): return .tcp(host: host, port: port)
        case .unix(let path): return .unixDomainSocket(path: path)
        }
    }

    /// `host:port`, `[v6]:port` or `unix:/path`, as parsed.
    public var description: String {
        switch self {
        case .tcp(let host, let port): return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        case .unix(let path): return "unix:\(path)"
        }
    }
}

/// The key store.
public enum StoreSettings: Sendable, Hashable {
    /// One SQLite file (single instance).
    /// One SQLite file (single instance) at `path`.
    case sqlite(path: String)
    /// PostgreSQL (several instances may share it).
    /// PostgreSQL (several instances may share it).
    case postgres(PostgresSettings)

    /// `sqlite` or `postgres`, as `ServerInfo` reports it.
    public var kind: String {
        switch self {
        case .sqlite: return "sqlite"
        case .postgres: return "postgres"
        }
    }

    /// Connections the store may hold at once: the PostgreSQL pool size, or SQLite's writer and
    /// its readers.
    public var connectionLimit: Int {
        switch self {
        case .sqlite: return 1 + SQLiteKeyStore.readerCount
        case .postgres(let settings): return settings.maximumConnections
        }
    }
}

/// Where and how to reach PostgreSQL.
public struct PostgresSettings: Sendable, Hashable {
    /// TLS to the server over TCP (`store.postgres.tls`: `disable` or `verify-full`, with
    /// `tls_ca_file` and `tls_server_name`), as the store takes it.
    public typealias TLS = PostgresKeyStoreConfiguration.TLS

    /// Server host, for TCP.
    public var host: String
    /// Server port, for TCP.
    public var port: Int
    /// The server's socket file (`…/.s.PGSQL.5432`); used instead of host and port when set.
    public var unixSocketPath: String?
    /// The role to log in as.
    public var user: String
    /// The database holding the gateway's tables.
    public var database: String
    /// A file holding the password (mode 0600 or 0400; one trailing newline ignored); nil for none.
    public var passwordFile: String?
    /// Connection pool size.
    public var maximumConnections: Int
    /// TLS over TCP; never with `unixSocketPath`.
    public var tls: TLS
    /// Standbys that may be promoted, tried after `host`:`port` (`store.postgres.failover_hosts`).
    public var failoverServers: [PostgresKeyStoreConfiguration.Server] = []
    /// Warn about, or refuse, a server whose commits would not survive a failover
    /// (`store.postgres.standby_durability`).
    public var standbyDurability: StandbyDurability = .warn
    public typealias StandbyDurability = PostgresKeyStoreConfiguration.StandbyDurability

    /// Settings; only `user` and `database` have no default.
    public init(
        host: String = "127.0.0.1",
        port: Int = 5432,
        unixSocketPath: String? = nil,
        user: String,
        database: String,
        passwordFile: String? = nil,
        maximumConnections: Int = 8,
        tls: TLS = .disable
    ) {
        self.host = host
        self.port = port
        self.unixSocketPath = unixSocketPath
        self.user = user
        self.database = database
        self.passwordFile = passwordFile
        self.maximumConnections = maximumConnections
        self.tls = tls
    }
}

/// Per-tenant fair admission of tenant-scoped work, beyond the queue bounds in `ServerLimits`.
public struct FairQueueSettings: Sendable, Hashable {
    /// The most tenant-scoped requests running at once across all tenants (64): the ceiling of
    /// the adaptive limit (``TenantFairScheduler``), enough to keep the token's sessions and the
    /// store's connections busy.
    public var maximumConcurrent = 64
    /// The least the adaptive limit falls to (4; at most `maximumConcurrent`). Set it equal to
    /// `maximumConcurrent` for a fixed limit.
    public var minimumConcurrent = 4

    /// The defaults.
    public init() {}
}

/// Authentication settings.
public struct AuthSettings: Sendable, Hashable {
    /// The longest instance id.
    public static let maximumInstanceIDLength = 64
    /// The longest access-cache lifetime: the protocol promises revocation within 2 s.
    public static let maximumAccessCacheTTL: Duration = .seconds(2)

    /// Where the first admin token is written when no principal exists yet (production start);
    /// nil: none is made, and the log says how to make one.
    public var bootstrapTokenFile: String?
    /// How long a checked API token is trusted before it is checked again (2 s at most).
    public var accessCacheTTL: Duration = .seconds(2)
    /// Refused authentications allowed per source address before its Hellos are refused
    /// RESOURCE_EXHAUSTED for a while (`auth.failure_burst`, `auth.failures_per_minute`); nil
    /// (`auth.failure_burst: 0`): no limit.
    public var failedAuthentications: FailureLimit? = FailureLimit()

    /// A token bucket of refused authentications per source address.
    public struct FailureLimit: Sendable, Hashable {
        /// Accepted for both values.
        public static let range = 1...100_000
        /// Failures in a row an address may have (20).
        public var burst = 20
        /// Failures per minute it earns back (60: one a second).
        public var perMinute = 60

        /// The defaults.
        public init() {}
    }

    /// The defaults, optionally with a bootstrap token file.
    public init(bootstrapTokenFile: String? = nil) {
        self.bootstrapTokenFile = bootstrapTokenFile
    }
}

/// How fast the background rewrap job moves data keys.
public struct RewrapSettings: Sendable, Hashable {
    /// Data keys per batch (100; 1 to 1,000).
    public var batchSize = 100
    /// Data keys per second (1,000); nil for no limit.
    public var keysPerSecond: Int? = 1000

    /// The defaults.
    public init() {}
}
