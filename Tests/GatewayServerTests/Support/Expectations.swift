import GatewayClient
import GatewayWire
import Testing

/// Runs `body`, which must fail with a `GatewayError`, and returns the error (nil, with a
/// recorded issue, when it succeeds or throws something else).
func gatewayError<T>(
    _ body: () async throws -> T,
    sourceLocation: SourceLocation = #_sourceLocation
) async -> GatewayError? {
    do {
        _ = try await body()
        Issue.record("expected a GatewayError, the call succeeded", sourceLocation: sourceLocation)
        return nil
    } catch let error as GatewayError {
        return error
    } catch {
        Issue.record("expected a GatewayError, got \(error)", sourceLocation: sourceLocation)
        return nil
    }
}

/// Expects `body` to fail with `code` (and `reason` when given) from the server.
func expectStatus<T>(
    _ code: StatusCode,
    reason: String? = nil,
    _ body: () async throws -> T,
    sourceLocation: SourceLocation = #_sourceLocation
) async {
    guard let error = await gatewayError(body, sourceLocation: sourceLocation) else { return }
    #expect(error.code == code, "\(error)", sourceLocation: sourceLocation)
    if let reason {
        #expect(error.reason == reason, "\(error)", sourceLocation: sourceLocation)
    }
}
