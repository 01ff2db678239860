import SecretMemory

/// The seal state of one gateway process as an I/O-free state machine: shares go in, actions
/// come out (log in with this PIN, drain and log out), and the caller performs them.
///
/// ```
///  sealed ──share──► unsealing(1..K-1 shares) ──K-th share, verified──► loggingIn ──ok──► unsealed
///    ▲  ▲                 │ reset / verification failed                    │ failed          │ seal
///    │  └─────────────────┘                                               ▼                 ▼
///    └───────────────────────────────────────────────────────────────── sealed ◄──drained── sealing
/// ```
///
/// Shares are held in zeroed memory only until the threshold is reached; the rebuilt PIN leaves
/// the machine in the `logIn` action and is not kept.
public struct SealStateMachine: Sendable {
    /// Where the gateway is.
    public enum State: Sendable {
        /// No share given; key operations refused.
        case sealed
        /// Some shares given, fewer than the threshold (never empty).
        case unsealing([SecretShare])
        /// The threshold was reached and the PIN verified; the caller is logging in.
        case loggingIn
        /// Logged in; key operations admitted.
        case unsealed
        /// A seal was asked for; in-flight operations are finishing, then the caller logs out.
        case sealing
    }

    /// What the caller does after a share is accepted.
    public enum SubmitOutcome: Sendable {
        /// The share was taken; more are needed.
        case accepted(SealProgress)
        /// The threshold was reached and the rebuilt PIN matches the check: log in with it, then
        /// call `loginSucceeded()` or `loginFailed()`. The caller drops the PIN when done.
        case logIn(SecretBytes)
    }

    /// What the caller does after a seal request.
    public enum SealAction: Sendable, Equatable {
        /// Stop admitting key operations, let in-flight ones finish, close the sessions and log
        /// out, then call `sealCompleted()`.
        case drainAndLogOut
        /// Nothing was logged in; any half-finished unseal was discarded.
        case none
    }

    /// The current state.
    public private(set) var state: State = .sealed
    /// The split this gateway accepts shares of.
    public let check: SealCheck

    public init(check: SealCheck) {
        self.check = check
    }

    /// Whether key operations may run.
    public var admitsKeyOperations: Bool {
        if case .unsealed = state { return true }
        return false
    }

    /// Progress for status calls and `/readyz`.
    public var progress: SealProgress {
        let submitted: Int
        switch state {
        case .sealed, .sealing: submitted = 0
        case .unsealing(let shares): submitted = shares.count
        case .loggingIn, .unsealed: submitted = check.threshold
        }
        return SealProgress(
            sealed: !admitsKeyOperations,
            submitted: submitted,
            threshold: check.threshold,
            shareCount: check.shareCount
        )
    }

    /// Takes one share. A refused share leaves the state as it was, except that a reconstruction
    /// that fails its check discards every share given so far (which one was wrong cannot be
    /// told without revealing something about the others).
    public mutating func submit(_ share: SecretShare) throws(UnsealRefusal) -> SubmitOutcome {
        var collected: [SecretShare]
        switch state {
        case .sealed: collected = []
        case .unsealing(let shares): collected = shares
        case .loggingIn: throw UnsealRefusal(.busy, "an unseal is completing; try again shortly")
        case .sealing: throw UnsealRefusal(.busy, "the gateway is sealing; try again shortly")
        case .unsealed: throw UnsealRefusal(.notSealed, "the gateway is not sealed")
        }
        guard check.admits(share) else {
            throw UnsealRefusal(.foreignShare, "the share does not belong to this gateway's current split")
        }
        guard !collected.contains(where: { $0.x == share.x }) else {
            throw UnsealRefusal(.duplicateShare, "share \(share.x) was already given in this unseal")
        }
        collected.append(share)
        guard collected.count >= check.threshold else {
            state = .unsealing(collected)
            return .accepted(progress)
        }
        let secret = SecretSharing.interpolateAtZero(collected)
        guard check.verifies(secret) else {
            state = .sealed
            throw UnsealRefusal(
                .verificationFailed,
                "the shares do not rebuild the PIN (at least one was altered); every share given was discarded"
            )
        }
        state = .loggingIn
        return .logIn(secret)
    }

    /// Discards the shares given so far. Returns whether there were any.
    @discardableResult
    public mutating func reset() -> Bool {
        guard case .unsealing = state else { return false }
        state = .sealed
        return true
    }

    /// The login with the rebuilt PIN worked. Returns false if a seal came in meanwhile: then the
    /// caller logs out again at once (and calls `sealCompleted()`).
    public mutating func loginSucceeded() -> Bool {
        switch state {
        case .loggingIn:
            state = .unsealed
            return true
        case .sealing:
            return false
        case .sealed, .unsealing, .unsealed:
            // Not reachable through this type's own transitions; stay sealed-safe.
            return false
        }
    }

    /// The login failed (the token refused the PIN or went away): sealed again.
    public mutating func loginFailed() {
        if case .loggingIn = state { state = .sealed }
    }

    /// A seal request.
    public mutating func seal() -> SealAction {
        switch state {
        case .sealed, .sealing:
            return .none
        case .unsealing:
            state = .sealed
            return .none
        case .loggingIn, .unsealed:
            state = .sealing
            return .drainAndLogOut
        }
    }

    /// The caller has drained and logged out.
    public mutating func sealCompleted() {
        if case .sealing = state { state = .sealed }
    }
}

/// How far an unseal has got; nothing in it says anything about a share's value.
public struct SealProgress: Sendable, Hashable, CustomStringConvertible {
    /// Whether key operations are refused.
    public let sealed: Bool
    /// Shares given in the current unseal.
    public let submitted: Int
    /// Shares needed.
    public let threshold: Int
    /// Shares that exist.
    public let shareCount: Int

    public init(sealed: Bool, submitted: Int, threshold: Int, shareCount: Int) {
        self.sealed = sealed
        self.submitted = submitted
        self.threshold = threshold
        self.shareCount = shareCount
    }

    public var description: String {
        sealed ? "sealed, \(submitted) of \(threshold) shares given" : "unsealed"
    }
}

/// Why a share or seal request was refused; the message is safe to show the operator and names no
/// other share.
public struct UnsealRefusal: Error, Hashable, Sendable, CustomStringConvertible {
    /// What kind of refusal.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Value: String, Sendable {
            case malformedShare = "malformed share"
            case foreignShare = "foreign share"
            case duplicateShare = "duplicate share"
            case verificationFailed = "verification failed"
            case notSealed = "not sealed"
            case busy = "busy"
        }

        private let value: Value
        private init(_ value: Value) { self.value = value }

        /// Not a share, a mistyped one, or a format this build does not read.
        public static let malformedShare = Code(.malformedShare)
        /// A share of another split.
        public static let foreignShare = Code(.foreignShare)
        /// A share with the same number was already given in this unseal.
        public static let duplicateShare = Code(.duplicateShare)
        /// The threshold was reached but the rebuilt PIN does not match the check; all shares
        /// were discarded.
        public static let verificationFailed = Code(.verificationFailed)
        /// The gateway is unsealed (or runs with auto-unseal).
        public static let notSealed = Code(.notSealed)
        /// A login or a seal is under way.
        public static let busy = Code(.busy)

        public var description: String { value.rawValue }
    }

    public let code: Code
    /// Safe to show the operator.
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    /// A share that did not parse.
    public init(parsing error: SecretSharingError) {
        self.init(.malformedShare, error.message)
    }

    public var description: String { "\(code): \(message)" }
}
