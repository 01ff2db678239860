/// Where and how `PostgresKeyStore` connects.
///
/// Over TCP, `tls` says whether the connection is encrypted and how the server is verified; a
/// Unix socket never uses TLS (it does not leave the host).
public struct PostgresKeyStoreConfiguration: Sendable {
    /// TLS for TCP connections, after libpq's `sslmode` values of the same names.
    public enum TLS: Sendable, Hashable {
        /// Plain TCP: for a database on the gateway's host or on a network already protected.
        case disable
        /// TLS 1.2 or later is required, and the server's certificate must chain to the PEM
        /// certificates in `caFile` (nil: the system's trust roots) and name `serverName` (nil:
        /// `host`, or the address connected to when `host` is an IP address). No fallback to
        /// plain TCP.
        case verifyFull(caFile: String?, serverName: String?)
    }

    /// A server the store may connect to over TCP.
    public struct Server: Sendable, Hashable, CustomStringConvertible {
        public var host: String
        public var port: Int
        public init(host: String, port: Int) {
            self.host = host
            self.port = port
        }
        public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
    }

    /// What `open` does when the server streams to standbys (or `failoverServers` names some) but
    /// a commit it acknowledges would not survive a failover: `synchronous_commit` is not `on` or
    /// `remote_apply`, or `synchronous_standby_names` is empty.
    public enum StandbyDurability: String, Sendable, Hashable, CaseIterable {
        /// Log a warning and serve.
        case warn
        /// Refuse to open (`StorageError(.other)`).
        case refuse
    }

    /// The most servers in all (`host` and `failoverServers`): a primary and its standbys.
    public static let maximumServers = 16

    /// The default pool size: enough for group commit and concurrent reads on a small gateway,
    /// well below PostgreSQL's default `max_connections` (100) when several gateways share it.
    public static let defaultMaximumConnections = 8
    /// Pool sizes accepted: at least one connection; at most 256, beyond which PostgreSQL's
    /// per-connection processes cost more than they bring (use a pooler such as PgBouncer).
    public static let maximumConnectionsRange = 1...256

    /// Server host name or address, for TCP.
    public var host: String
    /// Server port, for TCP.
    public var port: Int
    /// Path of the server's Unix socket file (`…/.s.PGSQL.<port>`); when set, used instead of
    /// `host` and `port`.
    public var unixSocketPath: String?
    /// The role to log in as.
    public var username: String
    /// The role's password (scram-sha-256 or md5); nil when the server needs none.
    public var password: String?
    /// The database holding the key store's tables.
    public var database: String
    /// Pool size: default `defaultMaximumConnections` (8), `maximumConnectionsRange` (1...256)
    /// accepted; `PostgresKeyStore.open` refuses anything else.
    public var maximumConnections: Int
    /// TLS for TCP; `PostgresKeyStore.open` refuses TLS with `unixSocketPath`.
    public var tls: TLS
    /// Further servers, tried in order after `host`:`port`: standbys that may be promoted. The
    /// store uses the first that accepts writes (not in recovery, as libpq's
    /// `target_session_attrs=read-write`), and moves to another when that one stops accepting
    /// them. Not with `unixSocketPath`; at most `maximumServers` in all.
    public var failoverServers: [Server]
    /// Whether a server whose commits would not survive a failover is refused or only warned about.
    public var standbyDurability: StandbyDurability
    /// The `application_name` of every connection (at most 63 bytes, the server's limit); the
    /// gateway sets it to its background-lease holder id, which the rewrap-job fence compares
    /// with the lease (migration 5). Nil: the server's default.
    public var applicationName: String?

    /// A configuration; only `username` and `database` have no default.
    public init(
        host: String = "127.0.0.1",
        port: Int = 5432,
        unixSocketPath: String? = nil,
        username: String,
        password: String? = nil,
        database: String,
        maximumConnections: Int = PostgresKeyStoreConfiguration.defaultMaximumConnections,
        tls: TLS = .disable,
        failoverServers: [Server] = [],
        standbyDurability: StandbyDurability = .warn
    ) {
        self.host = host
        self.port = port
        self.unixSocketPath = unixSocketPath
        self.username = username
        self.password = password
        self.database = database
        self.maximumConnections = maximumConnections
        self.tls = tls
        self.failoverServers = failoverServers
        self.standbyDurability = standbyDurability
    }

    /// Every server, in the order they are tried: `host`:`port` first.
    var servers: [Server] { [Server(host: host, port: port)] + failoverServers }

    /// Where the store connects, for log lines and errors (never the password).
    var endpointDescription: String { endpointDescription(server: 0) }

    /// `endpointDescription` for `servers[server]`.
    func endpointDescription(server: Int) -> String {
        if let unixSocketPath {
            return "unix:\(unixSocketPath) database \(database)"
        }
        let security = if case .verifyFull = tls { " (TLS)" } else { "" }
        return "\(servers[server]) database \(database)\(security)"
    }
}
