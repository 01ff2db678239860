import GatewayWire

/// A data key with its plaintext, for envelope encryption.
public struct EnvelopeDataKey: Sendable, CustomStringConvertible {
    /// The key's id, written in the envelope header.
    public var id: String
    /// The 32-byte AES-256 key.
    public var plaintext: SensitiveBytes

    /// A data key `id` with its plaintext.
    public init(id: String, plaintext: SensitiveBytes) {
        self.id = id
        self.plaintext = plaintext
    }

    public var description: String { "EnvelopeDataKey(id: \(id), plaintext: redacted)" }
}

/// Where envelope encryption gets its data keys: the gateway (`GatewayClient` conforms), or a
/// stand-in for tests. The envelope format does not depend on it.
///
/// A provider must bind each key to its tenant and encryption context, as the gateway does:
/// `decryptEnvelopeDataKey` with another context must fail.
public protocol DataKeyProvider: Sendable {
    /// A new data key for `tenant`, bound to `context`, with its plaintext.
    func generateEnvelopeDataKey(tenant: String, context: [String: String]) async throws -> EnvelopeDataKey

    /// The plaintext of data key `id` of `tenant`, which must have been generated with exactly
    /// `context`.
    func decryptEnvelopeDataKey(tenant: String, id: String, context: [String: String]) async throws -> SensitiveBytes

    /// As `decryptEnvelopeDataKey(tenant:id:context:)`, with the key's wrapped copy the caller
    /// kept (`DataKey.wrapped`, or empty), which the gateway uses when it has no row for the key
    /// (protocol §9.3). The default ignores `wrapped`: a provider that keeps its own keys has no
    /// use for it.
    func decryptEnvelopeDataKey(tenant: String, id: String, context: [String: String], wrapped: [UInt8])
        async throws -> SensitiveBytes
}

extension DataKeyProvider {
    public func decryptEnvelopeDataKey(tenant: String, id: String, context: [String: String], wrapped: [UInt8])
        async throws -> SensitiveBytes
    {
        try await decryptEnvelopeDataKey(tenant: tenant, id: id, context: context)
    }
}

extension GatewayClient: DataKeyProvider {
    /// `generateDataKey` with the plaintext.
    public func generateEnvelopeDataKey(tenant: String, context: [String: String]) async throws -> EnvelopeDataKey {
        let key = try await generateDataKey(tenant: tenant, context: context, includePlaintext: true)
        guard let plaintext = key.plaintext else {
            throw GatewayError(
                local: .internalError,
                reason: GatewayError.LocalReason.malformedResponse,
                message: "the gateway returned a data key without the plaintext that was asked for",
                transmission: .maybeProcessed
            )
        }
        return EnvelopeDataKey(id: key.id, plaintext: plaintext)
    }

    /// `decryptDataKey`'s plaintext.
    public func decryptEnvelopeDataKey(tenant: String, id: String, context: [String: String]) async throws
        -> SensitiveBytes
    {
        try await decryptEnvelopeDataKey(tenant: tenant, id: id, context: context, wrapped: [])
    }

    /// `decryptDataKey`'s plaintext, with the wrapped copy the caller kept (if not empty).
    public func decryptEnvelopeDataKey(tenant: String, id: String, context: [String: String], wrapped: [UInt8])
        async throws -> SensitiveBytes
    {
        let key = try await decryptDataKey(tenant: tenant, id: id, context: context, wrapped: wrapped)
        guard let plaintext = key.plaintext else {
            throw GatewayError(
                local: .internalError,
                reason: GatewayError.LocalReason.malformedResponse,
                message: "the gateway returned a data key without its plaintext",
                transmission: .maybeProcessed
            )
        }
        return plaintext
    }
}
