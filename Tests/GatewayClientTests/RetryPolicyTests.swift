import GatewayWire
import Testing

@testable import GatewayClient

@Suite("Retry policy")
struct RetryPolicyTests {
    @Test("the default follows the protocol: 5 attempts, 100 ms doubling to 5 s")
    func defaults() throws {
        let policy = RetryPolicy.default
        try policy.validate()
        #expect(policy.maximumAttempts == 5)
        #expect(policy.backoffCeiling(beforeRetry: 1) == .milliseconds(100))
        #expect(policy.backoffCeiling(beforeRetry: 2) == .milliseconds(200))
        #expect(policy.backoffCeiling(beforeRetry: 3) == .milliseconds(400))
        #expect(policy.backoffCeiling(beforeRetry: 4) == .milliseconds(800))
        #expect(policy.backoffCeiling(beforeRetry: 7) == .milliseconds(5000))  // capped (6.4 s)
        #expect(policy.backoffCeiling(beforeRetry: 9) == .seconds(5))
    }

    @Test("full jitter: the backoff is the ceiling times a uniform draw in [0, 1)")
    func jitter() {
        let policy = RetryPolicy(maximumAttempts: 4, initialBackoff: .seconds(1), maximumBackoff: .seconds(3))
        #expect(policy.backoff(beforeRetry: 1, unitRandom: { 0 }) == .zero)
        #expect(policy.backoff(beforeRetry: 1, unitRandom: { 0.5 }) == .milliseconds(500))
        #expect(policy.backoff(beforeRetry: 2, unitRandom: { 0.25 }) == .milliseconds(500))
        #expect(policy.backoff(beforeRetry: 3, unitRandom: { 0.5 }) == .milliseconds(1500))
        // Out-of-range draws are clamped.
        #expect(policy.backoff(beforeRetry: 1, unitRandom: { 7 }) == .seconds(1))
        #expect(policy.backoff(beforeRetry: 1, unitRandom: { -1 }) == .zero)
        // The real generator stays within the ceiling and is not constant.
        let draws = (0..<200).map { _ in policy.backoff(beforeRetry: 2) }
        #expect(draws.allSatisfy { $0 >= .zero && $0 <= .seconds(2) })
        #expect(Set(draws).count > 100)
    }

    @Test("validation names the field and the limit")
    func validation() {
        let cases: [(RetryPolicy, String)] = [
            (RetryPolicy(maximumAttempts: 0), "retryPolicy.maximumAttempts"),
            (RetryPolicy(maximumAttempts: 11), "retryPolicy.maximumAttempts"),
            (RetryPolicy(initialBackoff: .zero), "retryPolicy.initialBackoff"),
            (RetryPolicy(initialBackoff: .seconds(2), maximumBackoff: .seconds(1)), "retryPolicy.maximumBackoff"),
            (RetryPolicy(maximumBackoff: .seconds(61)), "retryPolicy.maximumBackoff"),
            (RetryPolicy(backoffMultiplier: 0.5), "retryPolicy.backoffMultiplier"),
        ]
        for (policy, field) in cases {
            #expect(throws: GatewayClientConfigurationError.self) { try policy.validate() }
            do {
                try policy.validate()
            } catch {
                #expect(error.field == field)
                #expect(error.code == .outOfRange)
            }
        }
        #expect(throws: Never.self) { try RetryPolicy.none.validate() }
    }

    static let unavailableSent = GatewayError(
        local: .unavailable,
        reason: GatewayError.LocalReason.connectionLost,
        message: "lost",
        transmission: .maybeProcessed
    )
    static let unavailableNotSent = GatewayError.notSent(.unavailable, reason: GatewayError.LocalReason.notSent, "x")

    @Test("UNAVAILABLE after sending: idempotent methods and calls with an idempotency key only")
    func unavailableMaybeProcessed() {
        let error = Self.unavailableSent
        #expect(RetryPolicy.isRetryable(error, method: .decryptDataKey, hasIdempotencyKey: false))
        #expect(RetryPolicy.isRetryable(error, method: .listTenants, hasIdempotencyKey: false))
        #expect(!RetryPolicy.isRetryable(error, method: .generateDataKey, hasIdempotencyKey: false))
        #expect(RetryPolicy.isRetryable(error, method: .generateDataKey, hasIdempotencyKey: true))
        #expect(!RetryPolicy.isRetryable(error, method: .encrypt, hasIdempotencyKey: false))
        #expect(!RetryPolicy.isRetryable(error, method: .destroyDataKey, hasIdempotencyKey: false))
        let server = GatewayError(serverCode: .unavailable, reason: "", message: "sealed")
        #expect(RetryPolicy.isRetryable(server, method: .getTenant, hasIdempotencyKey: false))
        #expect(!RetryPolicy.isRetryable(server, method: .createTenant, hasIdempotencyKey: false))
        #expect(RetryPolicy.isRetryable(server, method: .createTenant, hasIdempotencyKey: true))
    }

    @Test("a call that provably never left the client is retried for every method")
    func notSent() {
        for method in Method.all {
            #expect(RetryPolicy.isRetryable(Self.unavailableNotSent, method: method, hasIdempotencyKey: false))
        }
        let connect = GatewayError.notSent(.unavailable, reason: GatewayError.LocalReason.connectFailed, "refused")
        #expect(RetryPolicy.isRetryable(connect, method: .encrypt, hasIdempotencyKey: false))
    }

    @Test("refusals before any work are retried for every method; other exhaustion is not")
    func refusedBeforeWork() {
        for reason in [
            StatusReason.tooManyRequestsInFlight, StatusReason.overloaded, "TOO_MANY_CONNECTIONS",
            "TOO_MANY_CONNECTIONS_FROM_ADDRESS",
        ] {
            let error = GatewayError(serverCode: .resourceExhausted, reason: reason, message: "")
            #expect(error.requestProvablyNotProcessed)
            #expect(RetryPolicy.isRetryable(error, method: .encrypt, hasIdempotencyKey: false))
        }
        let aborted = GatewayError(serverCode: .aborted, reason: "", message: "lost a race")
        #expect(RetryPolicy.isRetryable(aborted, method: .rotateMasterKey, hasIdempotencyKey: false))
        let exhausted = GatewayError(serverCode: .resourceExhausted, reason: "", message: "key used up")
        #expect(!RetryPolicy.isRetryable(exhausted, method: .encrypt, hasIdempotencyKey: false))
        let queueFull = GatewayError.notSent(.resourceExhausted, reason: GatewayError.LocalReason.queueFull, "full")
        #expect(!RetryPolicy.isRetryable(queueFull, method: .getTenant, hasIdempotencyKey: false))
    }

    @Test("never retried: shut down, deadlines, cancellation, and final server answers")
    func neverRetried() {
        let never: [GatewayError] = [
            .notSent(.unavailable, reason: GatewayError.LocalReason.clientShutDown, "shut down"),
            GatewayConnectionHandler.deadlineError(sent: true),
            GatewayConnectionHandler.deadlineError(sent: false),
            GatewayConnectionHandler.cancelledError(sent: true),
            GatewayConnectionHandler.cancelledError(sent: false),
            .notSent(.resourceExhausted, reason: GatewayError.LocalReason.requestTooLarge, "big"),
            GatewayError(serverCode: .invalidArgument, reason: StatusReason.decryptionFailed, message: ""),
            GatewayError(serverCode: .unauthenticated, reason: "", message: ""),
            GatewayError(serverCode: .permissionDenied, reason: "", message: ""),
            GatewayError(serverCode: .notFound, reason: "", message: ""),
            GatewayError(serverCode: .deadlineExceeded, reason: "", message: ""),
            GatewayError(serverCode: .internalError, reason: "", message: ""),
        ]
        for error in never {
            #expect(!RetryPolicy.isRetryable(error, method: .getTenant, hasIdempotencyKey: true), "\(error)")
        }
    }
}
