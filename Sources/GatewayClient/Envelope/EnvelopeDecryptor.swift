/// A decrypted envelope: its header and its plaintext.
public struct EnvelopePlaintext: Sendable, CustomStringConvertible {
    /// The header: tenant, data key id, encryption context.
    public var header: EnvelopeHeader
    /// The plaintext.
    public var plaintext: [UInt8]

    /// A decrypted envelope.
    public init(header: EnvelopeHeader, plaintext: [UInt8]) {
        self.header = header
        self.plaintext = plaintext
    }

    public var description: String {
        "EnvelopePlaintext(tenant: \(header.tenant), dataKeyID: \(header.dataKeyID), \(plaintext.count) bytes)"
    }
}

/// Opens envelopes made by `EnvelopeEncryptor`: reads the header, asks the provider (the gateway)
/// for the data key under the header's tenant and context, checks the key commitment, and
/// authenticates every frame, their order and the end of the message.
public struct EnvelopeDecryptor: Sendable {
    /// Where data keys come from.
    public let provider: any DataKeyProvider

    /// A decryptor asking `provider` for data keys.
    public init(provider: any DataKeyProvider) {
        self.provider = provider
    }

    /// Decrypts a whole envelope.
    ///
    /// - Parameters:
    ///   - ciphertext: The envelope.
    ///   - requiredContext: Pairs the header's encryption context must hold (checked before the
    ///     provider is asked): the caller's guard that the envelope is the one it expects.
    ///   - wrappedDataKey: The data key's wrapped copy (`DataKey.wrapped`), if the caller kept it
    ///     when it generated the key (then encrypting with `EnvelopeEncryptor.encrypt(_:with:…)`):
    ///     the gateway uses it when it has no row for the key, after its database was lost or
    ///     restored from an older backup (protocol §9.3). The envelope itself does not carry it.
    /// - Throws: `EnvelopeError` when the envelope is malformed, altered, truncated or extended,
    ///   or lacks a required pair; the provider's errors (`GatewayError`) unchanged.
    public func decrypt(
        _ ciphertext: some Collection<UInt8>,
        requiredContext: [String: String] = [:],
        wrappedDataKey: [UInt8] = []
    ) async throws -> EnvelopePlaintext {
        var reader = EnvelopeReader()
        let bytes = Array(ciphertext)
        var input = bytes[...]
        var header: EnvelopeHeader?
        var plaintext: [UInt8] = []
        while let event = try reader.read(from: &input) {
            switch event {
            case .header(let parsed):
                try Self.check(parsed, requiredContext: requiredContext)
                let dataKey = try await provider.decryptEnvelopeDataKey(
                    tenant: parsed.tenant,
                    id: parsed.dataKeyID,
                    context: parsed.context,
                    wrapped: wrappedDataKey
                )
                try reader.begin(dataKey: dataKey)
                header = parsed
                plaintext.reserveCapacity(bytes.count)
            case .plaintext(let frame, _):
                plaintext.append(contentsOf: frame)
            }
        }
        try reader.finish()
        guard let header else {
            throw EnvelopeError(.truncated, "the envelope ends inside its header")
        }
        return EnvelopePlaintext(header: header, plaintext: plaintext)
    }

    /// Decrypts an envelope that arrives as a stream of chunks, yielding the plaintext frame by
    /// frame, each only after it authenticated. The stream ends with an error if the envelope
    /// is truncated or has bytes after its end; treat the output as complete only when the
    /// sequence ends normally. Memory stays near one frame plus the caller's current chunk.
    /// `wrappedDataKey` as for `decrypt`.
    public func decryptStream<Chunks: AsyncSequence>(
        _ chunks: Chunks,
        requiredContext: [String: String] = [:],
        wrappedDataKey: [UInt8] = []
    ) -> EnvelopeDecryptionSequence<Chunks> where Chunks.Element: Collection<UInt8> {
        EnvelopeDecryptionSequence(
            base: chunks, provider: provider, requiredContext: requiredContext, wrappedDataKey: wrappedDataKey)
    }

    /// Refuses a header whose context lacks a required pair.
    static func check(_ header: EnvelopeHeader, requiredContext: [String: String]) throws(EnvelopeError) {
        for (key, value) in requiredContext where header.context[key] != value {
            // Names the key (keys are not secret), never a value.
            throw EnvelopeError(
                .contextMismatch,
                "the envelope's encryption context does not hold the required value for \"\(key)\""
            )
        }
    }
}
