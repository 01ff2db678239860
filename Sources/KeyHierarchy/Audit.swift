import Crypto

/// One event to record: who did what to which keys, and how it ended. Never plaintext, payloads
/// or context values: `detail` carries hashes and counts only.
public struct AuditEvent: Sendable, Hashable {
    /// The most key ids one record lists (a batch of 1,000 data keys fits).
    public static let maximumKeyIDs = 1000
    /// The longest `detail`.
    public static let maximumDetailLength = 1024

    public var time: Timestamp
    public var principal: Principal
    public var tenant: TenantID?
    public var operation: AuditOperation
    /// Data key ids, or `v<n>` for master-key versions.
    public var keyIDs: [String]
    public var outcome: AuditOutcome
    public var requestID: String
    /// Non-secret facts: `context-sha256=<hex>`, counts, the new state.
    public var detail: String

    public init(
        time: Timestamp = .now(),
        principal: Principal,
        tenant: TenantID?,
        operation: AuditOperation,
        keyIDs: [String] = [],
        outcome: AuditOutcome = .success,
        requestID: String,
        detail: String = ""
    ) {
        self.time = time
        self.principal = principal
        self.tenant = tenant
        self.operation = operation
        self.keyIDs = Array(keyIDs.prefix(Self.maximumKeyIDs))
        self.outcome = outcome
        self.requestID = requestID
        self.detail = detail.truncated(toUTF8Bytes: Self.maximumDetailLength)
    }
}

/// How an audited call ended.
public enum AuditOutcome: Sendable, Hashable, CustomStringConvertible {
    case success
    /// The error code's name (never the message's details).
    case failure(String)

    /// Stored form: `ok` or `error:<code>`.
    public var description: String {
        switch self {
        case .success: return "ok"
        case .failure(let code): return "error:\(code)"
        }
    }

    public init(stored: String) {
        if stored == "ok" {
            self = .success
        } else if stored.hasPrefix("error:") {
            self = .failure(String(stored.dropFirst("error:".count)))
        } else {
            self = .failure(stored)
        }
    }
}

/// An event once chained: its position and the hashes that link it to the record before.
public struct AuditRecord: Sendable, Hashable {
    /// 1, 2, 3, ... with no gaps.
    public var sequence: Int64
    public var event: AuditEvent
    /// The previous record's hash (32 zero bytes before the first record).
    public var previousHash: [UInt8]
    /// SHA-256 over `previousHash` and the canonical encoding of `sequence` and `event`.
    public var hash: [UInt8]

    public init(sequence: Int64, event: AuditEvent, previousHash: [UInt8], hash: [UInt8]) {
        self.sequence = sequence
        self.event = event
        self.previousHash = previousHash
        self.hash = hash
    }
}

/// The end of the chain, kept in its own row: the last sequence and hash. Appending locks it,
/// which orders every append; verification compares it with the last record, so deleting
/// records from the end is detected too.
public struct AuditHead: Sendable, Hashable {
    public var sequence: Int64
    public var hash: [UInt8]

    public init(sequence: Int64, hash: [UInt8]) {
        self.sequence = sequence
        self.hash = hash
    }

    /// The head of an empty log.
    public static let genesis = AuditHead(sequence: 0, hash: [UInt8](repeating: 0, count: 32))
}

/// A head of the chain authenticated by the HSM: HMAC-SHA-256, under the audit-anchor key in the
/// token, of `message(sequence:hash:)`. Whoever can write the database but not use that key cannot
/// make one, so rewriting the log's tail and head consistently no longer verifies (security
/// invariant 5). The head row always carries the checkpoint of the head; every
/// `checkpointInterval` records one is also kept in a history, so verification can say which
/// checkpoint a forgery breaks.
public struct AuditCheckpoint: Sendable, Hashable {
    public var sequence: Int64
    public var hash: [UInt8]
    /// The `CKA_ID` of the key that made `mac`.
    public var keyID: TokenKeyID
    public var mac: [UInt8]
    public var time: Timestamp

    public init(sequence: Int64, hash: [UInt8], keyID: TokenKeyID, mac: [UInt8], time: Timestamp) {
        self.sequence = sequence
        self.hash = hash
        self.keyID = keyID
        self.mac = mac
        self.time = time
    }

    /// What the MAC covers: a domain tag, the sequence and the record hash at it.
    public static func message(sequence: Int64, hash: [UInt8]) -> [UInt8] {
        var writer = CanonicalWriter()
        writer.append("hsmgw-audit-anchor-v1")
        writer.append(UInt64(bitPattern: sequence))
        writer.append(bytes: hash)
        return writer.bytes
    }

    /// Whether this checkpoint is of `head`.
    public func covers(_ head: AuditHead) -> Bool {
        sequence == head.sequence && hash == head.hash
    }
}

/// The `audit_head` row: the head of the chain and the checkpoint that anchors it (nil before the
/// first anchored commit).
public struct AnchoredAuditHead: Sendable, Hashable {
    public var head: AuditHead
    public var anchor: AuditCheckpoint?

    public init(head: AuditHead, anchor: AuditCheckpoint?) {
        self.head = head
        self.anchor = anchor
    }
}

/// The hash chain: how records are linked and checked.
public enum AuditChain {
    /// Links `events` after `head`; returns the records and the new head.
    public static func link(_ events: [AuditEvent], after head: AuditHead) -> (records: [AuditRecord], head: AuditHead)
    {
        var records: [AuditRecord] = []
        records.reserveCapacity(events.count)
        var current = head
        for event in events {
            let sequence = current.sequence + 1
            let hash = self.hash(sequence: sequence, event: event, previousHash: current.hash)
            records.append(AuditRecord(sequence: sequence, event: event, previousHash: current.hash, hash: hash))
            current = AuditHead(sequence: sequence, hash: hash)
        }
        return (records, current)
    }

    /// SHA-256(previousHash ‖ canonical(sequence, event)).
    public static func hash(sequence: Int64, event: AuditEvent, previousHash: [UInt8]) -> [UInt8] {
        var sha = SHA256()
        sha.update(data: previousHash)
        sha.update(data: canonicalEncoding(sequence: sequence, event: event))
        return Array(sha.finalize())
    }

    /// The canonical encoding: a version tag, then each field in a fixed order, integers
    /// big-endian, strings as a 4-byte length and UTF-8. Unambiguous, so two different records
    /// can never encode the same.
    public static func canonicalEncoding(sequence: Int64, event: AuditEvent) -> [UInt8] {
        var out = CanonicalWriter()
        out.append("hsmgw-audit-v1")
        out.append(UInt64(bitPattern: sequence))
        out.append(UInt64(bitPattern: event.time.millisecondsSinceEpoch))
        out.append(event.principal.name)
        out.append(event.tenant?.rawValue ?? "")
        out.append(event.operation.rawValue)
        out.append(UInt32(event.keyIDs.count))
        for id in event.keyIDs { out.append(id) }
        out.append(event.outcome.description)
        out.append(event.requestID)
        out.append(event.detail)
        return out.bytes
    }

    /// Checks `records` (in stored order) against each other and against `head`.
    public static func verify(_ records: some Sequence<AuditRecord>, head: AuditHead) -> AuditVerification {
        var verifier = AuditVerifier()
        for record in records {
            if case .broken(let problem) = verifier.check(record) {
                return .broken(problem)
            }
        }
        return verifier.finish(head: head)
    }
}

/// Walks a log one record at a time (so a long log can be checked in pages).
public struct AuditVerifier: Sendable {
    private var expected = AuditHead.genesis
    private var count: Int64 = 0

    public init() {}

    /// Checks the next record; `.verified` so far, or where the chain breaks.
    public mutating func check(_ record: AuditRecord) -> AuditVerification {
        let recomputed = AuditChain.hash(
            sequence: record.sequence,
            event: record.event,
            previousHash: record.previousHash
        )
        if record.sequence <= expected.sequence {
            return .broken(
                AuditProblem(
                    sequence: record.sequence,
                    kind: .outOfOrder,
                    explanation: "record \(record.sequence) follows record \(expected.sequence)"
                )
            )
        }
        if recomputed != record.hash {
            return .broken(
                AuditProblem(
                    sequence: record.sequence,
                    kind: .edited,
                    explanation: "record \(record.sequence) does not match its hash: its content was changed"
                )
            )
        }
        if record.sequence != expected.sequence + 1 {
            return .broken(
                AuditProblem(
                    sequence: record.sequence,
                    kind: .missing,
                    explanation:
                        "records \(expected.sequence + 1) to \(record.sequence - 1) are missing before record \(record.sequence)"
                )
            )
        }
        if record.previousHash != expected.hash {
            return .broken(
                AuditProblem(
                    sequence: record.sequence,
                    kind: .inserted,
                    explanation:
                        "record \(record.sequence) does not link to record \(expected.sequence): a record was inserted, replaced or reordered"
                )
            )
        }
        expected = AuditHead(sequence: record.sequence, hash: record.hash)
        count += 1
        return .verified(records: count, head: expected)
    }

    /// Compares the last record checked with the stored head.
    public func finish(head: AuditHead) -> AuditVerification {
        if head.sequence > expected.sequence {
            return .broken(
                AuditProblem(
                    sequence: expected.sequence + 1,
                    kind: .missing,
                    explanation: "the log ends at record \(expected.sequence) but the head says \(head.sequence)"
                )
            )
        }
        if head != expected {
            return .broken(
                AuditProblem(
                    sequence: expected.sequence,
                    kind: .headMismatch,
                    explanation:
                        "the last record \(expected.sequence) does not match the stored head (\(head.sequence))"
                )
            )
        }
        return .verified(records: count, head: expected)
    }
}

/// The result of verifying the audit log.
public enum AuditVerification: Sendable, Hashable {
    case verified(records: Int64, head: AuditHead)
    case broken(AuditProblem)
}

/// Where and how the chain breaks.
public struct AuditProblem: Sendable, Hashable, CustomStringConvertible {
    public enum Kind: String, Sendable, Hashable {
        case edited
        case missing
        case inserted
        case outOfOrder = "out-of-order"
        case headMismatch = "head-mismatch"
        /// The log has records but its head carries no checkpoint from the HSM.
        case unanchored
        /// A checkpoint does not match the record (or head) it names: the log was rewritten at or
        /// before it.
        case anchorMismatch = "anchor-mismatch"
        /// A checkpoint's MAC does not verify with the audit key: it was not made by the gateway.
        case anchorForged = "anchor-forged"
    }

    /// The first sequence number at which the chain does not hold.
    public var sequence: Int64
    public var kind: Kind
    public var explanation: String

    public init(sequence: Int64, kind: Kind, explanation: String) {
        self.sequence = sequence
        self.kind = kind
        self.explanation = explanation
    }

    public var description: String { explanation }
}

/// Length-prefixed big-endian encoding used for every hash and AAD the service builds.
struct CanonicalWriter {
    var bytes: [UInt8] = []

    mutating func append(_ value: UInt64) {
        for shift in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: value >> shift)) }
    }

    mutating func append(_ value: UInt32) {
        for shift in stride(from: 24, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: value >> shift)) }
    }

    mutating func append(_ string: String) {
        append(UInt32(string.utf8.count))
        bytes.append(contentsOf: string.utf8)
    }

    mutating func append(bytes value: some Collection<UInt8>) {
        append(UInt32(value.count))
        bytes.append(contentsOf: value)
    }
}
