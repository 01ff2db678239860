/// Why an envelope could not be made or opened.
///
/// Codes are an open set. Messages name the rule that failed and never hold key material,
/// plaintext or encryption-context values. Errors of the `DataKeyProvider` (for the gateway,
/// `GatewayError`) are passed through unchanged.
public struct EnvelopeError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What kind of problem it is.
    public struct Code: Sendable, Hashable, CustomStringConvertible {
        private let name: String
        private init(_ name: String) { self.name = name }

        /// The bytes are not a well-formed envelope (bad magic, a field out of its limits, an
        /// unknown frame type, a frame out of sequence).
        public static let malformed = Code("malformed")
        /// The envelope's format version or algorithm suite is not one this library reads.
        public static let unsupported = Code("unsupported")
        /// A frame or the key commitment does not authenticate: the ciphertext, the header or
        /// the key is not the one that made it.
        public static let authenticationFailed = Code("authenticationFailed")
        /// The ciphertext ends before its final frame.
        public static let truncated = Code("truncated")
        /// Bytes follow the final frame.
        public static let trailingData = Code("trailingData")
        /// The header's encryption context lacks a pair the caller requires.
        public static let contextMismatch = Code("contextMismatch")
        /// An argument breaks a limit of the format (tenant, context, frame size, data key).
        public static let invalidArgument = Code("invalidArgument")

        public var description: String { name }
    }

    /// The kind of problem.
    public var code: Code
    /// What failed, for people.
    public var message: String

    /// An envelope error.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "envelope \(code): \(message)" }
}
