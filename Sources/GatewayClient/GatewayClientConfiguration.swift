import GatewayWire
import NIOSSL

/// An API token, held so that it does not print: `description`, `debugDescription` and the
/// mirror (`dump`) all show only that a token is present.
public struct APIToken: Sendable, Hashable, CustomStringConvertible, CustomDebugStringConvertible,
    CustomReflectable
{
    /// The token text ("hsmgw_" and 43 base64url characters for tokens the gateway issues).
    public let value: String

    /// Wraps `value`.
    public init(_ value: String) { self.value = value }

    public var description: String { "APIToken(redacted)" }
    public var debugDescription: String { description }
    public var customMirror: Mirror { Mirror(self, children: [:]) }
}

/// Everything a `GatewayClient` needs: where the gateway is, how to secure and authenticate the
/// connection, and the client's own limits. `validate()` explains precisely what is wrong;
/// `GatewayClient.init` calls it.
public struct GatewayClientConfiguration: Sendable, CustomStringConvertible {
    /// Where the gateway listens.
    public enum Target: Sendable, Hashable, CustomStringConvertible {
        /// A host name or IP address and a TCP port (the gateway's default is 7700).
        case host(String, port: Int)
        /// A Unix domain socket.
        case unixSocket(path: String)

        public var description: String {
            switch self {
            case .host(let host, let port): return "\(host):\(port)"
            case .unixSocket(let path): return "unix:\(path)"
            }
        }
    }

    /// Which certificates the client trusts for the server.
    public enum TrustRoots: Sendable, Hashable {
        /// The system's trust store.
        case system
        /// The certificates in a PEM file (a private CA's certificate).
        case pemFile(path: String)
    }

    /// TLS settings.
    public struct TLS: Sendable, Hashable {
        /// The server certificate's issuers.
        public var trustRoots: TrustRoots
        /// The name to verify in the server certificate and to send as SNI, when it is not the
        /// target's host (connecting by IP address or through a Unix socket).
        public var serverHostnameOverride: String?
        /// A PEM file with the client certificate chain, leaf first, for mutual TLS.
        public var clientCertificateChainPath: String?
        /// A PEM file with the client certificate's private key, for mutual TLS.
        public var clientPrivateKeyPath: String?

        /// TLS trusting `trustRoots`, optionally presenting a client certificate.
        public init(
            trustRoots: TrustRoots = .system,
            serverHostnameOverride: String? = nil,
            clientCertificateChainPath: String? = nil,
            clientPrivateKeyPath: String? = nil
        ) {
            self.trustRoots = trustRoots
            self.serverHostnameOverride = serverHostnameOverride
            self.clientCertificateChainPath = clientCertificateChainPath
            self.clientPrivateKeyPath = clientPrivateKeyPath
        }
    }

    /// How the connection is secured.
    public enum TransportSecurity: Sendable, Hashable {
        /// No TLS: for loopback, Unix sockets, or a server started with `--allow-plaintext`.
        case plaintext
        /// TLS 1.2 or 1.3.
        case tls(TLS)
    }

    // MARK: Limits

    /// The largest pool: each connection already carries up to the server's in-flight limit
    /// (128 by default), so a few connections serve thousands of concurrent calls; more mostly
    /// costs the server connection slots (1,024 per instance by default).
    public static let maximumPoolSize = 64
    /// The longest connect timeout (TCP, TLS and the Hello handshake together).
    public static let maximumConnectTimeout: Duration = .seconds(300)
    /// The longest deadline a call may have. Every method finishes in well under a minute on a
    /// healthy gateway; long background work (rewrap) runs as a job.
    public static let maximumDeadline: Duration = .seconds(3600)
    /// The most requests one connection may have in flight whatever the server offers: a bound
    /// on the client's pending table.
    public static let maximumRequestsInFlightLimit = 4096
    /// The most calls that may wait for an in-flight slot on one connection: past it a call
    /// fails at once with `RESOURCE_EXHAUSTED` instead of queueing without bound.
    public static let maximumQueuedRequestsLimit = 100_000
    /// The longest wait past a call's deadline before the client gives up on its own.
    public static let maximumLocalDeadlineGrace: Duration = .seconds(10)
    /// The longest client name, as the protocol allows (`HelloRequest.client_name`).
    public static let maximumClientNameByteCount = ClientNameRule.maximumByteCount
    /// The longest API token accepted: gateway tokens are 49 bytes; this only bounds input.
    public static let maximumAPITokenByteCount = 512
    /// The longest Unix socket path that fits `sockaddr_un` on both Linux (108) and macOS (104),
    /// with its terminating zero.
    public static let maximumUnixSocketPathByteCount = 103
    /// The longest DNS name.
    public static let maximumHostByteCount = 253

    // MARK: Settings

    /// Where the gateway listens.
    public var target: Target
    /// Plaintext or TLS.
    public var transportSecurity: TransportSecurity
    /// The API token sent in the Hello handshake; nil when mutual TLS alone authenticates.
    public var apiToken: APIToken?
    /// A name for the gateway's logs, e.g. "billing-service/1.2": at most 128 bytes, with no
    /// control, format, line or paragraph separator characters (``ClientNameRule``).
    public var clientName: String
    /// How many connections the client may open (1 to `maximumPoolSize`; default 2). They are
    /// opened lazily: a second only when the first is at its in-flight limit.
    public var poolSize: Int
    /// How long opening a connection may take: TCP, TLS and the Hello handshake.
    public var connectTimeout: Duration
    /// The deadline of calls that do not give one; nil for none.
    public var defaultDeadline: Duration?
    /// Retries of failed calls.
    public var retryPolicy: RetryPolicy
    /// A cap on requests in flight per connection below the server's (`HelloResponse`); nil to
    /// use the server's value as it is.
    public var maximumRequestsInFlightPerConnection: Int?
    /// How many calls may wait locally for an in-flight slot on one connection (default 4,096).
    public var maximumQueuedRequestsPerConnection: Int
    /// How long past a call's deadline the client still waits for the server's own
    /// `DEADLINE_EXCEEDED` (which names the request) before failing the call itself and sending a
    /// cancel; the protocol suggests about 1 s (`docs/protocol.md`, section 5.1).
    public var localDeadlineGrace: Duration

    /// A configuration with defaults for everything but the target and the security.
    public init(
        target: Target,
        transportSecurity: TransportSecurity,
        apiToken: APIToken? = nil,
        clientName: String = "hsm-gateway-swift-client",
        poolSize: Int = 2,
        connectTimeout: Duration = .seconds(10),
        defaultDeadline: Duration? = .seconds(30),
        retryPolicy: RetryPolicy = .default,
        maximumRequestsInFlightPerConnection: Int? = nil,
        maximumQueuedRequestsPerConnection: Int = 4096,
        localDeadlineGrace: Duration = .seconds(1)
    ) {
        self.target = target
        self.transportSecurity = transportSecurity
        self.apiToken = apiToken
        self.clientName = clientName
        self.poolSize = poolSize
        self.connectTimeout = connectTimeout
        self.defaultDeadline = defaultDeadline
        self.retryPolicy = retryPolicy
        self.maximumRequestsInFlightPerConnection = maximumRequestsInFlightPerConnection
        self.maximumQueuedRequestsPerConnection = maximumQueuedRequestsPerConnection
        self.localDeadlineGrace = localDeadlineGrace
    }

    /// Never shows the token.
    public var description: String {
        let security: String
        switch transportSecurity {
        case .plaintext: security = "plaintext"
        case .tls(let tls): security = tls.clientCertificateChainPath == nil ? "tls" : "mtls"
        }
        return "GatewayClientConfiguration(target: \(target), security: \(security), "
            + "token: \(apiToken == nil ? "none" : "redacted"), clientName: \(clientName), poolSize: \(poolSize))"
    }

    /// Checks every field against its rule and limit.
    public func validate() throws(GatewayClientConfigurationError) {
        switch target {
        case .host(let host, let port):
            guard !host.isEmpty, host.utf8.count <= Self.maximumHostByteCount,
                !host.unicodeScalars.contains(where: { $0.properties.isWhitespace || $0.value < 0x20 })
            else {
                throw .init(
                    .invalidValue,
                    field: "target.host",
                    "must be 1 to \(Self.maximumHostByteCount) bytes without spaces or control characters"
                )
            }
            guard (1...65535).contains(port) else {
                throw .init(.outOfRange, field: "target.port", "must be 1 to 65535, is \(port)")
            }
        case .unixSocket(let path):
            guard !path.isEmpty, path.utf8.count <= Self.maximumUnixSocketPathByteCount, !path.utf8.contains(0) else {
                throw .init(
                    .invalidValue,
                    field: "target.path",
                    "must be 1 to \(Self.maximumUnixSocketPathByteCount) bytes (the size of sockaddr_un)"
                )
            }
        }
        if case .tls(let tls) = transportSecurity {
            try Self.validate(tls)
        }
        if let apiToken {
            let bytes = apiToken.value.utf8
            guard !bytes.isEmpty, bytes.count <= Self.maximumAPITokenByteCount,
                bytes.allSatisfy({ (0x21...0x7E).contains($0) })
            else {
                // Says nothing of the token itself.
                throw .init(
                    .invalidValue,
                    field: "apiToken",
                    "must be 1 to \(Self.maximumAPITokenByteCount) printable ASCII characters without spaces"
                )
            }
        }
        // The server's rule, which it enforces on Hello (INVALID_ARGUMENT `INVALID_CLIENT_NAME`).
        guard ClientNameRule.isValid(clientName) else {
            throw .init(.invalidValue, field: "clientName", "must be \(ClientNameRule.summary)")
        }
        guard (1...Self.maximumPoolSize).contains(poolSize) else {
            throw .init(.outOfRange, field: "poolSize", "must be 1 to \(Self.maximumPoolSize), is \(poolSize)")
        }
        guard connectTimeout > .zero, connectTimeout <= Self.maximumConnectTimeout else {
            throw .init(
                .outOfRange,
                field: "connectTimeout",
                "must be greater than zero and at most \(Self.maximumConnectTimeout)"
            )
        }
        if let defaultDeadline {
            guard defaultDeadline > .zero, defaultDeadline <= Self.maximumDeadline else {
                throw .init(
                    .outOfRange,
                    field: "defaultDeadline",
                    "must be greater than zero and at most \(Self.maximumDeadline)"
                )
            }
        }
        try retryPolicy.validate()
        if let maximum = maximumRequestsInFlightPerConnection {
            guard (1...Self.maximumRequestsInFlightLimit).contains(maximum) else {
                throw .init(
                    .outOfRange,
                    field: "maximumRequestsInFlightPerConnection",
                    "must be 1 to \(Self.maximumRequestsInFlightLimit), is \(maximum)"
                )
            }
        }
        guard (0...Self.maximumQueuedRequestsLimit).contains(maximumQueuedRequestsPerConnection) else {
            throw .init(
                .outOfRange,
                field: "maximumQueuedRequestsPerConnection",
                "must be 0 to \(Self.maximumQueuedRequestsLimit), is \(maximumQueuedRequestsPerConnection)"
            )
        }
        guard localDeadlineGrace >= .zero, localDeadlineGrace <= Self.maximumLocalDeadlineGrace else {
            throw .init(
                .outOfRange,
                field: "localDeadlineGrace",
                "must be 0 to \(Self.maximumLocalDeadlineGrace)"
            )
        }
    }

    private static func validate(_ tls: TLS) throws(GatewayClientConfigurationError) {
        if case .pemFile(let path) = tls.trustRoots, path.isEmpty {
            throw .init(.invalidValue, field: "tls.trustRoots", "needs a PEM file path")
        }
        if let name = tls.serverHostnameOverride {
            guard !name.isEmpty, name.utf8.count <= 255, !name.utf8.contains(0) else {
                throw .init(.invalidValue, field: "tls.serverHostnameOverride", "must be 1 to 255 bytes")
            }
        }
        switch (tls.clientCertificateChainPath, tls.clientPrivateKeyPath) {
        case (nil, nil):
            break
        case (let chain?, let key?):
            guard !chain.isEmpty else {
                throw .init(.invalidValue, field: "tls.clientCertificateChainPath", "must not be empty")
            }
            guard !key.isEmpty else {
                throw .init(.invalidValue, field: "tls.clientPrivateKeyPath", "must not be empty")
            }
        case (_?, nil):
            throw .init(
                .conflictingValues,
                field: "tls.clientPrivateKeyPath",
                "is required with tls.clientCertificateChainPath"
            )
        case (nil, _?):
            throw .init(
                .conflictingValues,
                field: "tls.clientCertificateChainPath",
                "is required with tls.clientPrivateKeyPath"
            )
        }
    }

    /// The TLS context, with every file loaded now so a bad file fails at start-up rather than at
    /// the first call; nil for plaintext.
    func makeSSLContext() throws(GatewayClientConfigurationError) -> NIOSSLContext? {
        guard case .tls(let tls) = transportSecurity else { return nil }
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.minimumTLSVersion = .tlsv12
        switch tls.trustRoots {
        case .system:
            configuration.trustRoots = .default
        case .pemFile(let path):
            do {
                let certificates = try NIOSSLCertificate.fromPEMFile(path)
                guard !certificates.isEmpty else {
                    throw GatewayClientConfigurationError(
                        .unreadableFile,
                        field: "tls.trustRoots",
                        "\(path) holds no PEM certificate"
                    )
                }
                configuration.trustRoots = .certificates(certificates)
            } catch let error as GatewayClientConfigurationError {
                throw error
            } catch {
                throw .init(.unreadableFile, field: "tls.trustRoots", "\(path) cannot be read as PEM certificates")
            }
        }
        if let chainPath = tls.clientCertificateChainPath, let keyPath = tls.clientPrivateKeyPath {
            let chain: [NIOSSLCertificate]
            do {
                chain = try NIOSSLCertificate.fromPEMFile(chainPath)
            } catch {
                throw .init(
                    .unreadableFile,
                    field: "tls.clientCertificateChainPath",
                    "\(chainPath) cannot be read as PEM certificates"
                )
            }
            guard !chain.isEmpty else {
                throw .init(
                    .unreadableFile,
                    field: "tls.clientCertificateChainPath",
                    "\(chainPath) holds no PEM certificate"
                )
            }
            let key: NIOSSLPrivateKey
            do {
                key = try NIOSSLPrivateKey(file: keyPath, format: .pem)
            } catch {
                // The error could quote the file; say only which file failed.
                throw .init(
                    .unreadableFile, field: "tls.clientPrivateKeyPath", "\(keyPath) cannot be read as a PEM key")
            }
            configuration.certificateChain = chain.map { .certificate($0) }
            configuration.privateKey = .privateKey(key)
        }
        do {
            return try NIOSSLContext(configuration: configuration)
        } catch {
            throw .init(
                .conflictingValues,
                field: "tls",
                "the certificates and key do not make a valid TLS context (does the key match the certificate?)"
            )
        }
    }

    /// The name to send as SNI and verify in the server certificate: the override, else the
    /// target's host unless it is an IP address (NIOSSL then verifies the address itself).
    var tlsServerHostname: String? {
        guard case .tls(let tls) = transportSecurity else { return nil }
        if let name = tls.serverHostnameOverride { return name }
        guard case .host(let host, _) = target else { return nil }
        return host.isIPAddressLiteral ? nil : host
    }
}

extension String {
    /// Whether the string is an IPv4 or IPv6 address literal (no DNS name).
    var isIPAddressLiteral: Bool {
        if contains(":") { return true }  // IPv6; DNS names never hold a colon.
        let parts = split(separator: ".", omittingEmptySubsequences: false)
        return parts.count == 4 && parts.allSatisfy { part in UInt8(part) != nil }
    }
}
