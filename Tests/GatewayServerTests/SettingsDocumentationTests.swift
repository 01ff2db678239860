import Foundation
import Testing

@testable import GatewayServer

/// Every setting the gateway reads is in docs/configuration.md and in the example that claims
/// to show them all, so a new setting cannot be added without both.
@Suite("Settings documented")
struct SettingsDocumentationTests {
    static func read(_ path: String) throws -> String {
        try String(contentsOfFile: PackagePaths.root + "/" + path, encoding: .utf8)
    }

    @Test("every setting key is named in docs/configuration.md")
    func everyKeyInTheDocs() throws {
        let documentation = try Self.read("docs/configuration.md")
        let missing = SettingKeys.all.map(\.key).filter { !documentation.contains("`\($0)`") }
        #expect(missing.isEmpty, "not in docs/configuration.md: \(missing)")
    }

    @Test("every setting appears in hsm-config/gateway.example.yaml, set or commented out")
    func everyKeyInTheExample() throws {
        // A line's text without indentation and without the `#` of a commented-out setting.
        let lines = try Self.read("hsm-config/gateway.example.yaml").split(separator: "\n").map {
            $0.trimmingCharacters(in: CharacterSet.whitespaces.union(["#"]))
        }
        let missing = SettingKeys.all.map(\.key).filter { key in
            let leaf = String(key.split(separator: ".").last!) + ":"
            return !lines.contains { $0.hasPrefix(leaf) }
        }
        #expect(missing.isEmpty, "not in gateway.example.yaml: \(missing)")
    }
}
