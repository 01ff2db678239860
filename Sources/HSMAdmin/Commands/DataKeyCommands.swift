import ArgumentParser
import GatewayClient

/// `hsm-admin data-key`.
struct DataKeyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "data-key",
        abstract: "List, show, disable, enable or destroy a tenant's data keys (metadata only, never a key).",
        subcommands: [
            DataKeyListCommand.self, DataKeyShowCommand.self, DataKeyDisableCommand.self, DataKeyEnableCommand.self,
            DataKeyDestroyCommand.self,
        ]
    )
}

/// `hsm-admin data-key list TENANT`.
struct DataKeyListCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "list",
        abstract: "List a tenant's data keys, by id.",
        discussion:
            "Shows the first --limit keys (default 100) and says on stderr when more exist; --all lists every one."
    )

    /// The most keys one `--limit` asks for; `--all` has no limit.
    static let maximumLimit = 100_000

    @Argument(help: "Tenant id.", transform: argument(AdminArguments.tenantID))
    var tenant: String

    @Option(help: "Only keys in this state: enabled, disabled or destroyed.")
    var state: DataKeyStateFilter?

    @Option(help: "How many keys to show (1 to \(maximumLimit)).")
    var limit = 100

    @Flag(help: "Every key (pages through all of them).")
    var all = false

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func validate() throws {
        guard (1...Self.maximumLimit).contains(limit) else {
            throw ValidationError("--limit must be 1 to \(Self.maximumLimit), is \(limit)")
        }
    }

    struct Listing: Encodable {
        var tenant: String
        var dataKeys: [DataKeyView]
        /// Whether more keys follow the ones listed.
        var more: Bool
    }

    func execute(_ session: AdminSession) async throws {
        let client = session.client
        let (tenant, state) = (tenant, state?.rawValue ?? "")
        let (keys, next) = try await Paging.collect(limit: all ? nil : limit) { size, token in
            let page = try await client.listDataKeys(tenant: tenant, state: state, pageSize: size, pageToken: token)
            return (page.keys.map(DataKeyView.init), page.nextPageToken)
        }
        session.print(Listing(tenant: tenant, dataKeys: keys, more: !next.isEmpty)) { DataKeyView.table(keys).render() }
        if !next.isEmpty, !session.json {
            session.output.note("hsm-admin: more data keys exist: --all lists every one, or raise --limit")
        }
    }
}

/// The tenant and id arguments of the commands on one data key.
struct DataKeyArguments: ParsableArguments, Sendable {
    @Argument(help: "Tenant id.", transform: argument(AdminArguments.tenantID))
    var tenant: String

    @Argument(help: "Data key id (UUID).")
    var id: String

    init() {}
}

/// `hsm-admin data-key show TENANT ID`.
struct DataKeyShowCommand: RemoteCommand {
    static let configuration = CommandConfiguration(commandName: "show", abstract: "Show a data key's metadata.")

    @OptionGroup var key: DataKeyArguments
    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func execute(_ session: AdminSession) async throws {
        let view = DataKeyView(try await session.client.getDataKey(tenant: key.tenant, id: key.id))
        session.print(view) { view.fields.render() }
    }
}

/// `hsm-admin data-key disable TENANT ID`.
struct DataKeyDisableCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "disable",
        abstract: "Disable a data key: it decrypts nothing until enabled again."
    )

    @OptionGroup var key: DataKeyArguments
    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func execute(_ session: AdminSession) async throws {
        let view = DataKeyView(try await session.client.disableDataKey(tenant: key.tenant, id: key.id))
        session.print(view) { view.fields.render() }
    }
}

/// `hsm-admin data-key enable TENANT ID`.
struct DataKeyEnableCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "enable", abstract: "Enable a disabled data key.")

    @OptionGroup var key: DataKeyArguments
    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func execute(_ session: AdminSession) async throws {
        let view = DataKeyView(try await session.client.enableDataKey(tenant: key.tenant, id: key.id))
        session.print(view) { view.fields.render() }
    }
}

/// `hsm-admin data-key destroy TENANT ID --confirm ID`.
struct DataKeyDestroyCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "destroy",
        abstract: "Destroy a data key: everything encrypted under it becomes unreadable.",
        discussion:
            "Irreversible. Repeat the key id with --confirm; without it nothing is sent and the command exits 64."
    )

    @OptionGroup var key: DataKeyArguments

    @Option(help: ArgumentHelp("The data key id again, to confirm.", valueName: "id"))
    var confirm: String?

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func validate() throws {
        guard let confirm else {
            throw ValidationError(
                "refusing to destroy data key \(key.id.sanitizedForTerminal) without --confirm "
                    + "\(key.id.sanitizedForTerminal): everything encrypted under it becomes unreadable, irreversibly"
            )
        }
        guard confirm == key.id else {
            throw ValidationError("refusing to destroy: --confirm does not match the data key id")
        }
    }

    func execute(_ session: AdminSession) async throws {
        let view = DataKeyView(try await session.client.destroyDataKey(tenant: key.tenant, id: key.id))
        session.print(view) { view.fields.render() }
    }
}
