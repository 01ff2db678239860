import ArgumentParser
import GatewayClient

/// `hsm-admin token`.
struct TokenCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "token",
        abstract: "Create, list and revoke API tokens (gateway admin).",
        subcommands: [TokenCreateCommand.self, TokenListCommand.self, TokenRevokeCommand.self]
    )
}

/// `hsm-admin token create --principal P`.
struct TokenCreateCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "create",
        abstract: "Create an API token for a principal; it is printed once, alone on stdout.",
        discussion: """
            Standard output holds the token and a newline only, so it can be captured: \
            `hsm-admin token create --principal billing > billing.token` (then chmod 600). A note \
            on standard error gives the token's id. With --json, standard output holds \
            {"token": ..., "info": {...}}. The gateway keeps only the token's SHA-256: it cannot \
            be shown again.
            """
    )

    /// The longest description the protocol allows.
    static let maximumDescriptionByteCount = 256

    @Option(help: "The principal the token authenticates as.", transform: argument(AdminArguments.principalName))
    var principal: String

    @Option(name: .customLong("description"), help: "For people, e.g. \"ci deploys\" (at most 256 bytes).")
    var tokenDescription: String = ""

    @Option(
        help: ArgumentHelp("Lifetime, e.g. 30d, 12h (default: no expiry).", valueName: "duration"),
        transform: argument(DurationArgument.parse)
    )
    var ttl: Duration?

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func validate() throws {
        guard tokenDescription.utf8.count <= Self.maximumDescriptionByteCount else {
            throw ValidationError("--description is at most \(Self.maximumDescriptionByteCount) bytes")
        }
        if let ttl, ttl < .seconds(1) {
            throw ValidationError("--ttl must be at least 1s")
        }
    }

    func execute(_ session: AdminSession) async throws {
        let created = try await session.client.createAPIToken(
            principal: principal,
            description: tokenDescription,
            timeToLive: ttl
        )
        let info = APITokenView(created.info, now: session.nowMilliseconds)
        if session.json {
            session.output.write(AdminJSON.document(CreatedTokenView(token: created.token.value, info: info)))
        } else {
            session.output.line(created.token.value)
        }
        let expiry = info.expiresAt.map { "expires \($0)" } ?? "never expires"
        session.output.note(
            "hsm-admin: API token \(info.id.sanitizedForTerminal) for principal \(info.principal.sanitizedForTerminal) "
                + "(\(expiry)). It is shown once: store it now; the gateway keeps only its hash."
        )
    }
}

/// `hsm-admin token list [--principal P]`.
struct TokenListCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "list",
        abstract: "List API tokens (metadata only: never a token)."
    )

    @Option(help: "Only this principal's tokens.", transform: argument(AdminArguments.principalName))
    var principal: String?

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    struct Listing: Encodable {
        var tokens: [APITokenView]
    }

    func execute(_ session: AdminSession) async throws {
        let now = session.nowMilliseconds
        let tokens = try await session.client.listAPITokens(principal: principal ?? "").map {
            APITokenView($0, now: now)
        }
        session.print(Listing(tokens: tokens)) { APITokenView.table(tokens).render() }
    }
}

/// `hsm-admin token revoke ID`.
struct TokenRevokeCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "revoke",
        abstract: "Revoke an API token by its id (open connections lose it within seconds)."
    )

    @Argument(help: "The token's id, as `token list` shows it (not the token).")
    var id: String

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func validate() throws {
        // A pasted token instead of its id would travel to the gateway and into its logs.
        if id.hasPrefix("hsmgw_") {
            throw ValidationError("give the token's id (see `hsm-admin token list`), not the token itself")
        }
    }

    func execute(_ session: AdminSession) async throws {
        let view = APITokenView(try await session.client.revokeAPIToken(id: id), now: session.nowMilliseconds)
        session.print(view) { view.fields.render() }
    }
}
