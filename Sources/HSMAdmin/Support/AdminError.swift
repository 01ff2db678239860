import GatewayClient
import GatewayWire

/// The exit codes of `hsm-admin`. They are stable: scripts branch on them. The numbers above 63
/// follow BSD `sysexits.h`. Documented once here, in `hsm-admin --help` and in docs/admin-cli.md.
public enum AdminExitCode {
    /// The command did what was asked.
    public static let success: Int32 = 0
    /// The command ran but its result is a failure: `audit verify` found the chain broken, a
    /// preflight check failed, `status` found the gateway not ready, a watched rewrap job ended in
    /// a state other than completed; also a gateway error without a better code (`UNKNOWN`,
    /// `CANCELLED`).
    public static let failure: Int32 = 1
    /// The tenant, key, version, principal or token does not exist, or the caller may not know
    /// whether it does (`NOT_FOUND`).
    public static let notFound: Int32 = 2
    /// The state forbids it (`FAILED_PRECONDITION`: a disabled tenant, a version still
    /// referenced) or it exists already (`ALREADY_EXISTS`).
    public static let conflict: Int32 = 3
    /// Bad usage: an unknown flag, a missing or malformed argument, a refused confirmation, or
    /// connection settings that contradict each other (`EX_USAGE`).
    public static let usage: Int32 = 64
    /// The gateway refused an argument (`INVALID_ARGUMENT`, `OUT_OF_RANGE`); for `hsmgw`, also a
    /// bad envelope: malformed, tampered with, truncated, extended, or with another encryption
    /// context than the one required (`EX_DATAERR`).
    public static let invalidArgument: Int32 = 65
    /// The gateway cannot be reached or cannot serve now: connection refused, TLS failure,
    /// `UNAVAILABLE` (sealed, HSM or database down, shutting down), `DEADLINE_EXCEEDED`,
    /// `UNIMPLEMENTED` (an older gateway) (`EX_UNAVAILABLE`).
    public static let unavailable: Int32 = 69
    /// An input file cannot be opened (`hsmgw`'s `--in`) (`EX_NOINPUT`).
    public static let noInput: Int32 = 66
    /// A bug or inconsistency: `INTERNAL`, `DATA_LOSS`, an answer the CLI cannot read
    /// (`EX_SOFTWARE`).
    public static let internalError: Int32 = 70
    /// The output file of `audit export` cannot be written (`EX_CANTCREAT`).
    public static let cannotCreate: Int32 = 73
    /// Reading the input or writing the output failed midway (`hsmgw`) (`EX_IOERR`).
    public static let ioError: Int32 = 74
    /// A limit was reached or a concurrent change won: retry later (`RESOURCE_EXHAUSTED`,
    /// `ABORTED`) (`EX_TEMPFAIL`).
    public static let temporaryFailure: Int32 = 75
    /// No valid credentials (`UNAUTHENTICATED`: unknown, revoked or expired token; no token
    /// given) or not allowed (`PERMISSION_DENIED`) (`EX_NOPERM`).
    public static let permissionDenied: Int32 = 77
    /// The connection settings cannot work: a token file readable by others or unreadable, a
    /// malformed admin configuration file, an unreadable certificate or key (`EX_CONFIG`).
    public static let configuration: Int32 = 78

    /// Every code with its meaning, for help texts and documentation.
    public static let table: [(code: Int32, meaning: String)] = [
        (success, "success"),
        (failure, "failed: a check failed, audit chain broken, gateway not ready"),
        (notFound, "not found (NOT_FOUND)"),
        (conflict, "state forbids it or it exists (FAILED_PRECONDITION, ALREADY_EXISTS)"),
        (usage, "bad usage, refused confirmation, contradictory settings"),
        (invalidArgument, "the gateway refused an argument (INVALID_ARGUMENT, OUT_OF_RANGE); a bad envelope"),
        (noInput, "the input file cannot be opened"),
        (unavailable, "gateway unreachable or unavailable (UNAVAILABLE, DEADLINE_EXCEEDED)"),
        (internalError, "internal error (INTERNAL, DATA_LOSS, unreadable answer)"),
        (cannotCreate, "the output file cannot be written (or exists)"),
        (ioError, "reading the input or writing the output failed"),
        (temporaryFailure, "retry later (RESOURCE_EXHAUSTED, ABORTED)"),
        (permissionDenied, "unauthenticated or permission denied"),
        (configuration, "unusable settings (token file mode, admin config, TLS files)"),
    ]

    /// The table as help text: one `code meaning` line each.
    public static var helpText: String {
        table.map { entry in "\(entry.code)".padding(toLength: 4, withPad: " ", startingAt: 0) + entry.meaning }
            .joined(separator: "\n")
    }

    /// The exit code for a gateway status.
    public static func forStatus(_ code: StatusCode) -> Int32 {
        switch code {
        case .ok: return success
        case .notFound: return notFound
        case .alreadyExists, .failedPrecondition: return conflict
        case .invalidArgument, .outOfRange: return invalidArgument
        case .unavailable, .deadlineExceeded, .unimplemented: return unavailable
        case .internalError, .dataLoss: return internalError
        case .resourceExhausted, .aborted: return temporaryFailure
        case .unauthenticated, .permissionDenied: return permissionDenied
        default: return failure  // CANCELLED, UNKNOWN, and codes this build does not know.
        }
    }

    /// The exit code for a failed call: by its status, except that an answer the client could
    /// not read is an internal error whatever code it carries.
    public static func forError(_ error: GatewayError) -> Int32 {
        if error.origin == .client, error.reason == GatewayError.LocalReason.malformedResponse {
            return internalError
        }
        return forStatus(error.code)
    }
}

/// Why `hsm-admin` stopped, with the exit code that says so. The codes are an open set; the
/// message names what is wrong (a flag, a file, a setting's origin) and never holds a token.
public struct AdminError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What kind of problem it is, and the exit code it leads to.
    public struct Code: Sendable, Hashable, CustomStringConvertible {
        /// A short name, e.g. `usage`.
        public let name: String
        /// The process exit code.
        public let exitCode: Int32

        /// A code named `name` that exits with `exitCode`.
        public init(_ name: String, exitCode: Int32) {
            self.name = name
            self.exitCode = exitCode
        }

        /// Bad usage (64).
        public static let usage = Code("usage", exitCode: AdminExitCode.usage)
        /// Unusable settings: file modes, the admin configuration file (78).
        public static let configuration = Code("configuration", exitCode: AdminExitCode.configuration)
        /// No credentials at all (77).
        public static let credentials = Code("credentials", exitCode: AdminExitCode.permissionDenied)
        /// The operation ran and failed, or a check failed (1).
        public static let failed = Code("failed", exitCode: AdminExitCode.failure)
        /// An output file cannot be written (73).
        public static let cannotCreate = Code("cannotCreate", exitCode: AdminExitCode.cannotCreate)
        /// A bad envelope (65).
        public static let dataError = Code("dataError", exitCode: AdminExitCode.invalidArgument)
        /// An input file that cannot be opened (66).
        public static let noInput = Code("noInput", exitCode: AdminExitCode.noInput)
        /// A read or write that failed midway (74).
        public static let ioError = Code("ioError", exitCode: AdminExitCode.ioError)
        /// The gateway answered something inconsistent (70).
        public static let internalError = Code("internal", exitCode: AdminExitCode.internalError)

        public var description: String { name }
    }

    /// The kind of problem.
    public var code: Code
    /// For people; empty when the command already printed what went wrong.
    public var message: String

    /// An error of kind `code`.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    /// Exits with `code` without another message (the command printed its result already).
    public static func silent(_ code: Code) -> AdminError { AdminError(code, "") }

    /// The process exit code.
    public var exitCode: Int32 { code.exitCode }

    public var description: String { message }
}
