import ArgumentParser
import Foundation
import GatewayClient
import GatewayWire

/// What a remote command works with: a connected client, where to print, and how. Shared with
/// `hsmgw` (Sources/DataPlaneCLI), which runs its commands through `RemoteCommandRunner` too.
public struct AdminSession: Sendable {
    /// The gateway client (one connection, opened by the first call).
    public let client: GatewayClient
    /// Where results and notes go.
    public let output: AdminOutput
    /// The resolved connection settings.
    public let settings: ConnectionSettings
    /// Whether to print JSON.
    public let json: Bool

    /// Prints `value` as one JSON document, or `text()` for people.
    public func print(_ value: some Encodable, text: () -> String) {
        output.write(json ? AdminJSON.document(value) : text())
    }

    /// Milliseconds since 1970, for "expired" and similar judgements.
    var nowMilliseconds: Int64 { Int64((Date().timeIntervalSince1970 * 1000).rounded()) }
}

/// A command that talks to the gateway. It declares the connection and output flags; `run()`
/// resolves the settings, connects, calls `execute`, maps failures to exit codes
/// (`AdminExitCode`) and closes the connection.
protocol RemoteCommand: AsyncParsableCommand {
    /// The connection flags.
    var connection: ConnectionOptions { get }
    /// The output flags.
    var outputOptions: OutputOptions { get }
    /// The command's work. Throws `GatewayError` for a failed call, `AdminError` otherwise.
    func execute(_ session: AdminSession) async throws
}

extension RemoteCommand {
    /// Runs the command with the process's environment and console.
    mutating func run() async throws {
        let code = await AdminRunner.run(self, environment: ProcessInfo.processInfo.environment, output: .console)
        if code != AdminExitCode.success { throw ExitCode(code) }
    }
}

/// Runs `hsm-admin` commands in-process, with an injected environment and output: what `main`
/// does, and what tests call.
public enum AdminRunner {
    /// The client name the gateway logs for `hsm-admin` connections.
    public static let clientName = "hsm-admin/\(HSMGatewayVersion.current)"

    /// Parses `arguments` (without the program name) as `hsm-admin` does, runs the command and
    /// returns its exit code. Usage errors and help print as the executable prints them.
    public static func main(
        arguments: [String],
        environment: [String: String],
        output: AdminOutput
    ) async -> Int32 {
        let parsed: any ParsableCommand
        do {
            parsed = try HSMAdminCommand.parseAsRoot(arguments)
        } catch {
            return report(error, output: output)
        }
        if let remote = parsed as? any RemoteCommand {
            return await run(remote, environment: environment, output: output)
        }
        // Local commands (preflight, a bare group that prints its help).
        var command = parsed
        do {
            if var asynchronous = command as? any AsyncParsableCommand {
                try await asynchronous.run()
            } else {
                try command.run()
            }
            return AdminExitCode.success
        } catch {
            return report(error, output: output)
        }
    }

    /// Runs one parsed remote command; returns its exit code.
    static func run(
        _ command: some RemoteCommand,
        environment: [String: String],
        output: AdminOutput
    ) async -> Int32 {
        await RemoteCommandRunner.run(
            programName: "hsm-admin",
            clientName: clientName,
            connection: command.connection,
            json: command.outputOptions.json,
            environment: environment,
            output: output,
            execute: command.execute
        )
    }

    /// A failed call for people: what it means here, then the gateway's message, code and reason.
    public static func describe(_ error: GatewayError, settings: ConnectionSettings) -> String {
        let message = error.message.sanitizedForTerminal
        let tag = "[\(error.code.name)\(error.reason.isEmpty ? "" : ", \(error.reason.sanitizedForTerminal)")]"
        switch error.code {
        case .unavailable where error.origin == .client && error.reason == GatewayError.LocalReason.connectFailed:
            let hint =
                settings.targetOrigin == "default"
                ? " (the default address: is `hsm-gateway --dev` running here?)" : " (from \(settings.targetOrigin))"
            return "cannot reach the gateway at \(settings.summary)\(hint): \(message) \(tag)"
        case .unauthenticated:
            return "the gateway refused the credentials (\(settings.credential)): \(message) \(tag)"
        case .permissionDenied:
            return "permission denied: \(message) \(tag)"
        default:
            return "\(message.isEmpty ? error.code.name : message) \(tag)"
        }
    }

    /// Prints a parse error or a help request as the executable does, and returns its code.
    static func report(_ error: any Error, output: AdminOutput) -> Int32 {
        report(error, root: HSMAdminCommand.self, output: output)
    }

    /// Prints a parse error or a help request as the executable whose root command is `root`
    /// does, and returns its code.
    public static func report(_ error: any Error, root: any ParsableCommand.Type, output: AdminOutput) -> Int32 {
        let code = root.exitCode(for: error).rawValue
        let message = root.fullMessage(for: error)
        if code == AdminExitCode.success {
            if !message.isEmpty { output.write(message + "\n") }
        } else if !message.isEmpty {
            output.note(message)
        }
        return code
    }
}

/// The path every remote command of `hsm-admin` and `hsmgw` takes: resolve the connection
/// settings (flags, environment, admin configuration file), read the token, connect, run the
/// command, map its failure to an exit code (`AdminExitCode`) with one message on standard error,
/// and close the connection.
public enum RemoteCommandRunner {
    /// Runs `execute` with a session; returns the exit code.
    ///
    /// - Parameter programName: The program name that starts every error line, e.g. `hsm-admin`.
    /// - Parameter clientName: The client name the gateway logs for the connection.
    /// - Parameter classify: For errors other than `AdminError` and `GatewayError` (which every
    ///   command maps the same way): their message and exit code, or nil for an internal error.
    public static func run(
        programName: String,
        clientName: String,
        connection: ConnectionOptions,
        json: Bool,
        environment: [String: String],
        output: AdminOutput,
        classify: (any Error) -> (message: String, exitCode: Int32)? = { _ in nil },
        execute: (AdminSession) async throws -> Void
    ) async -> Int32 {
        let settings: ConnectionSettings
        let client: GatewayClient
        do {
            settings = try connection.resolve(environment: environment)
            let token = try settings.loadToken(environment: environment)
            client = try GatewayClient(
                configuration: settings.clientConfiguration(token: token, clientName: clientName))
        } catch let error as AdminError {
            output.note("\(programName): \(error.message)")
            return error.exitCode
        } catch {
            // GatewayClientConfigurationError: an unreadable certificate or key.
            output.note("\(programName): \(error)")
            return AdminExitCode.configuration
        }
        let session = AdminSession(client: client, output: output, settings: settings, json: json)
        let code: Int32
        do {
            try await execute(session)
            code = AdminExitCode.success
        } catch let error as AdminError {
            if !error.message.isEmpty { output.note("\(programName): \(error.message)") }
            code = error.exitCode
        } catch let error as GatewayError {
            output.note("\(programName): \(AdminRunner.describe(error, settings: settings))")
            code = AdminExitCode.forError(error)
        } catch {
            if let (message, exitCode) = classify(error) {
                output.note("\(programName): \(message)")
                code = exitCode
            } else {
                output.note("\(programName): \(error)")
                code = AdminExitCode.internalError
            }
        }
        await client.shutdown()
        return code
    }
}
