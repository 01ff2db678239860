import ArgumentParser
import Foundation

/// The connection flags every remote command takes. Each has an environment variable and a
/// setting in the admin configuration file; flags win, then the environment, then the file.
public struct ConnectionOptions: ParsableArguments, Sendable {
    @Option(
        help: ArgumentHelp(
            "Gateway address: host:port, [v6]:port or unix:/path (HSMGW_SERVER; default 127.0.0.1:7700).",
            valueName: "host:port"
        )
    )
    var server: String?

    @Option(help: ArgumentHelp("Gateway Unix socket (HSMGW_SOCKET).", valueName: "path"))
    var socket: String?

    @Option(
        help: ArgumentHelp(
            "File holding the API token, mode 0600 (HSMGW_TOKEN_FILE, or the token in HSMGW_TOKEN; "
                + "default ./.hsm-dev/admin.token for a local gateway when it exists).",
            valueName: "path"
        )
    )
    var tokenFile: String?

    @Option(
        help: ArgumentHelp(
            "CA certificates (PEM) to trust for the gateway; implies TLS (HSMGW_CA_FILE).", valueName: "path"))
    var caFile: String?

    @Option(
        name: .customLong("cert"),
        help: ArgumentHelp("Client certificate chain (PEM) for mutual TLS (HSMGW_CERT_FILE).", valueName: "path"))
    var certFile: String?

    @Option(
        name: .customLong("key"),
        help: ArgumentHelp("Client private key (PEM) for mutual TLS (HSMGW_KEY_FILE).", valueName: "path"))
    var keyFile: String?

    @Option(help: ArgumentHelp("Name to verify in the gateway's certificate (HSMGW_SERVER_NAME).", valueName: "name"))
    var serverName: String?

    @Flag(help: "Use TLS even to a local gateway (HSMGW_TLS; the default for remote gateways).")
    var tls = false

    @Flag(help: "No TLS: loopback and Unix sockets only (HSMGW_PLAINTEXT; the default for local gateways).")
    var plaintext = false

    @Flag(help: "No TLS to a remote gateway: the token crosses the network in clear (HSMGW_INSECURE_PLAINTEXT).")
    var insecurePlaintext = false

    @Option(
        help: ArgumentHelp(
            "How long one call may take, e.g. 30s, 2m (HSMGW_TIMEOUT; default 30s).", valueName: "duration"))
    var timeout: String?

    @Option(
        help: ArgumentHelp(
            "Admin configuration file of key = value lines (HSMGW_ADMIN_CONFIG; default "
                + "~/.config/hsm-admin/admin.conf when it exists).",
            valueName: "path"
        )
    )
    var adminConfig: String?

    public init() {}

    /// The flags as the top settings layer (a flag not given leaves the setting to the others).
    public var layer: SettingsLayer {
        var layer = SettingsLayer(kind: .flags)
        let values: [(ConnectionSettingKey, String?)] = [
            (.server, server), (.socket, socket), (.tokenFile, tokenFile), (.caFile, caFile),
            (.certFile, certFile), (.keyFile, keyFile), (.serverName, serverName), (.timeout, timeout),
            (.tls, tls ? "true" : nil), (.plaintext, plaintext ? "true" : nil),
            (.insecurePlaintext, insecurePlaintext ? "true" : nil),
        ]
        for (key, value) in values {
            if let value { layer.values[key] = SettingValue(value, origin: key.flag) }
        }
        return layer
    }

    /// The settings from these flags, `environment` and the admin configuration file.
    public func resolve(environment: [String: String]) throws(AdminError) -> ConnectionSettings {
        let file = try AdminConfigFile.locate(flag: adminConfig, environment: environment).map {
            (path: String) throws(AdminError) -> AdminConfigFile in try AdminConfigFile.load(path: path)
        }
        return try ConnectionSettings.resolve(flags: layer, environment: environment, file: file?.layer)
    }
}

/// The output flag every command takes.
public struct OutputOptions: ParsableArguments, Sendable {
    @Flag(help: "Print JSON: one document (JSON lines for audit tail and export, and with --watch).")
    public var json = false

    public init() {}
}
