import ArgumentParser
import Foundation
import GatewayClient
import HSMAdmin

/// `hsmgw data-key`.
struct DataKeyGroup: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "data-key",
        abstract: "Generate a data key, or decrypt one, for encryption done elsewhere.",
        subcommands: [DataKeyGenerateCommand.self, DataKeyDecryptCommand.self]
    )
}

/// Where a plaintext data key goes: a file of mode 0600 (the raw 32 bytes), or standard output
/// as base64 inside the command's result, refused when standard output is a terminal.
enum PlaintextDestination {
    case file(String)
    case standardOutput

    init(_ path: String) {
        self = path == "-" ? .standardOutput : .file(path)
    }

    /// Writes `key` to the file, or returns its base64 for the result.
    func deliver(_ key: SensitiveBytes, force: Bool, console: DataPlaneConsole) throws(AdminError) -> String? {
        switch self {
        case .standardOutput:
            return key.withUnsafeBytes { Data($0).base64EncodedString() }
        case .file(let path):
            let sink = try OutputSink.open(path, force: force, standardOutput: console.standardOutput)
            do {
                try key.withUnsafeBytes { (bytes) throws(AdminError) in try sink.write(bytes) }
                try sink.commit()
            } catch {
                sink.discard()
                throw error
            }
            return nil
        }
    }

    /// Refuses to print a key on a terminal, or an existing file without `force`, before the
    /// gateway is asked for a key that would then go nowhere.
    func check(console: DataPlaneConsole, flag: String, force: Bool) throws(AdminError) {
        switch self {
        case .standardOutput where console.standardOutputIsTerminal:
            throw AdminError(
                .usage,
                "refusing to print a plaintext data key on a terminal: give \(flag) PATH (a new 0600 file), "
                    + "or redirect standard output"
            )
        case .standardOutput:
            return
        case .file(let path):
            try OutputSink.open(path, force: force, standardOutput: console.standardOutput).discard()
        }
    }
}

/// What `data-key generate` and `data-key decrypt` print. `plaintext` (base64) only with
/// `-` as the destination; `plaintextFile` when the key went to a file.
struct DataKeyResult: CommandResult {
    var tenant: String
    var id: String
    var masterKeyVersion: UInt32
    var context: [String: String]
    /// The wrapped copy (base64): keep it with the data to decrypt the key even after the
    /// gateway's database was lost (protocol §9.3).
    var wrapped: String
    var plaintext: String?
    var plaintextFile: String?

    init(tenant: String, key: DataKey, context: [String: String], plaintext: String?, plaintextFile: String?) {
        self.tenant = tenant
        self.id = key.id
        self.masterKeyVersion = key.masterKeyVersion
        self.context = context
        self.wrapped = Data(key.wrapped).base64EncodedString()
        self.plaintext = plaintext
        self.plaintextFile = plaintextFile
    }

    var fields: FieldList {
        var list = FieldList()
        list.append("tenant", tenant)
        list.append("id", id)
        list.append("master key", "v\(masterKeyVersion)")
        list.append(
            "context", context.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))
        list.append("wrapped", wrapped)
        if let plaintextFile { list.append("plaintext", "written to \(plaintextFile) (mode 0600)") }
        if let plaintext { list.append("plaintext", plaintext) }
        return list
    }
}

/// `hsmgw data-key generate`.
struct DataKeyGenerateCommand: DataPlaneCommand {
    static let configuration = CommandConfiguration(
        commandName: "generate",
        abstract: "Generate a data key: its id and wrapped copy, and its plaintext unless --no-plaintext.",
        discussion: """
            As `aws kms generate-data-key`: the plaintext AES-256 key is for encrypting locally, \
            then forgetting. It goes to --plaintext-out PATH (the raw 32 bytes, a new file of \
            mode 0600), or with --plaintext-out - into the printed result as base64 (refused when \
            standard output is a terminal). --no-plaintext asks the gateway for none (as \
            generate-data-key-without-plaintext). Keep the id and the context: `data-key \
            decrypt` needs both.
            """
    )

    @Option(help: "Tenant id.", transform: argument(AdminArguments.tenantID))
    var tenant: String

    @OptionGroup var context: ContextOptions

    @Flag(help: "Do not return the plaintext key at all.")
    var noPlaintext = false

    @Option(help: ArgumentHelp("Where the plaintext key goes: a new 0600 file, or - (base64).", valueName: "path"))
    var plaintextOut: String?

    @Flag(help: "Replace an existing --plaintext-out file.")
    var force = false

    @OptionGroup var gateway: GatewayOptions

    func validate() throws {
        if noPlaintext, plaintextOut != nil {
            throw ValidationError("--no-plaintext and --plaintext-out contradict each other: give one")
        }
        if !noPlaintext, plaintextOut == nil {
            throw ValidationError(
                "the plaintext key needs a destination: --plaintext-out PATH (a new 0600 file) or - (base64 on "
                    + "standard output); or --no-plaintext")
        }
    }

    func execute(_ session: AdminSession, console: DataPlaneConsole) async throws -> (any CommandResult)? {
        let context = try self.context.pairs
        let destination = plaintextOut.map(PlaintextDestination.init)
        try destination?.check(console: console, flag: "--plaintext-out", force: force)
        let key = try await session.client.generateDataKey(
            tenant: tenant, context: context, includePlaintext: destination != nil)
        var inline: String?
        if let destination {
            guard let plaintext = key.plaintext else {
                throw AdminError(.internalError, "the gateway returned no plaintext key though it was asked for")
            }
            inline = try destination.deliver(plaintext, force: force, console: console)
        }
        return DataKeyResult(
            tenant: tenant, key: key, context: context, plaintext: inline,
            plaintextFile: plaintextOut.flatMap { $0 == "-" ? nil : $0 })
    }
}

/// `hsmgw data-key decrypt`.
struct DataKeyDecryptCommand: DataPlaneCommand {
    static let configuration = CommandConfiguration(
        commandName: "decrypt",
        abstract: "Decrypt a data key by its id (and the context it was generated with).",
        discussion: """
            --out PATH writes the raw 32 bytes to a new file of mode 0600; --out - (the default) \
            prints them as base64 in the result, refused when standard output is a terminal. \
            --wrapped-file names a file holding the `wrapped` value (base64) that `data-key \
            generate` printed: the gateway uses it when it has no row for the key.
            """
    )

    /// The largest `--wrapped-file` read: a wrapped key's base64 is under 100 bytes.
    static let maximumWrappedFileByteCount = 4096

    @Option(help: "Tenant id.", transform: argument(AdminArguments.tenantID))
    var tenant: String

    @Option(help: "Data key id (UUID).", transform: argument(DataPlaneArguments.dataKeyID))
    var keyId: String

    @OptionGroup var context: ContextOptions

    @Option(help: ArgumentHelp("File holding the kept wrapped copy (base64).", valueName: "path"))
    var wrappedFile: String?

    @Option(help: ArgumentHelp("Where the plaintext key goes: a new 0600 file, or - (base64).", valueName: "path"))
    var out = "-"

    @Flag(help: "Replace an existing --out file.")
    var force = false

    @OptionGroup var gateway: GatewayOptions

    /// The wrapped copy in `wrappedFile`, decoded.
    func wrapped() throws(AdminError) -> [UInt8] {
        guard let wrappedFile else { return [] }
        let input = try InputSource.open(wrappedFile, standardInput: -1)
        defer { input.close() }
        var bytes: [UInt8] = []
        while let chunk = try input.read() {
            bytes += chunk
            guard bytes.count <= Self.maximumWrappedFileByteCount else {
                throw AdminError(
                    .usage, "--wrapped-file is larger than \(Self.maximumWrappedFileByteCount) bytes: not a wrapped key"
                )
            }
        }
        let text = String(decoding: bytes, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        guard !text.isEmpty, let data = Data(base64Encoded: text) else {
            throw AdminError(
                .usage, "--wrapped-file must hold the base64 `wrapped` value that data-key generate printed")
        }
        return Array(data)
    }

    func execute(_ session: AdminSession, console: DataPlaneConsole) async throws -> (any CommandResult)? {
        let context = try self.context.pairs
        let destination = PlaintextDestination(out)
        try destination.check(console: console, flag: "--out", force: force)
        let key = try await session.client.decryptDataKey(
            tenant: tenant, id: keyId, context: context, wrapped: try wrapped())
        guard let plaintext = key.plaintext else {
            throw AdminError(.internalError, "the gateway returned no plaintext key")
        }
        let inline = try destination.deliver(plaintext, force: force, console: console)
        return DataKeyResult(
            tenant: tenant, key: key, context: context, plaintext: inline, plaintextFile: out == "-" ? nil : out)
    }
}

/// `hsmgw rewrap`.
struct RewrapKeyCommand: DataPlaneCommand {
    static let configuration = CommandConfiguration(
        commandName: "rewrap",
        abstract: "Rewrap a data key under the tenant's primary master key (after a rotation).",
        discussion: """
            The key's id and plaintext stay the same: envelopes and ciphertexts made with it \
            still decrypt. Prints the key's metadata; never the key.
            """
    )

    @Option(help: "Tenant id.", transform: argument(AdminArguments.tenantID))
    var tenant: String

    @Option(help: "Data key id (UUID).", transform: argument(DataPlaneArguments.dataKeyID))
    var keyId: String

    @OptionGroup var context: ContextOptions

    @OptionGroup var gateway: GatewayOptions

    func execute(_ session: AdminSession, console: DataPlaneConsole) async throws -> (any CommandResult)? {
        let context = try self.context.pairs
        return DataKeyView(try await session.client.rewrapDataKey(tenant: tenant, id: keyId, context: context))
    }
}
