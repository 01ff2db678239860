import ArgumentParser
import GatewayClient

/// `hsm-admin status`.
struct StatusCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Show the gateway's identity and health, and the principal and roles this connection has.",
        discussion: """
            Calls ServerInfo and shows the handshake's principal and roles. Exits 1 when the \
            gateway answers but is not ready (sealed, HSM token or database unreachable).
            """
    )

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func execute(_ session: AdminSession) async throws {
        let hello = try await session.client.hello()
        let info = try await session.client.serverInfo()
        let view = StatusView(server: session.settings.summary, info: info, hello: hello)
        session.print(view) { view.fields.render() }
        if !view.ready {
            if !session.json { session.output.note("hsm-admin: the gateway is not ready") }
            throw AdminError.silent(.failed)
        }
    }
}
