import ArgumentParser
import GatewayClient

/// `hsm-admin principal`.
struct PrincipalCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "principal",
        abstract: "Create and list principals, grant and revoke their roles (gateway admin).",
        discussion: """
            A role is TENANT:ROLE, with TENANT a tenant id or * (every tenant) and ROLE one of \
            \(AdminArguments.knownRoles.joined(separator: ", ")). admin on * is the gateway \
            admin: tenants, principals, tokens and audit.
            """,
        subcommands: [
            PrincipalCreateCommand.self, PrincipalListCommand.self, PrincipalGrantCommand.self,
            PrincipalRevokeCommand.self,
        ]
    )
}

/// `hsm-admin principal create NAME [--cn CN] [--role TENANT:ROLE ...]`.
struct PrincipalCreateCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "create",
        abstract: "Create a principal; give it API tokens with `hsm-admin token create`."
    )

    @Argument(
        help: "Principal name: 1 to 128 of a-z, 0-9, -, _, ., @.", transform: argument(AdminArguments.principalName))
    var name: String

    @Option(name: .customLong("cn"), help: "Subject common name of the client certificates that authenticate as it.")
    var commonName: String?

    @Option(
        name: .customLong("role"),
        help: ArgumentHelp("A role, TENANT:ROLE (repeatable), e.g. acme:key-user, *:admin.", valueName: "tenant:role"),
        transform: argument(AdminArguments.roleBinding)
    )
    var roles: [RoleBinding] = []

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func execute(_ session: AdminSession) async throws {
        let info = try await session.client.createPrincipal(
            name: name,
            certificateCommonName: commonName ?? "",
            roles: roles
        )
        let view = PrincipalView(info)
        session.print(view) { view.fields.render() }
    }
}

/// `hsm-admin principal list`.
struct PrincipalListCommand: RemoteCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List every principal.")

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    struct Listing: Encodable {
        var principals: [PrincipalView]
    }

    func execute(_ session: AdminSession) async throws {
        let principals = try await session.client.listPrincipals().map(PrincipalView.init)
        session.print(Listing(principals: principals)) { PrincipalView.table(principals).render() }
    }
}

/// `hsm-admin principal grant NAME TENANT:ROLE`.
struct PrincipalGrantCommand: RemoteCommand {
    static let configuration = CommandConfiguration(commandName: "grant", abstract: "Grant a principal a role.")

    @Argument(help: "Principal name.", transform: argument(AdminArguments.principalName))
    var name: String

    @Argument(
        help: ArgumentHelp("The role, TENANT:ROLE.", valueName: "tenant:role"),
        transform: argument(AdminArguments.roleBinding))
    var role: RoleBinding

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func execute(_ session: AdminSession) async throws {
        let view = PrincipalView(try await session.client.grantRole(principal: name, role: role))
        session.print(view) { view.fields.render() }
    }
}

/// `hsm-admin principal revoke NAME TENANT:ROLE`.
struct PrincipalRevokeCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "revoke",
        abstract: "Revoke a role from a principal (takes effect on open connections within seconds)."
    )

    @Argument(help: "Principal name.", transform: argument(AdminArguments.principalName))
    var name: String

    @Argument(
        help: ArgumentHelp("The role, TENANT:ROLE.", valueName: "tenant:role"),
        transform: argument(AdminArguments.roleBinding))
    var role: RoleBinding

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func execute(_ session: AdminSession) async throws {
        let view = PrincipalView(try await session.client.revokeRole(principal: name, role: role))
        session.print(view) { view.fields.render() }
    }
}
