/// A data key wrapped under a master-key version: what the database stores and what
/// GenerateDataKey returns. Self-describing and fixed-size (83 bytes):
///
/// ```
/// 0   2  magic "hw"
/// 2   1  format version (1)
/// 3   4  master-key version, big-endian
/// 7  16  data key id
/// 23 12  IV: 96 bits from the token's RNG, drawn for this wrap (NIST SP 800-38D §8.2.2)
/// 35 48  AES-256-GCM ciphertext of the 32-byte key ‖ 16-byte tag
/// ```
///
/// Blobs written before IVs were random carry a deterministic IV (the fixed field `00000001`
/// and an invocation counter) in the same 12 bytes; the layout, the format version and the AAD
/// are unchanged, so they read and decrypt exactly as before.
///
/// The AAD (`aad(tenant:context:)`) binds format version, tenant, data key id, master-key
/// version and the context hash, so a blob moved to another row, tenant, version or context
/// fails authentication inside the token.
public struct WrappedDataKey: Sendable, Hashable {
    public static let magic: [UInt8] = [0x68, 0x77]
    public static let formatVersion: UInt8 = 1
    public static let keyByteCount = 32
    public static let ivByteCount = 12
    public static let tagByteCount = 16
    public static let encodedByteCount = 3 + 4 + 16 + ivByteCount + keyByteCount + tagByteCount
    public var version: MasterKeyVersionNumber
    public var dataKeyID: DataKeyID
    public var iv: [UInt8]
    public var ciphertextAndTag: [UInt8]

    public init(version: MasterKeyVersionNumber, dataKeyID: DataKeyID, iv: [UInt8], ciphertextAndTag: [UInt8]) {
        self.version = version
        self.dataKeyID = dataKeyID
        self.iv = iv
        self.ciphertextAndTag = ciphertextAndTag
    }

    /// Parses a stored or returned blob; nil when it is not one.
    public init?(encoded bytes: [UInt8]) {
        guard bytes.count == Self.encodedByteCount, Array(bytes[0..<2]) == Self.magic,
            bytes[2] == Self.formatVersion
        else { return nil }
        let version = bytes[3..<7].reduce(0) { $0 << 8 | Int($1) }
        guard version > 0, let id = DataKeyID(bytes: bytes[7..<23]) else { return nil }
        self.version = version
        self.dataKeyID = id
        self.iv = Array(bytes[23..<35])
        self.ciphertextAndTag = Array(bytes[35...])
    }

    public var encoded: [UInt8] {
        var out = Self.magic
        out.append(Self.formatVersion)
        for shift in stride(from: 24, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: version >> shift)) }
        out += dataKeyID.bytes
        out += iv
        out += ciphertextAndTag
        return out
    }

    /// The additional authenticated data for wrapping data key `dataKeyID` under `version`.
    public static func aad(
        tenant: TenantID,
        dataKeyID: DataKeyID,
        version: MasterKeyVersionNumber,
        contextHash: [UInt8]
    ) -> [UInt8] {
        var writer = CanonicalWriter()
        writer.append("hsmgw-data-key")
        writer.append(UInt32(formatVersion))
        writer.append(tenant.rawValue)
        writer.append(bytes: dataKeyID.bytes)
        writer.append(UInt32(version))
        writer.append(bytes: contextHash)
        return writer.bytes
    }
}

/// The ciphertext Encrypt returns: self-describing, so Decrypt needs only it, the tenant and the
/// context.
///
/// ```
/// 0   2  magic "hc"
/// 2   1  format version (1)
/// 3  16  data key id
/// 19 12  nonce (random)
/// 31  …  AES-256-GCM ciphertext ‖ 16-byte tag
/// ```
///
/// AAD: format version, tenant, data key id and the context hash. The master-key version is not
/// in it: a data key keeps its plaintext when it is rewrapped, so payloads stay readable.
public struct PayloadCiphertext: Sendable, Hashable {
    public static let magic: [UInt8] = [0x68, 0x63]
    public static let formatVersion: UInt8 = 1
    public static let nonceByteCount = 12
    public static let tagByteCount = 16
    public static let headerByteCount = 3 + 16 + nonceByteCount
    /// The largest plaintext Encrypt accepts: 64 KiB. Larger data belongs in envelope
    /// encryption with a data key (client side), not in a request to the key service.
    public static let maximumPlaintextByteCount = 64 * 1024
    /// The largest ciphertext Decrypt accepts.
    public static let maximumCiphertextByteCount = headerByteCount + maximumPlaintextByteCount + tagByteCount

    public var dataKeyID: DataKeyID
    public var nonce: [UInt8]
    public var ciphertextAndTag: [UInt8]

    public init(dataKeyID: DataKeyID, nonce: [UInt8], ciphertextAndTag: [UInt8]) {
        self.dataKeyID = dataKeyID
        self.nonce = nonce
        self.ciphertextAndTag = ciphertextAndTag
    }

    /// Parses a ciphertext; throws `invalidArgument` for anything malformed or too large.
    public init(encoded bytes: [UInt8]) throws(KeyServiceError) {
        guard bytes.count <= Self.maximumCiphertextByteCount else {
            throw KeyServiceError(
                .invalidArgument,
                "ciphertext is \(bytes.count) bytes; at most \(Self.maximumCiphertextByteCount) are accepted"
            )
        }
        guard bytes.count >= Self.headerByteCount + Self.tagByteCount, Array(bytes[0..<2]) == Self.magic else {
            throw KeyServiceError(.invalidArgument, "not a gateway ciphertext")
        }
        guard bytes[2] == Self.formatVersion else {
            throw KeyServiceError(.invalidArgument, "unknown ciphertext format version \(bytes[2])")
        }
        dataKeyID = DataKeyID(bytes: bytes[3..<19])!
        nonce = Array(bytes[19..<31])
        ciphertextAndTag = Array(bytes[31...])
    }

    public var encoded: [UInt8] {
        var out = Self.magic
        out.append(Self.formatVersion)
        out += dataKeyID.bytes
        out += nonce
        out += ciphertextAndTag
        return out
    }

    public static func aad(tenant: TenantID, dataKeyID: DataKeyID, contextHash: [UInt8]) -> [UInt8] {
        var writer = CanonicalWriter()
        writer.append("hsmgw-payload")
        writer.append(UInt32(formatVersion))
        writer.append(tenant.rawValue)
        writer.append(bytes: dataKeyID.bytes)
        writer.append(bytes: contextHash)
        return writer.bytes
    }
}

/// The token label of a tenant's master-key version: `hsmgw:mk:<tenant>:v<n>`. Tenant ids
/// cannot contain `:`, so `labelPrefix(for:)` matches one tenant's keys only.
public enum MasterKeyLabel {
    public static let prefix = "hsmgw:mk:"

    public static func label(tenant: TenantID, version: MasterKeyVersionNumber) -> String {
        "\(prefix)\(tenant.rawValue):v\(version)"
    }

    public static func labelPrefix(for tenant: TenantID) -> String {
        "\(prefix)\(tenant.rawValue):"
    }

    /// The tenant and version a label names, or nil when it is not a master-key label.
    public static func parse(_ label: String) -> (tenant: TenantID, version: MasterKeyVersionNumber)? {
        guard label.hasPrefix(prefix) else { return nil }
        let rest = label.dropFirst(prefix.count)
        guard let colon = rest.lastIndex(of: ":"), rest[rest.index(after: colon)...].hasPrefix("v"),
            let version = Int(rest[rest.index(colon, offsetBy: 2)...]), version > 0,
            let tenant = try? TenantID(String(rest[..<colon]))
        else { return nil }
        return (tenant, version)
    }
}
