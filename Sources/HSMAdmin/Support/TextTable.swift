import Foundation

/// A table for people: a header and aligned columns separated by two spaces, no trailing
/// blanks. Cells are sanitised (`sanitizedForTerminal`) so a value sent by the gateway cannot
/// move the cursor or recolour the terminal.
struct TextTable: Sendable, Hashable {
    /// How a column's cells line up.
    enum Alignment: Sendable, Hashable {
        case left
        case right
    }

    /// A column: its title and alignment.
    struct Column: Sendable, Hashable {
        /// The header text.
        var title: String
        /// How cells line up (numbers on the right).
        var alignment: Alignment

        /// A column titled `title`.
        init(_ title: String, _ alignment: Alignment = .left) {
            self.title = title
            self.alignment = alignment
        }
    }

    /// The spaces between two columns.
    static let columnGap = 2

    /// The columns.
    let columns: [Column]
    /// The rows, sanitised, each with one cell per column.
    private(set) var rows: [[String]] = []

    /// An empty table with `columns`.
    init(_ columns: [Column]) {
        self.columns = columns
    }

    /// Adds a row; missing cells are empty and extra cells are dropped.
    mutating func append(_ cells: [String]) {
        var row = cells.prefix(columns.count).map(\.sanitizedForTerminal)
        while row.count < columns.count { row.append("") }
        rows.append(row)
    }

    /// Each column's width: its widest cell or title.
    var widths: [Int] {
        columns.indices.map { index in
            rows.reduce(columns[index].title.count) { max($0, $1[index].count) }
        }
    }

    /// The header line, as `render` prints it, for `widths`.
    func header(widths: [Int]) -> String {
        line(columns.map(\.title), widths: widths)
    }

    /// One row as a line, padded to `widths` (a wider cell pushes the rest right).
    func line(_ cells: [String], widths: [Int]) -> String {
        var text = ""
        for (index, column) in columns.enumerated() {
            let cell = index < cells.count ? cells[index] : ""
            let width = index < widths.count ? widths[index] : cell.count
            let padding = String(repeating: " ", count: max(width - cell.count, 0))
            let isLast = index == columns.count - 1
            switch column.alignment {
            case .left: text += isLast ? cell : cell + padding
            case .right: text += padding + cell
            }
            if !isLast { text += String(repeating: " ", count: Self.columnGap) }
        }
        // A left-aligned last column, or empty trailing cells, leave no blanks at the end.
        while text.last == " " { text.removeLast() }
        return text
    }

    /// The header and every row, one line each, with a final newline.
    func render() -> String {
        let widths = widths
        var lines = [header(widths: widths)]
        for row in rows { lines.append(line(row, widths: widths)) }
        return lines.joined(separator: "\n") + "\n"
    }
}

/// Named values for people, one per line with the values aligned: `name   value`.
public struct FieldList: Sendable, Hashable {
    /// The fields in order.
    private(set) var fields: [(name: String, value: String)] = []

    /// An empty list.
    public init() {}

    /// Adds a field; the value is sanitised.
    public mutating func append(_ name: String, _ value: String) {
        fields.append((name, value.sanitizedForTerminal))
    }

    /// One line per field, with a final newline; empty for no fields.
    public func render() -> String {
        let width = fields.reduce(0) { max($0, $1.name.count) }
        return fields.map { field in
            let line = field.name + String(repeating: " ", count: width - field.name.count + 2) + field.value
            return line.trimmingTrailingBlanks
        }.joined(separator: "\n") + (fields.isEmpty ? "" : "\n")
    }

    public static func == (lhs: FieldList, rhs: FieldList) -> Bool {
        lhs.fields.elementsEqual(rhs.fields) { $0.name == $1.name && $0.value == $1.value }
    }

    public func hash(into hasher: inout Hasher) {
        for field in fields {
            hasher.combine(field.name)
            hasher.combine(field.value)
        }
    }
}

extension String {
    /// The text with every control character (C0, DEL, C1: escape sequences, carriage returns,
    /// newlines, tabs) replaced by `?`, safe to print on a terminal.
    public var sanitizedForTerminal: String {
        guard unicodeScalars.contains(where: \.isTerminalControl) else { return self }
        return String(String.UnicodeScalarView(unicodeScalars.map { $0.isTerminalControl ? "?" : $0 }))
    }

    var trimmingTrailingBlanks: String {
        var text = self
        while text.last == " " { text.removeLast() }
        return text
    }
}

extension Unicode.Scalar {
    fileprivate var isTerminalControl: Bool {
        value < 0x20 || (0x7F...0x9F).contains(value) || value == 0x2028 || value == 0x2029
    }
}

/// Times as `hsm-admin` prints them: UTC, ISO 8601.
enum Timestamp {
    /// `2025-01-02T03:04:05.678Z`, for JSON; nil for 0 (the protocol's "never" or "not set").
    static func iso8601(milliseconds: Int64) -> String? {
        guard milliseconds != 0 else { return nil }
        let (seconds, fraction) = split(milliseconds)
        let millis = String(repeating: "0", count: 3 - "\(fraction)".count) + "\(fraction)"
        return calendarText(seconds, separator: "T") + "." + millis + "Z"
    }

    /// `2025-01-02 03:04:05Z`, for tables; `-` for 0.
    static func text(milliseconds: Int64) -> String {
        guard milliseconds != 0 else { return "-" }
        return calendarText(split(milliseconds).seconds, separator: " ") + "Z"
    }

    private static func split(_ milliseconds: Int64) -> (seconds: Int64, fraction: Int) {
        // Floor division, so times before 1970 keep a positive fraction.
        let seconds = milliseconds >= 0 ? milliseconds / 1000 : (milliseconds - 999) / 1000
        return (seconds, Int(milliseconds - seconds * 1000))
    }

    private static func calendarText(_ seconds: Int64, separator: String) -> String {
        var time = time_t(seconds)
        var parts = tm()
        guard gmtime_r(&time, &parts) != nil else { return "\(seconds)s" }
        func two(_ value: Int32) -> String { value < 10 ? "0\(value)" : "\(value)" }
        let year = Int(parts.tm_year) + 1900
        let yearText =
            year >= 0 && year < 1000 ? String(repeating: "0", count: 4 - "\(year)".count) + "\(year)" : "\(year)"
        return yearText + "-" + two(parts.tm_mon + 1) + "-" + two(parts.tm_mday) + separator + two(parts.tm_hour) + ":"
            + two(parts.tm_min) + ":" + two(parts.tm_sec)
    }
}

extension Sequence where Element == UInt8 {
    /// Lowercase hexadecimal.
    var lowercaseHex: String {
        let digits = Array("0123456789abcdef".utf8)
        var text: [UInt8] = []
        for byte in self {
            text.append(digits[Int(byte >> 4)])
            text.append(digits[Int(byte & 0x0F)])
        }
        return String(decoding: text, as: UTF8.self)
    }
}
