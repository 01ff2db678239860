/// Turns plaintext into frames with bounded memory: it holds at most one frame of plaintext
/// (`pending`) and returns one sealed frame at a time. The last frame is sealed only when the
/// input has ended, so a message whose length is a multiple of the frame size ends with a full
/// final frame, and only the empty message has an empty one.
struct EnvelopeWriter {
    private var sealer: EnvelopeFrameSealer
    private var pending: [UInt8] = []
    /// The largest buffer this writer has held (plaintext pending or a sealed frame), for tests
    /// of the memory bound.
    private(set) var largestBufferByteCount = 0

    init(sealer: EnvelopeFrameSealer) {
        self.sealer = sealer
        pending.reserveCapacity(sealer.header.frameSize)
    }

    /// The header's bytes: the first output of the message.
    var header: EnvelopeHeader { sealer.header }

    /// Consumes `input` into the pending frame. Returns a sealed frame as soon as one is full
    /// and more input follows it (with `input` advanced past what was used); nil once all of
    /// `input` is pending.
    mutating func write(from input: inout ArraySlice<UInt8>) throws(EnvelopeError) -> [UInt8]? {
        let frameSize = sealer.header.frameSize
        while !input.isEmpty {
            if pending.count == frameSize {
                // More input follows, so this full frame is not the last.
                let frame = try sealer.seal(pending[...], final: false)
                clearPending()
                note(frame.count)
                return frame
            }
            let take = min(frameSize - pending.count, input.count)
            pending.append(contentsOf: input.prefix(take))
            input = input.dropFirst(take)
            note(pending.capacity)
        }
        return nil
    }

    /// The final frame, with whatever is pending (0 to one frame of plaintext).
    mutating func finish() throws(EnvelopeError) -> [UInt8] {
        let frame = try sealer.seal(pending[...], final: true)
        clearPending()
        note(frame.count)
        return frame
    }

    private mutating func clearPending() {
        zeroize(&pending)
        pending.removeAll(keepingCapacity: true)
    }

    private mutating func note(_ byteCount: Int) {
        largestBufferByteCount = max(largestBufferByteCount, byteCount)
    }
}

/// Reads an envelope from bytes that arrive in pieces of any size, holding at most one header or
/// one frame (`unit`) at a time: it copies from the input only what the current unit still
/// needs, and checks every length against its limit before waiting for the bytes it announces.
struct EnvelopeReader {
    /// What reading produced.
    enum Event {
        /// The header is complete; call `begin(dataKey:)` before reading on.
        case header(EnvelopeHeader)
        /// One authenticated frame's plaintext.
        case plaintext([UInt8], final: Bool)
    }

    private enum Phase {
        case header
        case awaitingKey(EnvelopeHeader)
        case frames(EnvelopeFrameOpener)
        case finished
    }

    private var phase: Phase = .header
    private var unit: [UInt8] = []
    /// The largest unit buffer this reader has held, for tests of the memory bound.
    private(set) var largestBufferByteCount = 0

    init() {}

    /// Whether the final frame has been read.
    var isFinished: Bool {
        if case .finished = phase { return true }
        return false
    }

    /// Takes bytes from `input` until something happens or `input` is used up (nil). After the
    /// final frame any further byte is an error.
    mutating func read(from input: inout ArraySlice<UInt8>) throws(EnvelopeError) -> Event? {
        while true {
            switch phase {
            case .finished:
                guard input.isEmpty else {
                    throw EnvelopeError(.trailingData, "bytes follow the envelope's final frame")
                }
                return nil
            case .awaitingKey:
                preconditionFailure("begin(dataKey:) must follow the header")
            case .header:
                let needed = try EnvelopeHeader.byteCountNeeded(unit[...])
                if unit.count < needed {
                    guard fill(to: needed, from: &input) else { return nil }
                    continue
                }
                let header = try EnvelopeHeader(complete: unit[...])
                unit.removeAll(keepingCapacity: true)
                phase = .awaitingKey(header)
                return .header(header)
            case .frames(var opener):
                let needed = try frameByteCount(opener)
                if unit.count < needed {
                    guard fill(to: needed, from: &input) else { return nil }
                    continue
                }
                let (plaintext, final) = try opener.open(unit[...])
                unit.removeAll(keepingCapacity: true)
                phase = final ? .finished : .frames(opener)
                return .plaintext(plaintext, final: final)
            }
        }
    }

    /// Supplies the data key the header names; checks its commitment.
    mutating func begin(dataKey: SensitiveBytes) throws(EnvelopeError) {
        guard case .awaitingKey(let header) = phase else {
            preconditionFailure("begin(dataKey:) follows the header, once")
        }
        phase = .frames(try EnvelopeFrameOpener(header: header, dataKey: dataKey))
    }

    /// The input has ended: anything but a complete envelope is truncated.
    func finish() throws(EnvelopeError) {
        guard isFinished else {
            throw EnvelopeError(.truncated, "the envelope ends before its final frame")
        }
    }

    /// The byte count of the frame being read, as far as its first bytes tell.
    private func frameByteCount(_ opener: EnvelopeFrameOpener) throws(EnvelopeError) -> Int {
        guard unit.count >= 5 else { return 5 }
        let sequence = unit[...].bigEndianUInt32(at: 0)
        guard sequence == opener.expectedSequence else {
            throw EnvelopeError(
                .malformed,
                "frame \(sequence) is out of sequence; frame \(opener.expectedSequence) was expected"
            )
        }
        let frameSize = opener.header.frameSize
        switch unit[4] {
        case EnvelopeFormat.regularFrameType:
            return 5 + frameSize + EnvelopeFormat.tagByteCount
        case EnvelopeFormat.finalFrameType:
            guard unit.count >= 9 else { return 9 }
            let length = Int(unit[...].bigEndianUInt32(at: 5))
            guard length <= frameSize else {
                throw EnvelopeError(.malformed, "the final frame's length \(length) is over the frame size")
            }
            return 9 + length + EnvelopeFormat.tagByteCount
        default:
            throw EnvelopeError(.malformed, "frame \(sequence) has the unknown type \(unit[4])")
        }
    }

    /// Copies from `input` toward `count` unit bytes; false when `input` is empty.
    private mutating func fill(to count: Int, from input: inout ArraySlice<UInt8>) -> Bool {
        guard !input.isEmpty else { return false }
        let take = min(count - unit.count, input.count)
        if unit.capacity < count { unit.reserveCapacity(count) }
        unit.append(contentsOf: input.prefix(take))
        input = input.dropFirst(take)
        largestBufferByteCount = max(largestBufferByteCount, unit.capacity)
        return true
    }
}

/// The envelope of a stream of plaintext chunks, as a stream of ciphertext chunks: the header,
/// then one chunk per frame. Memory stays near one frame whatever the input's length; the data
/// key is fetched when the first chunk is asked for.
public struct EnvelopeEncryptionSequence<Base: AsyncSequence>: AsyncSequence where Base.Element: Collection<UInt8> {
    /// A chunk of the envelope.
    public typealias Element = [UInt8]

    enum KeySource {
        case provider(any DataKeyProvider)
        case dataKey(EnvelopeDataKey)
    }

    let base: Base
    let keySource: KeySource
    let tenant: String
    let context: [String: String]
    let frameSize: Int

    /// Starts reading the plaintext.
    public func makeAsyncIterator() -> AsyncIterator {
        AsyncIterator(
            base: base.makeAsyncIterator(),
            keySource: keySource,
            tenant: tenant,
            context: context,
            frameSize: frameSize
        )
    }

    /// Produces the envelope's chunks.
    public struct AsyncIterator: AsyncIteratorProtocol {
        private var base: Base.AsyncIterator
        private let keySource: KeySource
        private let tenant: String
        private let context: [String: String]
        private let frameSize: Int
        private var writer: EnvelopeWriter?
        private var current: ArraySlice<UInt8> = []
        private var isFinished = false

        init(
            base: Base.AsyncIterator,
            keySource: KeySource,
            tenant: String,
            context: [String: String],
            frameSize: Int
        ) {
            self.base = base
            self.keySource = keySource
            self.tenant = tenant
            self.context = context
            self.frameSize = frameSize
        }

        /// The largest buffer the encryption has held (not counting the caller's own chunk).
        var largestBufferByteCount: Int { writer?.largestBufferByteCount ?? 0 }

        /// The next chunk of the envelope: first the header, then one frame at a time.
        public mutating func next() async throws -> [UInt8]? {
            guard !isFinished else { return nil }
            guard var writer = self.writer.take() else {
                let dataKey: EnvelopeDataKey
                switch keySource {
                case .provider(let provider):
                    // Refuse bad arguments before asking the gateway for a key.
                    try EnvelopeFormat.validateTenant(tenant)
                    _ = try EnvelopeFormat.encodeContext(context)
                    dataKey = try await provider.generateEnvelopeDataKey(tenant: tenant, context: context)
                case .dataKey(let key):
                    dataKey = key
                }
                let writer = try EnvelopeWriter(
                    sealer: EnvelopeFrameSealer(
                        dataKey: dataKey,
                        tenant: tenant,
                        context: context,
                        frameSize: frameSize,
                        messageID: EnvelopeEncryptor.randomMessageID()
                    )
                )
                self.writer = writer
                return writer.header.encoded
            }
            // Taken out and put back so the pending buffer is never shared (and never copied).
            defer { self.writer = writer }
            while true {
                if let frame = try writer.write(from: &current) {
                    return frame
                }
                if let chunk = try await base.next() {
                    current = Array(chunk)[...]
                    continue
                }
                isFinished = true
                return try writer.finish()
            }
        }
    }
}

extension EnvelopeEncryptionSequence: Sendable where Base: Sendable {}
extension EnvelopeEncryptionSequence.KeySource: Sendable {}

/// The plaintext of an envelope that arrives as a stream of chunks, as a stream of plaintext
/// chunks, one per frame. Each chunk is released only after its frame authenticated; the whole
/// message is authentic only when the sequence ends without an error (a truncated or extended
/// envelope fails at its end).
public struct EnvelopeDecryptionSequence<Base: AsyncSequence>: AsyncSequence where Base.Element: Collection<UInt8> {
    /// A chunk of plaintext.
    public typealias Element = [UInt8]

    let base: Base
    let provider: any DataKeyProvider
    let requiredContext: [String: String]
    /// The data key's wrapped copy the caller kept, or empty (`EnvelopeDecryptor.decryptStream`).
    var wrappedDataKey: [UInt8] = []

    /// Starts reading the envelope.
    public func makeAsyncIterator() -> AsyncIterator {
        AsyncIterator(
            base: base.makeAsyncIterator(), provider: provider, requiredContext: requiredContext,
            wrappedDataKey: wrappedDataKey)
    }

    /// Produces the plaintext chunks.
    public struct AsyncIterator: AsyncIteratorProtocol {
        private var base: Base.AsyncIterator
        private let provider: any DataKeyProvider
        private let requiredContext: [String: String]
        private let wrappedDataKey: [UInt8]
        private var reader = EnvelopeReader()
        private var current: ArraySlice<UInt8> = []
        private var isDone = false
        /// The header, once read.
        private(set) var header: EnvelopeHeader?

        init(
            base: Base.AsyncIterator,
            provider: any DataKeyProvider,
            requiredContext: [String: String],
            wrappedDataKey: [UInt8] = []
        ) {
            self.base = base
            self.provider = provider
            self.requiredContext = requiredContext
            self.wrappedDataKey = wrappedDataKey
        }

        /// The largest buffer the decryption has held (not counting the caller's own chunk).
        var largestBufferByteCount: Int { reader.largestBufferByteCount }

        /// The next authenticated chunk of plaintext; nil at the end of a complete envelope.
        public mutating func next() async throws -> [UInt8]? {
            while !isDone {
                guard let event = try reader.read(from: &current) else {
                    if let chunk = try await base.next() {
                        current = Array(chunk)[...]
                        continue
                    }
                    isDone = true
                    try reader.finish()
                    return nil
                }
                switch event {
                case .header(let header):
                    try EnvelopeDecryptor.check(header, requiredContext: requiredContext)
                    let dataKey = try await provider.decryptEnvelopeDataKey(
                        tenant: header.tenant,
                        id: header.dataKeyID,
                        context: header.context,
                        wrapped: wrappedDataKey
                    )
                    try reader.begin(dataKey: dataKey)
                    self.header = header
                case .plaintext(let plaintext, let final):
                    if final {
                        // Nothing may follow the final frame: check before releasing it.
                        try await drainInput()
                        isDone = true
                        return plaintext.isEmpty ? nil : plaintext
                    }
                    return plaintext
                }
            }
            return nil
        }

        /// Reads the rest of the input, which must be empty.
        private mutating func drainInput() async throws {
            while true {
                _ = try reader.read(from: &current)
                guard let chunk = try await base.next() else { return }
                current = Array(chunk)[...]
            }
        }
    }
}

extension EnvelopeDecryptionSequence: Sendable where Base: Sendable {}
