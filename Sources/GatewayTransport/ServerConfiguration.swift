import NIOCore
import NIOSSL

/// Where and how the gateway listens: TCP addresses and/or a Unix socket, TLS (with optional
/// client certificates), and the limits of ``ServerLimits``.
///
/// TLS applies to the TCP listeners. A Unix socket is always plaintext: only local processes that
/// the socket file's permissions admit can reach it. Plaintext TCP is refused at start on any
/// address that is not loopback, unless ``allowPlaintext`` is set.
public struct ServerConfiguration: Sendable, Hashable {
    /// One address to accept connections on.
    public struct Listener: Sendable, Hashable, CustomStringConvertible {
        enum Address: Sendable, Hashable {
            case tcp(host: String, port: Int)
            case unixDomainSocket(path: String)
        }
        let address: Address

        /// TCP on `host` (an IP address or `localhost`; `0.0.0.0` or `::` for every interface)
        /// and `port` (0 picks a free port; see ``GatewayTransportServer/listeningAddresses()``).
        public static func tcp(host: String, port: Int) -> Listener { Listener(address: .tcp(host: host, port: port)) }

        /// A Unix domain socket at `path`. A stale socket file left by an earlier run is removed.
        public static func unixDomainSocket(path: String) -> Listener {
            Listener(address: .unixDomainSocket(path: path))
        }

        /// A short text for logs.

        public var description: String {
            switch address {
            case .tcp(let host, let port): return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
            case .unixDomainSocket(let path): return "unix:\(path)"
            }
        }
    }

    /// TLS for the TCP listeners: the server's certificate and key, and client certificates.
    public struct TLS: Sendable, Hashable {
        /// Whether the server asks clients for a certificate (mTLS). A client certificate is
        /// accepted only when it verifies against the client CA and its extendedKeyUsage
        /// extension lists `clientAuth`; any other presented certificate fails the TLS handshake.
        public enum ClientCertificates: Sendable, Hashable {
            /// Not asked for; clients authenticate with an API token in Hello.
            case none
            /// Asked for; a certificate that is presented must be acceptable (above), but a
            /// client may present none (and use a token).
            case optional
            /// Required: the TLS handshake fails without an acceptable certificate.
            case required
        }

        /// PEM file with the server certificate first, then any intermediates.
        public var certificateChainPath: String
        /// PEM file with the server's private key.
        public var privateKeyPath: String
        /// PEM file with the CA certificate(s) that sign client certificates; required unless
        /// `clientCertificates` is `.none`.
        public var clientCAPath: String?
        /// Whether client certificates are asked for, and whether they are required.
        public var clientCertificates: ClientCertificates

        /// TLS with the server's certificate chain and key, and optionally client certificates.
        public init(
            certificateChainPath: String,
            privateKeyPath: String,
            clientCAPath: String? = nil,
            clientCertificates: ClientCertificates = .none
        ) {
            self.certificateChainPath = certificateChainPath
            self.privateKeyPath = privateKeyPath
            self.clientCAPath = clientCAPath
            self.clientCertificates = clientCertificates
        }
    }

    /// Where to accept connections; at least one.
    public var listeners: [Listener]
    /// TLS for the TCP listeners; nil for plaintext.
    public var tls: TLS?
    /// Allows plaintext TCP on addresses that are not loopback (`--allow-plaintext`). Off by
    /// default: API tokens and data keys would cross the network in clear.
    public var allowPlaintext: Bool
    /// The protocol's limits.
    public var limits: ServerLimits

    /// A configuration; nothing is checked until ``validate()`` (which the server runs at start).
    public init(
        listeners: [Listener],
        tls: TLS? = nil,
        allowPlaintext: Bool = false,
        limits: ServerLimits = ServerLimits()
    ) {
        self.listeners = listeners
        self.tls = tls
        self.allowPlaintext = allowPlaintext
        self.limits = limits
    }

    /// The longest Unix socket path the kernel takes (`sun_path` holds 108 bytes with the NUL).
    public static let maxUnixSocketPathBytes = 107

    /// Checks the limits, the listeners and the plaintext rule; does not read the TLS files
    /// (``GatewayTransportServer`` loads them at start and reports what fails).
    public func validate() throws(GatewayTransportError) {
        try limits.validate()
        guard !listeners.isEmpty else {
            throw GatewayTransportError(.noListener, "no listener is configured (give a TCP address or a Unix socket)")
        }
        for listener in listeners {
            switch listener.address {
            case .tcp(let host, let port):
                guard !host.isEmpty else {
                    throw GatewayTransportError(.invalidListener, "listener \(listener): the host is empty")
                }
                guard (0...65_535).contains(port) else {
                    throw GatewayTransportError(.invalidListener, "listener \(listener): port \(port) is out of range")
                }
                if tls == nil, !allowPlaintext, !Self.isLoopback(host: host) {
                    throw GatewayTransportError(
                        .plaintextNotAllowed,
                        "listener \(listener) is plaintext TCP on an address that is not loopback; configure TLS, "
                            + "listen on 127.0.0.1, ::1 or a Unix socket, or set allowPlaintext (--allow-plaintext)"
                    )
                }
            case .unixDomainSocket(let path):
                guard !path.isEmpty, path.utf8.count <= Self.maxUnixSocketPathBytes else {
                    throw GatewayTransportError(
                        .invalidListener,
                        "listener \(listener): a Unix socket path must be 1–\(Self.maxUnixSocketPathBytes) bytes"
                    )
                }
            }
        }
        if let tls {
            switch (tls.clientCertificates, tls.clientCAPath) {
            case (.none, .some):
                throw GatewayTransportError(
                    .tlsConfigurationInvalid,
                    "a client CA is configured but client certificates are not asked for; "
                        + "set clientCertificates to optional or required"
                )
            case (.optional, nil), (.required, nil):
                throw GatewayTransportError(
                    .tlsConfigurationInvalid,
                    "client certificates are asked for but no client CA file is configured"
                )
            default:
                break
            }
        }
    }

    /// Whether `host` is certainly a loopback address: `localhost`, an IPv4 address in
    /// 127.0.0.0/8, `::1`, or an IPv4-mapped loopback. Any other name is not trusted to resolve
    /// to loopback.
    static func isLoopback(host: String) -> Bool {
        if host == "localhost" { return true }
        let bare = host.hasPrefix("[") && host.hasSuffix("]") ? String(host.dropFirst().dropLast()) : host
        guard let address = try? SocketAddress(ipAddress: bare, port: 0) else { return false }
        switch address {
        case .v4(let v4):
            return UInt32(bigEndian: v4.address.sin_addr.s_addr) >> 24 == 127
        case .v6(let v6):
            var raw = v6.address.sin6_addr
            let bytes = withUnsafeBytes(of: &raw) { Array($0) }
            let loopback: [UInt8] = Array(repeating: 0, count: 15) + [1]
            let mappedPrefix: [UInt8] = Array(repeating: 0, count: 10) + [0xFF, 0xFF]
            return bytes == loopback || (Array(bytes.prefix(12)) == mappedPrefix && bytes[12] == 127)
        case .unixDomainSocket:
            return false
        }
    }

    /// Loads the TLS material into a context; nil without TLS.
    func makeTLSContext() throws(GatewayTransportError) -> NIOSSLContext? {
        guard let tls else { return nil }
        let chain: [NIOSSLCertificate]
        do {
            chain = try NIOSSLCertificate.fromPEMFile(tls.certificateChainPath)
        } catch {
            throw GatewayTransportError(
                .tlsConfigurationInvalid,
                "cannot load the certificate chain from \(tls.certificateChainPath): \(Self.describe(error))"
            )
        }
        guard !chain.isEmpty else {
            throw GatewayTransportError(
                .tlsConfigurationInvalid,
                "the certificate chain file \(tls.certificateChainPath) holds no certificate"
            )
        }
        let key: NIOSSLPrivateKey
        do {
            key = try NIOSSLPrivateKey(file: tls.privateKeyPath, format: .pem)
        } catch {
            throw GatewayTransportError(
                .tlsConfigurationInvalid,
                "cannot load the private key from \(tls.privateKeyPath): \(Self.describe(error))"
            )
        }
        var configuration = TLSConfiguration.makeServerConfiguration(
            certificateChain: chain.map { .certificate($0) },
            privateKey: .privateKey(key)
        )
        configuration.minimumTLSVersion = .tlsv12
        // TLS 1.2 only with forward secrecy and AEAD (TLS 1.3's suites are all of that kind):
        // NIOSSL's default list still allows RSA key exchange and CBC.
        configuration.cipherSuites = Self.tls12CipherSuites
        switch tls.clientCertificates {
        case .none:
            configuration.certificateVerification = .none
        case .optional:
            configuration.certificateVerification = .optionalVerification
        case .required:
            configuration.certificateVerification = .noHostnameVerification
        }
        if let clientCAPath = tls.clientCAPath {
            let roots: [NIOSSLCertificate]
            do {
                roots = try NIOSSLCertificate.fromPEMFile(clientCAPath)
            } catch {
                throw GatewayTransportError(
                    .tlsConfigurationInvalid,
                    "cannot load the client CA from \(clientCAPath): \(Self.describe(error))"
                )
            }
            guard !roots.isEmpty else {
                throw GatewayTransportError(
                    .tlsConfigurationInvalid,
                    "the client CA file \(clientCAPath) holds no certificate"
                )
            }
            configuration.trustRoots = .certificates(roots)
            configuration.sendCANameList = true
        }
        do {
            return try NIOSSLContext(configuration: configuration)
        } catch {
            throw GatewayTransportError(
                .tlsConfigurationInvalid,
                "the TLS certificate and key cannot be used together: \(Self.describe(error))"
            )
        }
    }

    /// An error's text for a message, bounded: NIOSSL errors name the failing call, never
    /// the file's contents.
    private static func describe(_ error: any Error) -> String {
        String(String(describing: error).prefix(200))
    }
}

extension ServerConfiguration {
    /// The TLS 1.2 cipher suites the server offers: ECDHE key exchange with AES-GCM or
    /// ChaCha20-Poly1305, for ECDSA and RSA certificates.
    static let tls12CipherSuites = "ECDH+AESGCM:ECDH+CHACHA20:!aNULL:!eNULL:!MD5"
}
