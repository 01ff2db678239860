import DataPlaneCLI
import Foundation

// The same path the tests drive in-process; the exit code is the command's.
exit(
    await DataPlaneRunner.main(
        arguments: Array(CommandLine.arguments.dropFirst()), environment: ProcessInfo.processInfo.environment,
        console: .process))
