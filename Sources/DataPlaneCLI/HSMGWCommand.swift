import ArgumentParser
import Foundation
import GatewayClient
import HSMAdmin

/// `hsmgw`: the data-plane CLI. Encrypts and decrypts files and streams in the envelope format
/// (docs/envelope-format.md), generates and decrypts data keys, rewraps them. Connection
/// settings, the admin configuration file, token files, exit codes and output conventions are
/// `hsm-admin`'s own code (docs/cli.md).
public struct HSMGWCommand: AsyncParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "hsmgw",
        abstract: "Encrypt, decrypt and manage data keys with an hsm-gateway.",
        discussion: """
            Connects as hsm-admin does: 127.0.0.1:7700 with ./.hsm-dev/admin.token by default, \
            next to `hsm-gateway --dev`; flags, then HSMGW_* environment variables, then the \
            --admin-config file. The API token is never taken from a flag. Results on standard \
            output (--json for one JSON document), notes and errors on standard error. Every file \
            hsmgw creates has mode 0600 and appears only when complete.

            Exit codes:
            \(AdminExitCode.helpText)
            """,
        version: HSMGatewayVersion.current,
        subcommands: [EncryptCommand.self, DecryptCommand.self, DataKeyGroup.self, RewrapKeyCommand.self]
    )

    public init() {}

}

/// What `hsmgw` reads and writes besides its arguments: text (results, JSON, notes and errors)
/// through an `AdminOutput`, and the raw byte streams of `-` as descriptors. Injected so tests
/// drive commands in-process.
public struct DataPlaneConsole: Sendable {
    /// Results and JSON to standard output, notes, errors and progress to standard error.
    public var output: AdminOutput
    /// The descriptor `--in -` reads.
    public var standardInput: Int32
    /// The descriptor `--out -` writes (the envelope or plaintext, unbuffered).
    public var standardOutput: Int32
    /// Whether standard output is a terminal: a plaintext key is never printed there.
    public var standardOutputIsTerminal = false
    /// Whether standard error is a terminal: progress shows only there.
    public var standardErrorIsTerminal = false

    /// A console writing text to `output` and bytes to `standardOutput`, reading `standardInput`;
    /// neither stream a terminal until said otherwise.
    public init(output: AdminOutput, standardInput: Int32, standardOutput: Int32) {
        self.output = output
        self.standardInput = standardInput
        self.standardOutput = standardOutput
    }

    /// The process's own standard streams.
    public static var process: DataPlaneConsole {
        var console = DataPlaneConsole(output: .console, standardInput: STDIN_FILENO, standardOutput: STDOUT_FILENO)
        console.standardOutputIsTerminal = isatty(STDOUT_FILENO) == 1
        console.standardErrorIsTerminal = isatty(STDERR_FILENO) == 1
        return console
    }
}

/// The flags every `hsmgw` command takes: `hsm-admin`'s connection and output flags.
struct GatewayOptions: ParsableArguments {
    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var output: OutputOptions

}

/// A command that reads or writes a stream (`encrypt`, `decrypt`).
protocol StreamingCommand: DataPlaneCommand {
    /// `--in`, `--out`, `--force`.
    var streams: StreamOptions { get }
}

extension StreamingCommand {
    /// Refuses `--json` with the data on standard output, before connecting.
    func validate() throws {
        if gateway.output.json, streams.output == "-" {
            throw ValidationError("--json prints a summary on standard output: give --out PATH for the data")
        }
    }
}

/// A command that talks to the gateway: the common flags, and its work.
protocol DataPlaneCommand: AsyncParsableCommand {
    /// The connection and output flags.
    var gateway: GatewayOptions { get }
    /// The command's work; returns what to print, if anything (the runner prints it as
    /// `name  value` lines or, with `--json`, as one document). Throws `AdminError`,
    /// `GatewayError` or `EnvelopeError`.
    func execute(_ session: AdminSession, console: DataPlaneConsole) async throws -> (any CommandResult)?
}

/// What a command prints: JSON as it encodes, or its fields for people.
protocol CommandResult: Encodable {
    /// The result as `name  value` lines.
    var fields: FieldList { get }
}

extension DataKeyView: CommandResult {}

extension DataPlaneCommand {
    /// Runs the command with the process's environment and console.
    mutating func run() async throws {
        let code = await DataPlaneRunner.run(
            self, environment: ProcessInfo.processInfo.environment, console: .process)
        if code != AdminExitCode.success { throw ExitCode(code) }
    }
}

/// Runs `hsmgw` in-process with an injected environment and console: what `main` does, and what
/// tests call.
public enum DataPlaneRunner {
    /// The client name the gateway logs for `hsmgw` connections.
    public static let clientName = "hsmgw/\(HSMGatewayVersion.current)"

    /// Parses `arguments` (without the program name), runs the command and returns its exit
    /// code. Usage errors and help print as the executable prints them.
    public static func main(arguments: [String], environment: [String: String], console: DataPlaneConsole) async
        -> Int32
    {
        let parsed: any ParsableCommand
        do {
            parsed = try HSMGWCommand.parseAsRoot(arguments)
        } catch {
            return AdminRunner.report(error, root: HSMGWCommand.self, output: console.output)
        }
        guard let command = parsed as? any DataPlaneCommand else {
            // `help`, or a bare group (`hsmgw data-key`), whose run prints its help.
            var local = parsed
            do {
                try local.run()
                return AdminExitCode.success
            } catch {
                return AdminRunner.report(error, root: HSMGWCommand.self, output: console.output)
            }
        }
        return await run(command, environment: environment, console: console)
    }

    /// Runs one parsed command; returns its exit code.
    static func run(_ command: some DataPlaneCommand, environment: [String: String], console: DataPlaneConsole)
        async -> Int32
    {
        await RemoteCommandRunner.run(
            programName: "hsmgw",
            clientName: clientName,
            connection: command.gateway.connection,
            json: command.gateway.output.json,
            environment: environment,
            output: console.output,
            classify: classify
        ) { session in
            if let result = try await command.execute(session, console: console) {
                session.print(result) { result.fields.render() }
            }
        }
    }

    /// Envelope errors: a bad envelope is a data error (65); a broken limit is usage (64).
    static func classify(_ error: any Error) -> (message: String, exitCode: Int32)? {
        guard let error = error as? EnvelopeError else { return nil }
        let code = error.code == .invalidArgument ? AdminExitCode.usage : AdminExitCode.invalidArgument
        return ("\(error.description.sanitizedForTerminal)", code)
    }
}
