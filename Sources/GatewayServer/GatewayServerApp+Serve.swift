import Foundation
import GatewayTransport
import Logging
import NIOCore

extension GatewayServerApp {
    /// The executable's whole life: opens, serves until SIGTERM/SIGINT, drains and closes. In
    /// development mode it prints, once the listener is bound, where to connect and (first start
    /// only) the admin token.
    ///
    /// - Throws: `GatewayStartupError` when something cannot start; returns normally after a
    ///   graceful shutdown.
    public static func serve(_ launch: GatewayLaunch, logger: Logger) async throws(GatewayStartupError) {
        let app = try await open(launch, logger: logger)
        do {
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await app.run() }
                let addresses = try await app.listeningAddresses()
                let metrics = try? await app.metricsAddress()
                logger.info(
                    "serving",
                    metadata: [
                        "listen": "\(addresses.map(Self.display).joined(separator: ","))",
                        "metrics": "\(metrics.map(Self.display) ?? "off")",
                        "instance": "\(launch.configuration.instanceID)",
                        "store": "\(launch.configuration.store.kind)",
                        "gcm-iv": "\(launch.configuration.hsm.gcmIV.rawValue)",
                    ]
                )
                if let development = launch.development {
                    app.printDevelopmentBanner(development, addresses: addresses, metrics: metrics)
                }
                try await group.waitForAll()
            }
        } catch let error as GatewayTransportError {
            throw GatewayStartupError(.transport, error.description)
        } catch {
            throw GatewayStartupError(.transport, "\(error)")
        }
    }

    /// What a developer needs to connect. The token itself is printed only on the first start;
    /// later starts point at the file.
    func printDevelopmentBanner(
        _ development: DevelopmentEnvironment,
        addresses: [SocketAddress],
        metrics: SocketAddress?
    ) {
        let address = addresses.first.map { Self.display($0) } ?? "?"
        var lines = [
            "",
            "hsm-gateway --dev: serving plaintext on \(address) (SoftHSM2 token and SQLite in \(development.dataDirectory))",
        ]
        if let token = bootstrapAdminToken {
            lines += [
                "First start: created the admin principal `\(bootstrapAdminName)` with this API token (shown once;",
                "also in \(development.adminTokenPath), mode 0600):",
                "",
                "    \(token)",
                "",
            ]
        } else {
            lines.append("Admin API token: \(development.adminTokenPath)")
        }
        lines += [
            "Connect without TLS to \(address) and send the token in Hello.api_token, e.g. with the Swift",
            "client: GatewayClient over plaintext to \(address) with apiToken from the token file.",
            metrics.map { "Health and metrics: http://\(Self.display($0))/readyz and /metrics" } ?? "Metrics: off",
            "Stop with Ctrl-C (drains requests in flight). Data stays in \(development.dataDirectory); delete it to start over.",
            "",
        ]
        FileHandle.standardOutput.write(Data((lines.joined(separator: "\n") + "\n").utf8))
    }

    static func display(_ address: SocketAddress) -> String {
        switch address {
        case .v4, .v6:
            let host = address.ipAddress ?? "?"
            let port = address.port ?? 0
            return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        case .unixDomainSocket:
            return "unix:\(address.pathname ?? "?")"
        }
    }
}
