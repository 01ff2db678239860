import Foundation

/// A tenant's id: the unit of isolation. 1–63 characters of `a-z`, `0-9`, `-` and `_`, starting
/// with a letter or digit, so it is safe in token labels (`hsmgw:mk:<tenant>:v<n>`), log lines
/// and URLs, and never contains the `:` that separates label fields.
public struct TenantID: Hashable, Sendable, Comparable, CustomStringConvertible, Codable {
    /// The longest tenant id: a token label holds 32 bytes on some HSMs, and ours adds a prefix
    /// and a version; 63 keeps ids readable in logs while `CKA_LABEL` itself has no fixed limit.
    public static let maximumLength = 63

    public let rawValue: String

    /// Validates `rawValue`; throws `KeyServiceError.invalidArgument` naming the rule broken.
    public init(_ rawValue: String) throws(KeyServiceError) {
        guard !rawValue.isEmpty, rawValue.utf8.count <= Self.maximumLength else {
            throw KeyServiceError(.invalidArgument, "tenant id must be 1 to \(Self.maximumLength) characters")
        }
        for (index, byte) in rawValue.utf8.enumerated() {
            let isLower = byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z")
            let isDigit = byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9")
            let isPunctuation = byte == UInt8(ascii: "-") || byte == UInt8(ascii: "_")
            guard isLower || isDigit || (isPunctuation && index > 0) else {
                throw KeyServiceError(
                    .invalidArgument,
                    "tenant id may hold only a-z, 0-9, '-' and '_', and must start with a letter or digit"
                )
            }
        }
        self.rawValue = rawValue
    }

    /// For values read back from storage, which were validated when written.
    public init(trusted rawValue: String) {
        self.rawValue = rawValue
    }

    public var description: String { rawValue }
    public static func < (lhs: TenantID, rhs: TenantID) -> Bool { lhs.rawValue < rhs.rawValue }
}

/// A data key's id: 128 random bits, shown as a lowercase UUID string. Ids are not secret, but
/// random ids reveal nothing about how many keys a tenant has.
public struct DataKeyID: Hashable, Sendable, Comparable, CustomStringConvertible, Codable {
    public let uuid: UUID

    public init(uuid: UUID) {
        self.uuid = uuid
    }

    /// A new random id.
    public static func random() -> DataKeyID { DataKeyID(uuid: UUID()) }

    /// Parses the string form; throws `invalidArgument` for anything that is not a UUID.
    public init(_ string: String) throws(KeyServiceError) {
        guard string.utf8.count == 36, let uuid = UUID(uuidString: string) else {
            throw KeyServiceError(.invalidArgument, "data key id is not a UUID")
        }
        self.uuid = uuid
    }

    /// The id from its 16 bytes (as held in ciphertext headers).
    public init?(bytes: some Collection<UInt8>) {
        guard bytes.count == 16 else { return nil }
        let b = Array(bytes)
        uuid = UUID(
            uuid: (b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15])
        )
    }

    /// The 16 bytes of the id.
    public var bytes: [UInt8] {
        withUnsafeBytes(of: uuid.uuid) { Array($0) }
    }

    /// Lowercase canonical UUID text; what storage, logs and the wire use.
    public var description: String { uuid.uuidString.lowercased() }

    public static func < (lhs: DataKeyID, rhs: DataKeyID) -> Bool { lhs.description < rhs.description }
}

/// A master-key version number within one tenant: 1, 2, 3, ...
public typealias MasterKeyVersionNumber = Int

/// Who asked: a principal name from authentication (an API token's owner, a certificate
/// subject), or `system` for the gateway's own jobs.
public struct Principal: Hashable, Sendable, CustomStringConvertible, Codable {
    /// The longest principal name recorded.
    public static let maximumLength = 256

    public let name: String

    public init(_ name: String) {
        self.name = name.truncated(toUTF8Bytes: Self.maximumLength)
    }

    /// The gateway itself (rotation at the invocation limit, the rewrap job, scheduled deletion).
    public static let system = Principal("system")

    public var description: String { name }
}

/// Who is asking and under which request id; every call into the key service carries one.
public struct RequestContext: Sendable {
    /// The longest request id recorded.
    public static let maximumRequestIDLength = 128

    public var principal: Principal
    public var requestID: String

    public init(principal: Principal, requestID: String = UUID().uuidString.lowercased()) {
        self.principal = principal
        self.requestID = requestID.truncated(toUTF8Bytes: Self.maximumRequestIDLength)
    }

    /// The gateway's own work.
    public static func system(_ requestID: String = UUID().uuidString.lowercased()) -> RequestContext {
        RequestContext(principal: .system, requestID: requestID)
    }
}

/// A point in time, whole milliseconds since the Unix epoch: what storage keeps (BIGINT in both
/// stores, so values round-trip exactly and the audit hash is reproducible).
public struct Timestamp: Hashable, Sendable, Comparable, Codable, CustomStringConvertible {
    public var millisecondsSinceEpoch: Int64

    public init(millisecondsSinceEpoch: Int64) {
        self.millisecondsSinceEpoch = millisecondsSinceEpoch
    }

    public init(_ date: Date) {
        // Nearest, not down: 0.999 s is 998.9999… ms in binary floating point.
        millisecondsSinceEpoch = Int64((date.timeIntervalSince1970 * 1000).rounded())
    }

    public static func now() -> Timestamp { Timestamp(Date()) }

    public var date: Date { Date(timeIntervalSince1970: Double(millisecondsSinceEpoch) / 1000) }

    public func adding(days: Int) -> Timestamp {
        Timestamp(millisecondsSinceEpoch: millisecondsSinceEpoch + Int64(days) * 86_400_000)
    }

    public static func < (lhs: Timestamp, rhs: Timestamp) -> Bool {
        lhs.millisecondsSinceEpoch < rhs.millisecondsSinceEpoch
    }

    public var description: String { date.formatted(.iso8601) }
}

/// A position in a paged listing: opaque to callers, the last id of the previous page.
public struct PageRequest: Sendable, Hashable {
    /// The largest page: bounds one query and one response.
    public static let maximumPageSize = 1000

    public var after: String?
    public var limit: Int

    public init(after: String? = nil, limit: Int = 100) {
        self.after = after
        self.limit = limit
    }
}

/// One page of a listing; `nextPage` is nil on the last page.
public struct Page<Element: Sendable>: Sendable {
    public var items: [Element]
    public var nextPage: String?

    public init(items: [Element], nextPage: String?) {
        self.items = items
        self.nextPage = nextPage
    }
}

extension String {
    /// The longest prefix of whole characters that fits in `limit` UTF-8 bytes.
    func truncated(toUTF8Bytes limit: Int) -> String {
        guard utf8.count > limit else { return self }
        var end = startIndex
        var used = 0
        for index in indices {
            let next = self.index(after: index)
            let size = self[index..<next].utf8.count
            if used + size > limit { break }
            used += size
            end = next
        }
        return String(self[startIndex..<end])
    }
}
