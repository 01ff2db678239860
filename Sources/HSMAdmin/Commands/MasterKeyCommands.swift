import ArgumentParser
import Foundation
import GatewayClient

/// `hsm-admin master-key`.
struct MasterKeyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "master-key",
        abstract: "List, rotate and manage the states of a tenant's master-key versions (admin on the tenant).",
        subcommands: [
            MasterKeyListCommand.self, MasterKeyRotateCommand.self, MasterKeyActivateCommand.self,
            MasterKeySetStateCommand.self, MasterKeyScheduleDeletionCommand.self, MasterKeyCancelDeletionCommand.self,
        ]
    )
}

/// `hsm-admin master-key list TENANT`.
struct MasterKeyListCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "list",
        abstract: "List a tenant's master-key versions."
    )

    @Argument(help: "Tenant id.", transform: argument(AdminArguments.tenantID))
    var tenant: String

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    struct Listing: Encodable {
        var tenant: String
        var versions: [MasterKeyView]
    }

    func execute(_ session: AdminSession) async throws {
        let versions = try await session.client.listMasterKeys(tenant: tenant).map(MasterKeyView.init)
        session.print(Listing(tenant: tenant, versions: versions)) { MasterKeyView.table(versions).render() }
    }
}

/// `hsm-admin master-key rotate TENANT`.
struct MasterKeyRotateCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "rotate",
        abstract: "Add a master-key version in the HSM; it becomes the primary unless --no-activate.",
        discussion: """
            New data keys use the primary version; older versions stay usable for decrypt and \
            rewrap. Move existing data keys with `hsm-admin rewrap start TENANT`. The request \
            carries an idempotency key, so a retry after a lost answer adds one version only.
            """
    )

    @Argument(help: "Tenant id.", transform: argument(AdminArguments.tenantID))
    var tenant: String

    @Flag(name: .customLong("no-activate"), help: "Add the version pre-active; activate it later.")
    var noActivate = false

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func execute(_ session: AdminSession) async throws {
        let info = try await session.client.rotateMasterKey(
            tenant: tenant,
            activate: !noActivate,
            idempotencyKey: UUID().uuidString.lowercased()
        )
        let view = MasterKeyView(info)
        session.print(view) { view.fields.render() }
    }
}

/// The tenant and version arguments of the commands on one master-key version.
struct MasterKeyVersionArguments: ParsableArguments, Sendable {
    @Argument(help: "Tenant id.", transform: argument(AdminArguments.tenantID))
    var tenant: String

    @Argument(help: "Master-key version, e.g. 3 or v3.", transform: argument(AdminArguments.masterKeyVersion))
    var version: UInt32

    init() {}
}

/// `hsm-admin master-key activate TENANT VERSION`.
struct MasterKeyActivateCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "activate",
        abstract: "Make a version the primary: new data keys use it."
    )

    @OptionGroup var key: MasterKeyVersionArguments
    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func execute(_ session: AdminSession) async throws {
        let view = MasterKeyView(try await session.client.activateMasterKey(tenant: key.tenant, version: key.version))
        session.print(view) { view.fields.render() }
    }
}

/// `hsm-admin master-key set-state TENANT VERSION STATE`.
struct MasterKeySetStateCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "set-state",
        abstract: "Set a version's state (NIST SP 800-57): active, suspended, deactivated or compromised.",
        discussion: """
            suspended: usable again later; deactivated: decrypt and rewrap only; compromised: \
            decrypt and rewrap only, flagged for replacement. Destruction goes through \
            schedule-deletion.
            """
    )

    @OptionGroup var key: MasterKeyVersionArguments

    @Argument(help: "The new state: \(MasterKeyTargetState.allCases.map(\.rawValue).joined(separator: ", ")).")
    var state: MasterKeyTargetState

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func execute(_ session: AdminSession) async throws {
        let info = try await session.client.setMasterKeyState(
            tenant: key.tenant,
            version: key.version,
            state: state.rawValue
        )
        let view = MasterKeyView(info)
        session.print(view) { view.fields.render() }
    }
}

/// `hsm-admin master-key schedule-deletion TENANT VERSION [--days N]`.
struct MasterKeyScheduleDeletionCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "schedule-deletion",
        abstract: "Schedule a version's destruction in the HSM after a waiting period.",
        discussion: """
            The gateway refuses while stored data keys still use the version (rewrap them first). \
            Until the period ends, cancel-deletion takes it back.
            """
    )

    /// The waiting period the protocol allows, in days (`MasterKeyVersionRequest`).
    static let waitingPeriodDays = 7...365

    @OptionGroup var key: MasterKeyVersionArguments

    @Option(help: "Waiting period in days, 7 to 365 (default: the gateway's, 30).")
    var days: Int?

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func validate() throws {
        if let days, !Self.waitingPeriodDays.contains(days) {
            throw ValidationError("--days must be 7 to 365, is \(days)")
        }
    }

    func execute(_ session: AdminSession) async throws {
        let info = try await session.client.scheduleMasterKeyDestruction(
            tenant: key.tenant,
            version: key.version,
            waitingPeriodDays: days ?? 0
        )
        let view = MasterKeyView(info)
        session.print(view) { view.fields.render() }
    }
}

/// `hsm-admin master-key cancel-deletion TENANT VERSION`.
struct MasterKeyCancelDeletionCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "cancel-deletion",
        abstract: "Cancel a version's scheduled destruction."
    )

    @OptionGroup var key: MasterKeyVersionArguments
    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func execute(_ session: AdminSession) async throws {
        let info = try await session.client.cancelMasterKeyDestruction(tenant: key.tenant, version: key.version)
        let view = MasterKeyView(info)
        session.print(view) { view.fields.render() }
    }
}
