import ArgumentParser
import GatewayClient

/// The argument forms `hsm-admin` parses itself, as pure functions: tenant ids, role bindings
/// (`tenant:role`), durations (`30d`, `12h`, `1d12h`), master-key versions. Each throws an
/// `AdminError` (usage) that names the rule, so a typo is caught before any connection.
public enum AdminArguments {
    /// The longest tenant id the protocol allows (docs/protocol-rules.md, field limits).
    public static let maximumTenantIDByteCount = 63
    /// The longest role name accepted locally: the gateway's roles are short words; this only
    /// bounds input before the gateway judges it.
    public static let maximumRoleByteCount = 32
    /// The longest principal name the protocol allows.
    public static let maximumPrincipalNameByteCount = 128
    /// The roles the gateway defines today (the gateway is the judge; this list feeds help texts).
    public static let knownRoles = ["admin", "key-user", "decrypt-only"]

    /// Checks a tenant id: 1 to 63 bytes of `[a-z0-9_-]`, starting with a letter or digit.
    public static func tenantID(_ text: String) throws(AdminError) -> String {
        let bytes = Array(text.utf8)
        guard !bytes.isEmpty, bytes.count <= maximumTenantIDByteCount else {
            throw AdminError(.usage, "tenant id must be 1 to \(maximumTenantIDByteCount) bytes, is \(bytes.count)")
        }
        guard isLowercaseAlphanumeric(bytes[0]),
            bytes.allSatisfy({ isLowercaseAlphanumeric($0) || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: "-") })
        else {
            throw AdminError(
                .usage,
                "tenant id `\(text.sanitizedForTerminal)` must be lowercase letters, digits, `_` and `-`, "
                    + "starting with a letter or digit"
            )
        }
        return text
    }

    /// Parses a role binding `tenant:role`, where tenant is a tenant id or `*` (every tenant).
    public static func roleBinding(_ text: String) throws(AdminError) -> RoleBinding {
        let parts = text.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
        guard parts.count == 2 else {
            throw AdminError(
                .usage,
                "role `\(text.sanitizedForTerminal)` must be TENANT:ROLE, e.g. acme:key-user or *:admin "
                    + "(roles: \(knownRoles.joined(separator: ", ")))"
            )
        }
        let tenant = String(parts[0])
        let role = String(parts[1])
        if tenant != "*" {
            do {
                _ = try tenantID(tenant)
            } catch {
                throw AdminError(.usage, "in role `\(text.sanitizedForTerminal)`: \(error.message)")
            }
        }
        let roleBytes = Array(role.utf8)
        guard !roleBytes.isEmpty, roleBytes.count <= maximumRoleByteCount,
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(roleBytes[0]),
            roleBytes.allSatisfy({ isLowercaseAlphanumeric($0) || $0 == UInt8(ascii: "-") })
        else {
            throw AdminError(
                .usage,
                "role name `\(role.sanitizedForTerminal)` must be lowercase letters, digits and `-` "
                    + "(roles: \(knownRoles.joined(separator: ", ")))"
            )
        }
        return RoleBinding(tenant: tenant, role: role)
    }

    /// A role binding as `hsm-admin` prints and parses it: `tenant:role`.
    public static func format(_ binding: RoleBinding) -> String { "\(binding.tenant):\(binding.role)" }

    /// Checks a principal name: 1 to 128 of `a-z`, `0-9`, `-`, `_`, `.`, `@`.
    public static func principalName(_ text: String) throws(AdminError) -> String {
        let bytes = Array(text.utf8)
        let extra: Set<UInt8> = [UInt8(ascii: "-"), UInt8(ascii: "_"), UInt8(ascii: "."), UInt8(ascii: "@")]
        guard !bytes.isEmpty, bytes.count <= maximumPrincipalNameByteCount,
            bytes.allSatisfy({ isLowercaseAlphanumeric($0) || extra.contains($0) })
        else {
            throw AdminError(
                .usage,
                "principal name `\(text.sanitizedForTerminal)` must be 1 to \(maximumPrincipalNameByteCount) "
                    + "of a-z, 0-9, `-`, `_`, `.`, `@`"
            )
        }
        return text
    }

    /// Parses a master-key version: a whole number from 1, with an optional leading `v` (`v3`).
    public static func masterKeyVersion(_ text: String) throws(AdminError) -> UInt32 {
        let digits = text.hasPrefix("v") ? String(text.dropFirst()) : text
        guard let version = UInt32(digits), version >= 1 else {
            throw AdminError(.usage, "version `\(text.sanitizedForTerminal)` must be a number from 1, e.g. 3 or v3")
        }
        return version
    }

    private static func isLowercaseAlphanumeric(_ byte: UInt8) -> Bool {
        (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte)
    }
}

/// Durations as people type them: one or more `<number><unit>` with units `ms`, `s`, `m`, `h`,
/// `d` and `w`, e.g. `30d`, `12h`, `1d12h`, `500ms`.
public enum DurationArgument {
    /// The longest duration accepted: ten years, beyond any sensible token lifetime or timeout;
    /// it also keeps the arithmetic far from overflow.
    public static let maximumMilliseconds: Int64 = 3650 * 86_400_000

    /// The longest duration text read: `3650d` needs five characters; this bounds input.
    static let maximumTextByteCount = 64

    private static let units: [(suffix: String, milliseconds: Int64)] = [
        ("ms", 1), ("s", 1000), ("m", 60_000), ("h", 3_600_000), ("d", 86_400_000), ("w", 604_800_000),
    ]

    /// Parses `text` into a positive duration.
    public static func parse(_ text: String) throws(AdminError) -> Duration {
        let example = "give a number and a unit (ms, s, m, h, d, w), e.g. 30d, 12h, 1d12h"
        guard !text.isEmpty, text.utf8.count <= maximumTextByteCount else {
            throw AdminError(.usage, "duration `\(text.sanitizedForTerminal)` is not valid: \(example)")
        }
        var total: Int64 = 0
        var rest = Substring(text)
        while !rest.isEmpty {
            let digits = rest.prefix { $0.isASCII && $0.isNumber }
            guard !digits.isEmpty, let number = Int64(digits) else {
                throw AdminError(.usage, "duration `\(text.sanitizedForTerminal)` is not valid: \(example)")
            }
            rest = rest.dropFirst(digits.count)
            let unitText = rest.prefix { $0.isASCII && $0.isLetter }
            // Longest suffix first, so `ms` is not read as `m` followed by `s`.
            guard let unit = units.first(where: { $0.suffix == unitText }) else {
                let problem = unitText.isEmpty ? "has a number without a unit" : "has an unknown unit `\(unitText)`"
                throw AdminError(.usage, "duration `\(text.sanitizedForTerminal)` \(problem): \(example)")
            }
            rest = rest.dropFirst(unitText.count)
            let (product, overflow) = number.multipliedReportingOverflow(by: unit.milliseconds)
            guard !overflow, product <= maximumMilliseconds else {
                throw AdminError(.usage, "duration `\(text.sanitizedForTerminal)` is longer than 3650d")
            }
            total += product
            guard total <= maximumMilliseconds else {
                throw AdminError(.usage, "duration `\(text.sanitizedForTerminal)` is longer than 3650d")
            }
        }
        guard total > 0 else {
            throw AdminError(.usage, "duration `\(text.sanitizedForTerminal)` must be greater than zero")
        }
        return .milliseconds(total)
    }

    /// A duration in the same notation, largest units first, e.g. `1d12h`, `45s`, `0s`.
    public static func format(_ duration: Duration) -> String {
        var milliseconds = max(
            duration.components.seconds * 1000 + duration.components.attoseconds / 1_000_000_000_000_000, 0)
        if milliseconds == 0 { return "0s" }
        var text = ""
        for unit in [("w", Int64(604_800_000)), ("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)] {
            if milliseconds >= unit.1 {
                text += "\(milliseconds / unit.1)\(unit.0)"
                milliseconds %= unit.1
            }
        }
        if milliseconds > 0 { text += "\(milliseconds)ms" }
        return text
    }
}

/// The states `master-key set-state` may set (`destroyed` comes only by scheduled deletion).
public enum MasterKeyTargetState: String, CaseIterable, ExpressibleByArgument, Sendable {
    /// In use (a pre-active or suspended version becomes usable).
    case active
    /// Temporarily unusable.
    case suspended
    /// Decrypt and rewrap only.
    case deactivated
    /// Decrypt and rewrap only, flagged for replacement.
    case compromised
}

/// The data-key states `data-key list --state` filters by.
public enum DataKeyStateFilter: String, CaseIterable, ExpressibleByArgument, Sendable {
    /// Usable.
    case enabled
    /// Refused until enabled again.
    case disabled
    /// Gone for good.
    case destroyed
}

/// Adapts an `AdminArguments` parser to ArgumentParser's `transform:`, whose errors it prints
/// with the usage and exit code 64.
public func argument<T>(_ parse: @escaping @Sendable (String) throws(AdminError) -> T) -> @Sendable (String) throws -> T
{
    { text in
        do throws(AdminError) {
            return try parse(text)
        } catch {
            throw ValidationError(error.message)
        }
    }
}
