import Foundation
import GatewayConfig
import Yams

// Every setting has one dotted key (`tls.certificate`), which is its path in the YAML file and,
// upper-cased with `_` for `.` and prefixed with `HSMGW_`, its environment variable
// (`HSMGW_TLS_CERTIFICATE`). Flags set keys too. The three sources are flattened into one map of
// raw values, file first, then the environment, then flags, so the last one wins; every value
// remembers where it came from so an error can name it.

/// One setting the gateway understands.
struct SettingDefinition: Sendable {
    /// The dotted key, e.g. `limits.max_connections`.
    let key: String
    /// Whether it holds a list (YAML sequence; comma-separated in the environment).
    let isList: Bool

    init(_ key: String, list: Bool = false) {
        self.key = key
        self.isList = list
    }

    /// `HSMGW_` and the key in upper case, `.` as `_`.
    var environmentName: String {
        "HSMGW_" + key.uppercased().replacingOccurrences(of: ".", with: "_")
    }
}

/// Every setting, documented in docs/configuration.md.
enum SettingKeys {
    static let all: [SettingDefinition] = [
        SettingDefinition("listen", list: true),
        SettingDefinition("metrics_listen"),
        SettingDefinition("allow_plaintext"),
        SettingDefinition("instance_id"),
        SettingDefinition("tls.certificate"),
        SettingDefinition("tls.private_key"),
        SettingDefinition("tls.client_ca"),
        SettingDefinition("tls.client_certificates"),
        SettingDefinition("hsm.module"),
        SettingDefinition("hsm.token_label"),
        SettingDefinition("hsm.pin.file"),
        SettingDefinition("hsm.pin.env"),
        SettingDefinition("hsm.unseal"),
        SettingDefinition("hsm.unseal_check_file"),
        SettingDefinition("hsm.sessions.max"),
        SettingDefinition("hsm.sessions.acquire_timeout_ms"),
        SettingDefinition("hsm.softhsm2_conf"),
        SettingDefinition("hsm.gcm_iv"),
        SettingDefinition("hsm.initialize_args"),
        SettingDefinition("store.kind"),
        SettingDefinition("store.sqlite.path"),
        SettingDefinition("store.postgres.host"),
        SettingDefinition("store.postgres.port"),
        SettingDefinition("store.postgres.unix_socket"),
        SettingDefinition("store.postgres.user"),
        SettingDefinition("store.postgres.database"),
        SettingDefinition("store.postgres.password_file"),
        SettingDefinition("store.postgres.tls"),
        SettingDefinition("store.postgres.tls_ca_file"),
        SettingDefinition("store.postgres.tls_server_name"),
        SettingDefinition("store.postgres.max_connections"),
        SettingDefinition("store.postgres.failover_hosts", list: true),
        SettingDefinition("store.postgres.standby_durability"),
        SettingDefinition("limits.max_frame_bytes"),
        SettingDefinition("limits.max_requests_in_flight"),
        SettingDefinition("limits.max_connections"),
        SettingDefinition("limits.max_connections_per_address"),
        SettingDefinition("limits.handshake_timeout_ms"),
        SettingDefinition("limits.idle_timeout_seconds"),
        SettingDefinition("limits.read_timeout_ms"),
        SettingDefinition("limits.keepalive_seconds"),
        SettingDefinition("limits.keepalive_timeout_seconds"),
        SettingDefinition("limits.drain_timeout_seconds"),
        SettingDefinition("fair_queue.max_waiting_per_tenant"),
        SettingDefinition("fair_queue.max_wait_ms"),
        SettingDefinition("fair_queue.max_concurrent"),
        SettingDefinition("fair_queue.min_concurrent"),
        SettingDefinition("auth.bootstrap_token_file"),
        SettingDefinition("auth.access_cache_ttl_ms"),
        SettingDefinition("auth.failure_burst"),
        SettingDefinition("auth.failures_per_minute"),
        SettingDefinition("rewrap.batch_size"),
        SettingDefinition("rewrap.keys_per_second"),
        SettingDefinition("log.level"),
    ]

    static let byKey: [String: SettingDefinition] = Dictionary(uniqueKeysWithValues: all.map { ($0.key, $0) })

    /// Section names that appear in the file as mappings (`tls`, `hsm.pin`...).
    static let sections: Set<String> = {
        var sections: Set<String> = []
        for definition in all {
            var parts = definition.key.split(separator: ".").dropLast()
            while !parts.isEmpty {
                sections.insert(parts.joined(separator: "."))
                parts = parts.dropLast()
            }
        }
        return sections
    }()
}

/// A setting's value as read, before validation, and where it came from.
struct RawSetting: Sendable, Hashable {
    /// One element for a scalar; any number for a list.
    var values: [String]
    /// For error messages: `gateway.yaml: tls.certificate`, `HSMGW_TLS_CERTIFICATE` or `--listen`.
    var origin: String
}

/// Settings given on the command line: the executable turns its flags into these. A later value
/// for the same key replaces an earlier one; for a list key, `append` adds to the flags' list.
public struct ConfigurationOverrides: Sendable {
    var values: [String: RawSetting] = [:]

    /// No overrides.
    public init() {}

    /// Sets `key` (a dotted setting key) to `value`; `origin` names the flag for error messages.
    public mutating func set(_ key: String, _ value: String, origin: String) throws(ConfigurationError) {
        guard let definition = SettingKeys.byKey[key] else {
            throw ConfigurationError("\(origin): unknown setting `\(key)`")
        }
        values[key] = RawSetting(
            values: definition.isList ? Self.splitList(value) : [value],
            origin: origin
        )
    }

    /// Adds `value` to a list setting (`listen`), keeping values set before by flags.
    public mutating func append(_ key: String, _ value: String, origin: String) throws(ConfigurationError) {
        guard let definition = SettingKeys.byKey[key] else {
            throw ConfigurationError("\(origin): unknown setting `\(key)`")
        }
        guard definition.isList else { return try set(key, value, origin: origin) }
        var existing = values[key] ?? RawSetting(values: [], origin: origin)
        existing.values += Self.splitList(value)
        values[key] = existing
    }

    /// Parses `key=value` (the `--set` flag).
    public mutating func set(assignment: String, origin: String) throws(ConfigurationError) {
        guard let equals = assignment.firstIndex(of: "=") else {
            throw ConfigurationError("\(origin): expected key=value, got `\(assignment)`")
        }
        let key = String(assignment[..<equals]).trimmingCharacters(in: .whitespaces)
        try set(key, String(assignment[assignment.index(after: equals)...]), origin: "\(origin) \(key)")
    }

    static func splitList(_ text: String) -> [String] {
        text.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
    }
}

/// Reads the three sources into one map.
enum SettingsSources {
    /// The largest configuration file read (1 MiB): configuration, not data.
    static let maximumFileByteCount = HSMSettings.maximumFileByteCount

    /// Flattens a YAML document into dotted keys; unknown keys and wrong shapes are errors.
    static func flatten(yaml: String, source: String) throws(ConfigurationError) -> [String: RawSetting] {
        let root: Node?
        do {
            root = try Yams.compose(yaml: yaml)
        } catch let error as YamlError {
            throw ConfigurationError("\(source): not valid YAML: \(describe(error))")
        } catch {
            throw ConfigurationError("\(source): not valid YAML")
        }
        guard let root else { return [:] }
        guard let mapping = root.mapping else {
            throw ConfigurationError("\(source): expected a mapping of settings at the top level")
        }
        var result: [String: RawSetting] = [:]
        try flatten(mapping, prefix: "", source: source, into: &result)
        return result
    }

    private static func flatten(
        _ mapping: Node.Mapping,
        prefix: String,
        source: String,
        into result: inout [String: RawSetting]
    ) throws(ConfigurationError) {
        for (keyNode, value) in mapping {
            guard let name = keyNode.string, !name.isEmpty else {
                throw ConfigurationError(
                    "\(source): a key under `\(prefix.isEmpty ? "the top level" : prefix)` is not text")
            }
            let key = prefix.isEmpty ? name : "\(prefix).\(name)"
            if SettingKeys.sections.contains(key) {
                if value.null != nil { continue }
                guard let inner = value.mapping else {
                    throw ConfigurationError("\(source): `\(key)` must be a mapping")
                }
                try flatten(inner, prefix: key, source: source, into: &result)
                continue
            }
            guard let definition = SettingKeys.byKey[key] else {
                throw ConfigurationError("\(source): unknown setting `\(key)`")
            }
            let origin = "\(source): \(key)"
            if value.null != nil { continue }
            switch value {
            case .scalar(let scalar):
                result[key] = RawSetting(
                    values: definition.isList ? ConfigurationOverrides.splitList(scalar.string) : [scalar.string],
                    origin: origin
                )
            case .sequence(let sequence):
                guard definition.isList else {
                    throw ConfigurationError("\(origin) must be a single value, not a list")
                }
                var values: [String] = []
                for element in sequence {
                    guard case .scalar(let scalar) = element else {
                        throw ConfigurationError("\(origin) must be a list of single values")
                    }
                    values.append(scalar.string)
                }
                result[key] = RawSetting(values: values, origin: origin)
            case .mapping, .alias:
                throw ConfigurationError("\(origin) must be a single value")
            }
        }
    }

    /// The settings named by `HSMGW_*` variables, and the names of `HSMGW_*` variables that name
    /// no setting (a typo is reported, not ignored).
    static func environment(_ environment: [String: String]) -> (settings: [String: RawSetting], unknown: [String]) {
        var settings: [String: RawSetting] = [:]
        var known: Set<String> = []
        for definition in SettingKeys.all {
            let name = definition.environmentName
            known.insert(name)
            guard let value = environment[name] else { continue }
            settings[definition.key] = RawSetting(
                values: definition.isList ? ConfigurationOverrides.splitList(value) : [value],
                origin: "environment variable \(name)"
            )
        }
        let unknown = environment.keys.filter { $0.hasPrefix("HSMGW_") && !known.contains($0) }.sorted()
        return (settings, unknown)
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
