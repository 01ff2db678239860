/// Why the transport cannot start or serve: a configuration out of range, a listener it refuses,
/// TLS material it cannot load, an address it cannot bind. The `message` says which setting or
/// listener; it never carries key material or file contents.
public struct GatewayTransportError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The kind of failure. An open set: new codes may be added, so `switch` with a `default`.
    public struct Code: Sendable, Hashable, CustomStringConvertible {
        private enum Value: Sendable, Hashable {
            case limitOutOfRange
            case noListener
            case invalidListener
            case plaintextNotAllowed
            case tlsConfigurationInvalid
            case bindFailed
            case alreadyRunning
        }
        private let value: Value
        private init(_ value: Value) { self.value = value }

        /// A limit of ``ServerLimits`` is outside its accepted range.
        public static let limitOutOfRange = Code(.limitOutOfRange)
        /// The configuration names no listener.
        public static let noListener = Code(.noListener)
        /// A listener's host, port or path is malformed.
        public static let invalidListener = Code(.invalidListener)
        /// A plaintext TCP listener on an address that is not loopback, without `allowPlaintext`.
        public static let plaintextNotAllowed = Code(.plaintextNotAllowed)
        /// The TLS certificate, key or client CA cannot be loaded or does not fit together.
        public static let tlsConfigurationInvalid = Code(.tlsConfigurationInvalid)
        /// A listener could not bind its address.
        public static let bindFailed = Code(.bindFailed)
        /// `run()` was called on a server that is already running or has run.
        public static let alreadyRunning = Code(.alreadyRunning)

        /// A short text for logs.

        public var description: String {
            switch value {
            case .limitOutOfRange: return "limitOutOfRange"
            case .noListener: return "noListener"
            case .invalidListener: return "invalidListener"
            case .plaintextNotAllowed: return "plaintextNotAllowed"
            case .tlsConfigurationInvalid: return "tlsConfigurationInvalid"
            case .bindFailed: return "bindFailed"
            case .alreadyRunning: return "alreadyRunning"
            }
        }
    }

    /// What went wrong.
    public var code: Code
    /// Which setting, listener or file, and why; safe to log.
    public var message: String

    /// An error with a code and a message.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    /// A short text for logs.

    public var description: String { "\(code): \(message)" }
}
