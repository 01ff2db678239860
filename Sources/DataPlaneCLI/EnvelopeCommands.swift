import ArgumentParser
import GatewayClient
import HSMAdmin
import Synchronization

/// The data-key provider `encrypt` and `decrypt` use: the gateway, with the key's id and context
/// noted for the summary, and, for `decrypt --context`, the header's context checked to equal the
/// one given before the gateway is asked.
final class RecordingProvider: DataKeyProvider {
    /// What the envelope's header said (decrypt) or what was generated (encrypt).
    struct Record: Sendable {
        var tenant = ""
        var dataKeyID = ""
        var context: [String: String] = [:]
    }

    private let base: any DataKeyProvider
    private let expectedContext: [String: String]?
    private let state = Mutex(Record())

    /// `base`, requiring the envelope's context to equal `expectedContext` when not nil.
    init(base: any DataKeyProvider, expectedContext: [String: String]? = nil) {
        self.base = base
        self.expectedContext = expectedContext
    }

    /// The key used.
    var record: Record { state.withLock { $0 } }

    func generateEnvelopeDataKey(tenant: String, context: [String: String]) async throws -> EnvelopeDataKey {
        let key = try await base.generateEnvelopeDataKey(tenant: tenant, context: context)
        state.withLock { $0 = Record(tenant: tenant, dataKeyID: key.id, context: context) }
        return key
    }

    func decryptEnvelopeDataKey(tenant: String, id: String, context: [String: String]) async throws
        -> SensitiveBytes
    {
        try await decryptEnvelopeDataKey(tenant: tenant, id: id, context: context, wrapped: [])
    }

    func decryptEnvelopeDataKey(tenant: String, id: String, context: [String: String], wrapped: [UInt8])
        async throws -> SensitiveBytes
    {
        if let expectedContext, expectedContext != context {
            // Names keys (not secret), never values.
            let keys = Set(expectedContext.keys).symmetricDifference(context.keys).sorted()
            let detail =
                keys.isEmpty
                ? "a value differs" : "keys not in both: \(keys.map(\.sanitizedForTerminal).joined(separator: ", "))"
            throw EnvelopeError(
                .contextMismatch, "the envelope's encryption context is not the one given with --context (\(detail))")
        }
        state.withLock { $0 = Record(tenant: tenant, dataKeyID: id, context: context) }
        return try await base.decryptEnvelopeDataKey(tenant: tenant, id: id, context: context, wrapped: wrapped)
    }
}

/// What `encrypt` and `decrypt` print: the key used and the byte counts (never a key or data).
struct EnvelopeSummary: CommandResult {
    var tenant: String
    var dataKeyId: String
    var context: [String: String]
    var frameSize: Int?
    var plaintextBytes: Int
    var envelopeBytes: Int
    var out: String

    var fields: FieldList {
        var list = FieldList()
        list.append("tenant", tenant)
        list.append("data key", dataKeyId)
        list.append(
            "context", context.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))
        if let frameSize { list.append("frame size", "\(frameSize) bytes") }
        list.append("plaintext", "\(plaintextBytes) bytes")
        list.append("envelope", "\(envelopeBytes) bytes")
        list.append("written to", out)
        return list
    }
}

/// The flags `encrypt` and `decrypt` share: where from, where to.
struct StreamOptions: ParsableArguments {
    @Option(name: .customLong("in"), help: ArgumentHelp("Input file, or - for standard input.", valueName: "path"))
    var input = "-"

    @Option(
        name: .customLong("out"),
        help: ArgumentHelp(
            "Output file (created 0600, refused if it exists), or - for standard output.", valueName: "path")
    )
    var output = "-"

    @Flag(help: "Replace an existing output file (only once the new one is complete).")
    var force = false

    func validate() throws {
        if input != "-", input == output {
            throw ValidationError("--in and --out name the same file")
        }
    }
}

extension DataPlaneCommand {
    /// Streams `input` through `transform` into `--out`: the output appears under its name only
    /// after the stream ended without error; on any error it is removed.
    func stream(
        _ options: StreamOptions,
        console: DataPlaneConsole,
        verb: String,
        _ transform: (InputSource.Chunks) -> some AsyncSequence<[UInt8], any Error>
    ) async throws -> (input: Int, output: Int) {
        let input = try InputSource.open(options.input, standardInput: console.standardInput)
        defer { input.close() }
        let output = try OutputSink.open(options.output, force: options.force, standardOutput: console.standardOutput)
        var progress = ProgressLine(
            output: console.output, isTerminal: console.standardErrorIsTerminal, total: input.knownSize, verb: verb)
        defer { progress.finish() }
        do {
            for try await chunk in transform(input.chunks) {
                try output.write(chunk)
                progress.update(input.byteCount)
            }
            try output.commit()
        } catch {
            output.discard()
            throw error
        }
        return (input.byteCount, output.byteCount)
    }
}

/// `hsmgw encrypt`.
struct EncryptCommand: StreamingCommand {
    static let configuration = CommandConfiguration(
        commandName: "encrypt",
        abstract: "Encrypt a file or standard input into an envelope under a new data key.",
        discussion: """
            Asks the gateway for a new data key of --tenant bound to the --context pairs, seals \
            the input with it on this machine (AES-256-GCM in frames, docs/envelope-format.md) \
            and writes the envelope. The envelope names the tenant, key and context, so \
            `hsmgw decrypt` needs nothing else. Memory stays near one frame whatever the size.
            """
    )

    @Option(help: "Tenant id.", transform: argument(AdminArguments.tenantID))
    var tenant: String

    @OptionGroup var context: ContextOptions

    @OptionGroup var streams: StreamOptions

    @Option(
        help: ArgumentHelp(
            "Plaintext bytes per frame, \(EnvelopeFormat.minimumFrameSize) to \(EnvelopeFormat.maximumFrameSize).",
            valueName: "bytes"
        ),
        transform: argument(DataPlaneArguments.frameSize)
    )
    var frameSize = EnvelopeFormat.defaultFrameSize

    @OptionGroup var gateway: GatewayOptions

    func execute(_ session: AdminSession, console: DataPlaneConsole) async throws -> (any CommandResult)? {
        let context = try self.context.pairs
        let provider = RecordingProvider(base: session.client)
        let encryptor = try EnvelopeEncryptor(provider: provider, frameSize: frameSize)
        let (input, output) = try await stream(streams, console: console, verb: "encrypted") { chunks in
            encryptor.encryptStream(chunks, tenant: tenant, context: context)
        }
        guard streams.output != "-" else { return nil }
        let record = provider.record
        return EnvelopeSummary(
            tenant: tenant, dataKeyId: record.dataKeyID, context: context, frameSize: frameSize,
            plaintextBytes: input, envelopeBytes: output, out: streams.output)
    }
}

/// `hsmgw decrypt`.
struct DecryptCommand: StreamingCommand {
    static let configuration = CommandConfiguration(
        commandName: "decrypt",
        abstract: "Decrypt an envelope from a file or standard input.",
        discussion: """
            The tenant, data key and encryption context come from the envelope's header; with \
            --context the header's context must equal the pairs given (checked before the gateway \
            is asked). Every frame is authenticated before its plaintext is written. A file \
            output appears only after the final frame authenticated: a tampered or truncated \
            envelope leaves no file. Standard output is streamed frame by frame: there, the exit \
            code (0) is the only sign that the whole message was authentic.
            """
    )

    @OptionGroup var context: ContextOptions

    @OptionGroup var streams: StreamOptions

    @OptionGroup var gateway: GatewayOptions

    func execute(_ session: AdminSession, console: DataPlaneConsole) async throws -> (any CommandResult)? {
        let expected = self.context.flags.isEmpty ? nil : try self.context.pairs
        let provider = RecordingProvider(base: session.client, expectedContext: expected)
        let decryptor = EnvelopeDecryptor(provider: provider)
        let (input, output) = try await stream(streams, console: console, verb: "decrypted") { chunks in
            decryptor.decryptStream(chunks)
        }
        guard streams.output != "-" else { return nil }
        let record = provider.record
        return EnvelopeSummary(
            tenant: record.tenant, dataKeyId: record.dataKeyID, context: record.context, frameSize: nil,
            plaintextBytes: output, envelopeBytes: input, out: streams.output)
    }
}
