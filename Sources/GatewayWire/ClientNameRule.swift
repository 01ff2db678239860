/// The rule for `HelloRequest.client_name`, written once for the server (which refuses a Hello
/// that breaks it with INVALID_ARGUMENT, reason `INVALID_CLIENT_NAME`) and the client library
/// (which refuses such a configuration before connecting).
///
/// The name goes into the server's log lines as it is, so it may hold no character that could
/// end a log line, forge another, or hide or reorder text: no control characters (Unicode
/// general category Cc: C0, DEL, C1, so also `\n`, `\r`, `\t`, ESC), no format characters (Cf:
/// zero-width characters such as U+200B and U+200D, bidirectional controls such as U+202E, the
/// byte order mark U+FEFF, soft hyphen U+00AD), and no line or paragraph separators (Zl U+2028,
/// Zp U+2029). Letters, marks, digits, punctuation, symbols and spaces of any script are fine.
public enum ClientNameRule {
    /// At most 128 bytes of UTF-8: the name is logged with every connection.
    public static let maximumByteCount = 128

    /// The rule in words, for error messages.
    public static let summary =
        "at most \(maximumByteCount) bytes of UTF-8 with no control, format, line separator or paragraph separator "
        + "characters"

    /// Whether `scalar` may appear in a client name (see the type's description).
    public static func allows(_ scalar: Unicode.Scalar) -> Bool {
        switch scalar.properties.generalCategory {
        case .control, .format, .lineSeparator, .paragraphSeparator: return false
        default: return true
        }
    }

    /// Whether `name` follows the rule; the empty name does.
    public static func isValid(_ name: String) -> Bool {
        name.utf8.count <= maximumByteCount && name.unicodeScalars.allSatisfy(allows)
    }
}
