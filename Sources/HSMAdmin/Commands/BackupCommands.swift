import ArgumentParser
import Foundation
import GatewayConfig
import GatewayServer
import KeyHierarchy
import Logging
import PKCS11
import PKCS11KeyToken
import StoreBackup

/// The token and store flags `backup` and `restore` share: both open the store named by the
/// gateway's configuration file directly (no gateway is involved), and find its token.
struct StoreAccessOptions: ParsableArguments {
    @Option(help: "The gateway's configuration file (YAML): its `store:` and `hsm:` sections are used.")
    var config: String

    @Option(help: "Path of the PKCS#11 module, instead of the configuration's hsm.module.")
    var module: String?

    @Option(help: "Label of the token, instead of the configuration's hsm.token_label.")
    var token: String?

    @Option(help: "File holding the user PIN (mode 0600 or 0400), instead of the configuration's hsm.pin.")
    var pinFile: String?

    @Option(help: "Environment variable holding the user PIN, instead of the configuration's hsm.pin.")
    var pinEnv: String?

    func validate() throws {
        if pinFile != nil, pinEnv != nil {
            throw ValidationError("give --pin-file or --pin-env, not both")
        }
    }

    /// The configuration's HSM settings with the flags applied, and its store settings.
    func load() throws(AdminError) -> (hsm: HSMSettings, store: StoreSettings) {
        let configuration: GatewayConfiguration
        do {
            configuration = try GatewayConfiguration.load(file: config).configuration
        } catch {
            throw AdminError(.configuration, "\(config): \(error)")
        }
        var hsm = configuration.hsm
        if let module { hsm.modulePath = module }
        if let token { hsm.tokenLabel = token }
        if let pinFile { hsm.pin = .file(pinFile) }
        if let pinEnv { hsm.pin = .environment(pinEnv) }
        return (hsm, configuration.store)
    }

    /// Loads the module, reads the token's identity and logs in (one small session pool).
    static func logIn(_ settings: HSMSettings) async throws(AdminError) -> (
        pool: SessionPool, token: PKCS11KeyToken, identity: BackupTokenIdentity
    ) {
        let (module, identity) = try openToken(settings)
        let pin: SecretBytes
        do {
            pin = try settings.pin.read()
        } catch {
            throw AdminError(.configuration, "hsm.pin: \(error)")
        }
        do {
            let pool = try await SessionPool(module: module, tokenLabel: settings.tokenLabel, pin: pin)
            return (pool, PKCS11KeyToken(pool: pool, ivSource: settings.gcmIV), identity)
        } catch {
            throw AdminError(.unavailable, "hsm.token_label \(settings.tokenLabel): cannot log in: \(error)")
        }
    }

    /// Loads the module and reads the token's label and serial (no login needed).
    static func openToken(_ settings: HSMSettings) throws(AdminError) -> (PKCS11Module, BackupTokenIdentity) {
        if let conf = settings.softHSM2ConfigPath {
            // SoftHSM2 reads it once, in C_Initialize.
            setenv("SOFTHSM2_CONF", conf, 1)
        }
        do {
            let module = try PKCS11Module.load(
                path: settings.modulePath, initializeArguments: settings.initializeArguments)
            let info = try module.tokenInfo(try module.slot(tokenLabel: settings.tokenLabel))
            return (module, BackupTokenIdentity(label: info.label, serial: info.serialNumber))
        } catch {
            throw AdminError(
                .unavailable, "hsm.token_label \(settings.tokenLabel) (module \(settings.modulePath)): \(error)")
        }
    }

    /// Opens the store as the gateway does (migrations applied).
    static func openStore(_ settings: StoreSettings) async throws(AdminError) -> any KeyRepository {
        do {
            return try await GatewayServerApp.openStore(settings, logger: Logger(label: "hsm-admin.store"))
        } catch {
            throw AdminError(.unavailable, error.message)
        }
    }

    /// Logs in to the token and opens the store, runs `body`, closes both whatever it returned,
    /// and reports a failure as `hsm-admin COMMAND: …` on standard error with its exit code.
    func withTokenAndStore<T>(
        _ command: String,
        _ body: (SessionPool, PKCS11KeyToken, BackupTokenIdentity, any KeyRepository) async -> Result<T, AdminError>
    ) async throws -> T {
        do {
            let (hsm, storeSettings) = try load()
            let (pool, token, identity) = try await Self.logIn(hsm)
            let store: any KeyRepository
            do {
                store = try await Self.openStore(storeSettings)
            } catch {
                await pool.shutdown()
                throw error
            }
            let result = await body(pool, token, identity, store)
            await store.close()
            await pool.shutdown()
            return try result.get()
        } catch let error as AdminError {
            FileHandle.standardError.write(Data("hsm-admin \(command): \(error.message)\n".utf8))
            throw ExitCode(error.exitCode)
        } catch {
            FileHandle.standardError.write(Data("hsm-admin \(command): \(error)\n".utf8))
            throw ExitCode(AdminExitCode.internalError)
        }
    }

    /// `operation`'s outcome, a `BackupError` mapped to its exit code and anything else to a failure.
    static func outcome<T>(_ command: String, _ operation: () async throws -> T) async -> Result<T, AdminError> {
        do {
            return .success(try await operation())
        } catch let error as BackupError {
            return .failure(AdminError(.forBackup(error), error.message))
        } catch {
            return .failure(AdminError(.failed, "\(command) failed: \(error)"))
        }
    }
}

extension AdminError.Code {
    /// The token or the store cannot be reached (69).
    static let unavailable = AdminError.Code("unavailable", exitCode: AdminExitCode.unavailable)
    /// The target of a restore is not empty (3).
    static let conflict = AdminError.Code("conflict", exitCode: AdminExitCode.conflict)

    /// The exit code for a backup or restore failure.
    static func forBackup(_ error: BackupError) -> AdminError.Code {
        switch error.code {
        case .targetNotEmpty: return .conflict
        case .io: return .cannotCreate
        default: return .failed
        }
    }
}

/// `hsm-admin backup`.
public struct BackupCommand: AsyncParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "backup",
        abstract: "Write a consistent, checksummed backup of the gateway's database to a file.",
        discussion: """
            Opens the store named by the gateway's configuration directly and copies one \
            consistent snapshot of it (PostgreSQL: a REPEATABLE READ READ ONLY transaction; \
            SQLite: one read transaction) while gateways keep serving: tenants, master-key \
            versions, wrapped data keys, rewrap jobs, principals, API token hashes, the audit \
            log and its checkpoints. The header names the token (label and serial) and carries \
            the audit head's checkpoint from the HSM. Master keys never leave the HSM: the \
            backup is useless without the token, which is backed up with the HSM's own tools \
            (docs/operations.md). The last line holds the file's SHA-256 and its HMAC by a \
            backup key inside the token (made on the first backup), so restore refuses a file \
            changed later even if checksummed again; the PIN is therefore needed (--pin-file or \
            --pin-env, or else the configuration's hsm.pin). The file is created with mode \
            0600; an existing file is not replaced.

            Exit codes: 0 written; 1 failed; 69 store or token unreachable; 73 the file cannot \
            be created; 78 unusable configuration.
            """
    )

    @OptionGroup var access: StoreAccessOptions

    @Option(help: "The backup file to create.")
    var output: String

    @Flag(help: "Print the summary as JSON.")
    var json = false

    public init() {}

    public func run() async throws {
        let summary = try await self.access.withTokenAndStore("backup") {
            _, token, identity, store -> Result<StoreBackupWriter.Summary, AdminError> in
            guard let source = store as? any BackupSource else {
                return .failure(AdminError(.failed, "this store cannot be backed up"))
            }
            return await StoreAccessOptions.outcome("backup") {
                try await StoreBackupWriter.write(from: source, identity: identity, token: token, to: output)
            }
        }
        BackupSummaryView(summary: summary, path: output).print(json: json)
    }
}

/// `hsm-admin restore`.
public struct RestoreCommand: AsyncParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "restore",
        abstract: "Load a backup into an empty database, after verifying it with the token.",
        discussion: """
            Verifies the whole file before writing anything: its SHA-256 and the token's MAC \
            of it, every line, the audit chain, and every audit checkpoint's MAC with the audit \
            key in the token. A backup made under another token, or changed since, is refused \
            (label and serial must match too; with --allow-cloned-token only the MACs decide, \
            for an HSM clone with another serial). \
            Then loads everything in one transaction into the store named by the gateway's \
            configuration, which must be empty (no tenant, principal or audit record: create \
            the database, run restore, then start the gateways), and verifies the loaded audit \
            log. Every restored master-key version is marked used up, so the first new data \
            key of each tenant rotates it (docs/operations.md). The PIN comes from --pin-file \
            or --pin-env, or else from the configuration's hsm.pin.

            Exit codes: 0 restored; 1 refused (damaged file, another token, broken audit log); \
            3 the database is not empty; 69 store or token unreachable; 78 unusable \
            configuration.
            """
    )

    @OptionGroup var access: StoreAccessOptions

    @Option(help: "The backup file to load.")
    var input: String

    @Flag(help: "Accept a token whose label or serial differs from the backup's if the audit anchor verifies.")
    var allowClonedToken = false

    @Flag(help: "Print the summary as JSON.")
    var json = false

    public init() {}

    public func run() async throws {
        let report = try await self.access.withTokenAndStore("restore") {
            pool, token, identity, store -> Result<StoreRestore.Report, AdminError> in
            await StoreAccessOptions.outcome("restore") {
                // The master keys on the token, so versions rotated in after the backup are kept.
                let onToken = try await pool.withSession { session in
                    try session.findMasterKeys(labelPrefix: MasterKeyLabel.prefix).compactMap { object in
                        TokenKeyID(bytes: object.id).map { StoreRestore.TokenMasterKey(label: object.label, id: $0) }
                    }
                }
                return try await StoreRestore.restore(
                    path: input, into: store, token: token, identity: identity, masterKeysOnToken: onToken,
                    options: StoreRestore.Options(allowClonedToken: allowClonedToken))
            }
        }
        RestoreSummaryView(report: report, path: input).print(json: json)
    }
}

/// What `backup` prints.
struct BackupSummaryView: Encodable {
    let summary: StoreBackupWriter.Summary
    let path: String

    enum CodingKeys: String, CodingKey {
        case path, store, token, counts, bytes, sha256, auditHead
    }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(path, forKey: .path)
        try container.encode(summary.header.store, forKey: .store)
        try container.encode(summary.header.token, forKey: .token)
        try container.encode(summary.counts, forKey: .counts)
        try container.encode(summary.bytes, forKey: .bytes)
        try container.encode(summary.sha256, forKey: .sha256)
        try container.encode(summary.header.auditHead.sequence, forKey: .auditHead)
    }

    func print(json: Bool) {
        if json {
            Swift.print(AdminJSON.document(self), terminator: "")
            return
        }
        let counts = summary.counts
        Swift.print(
            """
            backup written: \(path) (\(summary.bytes) bytes, sha256 \(summary.sha256))
            store \(summary.header.store), token \(summary.header.token)
            \(counts.tenants) tenants, \(counts.versions) master-key versions, \(counts.dataKeys) data keys, \
            \(counts.principals) principals, \(counts.apiTokens) API tokens, \(counts.auditRecords) audit records \
            (head \(summary.header.auditHead.sequence), \(counts.checkpoints) checkpoints)
            """)
    }
}

/// What `restore` prints.
struct RestoreSummaryView: Encodable {
    let report: StoreRestore.Report
    let path: String

    enum CodingKeys: String, CodingKey {
        case path, token, counts, auditVerified, anchoredThrough, adoptedVersions
    }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(path, forKey: .path)
        try container.encode(report.header.token, forKey: .token)
        try container.encode(report.counts, forKey: .counts)
        try container.encode(true, forKey: .auditVerified)
        try container.encodeIfPresent(report.verification.anchoredThrough, forKey: .anchoredThrough)
        try container.encode(adopted, forKey: .adoptedVersions)
    }

    /// `tenant:vN` of each version found on the token beyond the backup.
    var adopted: [String] { report.adoptedVersions.map { "\($0.tenant):v\($0.version)" } }

    func print(json: Bool) {
        if json {
            Swift.print(AdminJSON.document(self), terminator: "")
            return
        }
        let counts = report.counts
        Swift.print(
            """
            restored: \(path), made under token \(report.header.token)
            \(counts.tenants) tenants, \(counts.versions) master-key versions, \(counts.dataKeys) data keys, \
            \(counts.principals) principals, \(counts.apiTokens) API tokens, \(counts.auditRecords) audit records
            audit log verified with the HSM (\(report.verification.checkpointsChecked) checkpoints)
            every restored master-key version is used up: each tenant rotates at its next new data key
            """)
        if !adopted.isEmpty {
            Swift.print(
                "versions on the token newer than the backup, added as deactivated: "
                    + adopted.joined(separator: ", "))
        }
    }
}
