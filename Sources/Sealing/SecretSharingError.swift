/// Why a split, a share or a reconstruction was refused: a code from an open set and a message
/// that says what was wrong with the input without showing any share, secret or check value.
public struct SecretSharingError: Error, Hashable, Sendable, CustomStringConvertible {
    /// What kind of failure.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Value: String, Sendable {
            case invalidParameters = "invalid parameters"
            case malformedShare = "malformed share"
            case checksumMismatch = "checksum mismatch"
            case unsupportedVersion = "unsupported version"
            case foreignShare = "foreign share"
            case duplicateShare = "duplicate share"
            case tooFewShares = "too few shares"
            case verificationFailed = "verification failed"
        }

        private let value: Value
        private init(_ value: Value) { self.value = value }

        /// A share count, threshold or secret length outside its limit.
        public static let invalidParameters = Code(.invalidParameters)
        /// Not a share: wrong length, not hexadecimal, x coordinate zero.
        public static let malformedShare = Code(.malformedShare)
        /// The share's own checksum does not match (a typo or a damaged file).
        public static let checksumMismatch = Code(.checksumMismatch)
        /// A share format this build does not read.
        public static let unsupportedVersion = Code(.unsupportedVersion)
        /// The share belongs to another split (another `operator init` or `rekey`).
        public static let foreignShare = Code(.foreignShare)
        /// A share with the same number was already given.
        public static let duplicateShare = Code(.duplicateShare)
        /// Fewer shares than the threshold.
        public static let tooFewShares = Code(.tooFewShares)
        /// The shares were well-formed but the secret they rebuild does not match the check value:
        /// at least one share was altered. Which one cannot be told without revealing the others.
        public static let verificationFailed = Code(.verificationFailed)

        public var description: String { value.rawValue }
    }

    public let code: Code
    /// A message safe to show an operator: it never holds share, secret or check bytes.
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "\(code): \(message)" }
}
