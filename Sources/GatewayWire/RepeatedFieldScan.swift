import NIOCore

/// Counts the entries of repeated fields and maps in a protobuf message's wire bytes, without
/// decoding the message: each entry is a length-delimited field whose bytes are skipped, not
/// materialised, and the scan stops at the first entry over its field's limit.
///
/// Decoding first and counting afterwards lets a caller make the server build every entry a frame
/// can hold: a 1 MiB frame holds about 500,000 empty `DataKeyReference`s (two bytes each), each a
/// message object on the heap. With this scan in front of the decoder, a request over a limit costs
/// at most `maximum + 1` entries read and no allocation; a request within its limits is read once
/// more, without allocating, before it is decoded.
public enum RepeatedFieldScan {
    /// A repeated message field or map (both are repeated length-delimited fields on the wire)
    /// and the most entries it may hold.
    public struct Rule: Sendable, Hashable {
        /// The field's number in its message.
        public var fieldNumber: UInt64
        /// The field's name in the `.proto` file, for the error (`keys`, `encryption_context`).
        public var name: String
        /// Entries allowed, counted as sent (a map entry repeated with the same key counts each
        /// time).
        public var maximum: Int
        /// Rules for the fields inside each entry (an entry of a repeated message field is a
        /// message of its own).
        public var entryRules: [Rule]

        public init(fieldNumber: UInt64, name: String, maximum: Int, entryRules: [Rule] = []) {
            self.fieldNumber = fieldNumber
            self.name = name
            self.maximum = maximum
            self.entryRules = entryRules
        }
    }

    /// The first field found over its limit.
    public struct Excess: Sendable, Hashable, CustomStringConvertible {
        /// The field's path: `keys`, or `keys[17].encryption_context` inside an entry.
        public var path: String
        /// Its limit.
        public var maximum: Int

        public init(path: String, maximum: Int) {
            self.path = path
            self.maximum = maximum
        }

        public var description: String { "\(path) holds more than \(maximum) entries" }
    }

    /// What a scan found.
    public enum Outcome: Sendable, Hashable {
        /// Every counted field is within its limit.
        case withinLimits
        /// The first field over its limit.
        case over(Excess)
        /// The bytes are not a well-formed protobuf message (a truncated varint or field, an
        /// unknown wire type, an unbalanced or too deeply nested group); the decoder would refuse
        /// them too.
        case malformed
    }

    /// Groups (a proto2 feature that proto3 decoders still skip when they meet one) nested
    /// deeper than this are malformed: SwiftProtobuf's own default depth limit.
    public static let maximumGroupDepth = 100

    /// Scans `payload` (a serialized message) against `rules`.
    ///
    /// - Returns: the outcome, and how many fields (tags) the scan read: a request over a limit
    ///   stops after the entry that crossed it, however many more the payload holds.
    public static func scan(_ payload: ByteBuffer, rules: [Rule]) -> (outcome: Outcome, fieldsRead: Int) {
        guard !rules.isEmpty else { return (.withinLimits, 0) }
        return payload.withUnsafeReadableBytes { bytes in
            var fieldsRead = 0
            let outcome = scan(bytes, rules: rules, fieldsRead: &fieldsRead)
            return (outcome, fieldsRead)
        }
    }

    private static func scan(
        _ bytes: UnsafeRawBufferPointer,
        rules: [Rule],
        fieldsRead: inout Int
    ) -> Outcome {
        // On the stack: scanning each of a thousand entries allocates nothing.
        withUnsafeTemporaryAllocation(of: Int.self, capacity: rules.count) { counts in
            counts.initialize(repeating: 0)
            return scan(bytes, rules: rules, counts: counts, fieldsRead: &fieldsRead)
        }
    }

    private static func scan(
        _ bytes: UnsafeRawBufferPointer,
        rules: [Rule],
        counts: UnsafeMutableBufferPointer<Int>,
        fieldsRead: inout Int
    ) -> Outcome {
        var index = 0
        while index < bytes.count {
            guard let (fieldNumber, wireType) = tag(bytes, &index) else { return .malformed }
            fieldsRead += 1
            switch wireType {
            case 2:
                guard let length = varint(bytes, &index), length <= UInt64(bytes.count - index) else {
                    return .malformed
                }
                let start = index
                index += Int(length)
                guard let rule = rules.firstIndex(where: { $0.fieldNumber == fieldNumber }) else { continue }
                counts[rule] += 1
                guard counts[rule] <= rules[rule].maximum else {
                    return .over(Excess(path: rules[rule].name, maximum: rules[rule].maximum))
                }
                if !rules[rule].entryRules.isEmpty, index > start {
                    let entry = UnsafeRawBufferPointer(rebasing: bytes[start..<index])
                    switch scan(entry, rules: rules[rule].entryRules, fieldsRead: &fieldsRead) {
                    case .withinLimits:
                        break
                    case .over(var excess):
                        // The path is only spelled out for the refusal.
                        excess.path = "\(rules[rule].name)[\(counts[rule] - 1)].\(excess.path)"
                        return .over(excess)
                    case .malformed:
                        return .malformed
                    }
                }
            case 3:
                guard skipGroup(bytes, &index, fieldNumber: fieldNumber, depth: 1, fieldsRead: &fieldsRead) else {
                    return .malformed
                }
            default:
                guard skipScalar(bytes, &index, wireType: wireType) else { return .malformed }
            }
        }
        return .withinLimits
    }

    /// Skips a group's fields up to its end-group tag; its fields are not counted.
    private static func skipGroup(
        _ bytes: UnsafeRawBufferPointer,
        _ index: inout Int,
        fieldNumber: UInt64,
        depth: Int,
        fieldsRead: inout Int
    ) -> Bool {
        guard depth <= maximumGroupDepth else { return false }
        while index < bytes.count {
            guard let (number, wireType) = tag(bytes, &index) else { return false }
            fieldsRead += 1
            switch wireType {
            case 2:
                guard let length = varint(bytes, &index), length <= UInt64(bytes.count - index) else {
                    return false
                }
                index += Int(length)
            case 3:
                guard skipGroup(bytes, &index, fieldNumber: number, depth: depth + 1, fieldsRead: &fieldsRead)
                else { return false }
            case 4:
                return number == fieldNumber
            default:
                guard skipScalar(bytes, &index, wireType: wireType) else { return false }
            }
        }
        return false
    }

    /// Skips a varint (0), fixed64 (1) or fixed32 (5) value; false for any other wire type (an
    /// end-group tag without its start, or 6 and 7, which do not exist).
    private static func skipScalar(_ bytes: UnsafeRawBufferPointer, _ index: inout Int, wireType: UInt64) -> Bool {
        switch wireType {
        case 0:
            return varint(bytes, &index) != nil
        case 1, 5:
            let size = wireType == 1 ? 8 : 4
            guard bytes.count - index >= size else { return false }
            index += size
            return true
        default:
            return false
        }
    }

    /// A tag: field number (1 to 2^29 - 1) and wire type.
    private static func tag(_ bytes: UnsafeRawBufferPointer, _ index: inout Int) -> (UInt64, UInt64)? {
        guard let tag = varint(bytes, &index), tag >> 3 >= 1, tag >> 3 < 1 << 29 else { return nil }
        return (tag >> 3, tag & 7)
    }

    /// A base-128 varint of at most 10 bytes.
    private static func varint(_ bytes: UnsafeRawBufferPointer, _ index: inout Int) -> UInt64? {
        var value: UInt64 = 0
        var shift: UInt64 = 0
        while index < bytes.count, shift < 64 {
            let byte = bytes[index]
            index += 1
            value |= UInt64(byte & 0x7F) << shift
            if byte & 0x80 == 0 { return value }
            shift += 7
        }
        return nil
    }
}
