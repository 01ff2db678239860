import ArgumentParser
import Foundation
import GatewayClient

/// `hsm-admin tenant`.
struct TenantCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tenant",
        abstract: "Create, list, show, disable, enable or shred tenants.",
        subcommands: [
            TenantCreateCommand.self, TenantListCommand.self, TenantShowCommand.self, TenantDisableCommand.self,
            TenantEnableCommand.self, TenantShredCommand.self,
        ]
    )
}

/// `hsm-admin tenant create TENANT`.
struct TenantCreateCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "create",
        abstract: "Create a tenant and its first master-key version (gateway admin).",
        discussion: "The request carries an idempotency key, so a retry after a lost answer creates nothing twice."
    )

    @Argument(help: "Tenant id: 1 to 63 of a-z, 0-9, _ and -.", transform: argument(AdminArguments.tenantID))
    var tenant: String

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func execute(_ session: AdminSession) async throws {
        let info = try await session.client.createTenant(tenant, idempotencyKey: UUID().uuidString.lowercased())
        let view = TenantView(info)
        session.print(view) { view.fields.render() }
    }
}

/// `hsm-admin tenant list`.
struct TenantListCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "list",
        abstract: "List the tenants this principal may see (every tenant for a gateway admin)."
    )

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    struct Listing: Encodable {
        var tenants: [TenantView]
    }

    func execute(_ session: AdminSession) async throws {
        let client = session.client
        let (tenants, _) = try await Paging.collect(limit: nil) { size, token in
            let page = try await client.listTenants(pageSize: size, pageToken: token)
            return (page.tenants.map(TenantView.init), page.nextPageToken)
        }
        session.print(Listing(tenants: tenants)) { TenantView.table(tenants).render() }
    }
}

/// `hsm-admin tenant show TENANT`.
struct TenantShowCommand: RemoteCommand {
    static let configuration = CommandConfiguration(commandName: "show", abstract: "Show one tenant.")

    @Argument(help: "Tenant id.", transform: argument(AdminArguments.tenantID))
    var tenant: String

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func execute(_ session: AdminSession) async throws {
        let view = TenantView(try await session.client.getTenant(tenant))
        session.print(view) { view.fields.render() }
    }
}

/// `hsm-admin tenant disable TENANT`.
struct TenantDisableCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "disable",
        abstract: "Disable a tenant: its keys serve nothing until it is enabled again."
    )

    @Argument(help: "Tenant id.", transform: argument(AdminArguments.tenantID))
    var tenant: String

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func execute(_ session: AdminSession) async throws {
        let view = TenantView(try await session.client.disableTenant(tenant))
        session.print(view) { view.fields.render() }
    }
}

/// `hsm-admin tenant enable TENANT`.
struct TenantEnableCommand: RemoteCommand {
    static let configuration = CommandConfiguration(commandName: "enable", abstract: "Enable a disabled tenant.")

    @Argument(help: "Tenant id.", transform: argument(AdminArguments.tenantID))
    var tenant: String

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func execute(_ session: AdminSession) async throws {
        let view = TenantView(try await session.client.enableTenant(tenant))
        session.print(view) { view.fields.render() }
    }
}

/// `hsm-admin tenant shred TENANT --confirm TENANT`.
struct TenantShredCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "shred",
        abstract: "Crypto-shred a tenant: destroy its master keys in the HSM and delete its data keys (gateway admin).",
        discussion: """
            Irreversible: everything ever encrypted under the tenant's keys becomes unreadable. \
            Repeat the tenant id with --confirm; without it, or with another id, nothing is sent \
            and the command exits 64.
            """
    )

    @Argument(help: "Tenant id.", transform: argument(AdminArguments.tenantID))
    var tenant: String

    @Option(help: ArgumentHelp("The tenant id again, to confirm.", valueName: "tenant"))
    var confirm: String?

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func validate() throws {
        try Self.checkConfirmation(tenant: tenant, confirm: confirm)
    }

    /// Refuses unless `confirm` repeats `tenant` exactly, saying why.
    static func checkConfirmation(tenant: String, confirm: String?) throws {
        guard let confirm else {
            throw ValidationError(
                "refusing to shred tenant `\(tenant)` without --confirm \(tenant): shredding destroys its master "
                    + "keys in the HSM and deletes its data keys, so everything encrypted under them becomes "
                    + "unreadable, irreversibly"
            )
        }
        guard confirm == tenant else {
            throw ValidationError(
                "refusing to shred: --confirm `\(confirm.sanitizedForTerminal)` does not match the tenant `\(tenant)`")
        }
    }

    func execute(_ session: AdminSession) async throws {
        let view = ShredView(try await session.client.shredTenant(tenant, confirm: confirm ?? ""))
        session.print(view) { view.fields.render() }
    }
}
