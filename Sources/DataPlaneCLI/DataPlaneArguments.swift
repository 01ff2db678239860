import ArgumentParser
import GatewayClient
import HSMAdmin

/// The argument forms `hsmgw` parses itself, as pure functions: encryption-context pairs, frame
/// sizes, data key ids and the base64 of a kept wrapped key. Each throws an `AdminError` (usage)
/// that names the rule, so a typo is caught before any connection. Context values are never
/// quoted in errors (they may be sensitive); keys are.
public enum DataPlaneArguments {
    /// The most `--context` flags: the gateway's limit on pairs (protocol-rules.md).
    public static let maximumContextPairs = EnvelopeFormat.maximumContextPairs
    /// The longest context key: the gateway's limit.
    public static let maximumContextKeyByteCount = EnvelopeFormat.maximumContextKeyByteCount
    /// The longest context value: the gateway's limit.
    public static let maximumContextValueByteCount = EnvelopeFormat.maximumContextValueByteCount
    /// The longest canonical context encoding: the gateway's limit (8 KiB).
    public static let maximumEncodedContextByteCount = EnvelopeFormat.maximumEncodedContextByteCount
    /// The longest data key id accepted: the gateway's are 36-byte UUIDs; this bounds input
    /// before the gateway judges it.
    public static let maximumDataKeyIDByteCount = EnvelopeFormat.maximumDataKeyIDByteCount
    /// The longest `--frame-size` text: `4194304` has seven digits; this bounds input.
    static let maximumFrameSizeTextByteCount = 16

    /// Parses repeated `--context KEY=VALUE` flags into a context. The first `=` separates key
    /// and value, so values may hold `=`; a key may be given once; the whole context must fit
    /// the gateway's limits (64 pairs, keys 1 to 256 bytes, values up to 4096 bytes, 8 KiB in
    /// all), checked here with the envelope library's own encoder.
    public static func context(_ flags: [String]) throws(AdminError) -> [String: String] {
        guard flags.count <= maximumContextPairs else {
            throw AdminError(.usage, "--context is given \(flags.count) times; at most \(maximumContextPairs) pairs")
        }
        var context: [String: String] = [:]
        for flag in flags {
            guard let equals = flag.firstIndex(of: "=") else {
                throw AdminError(.usage, "--context must be KEY=VALUE, e.g. --context purpose=backup")
            }
            let key = String(flag[..<equals])
            let value = String(flag[flag.index(after: equals)...])
            guard (1...maximumContextKeyByteCount).contains(key.utf8.count) else {
                throw AdminError(.usage, "--context keys must be 1 to \(maximumContextKeyByteCount) bytes")
            }
            guard value.utf8.count <= maximumContextValueByteCount else {
                throw AdminError(
                    .usage,
                    "--context value for `\(key.sanitizedForTerminal)` is over \(maximumContextValueByteCount) bytes"
                )
            }
            guard context.updateValue(value, forKey: key) == nil else {
                throw AdminError(.usage, "--context key `\(key.sanitizedForTerminal)` is given twice")
            }
        }
        do {
            _ = try EnvelopeFormat.encodeContext(context)
        } catch {
            throw AdminError(.usage, "--context: \(error.message)")
        }
        return context
    }

    /// Parses `--frame-size`: plaintext bytes per envelope frame, 1024 to 4194304.
    public static func frameSize(_ text: String) throws(AdminError) -> Int {
        let range = "\(EnvelopeFormat.minimumFrameSize) to \(EnvelopeFormat.maximumFrameSize)"
        guard text.utf8.count <= maximumFrameSizeTextByteCount, let size = Int(text) else {
            throw AdminError(.usage, "--frame-size must be a number of bytes, \(range)")
        }
        do {
            try EnvelopeFormat.validateFrameSize(size)
        } catch {
            throw AdminError(.usage, "--frame-size must be \(range) bytes, is \(size)")
        }
        return size
    }

    /// Checks a data key id: 1 to 64 printable ASCII bytes (the gateway's are UUIDs).
    public static func dataKeyID(_ text: String) throws(AdminError) -> String {
        guard (1...maximumDataKeyIDByteCount).contains(text.utf8.count),
            text.utf8.allSatisfy({ (0x21...0x7E).contains($0) })
        else {
            throw AdminError(
                .usage, "--key-id must be 1 to \(maximumDataKeyIDByteCount) printable ASCII bytes (a UUID)")
        }
        return text
    }
}

/// The repeated `--context KEY=VALUE` flag every command takes, checked at parse time.
struct ContextOptions: ParsableArguments {
    @Option(
        name: .customLong("context"),
        help: ArgumentHelp(
            "Encryption-context pair, repeatable (at most \(DataPlaneArguments.maximumContextPairs); "
                + "the first = separates key and value).",
            valueName: "key=value"
        )
    )
    var flags: [String] = []

    init() {}

    func validate() throws {
        do {
            _ = try DataPlaneArguments.context(flags)
        } catch {
            throw ValidationError(error.message)
        }
    }

    /// The pairs as a context.
    var pairs: [String: String] {
        get throws(AdminError) { try DataPlaneArguments.context(flags) }
    }
}
