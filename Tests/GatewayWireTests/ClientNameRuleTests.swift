import GatewayWire
import Testing

@Suite("client_name rule: length, and no control, format or separator characters")
struct ClientNameRuleTests {
    @Test(
        "refused: each class of character that could break, forge or hide a log line",
        arguments: [
            ("BEL (Cc)", "billing\u{7}"),
            ("line feed (Cc)", "billing\nservice"),
            ("carriage return (Cc)", "billing\r"),
            ("tab (Cc)", "billing\tservice"),
            ("NUL (Cc)", "billing\u{0}"),
            ("ESC (Cc)", "\u{1B}[31mred"),
            ("DEL (Cc)", "billing\u{7F}"),
            ("NEL, a C1 control (Cc)", "billing\u{85}service"),
            ("zero width space (Cf)", "billing\u{200B}service"),
            ("zero width joiner (Cf)", "billing\u{200D}"),
            ("right-to-left override (Cf)", "\u{202E}ecivres-gnillib"),
            ("byte order mark (Cf)", "\u{FEFF}billing"),
            ("soft hyphen (Cf)", "bill\u{AD}ing"),
            ("line separator (Zl)", "billing\u{2028}service"),
            ("paragraph separator (Zp)", "billing\u{2029}service"),
        ]
    )
    func refused(_ what: String, name: String) {
        #expect(!ClientNameRule.isValid(name), "\(what)")
    }

    @Test(
        "accepted: letters, marks, digits, punctuation, symbols and spaces of any script",
        arguments: [
            "", "billing-service/2.3.1", "caf\u{E9}-service", "cafe\u{301}",
            "\u{8A08}\u{7B97}\u{30B5}\u{30FC}\u{30D3}\u{30B9}",
            "\u{C11C}\u{BE44}\u{C2A4} 1.0", "\u{627}\u{644}\u{62E}\u{62F}\u{645}\u{629}", "snow \u{2603} (beta)",
            "no\u{A0}break space",
        ]
    )
    func accepted(name: String) {
        #expect(ClientNameRule.isValid(name), "\(name.unicodeScalars.map { String($0.value, radix: 16) })")
    }

    @Test("at most 128 bytes of UTF-8, counted in bytes, not characters")
    func length() {
        #expect(ClientNameRule.isValid(String(repeating: "n", count: 128)))
        #expect(!ClientNameRule.isValid(String(repeating: "n", count: 129)))
        #expect(ClientNameRule.isValid(String(repeating: "\u{E9}", count: 64)))  // 2 bytes each
        #expect(!ClientNameRule.isValid(String(repeating: "\u{E9}", count: 65)))
    }
}
