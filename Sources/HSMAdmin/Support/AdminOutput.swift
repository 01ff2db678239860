import Foundation
import Synchronization

/// Where a command writes: standard output for results (tables, JSON, a new token), standard
/// error for notes and errors. Injected so tests capture what a command prints.
public struct AdminOutput: Sendable {
    /// One of the two streams.
    public enum Stream: Sendable, Hashable {
        /// Results: tables, JSON, a new token.
        case standardOutput
        /// Notes and errors.
        case standardError
    }

    private let sink: @Sendable (Stream, String) -> Void
    /// Whether standard output is a terminal: progress lines are redrawn in place only there.
    public let isTerminal: Bool

    /// Output that hands every write to `sink`.
    public init(isTerminal: Bool, sink: @escaping @Sendable (Stream, String) -> Void) {
        self.isTerminal = isTerminal
        self.sink = sink
    }

    /// The process's standard output and error, written unbuffered (so `--follow` and
    /// `--watch` lines appear at once, even through a pipe).
    public static var console: AdminOutput {
        AdminOutput(isTerminal: isatty(STDOUT_FILENO) == 1) { stream, text in
            let handle = stream == .standardOutput ? FileHandle.standardOutput : FileHandle.standardError
            handle.write(Data(text.utf8))
        }
    }

    /// Writes `text` as it is to standard output.
    public func write(_ text: String) { sink(.standardOutput, text) }

    /// Writes `line` and a newline to standard output.
    public func line(_ line: String) { sink(.standardOutput, line + "\n") }

    /// Writes `text` and a newline to standard error.
    public func note(_ text: String) { sink(.standardError, text + "\n") }

    /// Writes `text` as it is to standard error (a progress line redrawn with `\r`).
    public func noteWithoutNewline(_ text: String) { sink(.standardError, text) }
}

/// Output kept in memory, for tests.
public final class CapturedOutput: Sendable {
    private let state = Mutex<(output: String, error: String)>(("", ""))
    private let terminal: Bool

    /// A capture that reports standard output as a terminal when `isTerminal`.
    public init(isTerminal: Bool = false) {
        self.terminal = isTerminal
    }

    /// The `AdminOutput` that writes here.
    public var output: AdminOutput {
        AdminOutput(isTerminal: terminal) { [self] stream, text in
            state.withLock { captured in
                switch stream {
                case .standardOutput: captured.output += text
                case .standardError: captured.error += text
                }
            }
        }
    }

    /// Everything written to standard output.
    public var standardOutput: String { state.withLock { $0.output } }
    /// Everything written to standard error.
    public var standardError: String { state.withLock { $0.error } }
}
