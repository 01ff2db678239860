import Foundation
import GatewayClient

/// A connection setting, by the name the admin configuration file gives it; each also has an
/// environment variable (`HSMGW_` and the name in capitals) and a flag.
public enum ConnectionSettingKey: String, CaseIterable, Sendable, Hashable {
    case server
    case socket
    case tokenFile = "token_file"
    case caFile = "ca_file"
    case certFile = "cert_file"
    case keyFile = "key_file"
    case serverName = "server_name"
    case tls
    case plaintext
    case insecurePlaintext = "insecure_plaintext"
    case timeout

    /// The environment variable, e.g. `HSMGW_TOKEN_FILE`.
    public var environmentVariable: String { "HSMGW_" + rawValue.uppercased() }

    /// The flag, e.g. `--token-file`.
    public var flag: String {
        switch self {
        case .certFile: return "--cert"
        case .keyFile: return "--key"
        default: return "--" + rawValue.replacingOccurrences(of: "_", with: "-")
        }
    }

    /// Whether the value is a file path (a relative one in the configuration file is taken
    /// relative to that file).
    var isPath: Bool {
        switch self {
        case .socket, .tokenFile, .caFile, .certFile, .keyFile: return true
        default: return false
        }
    }
}

/// A setting's value and where it came from, e.g. `--server`, `HSMGW_SERVER` or
/// `/etc/hsm-admin.conf:3`, so an error can say which one to fix.
public struct SettingValue: Sendable, Hashable {
    /// The value as given.
    public var value: String
    /// Where it came from.
    public var origin: String

    /// `value` from `origin`.
    public init(_ value: String, origin: String) {
        self.value = value
        self.origin = origin
    }
}

/// The settings one source gives: the flags, the environment, or the admin configuration file.
public struct SettingsLayer: Sendable, Hashable {
    /// Which source it is; precedence is flags, then environment, then file.
    public enum Kind: Sendable, Hashable {
        /// The command line.
        case flags
        /// `HSMGW_*` variables.
        case environment
        /// The admin configuration file.
        case file
    }

    /// The source.
    public var kind: Kind
    /// Its values.
    public var values: [ConnectionSettingKey: SettingValue]
    /// The token itself, from `HSMGW_TOKEN` (the environment only: a flag would show in `ps`, a
    /// configuration file is not kept private).
    public var token: SettingValue?

    /// A layer of `kind` with `values`.
    public init(kind: Kind, values: [ConnectionSettingKey: SettingValue] = [:], token: SettingValue? = nil) {
        self.kind = kind
        self.values = values
        self.token = token
    }

    /// The environment variable that carries the API token itself.
    public static let tokenVariable = "HSMGW_TOKEN"

    /// The `HSMGW_*` variables of `environment`; empty ones count as unset.
    public static func environment(_ environment: [String: String]) -> SettingsLayer {
        var layer = SettingsLayer(kind: .environment)
        for key in ConnectionSettingKey.allCases {
            if let value = environment[key.environmentVariable], !value.isEmpty {
                layer.values[key] = SettingValue(value, origin: key.environmentVariable)
            }
        }
        if let token = environment[tokenVariable], !token.isEmpty {
            layer.token = SettingValue(token, origin: tokenVariable)
        }
        return layer
    }
}

/// Where and how `hsm-admin` connects: resolved from flags, the environment, the admin
/// configuration file and defaults, in that order of precedence.
public struct ConnectionSettings: Sendable, Hashable {
    /// Where the gateway listens.
    public enum Target: Sendable, Hashable, CustomStringConvertible {
        /// A host name or address and a TCP port.
        case tcp(host: String, port: Int)
        /// A Unix domain socket.
        case unixSocket(path: String)

        public var description: String {
            switch self {
            case .tcp(let host, let port): return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
            case .unixSocket(let path): return "unix:\(path)"
            }
        }

        /// Whether traffic stays on this machine: a loopback address or a Unix socket.
        public var isLocal: Bool {
            switch self {
            case .unixSocket: return true
            case .tcp(let host, _): return ConnectionSettings.isLoopback(host)
            }
        }
    }

    /// Where the API token comes from (never the token itself).
    public enum Credential: Sendable, Hashable, CustomStringConvertible {
        /// A file, from the setting at `origin` (or the dev default).
        case tokenFile(path: String, origin: String)
        /// An environment variable.
        case environment(variable: String)
        /// No token: the TLS client certificate authenticates.
        case clientCertificateOnly

        public var description: String {
            switch self {
            case .tokenFile(let path, let origin): return "token file \(path) (\(origin))"
            case .environment(let variable): return "token from \(variable)"
            case .clientCertificateOnly: return "client certificate"
            }
        }
    }

    /// How the connection is secured.
    public enum Security: Sendable, Hashable {
        /// No TLS (local gateways, or `--insecure-plaintext`).
        case plaintext
        /// TLS: the CA file (nil: the system's trust store), the client certificate and key for
        /// mutual TLS, and the name to verify when it is not the host.
        case tls(caFile: String?, certFile: String?, keyFile: String?, serverName: String?)
    }

    /// The gateway's default port.
    public static let defaultPort = 7700
    /// The default target: a gateway started with `hsm-gateway --dev` next to the caller.
    public static let defaultTarget = Target.tcp(host: "127.0.0.1", port: defaultPort)
    /// The token `hsm-gateway --dev` writes, relative to the working directory; used when it
    /// exists, no other credential is given and the target is local.
    public static let defaultTokenFile = ".hsm-dev/admin.token"
    /// The default time a command may take, connection included.
    public static let defaultTimeout: Duration = .seconds(30)
    /// The longest `--timeout`: the client library's longest deadline.
    public static let maximumTimeout: Duration = GatewayClientConfiguration.maximumDeadline

    /// Where the gateway listens.
    public var target: Target
    /// Where the target came from (`default` when nothing named one).
    public var targetOrigin: String
    /// Where the token comes from.
    public var credential: Credential
    /// Plaintext or TLS.
    public var security: Security
    /// How long one call may take, retries and the connection included.
    public var timeout: Duration

    /// A one-line summary for people: `127.0.0.1:7700 (plaintext)`.
    public var summary: String {
        switch security {
        case .plaintext: return "\(target) (plaintext)"
        case .tls(_, let cert, _, _): return "\(target) (TLS\(cert == nil ? "" : ", client certificate"))"
        }
    }

    /// Resolves the settings. Flags win over the environment, the environment over the file.
    ///
    /// - Parameters:
    ///   - flags: The command line's connection flags.
    ///   - environment: The process environment (`HSMGW_*`).
    ///   - file: The admin configuration file's settings, if one was read.
    ///   - fileExists: Whether a path exists (for the dev token default).
    public static func resolve(
        flags: SettingsLayer,
        environment: [String: String],
        file: SettingsLayer?,
        fileExists: (String) -> Bool = { FileManager.default.fileExists(atPath: $0) }
    ) throws(AdminError) -> ConnectionSettings {
        let layers = [flags, SettingsLayer.environment(environment)] + (file.map { [$0] } ?? [])

        func first(_ key: ConnectionSettingKey) -> (SettingValue, SettingsLayer.Kind)? {
            for layer in layers { if let value = layer.values[key] { return (value, layer.kind) } }
            return nil
        }
        func flag(_ key: ConnectionSettingKey) throws(AdminError) -> SettingValue? {
            guard let (value, kind) = first(key) else { return nil }
            guard let enabled = parseBoolean(value.value) else {
                throw AdminError(
                    code(for: kind),
                    "\(value.origin): `\(value.value.sanitizedForTerminal)` is not a boolean (true or false)"
                )
            }
            return enabled ? value : nil
        }

        // The target: the first source that names one; one source naming two is a mistake.
        var target = defaultTarget
        var targetOrigin = "default"
        for layer in layers {
            let server = layer.values[.server]
            let socket = layer.values[.socket]
            if let server, let socket {
                throw AdminError(
                    code(for: layer.kind), "give \(server.origin) or \(socket.origin), not both")
            }
            if let server {
                target = try parseServer(server, kind: layer.kind)
                targetOrigin = server.origin
                break
            }
            if let socket {
                target = try unixSocket(socket.value, origin: socket.origin, kind: layer.kind)
                targetOrigin = socket.origin
                break
            }
        }

        // Security: TLS when anything TLS is asked for; plaintext when asked, or by default on a
        // local target; TLS with the system's trust store by default on any other.
        let tlsValues: [ConnectionSettingKey] = [.caFile, .certFile, .keyFile, .serverName]
        let tlsSetting = try flag(.tls) ?? tlsValues.lazy.compactMap { first($0)?.0 }.first
        let plaintext = try flag(.plaintext)
        let insecure = try flag(.insecurePlaintext)
        if let asked = plaintext ?? insecure, let tlsSetting {
            throw AdminError(.usage, "\(asked.origin) contradicts \(tlsSetting.origin) (TLS): give one")
        }
        let certFile = first(.certFile)
        let keyFile = first(.keyFile)
        if (certFile == nil) != (keyFile == nil) {
            let given = certFile?.0 ?? keyFile!.0
            let missing: ConnectionSettingKey = certFile == nil ? .certFile : .keyFile
            throw AdminError(.usage, "\(given.origin) needs \(missing.flag) too (a client certificate and its key)")
        }
        let security: Security
        if plaintext != nil || insecure != nil {
            if !target.isLocal, insecure == nil {
                throw AdminError(
                    .usage,
                    "plaintext to \(target) is refused: the API token would cross the network in clear. "
                        + "Use TLS (--ca-file), or --insecure-plaintext if the network is trusted"
                )
            }
            security = .plaintext
        } else if tlsSetting != nil || !target.isLocal {
            security = .tls(
                caFile: first(.caFile)?.0.value,
                certFile: certFile?.0.value,
                keyFile: keyFile?.0.value,
                serverName: first(.serverName)?.0.value
            )
        } else {
            security = .plaintext
        }

        // The credential: the first source that gives one; one source giving two is a mistake.
        var credential: Credential?
        for layer in layers {
            let file = layer.values[.tokenFile]
            if let file, let token = layer.token {
                throw AdminError(code(for: layer.kind), "give \(file.origin) or \(token.origin), not both")
            }
            if let file {
                credential = .tokenFile(path: file.value, origin: file.origin)
                break
            }
            if let token = layer.token {
                credential = .environment(variable: token.origin)
                break
            }
        }
        if credential == nil, certFile != nil {
            credential = .clientCertificateOnly
        }
        if credential == nil, target.isLocal, fileExists(defaultTokenFile) {
            // Only for a local gateway: a dev credential is never sent elsewhere implicitly.
            credential = .tokenFile(path: defaultTokenFile, origin: "default")
        }
        guard let credential else {
            throw AdminError(
                .credentials,
                "no credentials for \(target): give --token-file (or \(ConnectionSettingKey.tokenFile.environmentVariable), "
                    + "\(SettingsLayer.tokenVariable), token_file in the admin config), or --cert and --key"
                    + (target.isLocal ? "; next to `hsm-gateway --dev` the default is ./\(defaultTokenFile)" : "")
            )
        }

        var timeout = defaultTimeout
        if let (value, kind) = first(.timeout) {
            do {
                timeout = try DurationArgument.parse(value.value)
            } catch {
                throw AdminError(code(for: kind), "\(value.origin): \(error.message)")
            }
            guard timeout <= maximumTimeout else {
                throw AdminError(code(for: kind), "\(value.origin): at most \(DurationArgument.format(maximumTimeout))")
            }
        }
        return ConnectionSettings(
            target: target,
            targetOrigin: targetOrigin,
            credential: credential,
            security: security,
            timeout: timeout
        )
    }

    /// Reads the API token the credential names: a file is checked first (regular, not
    /// accessible by group or others).
    public func loadToken(environment: [String: String]) throws(AdminError) -> APIToken? {
        switch credential {
        case .clientCertificateOnly:
            return nil
        case .tokenFile(let path, _):
            return try TokenFile.load(path: path)
        case .environment(let variable):
            guard let value = environment[variable] else {
                throw AdminError(.credentials, "\(variable) is not set")
            }
            return try TokenFile.token(fromText: value, source: variable)
        }
    }

    /// The longest time `hsm-admin` waits to connect: the client library's limit.
    static let maximumConnectTimeout: Duration = GatewayClientConfiguration.maximumConnectTimeout

    /// The client library's configuration for these settings.
    public func clientConfiguration(token: APIToken?, clientName: String) -> GatewayClientConfiguration {
        let clientTarget: GatewayClientConfiguration.Target
        switch target {
        case .tcp(let host, let port): clientTarget = .host(host, port: port)
        case .unixSocket(let path): clientTarget = .unixSocket(path: path)
        }
        let transport: GatewayClientConfiguration.TransportSecurity
        switch security {
        case .plaintext:
            transport = .plaintext
        case .tls(let caFile, let certFile, let keyFile, let serverName):
            transport = .tls(
                .init(
                    trustRoots: caFile.map { .pemFile(path: $0) } ?? .system,
                    serverHostnameOverride: serverName,
                    clientCertificateChainPath: certFile,
                    clientPrivateKeyPath: keyFile
                )
            )
        }
        return GatewayClientConfiguration(
            target: clientTarget,
            transportSecurity: transport,
            apiToken: token,
            clientName: clientName,
            poolSize: 1,
            connectTimeout: min(timeout, Self.maximumConnectTimeout),
            defaultDeadline: timeout
        )
    }

    // MARK: Parsing

    /// Parses `host:port`, `[v6]:port`, `host` (port 7700) or `unix:/path`.
    static func parseServer(_ setting: SettingValue, kind: SettingsLayer.Kind) throws(AdminError) -> Target {
        let text = setting.value
        func invalid(_ why: String) -> AdminError {
            AdminError(code(for: kind), "\(setting.origin): `\(text.sanitizedForTerminal)` \(why)")
        }
        if text.hasPrefix("unix:") {
            return try unixSocket(String(text.dropFirst(5)), origin: setting.origin, kind: kind)
        }
        var host: Substring
        var portText: Substring?
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { throw invalid("has no closing `]`") }
            host = text[text.index(after: text.startIndex)..<close]
            let rest = text[text.index(after: close)...]
            if !rest.isEmpty {
                guard rest.hasPrefix(":") else { throw invalid("must be [address]:port") }
                portText = rest.dropFirst()
            }
        } else if text.filter({ $0 == ":" }).count > 1 {
            host = Substring(text)  // A bare IPv6 address.
        } else if let colon = text.firstIndex(of: ":") {
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
        } else {
            host = Substring(text)
        }
        guard !host.isEmpty, host.utf8.count <= GatewayClientConfiguration.maximumHostByteCount,
            !host.contains(where: { $0.isWhitespace || $0 == "/" || $0 == "@" })
        else {
            throw invalid("is not host:port, [address]:port or unix:/path")
        }
        var port = defaultPort
        if let portText {
            guard let number = Int(portText), (1...65_535).contains(number) else {
                throw invalid("has a port that is not 1 to 65535")
            }
            port = number
        }
        return .tcp(host: String(host), port: port)
    }

    static func unixSocket(_ path: String, origin: String, kind: SettingsLayer.Kind) throws(AdminError) -> Target {
        guard !path.isEmpty, path.utf8.count <= GatewayClientConfiguration.maximumUnixSocketPathByteCount else {
            throw AdminError(
                code(for: kind),
                "\(origin): a socket path must be 1 to \(GatewayClientConfiguration.maximumUnixSocketPathByteCount) bytes"
            )
        }
        return .unixSocket(path: path)
    }

    /// `true`/`false` and their usual spellings; nil for anything else.
    static func parseBoolean(_ text: String) -> Bool? {
        switch text.lowercased() {
        case "1", "true", "yes", "on": return true
        case "0", "false", "no", "off": return false
        default: return nil
        }
    }

    /// Whether `host` is this machine: `localhost`, 127.0.0.0/8 or ::1.
    static func isLoopback(_ host: String) -> Bool {
        if host.lowercased() == "localhost" { return true }
        var v4 = in_addr()
        if inet_pton(AF_INET, host, &v4) == 1 {
            return UInt32(bigEndian: v4.s_addr) >> 24 == 127
        }
        var v6 = in6_addr()
        if inet_pton(AF_INET6, host, &v6) == 1 {
            let bytes = withUnsafeBytes(of: v6) { Array($0) }
            return bytes == [UInt8](repeating: 0, count: 15) + [1]
        }
        return false
    }

    /// A mistake on the command line is usage; one in the environment or a file is configuration.
    static func code(for kind: SettingsLayer.Kind) -> AdminError.Code {
        kind == .flags ? .usage : .configuration
    }
}
