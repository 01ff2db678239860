import DataPlaneCLI
import Foundation

// Ctrl-C during a decrypt to a file removes the incomplete temporary file.
PendingFiles.removeOnSignals()
// The same path the tests drive in-process; the exit code is the command's.
exit(
    await DataPlaneRunner.main(
        arguments: Array(CommandLine.arguments.dropFirst()), environment: ProcessInfo.processInfo.environment,
        console: .process))
