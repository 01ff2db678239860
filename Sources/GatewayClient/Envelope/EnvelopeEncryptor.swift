import Crypto

/// Envelope encryption in the manner of the AWS Encryption SDK: a fresh gateway data key per
/// message (or a cached one), the data sealed on the client with AES-256-GCM in frames of a fixed
/// size, under a key derived for the message alone, behind a self-describing header.
/// `EnvelopeDecryptor` needs only the envelope and the gateway. The format is in
/// `docs/envelope-format.md`.
///
/// ```swift
/// let encryptor = try EnvelopeEncryptor(provider: client)
/// let envelope = try await encryptor.encrypt(document, tenant: "acme", context: ["doc": "42"])
/// ```
public struct EnvelopeEncryptor: Sendable {
    /// Where data keys come from.
    public let provider: any DataKeyProvider
    /// Plaintext bytes per frame.
    public let frameSize: Int

    /// An encryptor taking data keys from `provider`.
    ///
    /// - Parameter frameSize: Plaintext bytes per frame, `EnvelopeFormat.minimumFrameSize` to
    ///   `maximumFrameSize` (default 64 KiB).
    public init(provider: any DataKeyProvider, frameSize: Int = EnvelopeFormat.defaultFrameSize) throws(EnvelopeError) {
        try EnvelopeFormat.validateFrameSize(frameSize)
        self.provider = provider
        self.frameSize = frameSize
    }

    /// Seals `plaintext` under a new data key of `tenant`, bound to `context`.
    ///
    /// - Throws: `EnvelopeError` for arguments over the format's limits (checked before the
    ///   provider is asked), and the provider's own errors (`GatewayError` from the gateway).
    public func encrypt(
        _ plaintext: some Collection<UInt8>,
        tenant: String,
        context: [String: String] = [:]
    ) async throws -> [UInt8] {
        try EnvelopeFormat.validateTenant(tenant)
        _ = try EnvelopeFormat.encodeContext(context)
        let dataKey = try await provider.generateEnvelopeDataKey(tenant: tenant, context: context)
        return try Self.encrypt(plaintext, with: dataKey, tenant: tenant, context: context, frameSize: frameSize)
    }

    /// Seals a stream of plaintext chunks under a new data key; the result is the envelope as a
    /// stream of chunks (the header, then one per frame). Memory stays near one frame plus the
    /// caller's current chunk, whatever the total length.
    public func encryptStream<Chunks: AsyncSequence>(
        _ chunks: Chunks,
        tenant: String,
        context: [String: String] = [:]
    ) -> EnvelopeEncryptionSequence<Chunks> where Chunks.Element: Collection<UInt8> {
        EnvelopeEncryptionSequence(
            base: chunks,
            keySource: .provider(provider),
            tenant: tenant,
            context: context,
            frameSize: frameSize
        )
    }

    /// Seals `plaintext` under a data key the caller already holds (a cached key: every
    /// message gets its own random message id and so its own derived key; the gateway need not
    /// be asked again). `dataKey` must have been generated for `tenant` with `context`, or the
    /// envelope will not decrypt.
    public static func encrypt(
        _ plaintext: some Collection<UInt8>,
        with dataKey: EnvelopeDataKey,
        tenant: String,
        context: [String: String] = [:],
        frameSize: Int = EnvelopeFormat.defaultFrameSize
    ) throws(EnvelopeError) -> [UInt8] {
        try encrypt(
            plaintext,
            with: dataKey,
            tenant: tenant,
            context: context,
            frameSize: frameSize,
            messageID: randomMessageID()
        )
    }

    /// `encryptStream` with a data key the caller holds.
    public static func encryptStream<Chunks: AsyncSequence>(
        _ chunks: Chunks,
        with dataKey: EnvelopeDataKey,
        tenant: String,
        context: [String: String] = [:],
        frameSize: Int = EnvelopeFormat.defaultFrameSize
    ) -> EnvelopeEncryptionSequence<Chunks> where Chunks.Element: Collection<UInt8> {
        EnvelopeEncryptionSequence(
            base: chunks,
            keySource: .dataKey(dataKey),
            tenant: tenant,
            context: context,
            frameSize: frameSize
        )
    }

    /// The whole-message path with a chosen message id (known-answer tests).
    static func encrypt(
        _ plaintext: some Collection<UInt8>,
        with dataKey: EnvelopeDataKey,
        tenant: String,
        context: [String: String],
        frameSize: Int,
        messageID: [UInt8]
    ) throws(EnvelopeError) -> [UInt8] {
        var writer = EnvelopeWriter(
            sealer: try EnvelopeFrameSealer(
                dataKey: dataKey,
                tenant: tenant,
                context: context,
                frameSize: frameSize,
                messageID: messageID
            )
        )
        let bytes = Array(plaintext)
        let frameCount = max(1, (bytes.count + frameSize - 1) / frameSize)
        guard frameCount <= Int(EnvelopeFormat.maximumFrameCount) else {
            throw EnvelopeError(.invalidArgument, "the message is over \(EnvelopeFormat.maximumFrameCount) frames")
        }
        var output = writer.header.encoded
        output.reserveCapacity(output.count + bytes.count + frameCount * (9 + EnvelopeFormat.tagByteCount))
        var input = bytes[...]
        while let frame = try writer.write(from: &input) {
            output.append(contentsOf: frame)
        }
        output.append(contentsOf: try writer.finish())
        return output
    }

    /// 32 bytes from the system's cryptographic random generator.
    static func randomMessageID() -> [UInt8] {
        // A random 256-bit key's bytes are exactly that.
        SymmetricKey(size: .bits256).withUnsafeBytes { Array($0) }
    }
}
