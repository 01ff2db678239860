import Foundation
import PKCS11
import Yams

/// The `hsm:` section of the gateway's configuration file: how to reach the token that holds
/// the master keys. See `hsm-config/gateway.*.example.yaml` for every key, documented.
public struct HSMSettings: Sendable, Hashable {
    /// The PKCS#11 module, loaded with `dlopen`.
    public var modulePath: String
    /// The token, found by label (slot numbers are not stable).
    public var tokenLabel: String
    /// Where the user PIN comes from (`unseal` is `.auto`; not read in `.shamir`).
    public var pin: PINSource
    /// How the gateway gets the PIN: `pin` at start, or operators' Shamir shares.
    public var unseal: UnsealMode = .auto
    /// Upper bound on open sessions (also capped by the token).
    public var maximumSessions: Int
    /// How long a request waits for a free session.
    public var acquireTimeout: Duration
    /// SoftHSM2 only: exported as `SOFTHSM2_CONF` before the module loads.
    public var softHSM2ConfigPath: String?
    /// Who makes the AES-GCM IVs under master keys (`hsm.gcm_iv`): the gateway, from the token's
    /// RNG (the default), or the module itself, as HSMs in FIPS mode require (docs/hsm/README.md).
    public var gcmIV: GCMIVSource = .gateway
    /// Passed to `C_Initialize` in `CK_C_INITIALIZE_ARGS.pReserved` (`hsm.initialize_args`):
    /// NSS's softoken reads its library parameters there, some vendor modules their own
    /// options. Configuration, not a secret: it must not hold a PIN or password, and the gateway
    /// never logs it or puts it in an error.
    public var initializeArguments: String?

    /// The largest `sessions.max` accepted: far above what any HSM grants one client.
    public static let maximumSessionsLimit = 1024
    /// The longest `sessions.acquire_timeout_ms` accepted (10 minutes); a longer wait is a hang.
    public static let maximumAcquireTimeoutMilliseconds = 600_000
    /// The largest configuration file read (1 MiB): configuration, not data.
    public static let maximumFileByteCount = 1 << 20
    /// The longest path accepted for the module, PIN file or SoftHSM2 config (PATH_MAX).
    public static let maximumPathByteCount = 4096
    /// The longest token label: PKCS#11 labels are 32 bytes.
    public static let maximumTokenLabelByteCount = 32
    /// The longest `hsm.initialize_args` accepted: `PKCS11Module.maximumInitializeArgumentsByteCount`
    /// (8 KiB, a database path of PATH_MAX and NSS's other parameters).
    public static let maximumInitializeArgumentsByteCount = PKCS11Module.maximumInitializeArgumentsByteCount

    public init(
        modulePath: String,
        tokenLabel: String,
        pin: PINSource,
        maximumSessions: Int = 8,
        acquireTimeout: Duration = .seconds(5),
        softHSM2ConfigPath: String? = nil,
        initializeArguments: String? = nil
    ) {
        self.modulePath = modulePath
        self.tokenLabel = tokenLabel
        self.pin = pin
        self.maximumSessions = maximumSessions
        self.acquireTimeout = acquireTimeout
        self.softHSM2ConfigPath = softHSM2ConfigPath
        self.initializeArguments = initializeArguments
    }

    /// Reads the `hsm:` section of the YAML file at `path`. Other top-level sections are left to
    /// their owners; unknown keys inside `hsm:` are errors, so a typo is not silently ignored.
    public static func load(fromFile path: String) throws -> HSMSettings {
        let text = try ConfigurationFile.read(path, limit: maximumFileByteCount, what: "configuration file")
        return try parse(yaml: text, source: path)
    }

    /// Parses the `hsm:` section of a YAML document.
    public static func parse(yaml: String, source: String = "configuration") throws -> HSMSettings {
        let root: Node?
        do {
            root = try Yams.compose(yaml: yaml)
        } catch let error as YamlError {
            throw ConfigurationError("\(source): not valid YAML: \(Self.describe(error))")
        }
        guard let mapping = root?.mapping else {
            throw ConfigurationError("\(source): expected a mapping with an `hsm:` section")
        }
        guard let hsm = mapping["hsm"] else {
            throw ConfigurationError("\(source): no `hsm:` section")
        }
        var reader = try SectionReader(node: hsm, path: "hsm", source: source)
        let module = try reader.string("module", maximumBytes: maximumPathByteCount)
        let label = try reader.string("token_label", maximumBytes: maximumTokenLabelByteCount)

        var pinReader = try reader.section("pin")
        let pinFile = try pinReader.optionalString("file", maximumBytes: maximumPathByteCount)
        let pinEnv = try pinReader.optionalString("env", maximumBytes: 255)
        try pinReader.rejectUnknownKeys()
        let pin: PINSource
        switch (pinFile, pinEnv) {
        case (let file?, nil): pin = .file(file)
        case (nil, let variable?): pin = .environment(variable)
        default: throw ConfigurationError("\(source): hsm.pin needs exactly one of `file` or `env`")
        }

        var settings = HSMSettings(modulePath: module, tokenLabel: label, pin: pin)
        if var sessions = try reader.optionalSection("sessions") {
            if let max = try sessions.optionalInteger("max", in: 1...maximumSessionsLimit) {
                settings.maximumSessions = max
            }
            if let milliseconds = try sessions.optionalInteger(
                "acquire_timeout_ms",
                in: 1...maximumAcquireTimeoutMilliseconds
            ) {
                settings.acquireTimeout = .milliseconds(milliseconds)
            }
            try sessions.rejectUnknownKeys()
        }
        settings.softHSM2ConfigPath = try reader.optionalString("softhsm2_conf", maximumBytes: maximumPathByteCount)
        if let gcmIV = try reader.optionalString("gcm_iv", maximumBytes: 16) {
            guard let source = GCMIVSource(rawValue: gcmIV) else {
                throw ConfigurationError(
                    "\(source): `hsm.gcm_iv` must be one of "
                        + GCMIVSource.allCases.map(\.rawValue).joined(separator: ", ") + ", not `\(gcmIV)`")
            }
            settings.gcmIV = source
        }
        settings.initializeArguments = try reader.optionalInitializeArguments("initialize_args")
        try reader.rejectUnknownKeys()
        return settings
    }

    private static func describe(_ error: YamlError) -> String {
        switch error {
        case .scanner(_, let problem, let mark, _), .parser(_, let problem, let mark, _):
            "\(problem) at line \(mark.line), column \(mark.column)"
        default:
            "\(error)"
        }
    }
}

/// A configuration the gateway refuses, with the file and key at fault.
public struct ConfigurationError: Error, Hashable, Sendable, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Reads one YAML mapping key by key, remembering which keys were used.
private struct SectionReader {
    let mapping: Node.Mapping
    let path: String
    let source: String
    var used: Set<String> = []

    init(node: Node, path: String, source: String) throws {
        guard let mapping = node.mapping else {
            throw ConfigurationError("\(source): `\(path)` must be a mapping")
        }
        self.mapping = mapping
        self.path = path
        self.source = source
    }

    mutating func scalar(_ key: String) throws -> String? {
        used.insert(key)
        guard let node = mapping[key] else { return nil }
        guard let scalar = node.scalar else {
            throw ConfigurationError("\(source): `\(path).\(key)` must be a single value")
        }
        return scalar.string
    }

    mutating func optionalString(_ key: String, maximumBytes: Int) throws -> String? {
        guard let value = try scalar(key) else { return nil }
        guard !value.isEmpty else {
            throw ConfigurationError("\(source): `\(path).\(key)` is empty")
        }
        guard value.utf8.count <= maximumBytes else {
            throw ConfigurationError("\(source): `\(path).\(key)` is longer than \(maximumBytes) bytes")
        }
        return value
    }

    mutating func string(_ key: String, maximumBytes: Int) throws -> String {
        guard let value = try optionalString(key, maximumBytes: maximumBytes) else {
            throw ConfigurationError("\(source): `\(path).\(key)` is required")
        }
        return value
    }

    /// `hsm.initialize_args`: checked like other strings, but the error never quotes the value.
    mutating func optionalInitializeArguments(_ key: String) throws -> String? {
        guard let value = try optionalString(key, maximumBytes: HSMSettings.maximumInitializeArgumentsByteCount)
        else { return nil }
        guard !value.utf8.contains(0) else {
            throw ConfigurationError("\(source): `\(path).\(key)` holds a NUL byte")
        }
        return value
    }

    mutating func optionalInteger(_ key: String, in range: ClosedRange<Int>) throws -> Int? {
        guard let text = try scalar(key) else { return nil }
        guard let value = Int(text), range.contains(value) else {
            throw ConfigurationError(
                "\(source): `\(path).\(key)` must be a whole number from \(range.lowerBound) to \(range.upperBound)"
            )
        }
        return value
    }

    mutating func optionalSection(_ key: String) throws -> SectionReader? {
        used.insert(key)
        guard let node = mapping[key] else { return nil }
        return try SectionReader(node: node, path: "\(path).\(key)", source: source)
    }

    mutating func section(_ key: String) throws -> SectionReader {
        guard let section = try optionalSection(key) else {
            throw ConfigurationError("\(source): `\(path).\(key)` is required")
        }
        return section
    }

    func rejectUnknownKeys() throws {
        let unknown = mapping.keys.compactMap(\.string).filter { !used.contains($0) }.sorted()
        guard unknown.isEmpty else {
            throw ConfigurationError(
                "\(source): unknown key\(unknown.count == 1 ? "" : "s") in `\(path)`: "
                    + unknown.joined(separator: ", ")
            )
        }
    }
}

/// Bounded reads of small configuration files.
enum ConfigurationFile {
    /// Reads a regular file of at most `limit` bytes as UTF-8.
    static func read(_ path: String, limit: Int, what: String) throws -> String {
        let descriptor = open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else {
            throw ConfigurationError("cannot open \(what) \(path): \(String(cString: strerror(errno)))")
        }
        let handle = FileHandle(fileDescriptor: descriptor, closeOnDealloc: true)
        var status = stat()
        guard fstat(descriptor, &status) == 0, (status.st_mode & S_IFMT) == S_IFREG else {
            throw ConfigurationError("\(what) \(path) is not a regular file")
        }
        // Read one byte past the limit so a file that grew since fstat is still caught.
        let data: Data
        do {
            data = try handle.read(upToCount: limit + 1) ?? Data()
        } catch {
            throw ConfigurationError("cannot read \(what) \(path): \(error.localizedDescription)")
        }
        guard data.count <= limit else {
            throw ConfigurationError("\(what) \(path) is larger than \(limit) bytes")
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw ConfigurationError("\(what) \(path) is not UTF-8 text")
        }
        return text
    }
}

/// How the gateway gets the HSM user PIN (`hsm.unseal`).
public enum UnsealMode: Sendable, Hashable, CustomStringConvertible {
    /// From `hsm.pin.file` or `hsm.pin.env` at start (development, and platforms that keep the PIN
    /// in their own secret store).
    case auto
    /// From K of N Shamir shares given by operators after start; `checkFile` is what
    /// `hsm-admin operator init` wrote (docs/sealing.md). The gateway starts sealed.
    case shamir(checkFile: String)

    /// `auto` or `shamir`, as in the configuration and on the wire.
    public var name: String {
        switch self {
        case .auto: "auto"
        case .shamir: "shamir"
        }
    }

    public var description: String {
        switch self {
        case .auto: "auto (PIN from hsm.pin)"
        case .shamir(let checkFile): "shamir (sealed at start; check file \(checkFile))"
        }
    }
}
