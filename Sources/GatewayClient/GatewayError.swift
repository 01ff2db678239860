import GatewayWire

/// Why a call to the gateway failed: a gRPC status code, a stable machine-readable reason, a
/// message for people, and whether the gateway said so or the client decided it locally.
///
/// The set of codes is open (`StatusCode` wraps a number) and so is the set of reasons; branch on
/// `code` first, on `reason` for the cases that need it (`StatusReason` and `LocalReason` list the
/// stable values). Neither the message nor the description ever holds a token, key material, a
/// payload or an encryption-context value: server messages are safe by protocol rule, and local
/// messages are written here without any of them.
public struct GatewayError: Error, Sendable, Hashable, CustomStringConvertible {
    /// Who decided the outcome.
    public struct Origin: Sendable, Hashable, CustomStringConvertible {
        private enum Value: Hashable {
            case server
            case client
        }
        private let value: Value

        /// The gateway answered with this status (a response or a goaway).
        public static let server = Origin(value: .server)
        /// The client library decided it: connect failure, lost connection, local deadline,
        /// cancellation, a limit, a response it could not read.
        public static let client = Origin(value: .client)

        public var description: String { value == .server ? "server" : "client" }
    }

    /// Stable `reason` values of errors the client makes itself.
    public enum LocalReason {
        /// The connection (TCP, TLS or the handshake's transport) could not be opened.
        public static let connectFailed = "CONNECT_FAILED"
        /// The connection closed or broke while the request was in flight: it may have run.
        public static let connectionLost = "CONNECTION_LOST"
        /// The connection was going away or closed before the request was written: it did not run.
        public static let notSent = "NOT_SENT"
        /// The call's deadline passed on the client; a cancel frame was sent if it was in flight.
        public static let deadline = "LOCAL_DEADLINE"
        /// The calling task was cancelled; a cancel frame was sent if it was in flight.
        public static let taskCancelled = "TASK_CANCELLED"
        /// The client was shut down.
        public static let clientShutDown = "CLIENT_SHUT_DOWN"
        /// The request is larger than the server's maximum frame.
        public static let requestTooLarge = "REQUEST_TOO_LARGE"
        /// Too many requests were already waiting for a slot on the connection.
        public static let queueFull = "LOCAL_QUEUE_FULL"
        /// The server's answer could not be read as the method's response message.
        public static let malformedResponse = "MALFORMED_RESPONSE"
        /// An argument breaks a protocol limit, found before sending.
        public static let invalidArgument = "INVALID_ARGUMENT"
    }

    /// Whether the request may have reached the server. Decides what may be retried.
    enum Transmission: Sendable, Hashable {
        /// Provably never written to any connection (or refused by the server before any work,
        /// as with `TOO_MANY_REQUESTS_IN_FLIGHT`): safe to retry for every method.
        case notSent
        /// Written, so it may have run.
        case maybeProcessed
    }

    /// The gRPC canonical code.
    public var code: StatusCode
    /// A stable machine-readable reason within the code; empty when the code says it all.
    public var reason: String
    /// A message for people; never holds secrets.
    public var message: String
    /// Whether the gateway or the client produced this error.
    public var origin: Origin

    var transmission: Transmission

    /// Whether the request can be shown never to have run on the server.
    public var requestProvablyNotProcessed: Bool { transmission == .notSent }

    /// Reasons with which the gateway refuses a request before doing any of its work
    /// (`docs/protocol.md`, section 13).
    static let notProcessedReasons: Set<String> = [
        StatusReason.tooManyRequestsInFlight, StatusReason.overloaded, "TOO_MANY_CONNECTIONS",
        "TOO_MANY_CONNECTIONS_FROM_ADDRESS",
    ]

    /// An error as the gateway sent it (a failed response's `Status`). A code this build does
    /// not know becomes `UNKNOWN`, as the protocol asks.
    public init(serverCode code: StatusCode, reason: String, message: String) {
        self.code = code.rawValue <= 16 ? code : .unknown
        self.reason = reason
        self.message = message
        self.origin = .server
        // ABORTED means nothing was stored; the reasons above mean the work never started.
        let notProcessed =
            code == .aborted || (code == .resourceExhausted && Self.notProcessedReasons.contains(reason))
        self.transmission = notProcessed ? .notSent : .maybeProcessed
    }

    init(local code: StatusCode, reason: String, message: String, transmission: Transmission) {
        self.code = code
        self.reason = reason
        self.message = message
        self.origin = .client
        self.transmission = transmission
    }

    /// An error made by the client before the request was written.
    static func notSent(_ code: StatusCode, reason: String, _ message: String) -> GatewayError {
        GatewayError(local: code, reason: reason, message: message, transmission: .notSent)
    }

    /// The failed response `status` of a call.
    init(status: Hsmgw_V1_Status, headerStatus: StatusCode) {
        // The header's status is authoritative; the message's code repeats it.
        self.init(serverCode: headerStatus, reason: status.reason, message: status.message)
    }

    public var description: String {
        var text = "\(code.name)"
        if !reason.isEmpty { text += " [\(reason)]" }
        text += " (\(origin))"
        if !message.isEmpty { text += ": \(message)" }
        return text
    }
}
