import ArgumentParser
import Foundation
import GatewayConfig
import PKCS11

/// `hsm-admin`: the operator CLI. `preflight` checks a token directly, `backup` and `restore` open
/// the gateway's store and token directly; every other command talks to a running gateway over
/// the wire protocol (docs/admin-cli.md).
public struct HSMAdminCommand: AsyncParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "hsm-admin",
        abstract: "Operate an hsm-gateway and the HSM token behind it.",
        discussion: """
            Remote commands connect to 127.0.0.1:7700 with ./.hsm-dev/admin.token by default, so \
            `hsm-admin status` works next to `hsm-gateway --dev`. Settings: flags, then HSMGW_* \
            environment variables, then the --admin-config file (key = value lines). The API \
            token is never taken from a flag: use a file of mode 0600 or HSMGW_TOKEN. Tables by \
            default; --json for machine-readable output.

            Exit codes:
            \(AdminExitCode.helpText)
            """,
        version: HSMGatewayVersion.current,
        subcommands: [
            StatusCommand.self, TenantCommand.self, MasterKeyCommand.self, DataKeyCommand.self, RewrapCommand.self,
            PrincipalCommand.self, TokenCommand.self, AuditCommand.self, PreflightCommand.self, OperatorCommand.self,
            BackupCommand.self, RestoreCommand.self,
        ]
    )

    public init() {}

    /// The executable's entry point: runs the command line through `AdminRunner.main`, the same
    /// path tests drive in-process, and exits with its code.
    ///
    /// Not named `main`: in top-level code, `await HSMAdminCommand.main()` resolves to
    /// ArgumentParser's synchronous `main()` (Swift 6.3), which refuses asynchronous commands.
    public static func runCommandLine() async -> Never {
        let code = await AdminRunner.main(
            arguments: Array(CommandLine.arguments.dropFirst()),
            environment: ProcessInfo.processInfo.environment,
            output: .console
        )
        Foundation.exit(code)
    }
}

/// The version every executable reports.
public enum HSMGatewayVersion {
    public static let current = "0.1.0-dev"
}

/// `hsm-admin preflight`.
public struct PreflightCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "preflight",
        abstract: "Check a PKCS#11 token before pointing the gateway at it.",
        discussion: """
            Loads the module, shows the token, checks the mechanisms the gateway needs (AES key \
            generation, AES-GCM, random; key wrap with padding is optional), verifies every \
            master key against the policy (sensitive, never extractable, single purpose), and \
            times a short AES-GCM round trip. Then the rules of the token's HSM family \
            (detected from the module and token, or --family; docs/hsm/): session limits against \
            hsm.sessions.max, the PIN convention (checked, never printed), CKA_SENSITIVE and \
            CKA_EXTRACTABLE enforcement, and whether the token takes GCM IVs from the gateway or \
            generates them itself (hsm.gcm_iv). Each rule that is not met names the page to read. \
            Give the token either with --config or with --module, --token and --pin-file / \
            --pin-env. The PIN is never taken from a flag.

            Exit codes: 0 every check passed (warnings allowed); 1 a check failed; 64 bad usage.
            """
    )

    @Option(help: "Gateway configuration file (YAML); its `hsm:` section names module, token and PIN.")
    var config: String?

    @Option(help: "Path of the PKCS#11 module (shared library).")
    var module: String?

    @Option(help: "Label of the token.")
    var token: String?

    @Option(
        help: """
            C_Initialize arguments (hsm.initialize_args), e.g. NSS's \
            "configdir='sql:DIR' certPrefix='' keyPrefix='' secmod='secmod.db' flags= dbTokenDescription='LABEL'".
            """)
    var initializeArgs: String?

    @Option(help: "File holding the user PIN (mode 0600 or 0400).")
    var pinFile: String?

    @Option(help: "Environment variable holding the user PIN.")
    var pinEnv: String?

    @Option(help: "Label prefix that marks gateway master keys.")
    var labelPrefix: String = MasterKeyPolicy.labelPrefix

    @Option(help: "AES-GCM round trips to time (0 to skip, at most \(Preflight.Options.maximumRounds)).")
    var rounds: Int = 1000

    @Option(
        help:
            "HSM family whose rules to check, instead of detecting it: \(HSMFamily.allCases.map(\.rawValue).joined(separator: ", "))."
    )
    var family: String?

    @Option(help: "Who makes GCM IVs (hsm.gcm_iv): \(GCMIVSource.allCases.map(\.rawValue).joined(separator: ", ")).")
    var gcmIV: String?

    @Flag(help: "Print the report as JSON.")
    var json = false

    public init() {}

    public func validate() throws {
        guard (0...Preflight.Options.maximumRounds).contains(rounds) else {
            throw ValidationError("--rounds must be from 0 to \(Preflight.Options.maximumRounds)")
        }
        guard !labelPrefix.isEmpty, labelPrefix.utf8.count <= 64 else {
            throw ValidationError("--label-prefix must be 1 to 64 bytes")
        }
        if pinFile != nil, pinEnv != nil {
            throw ValidationError("give --pin-file or --pin-env, not both")
        }
        if let family, HSMFamily(rawValue: family) == nil {
            throw ValidationError(
                "--family must be one of \(HSMFamily.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        if let gcmIV, GCMIVSource(rawValue: gcmIV) == nil {
            throw ValidationError(
                "--gcm-iv must be one of \(GCMIVSource.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        if config == nil {
            guard module != nil, token != nil, pinFile != nil || pinEnv != nil else {
                throw ValidationError("give --config, or --module, --token and --pin-file (or --pin-env)")
            }
        }
    }

    /// The settings from the configuration file, with flags taking precedence.
    func settings() throws -> HSMSettings {
        var settings: HSMSettings
        if let config {
            settings = try HSMSettings.load(fromFile: config)
        } else {
            settings = HSMSettings(modulePath: "", tokenLabel: "", pin: .environment(""))
        }
        if let module { settings.modulePath = module }
        if let token { settings.tokenLabel = token }
        if let initializeArgs { settings.initializeArguments = initializeArgs }
        if let pinFile { settings.pin = .file(pinFile) }
        if let pinEnv { settings.pin = .environment(pinEnv) }
        if let gcmIV, let source = GCMIVSource(rawValue: gcmIV) { settings.gcmIV = source }
        return settings
    }

    public func run() throws {
        let settings: HSMSettings
        do {
            settings = try self.settings()
        } catch let error as ConfigurationError {
            FileHandle.standardError.write(Data("hsm-admin preflight: \(error)\n".utf8))
            throw ExitCode(64)
        }
        var options = Preflight.Options(settings: settings, labelPrefix: labelPrefix, rounds: rounds)
        options.family = family.flatMap(HSMFamily.init(rawValue:))
        let report = Preflight(options: options).run()
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
            let data = try encoder.encode(report)
            print(String(decoding: data, as: UTF8.self))
        } else {
            print(report.text)
        }
        if !report.passed {
            throw ExitCode.failure
        }
    }
}
