/// A client configuration that cannot work: which field, what is wrong, and why.
///
/// Codes are an open set. The message names the field and the rule, and at most a file path:
/// never the token or the contents of a key file.
public struct GatewayClientConfigurationError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What kind of problem it is.
    public struct Code: Sendable, Hashable, CustomStringConvertible {
        private let name: String
        private init(_ name: String) { self.name = name }

        /// A number or duration outside its named limit.
        public static let outOfRange = Code("outOfRange")
        /// A value with the wrong form (an empty host, a name with control characters).
        public static let invalidValue = Code("invalidValue")
        /// Settings that do not go together (a client key without its certificate).
        public static let conflictingValues = Code("conflictingValues")
        /// A certificate or key file that cannot be read or parsed.
        public static let unreadableFile = Code("unreadableFile")

        public var description: String { name }
    }

    /// The kind of problem.
    public var code: Code
    /// The configuration field, e.g. `poolSize` or `tls.clientKeyPath`.
    public var field: String
    /// What is wrong, for people.
    public var message: String

    /// A configuration error about `field`.
    public init(_ code: Code, field: String, _ message: String) {
        self.code = code
        self.field = field
        self.message = message
    }

    public var description: String { "invalid client configuration: \(field) \(message) (\(code))" }
}
