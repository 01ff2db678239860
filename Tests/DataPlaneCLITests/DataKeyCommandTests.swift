import DataPlaneCLI
import Foundation
import GatewayClient
import Testing

/// `hsmgw data-key generate`, `data-key decrypt` and `rewrap` against a real `hsm-gateway --dev`.
@Suite("hsmgw data-key and rewrap", .serialized)
struct DataKeyCommandTests {
    /// `data-key generate --json` with the plaintext to a new file `key.bin`: the result, the
    /// file's path and the key's id.
    func generate(_ fixture: DataPlaneFixture, context: String) async throws -> (
        result: [String: Any], keyFile: String, id: String
    ) {
        let keyFile = fixture.path("key.bin")
        let result = try await fixture.hsmgw([
            "data-key", "generate", "--tenant", fixture.tenant, "--context", context, "--plaintext-out", keyFile,
            "--json",
        ]).json()
        return (result, keyFile, try #require(result["id"] as? String))
    }

    @Test("generate writes the plaintext to a new 0600 file; data-key decrypt yields the same bytes")
    func generateThenDecrypt() async throws {
        let fixture = try await DataPlaneFixture()
        let (generated, keyFile, id) = try await generate(fixture, context: "app=x")
        #expect(Set(generated.keys) == ["tenant", "id", "masterKeyVersion", "context", "wrapped", "plaintextFile"])
        #expect(generated["plaintextFile"] as? String == keyFile)
        #expect(generated["masterKeyVersion"] as? Int == 1)
        #expect(try fixture.mode(keyFile) == 0o600)
        let key = try fixture.read(keyFile)
        #expect(key.count == 32)
        let wrapped = try #require(generated["wrapped"] as? String)
        #expect(Data(base64Encoded: wrapped) != nil)

        let decrypted = try await fixture.hsmgw([
            "data-key", "decrypt", "--tenant", fixture.tenant, "--key-id", id, "--context", "app=x", "--out",
            fixture.path("again.bin"),
        ])
        #expect(decrypted.code == 0, "\(decrypted)")
        #expect(try fixture.read(fixture.path("again.bin")) == key)
        #expect(try fixture.mode(fixture.path("again.bin")) == 0o600)
        #expect(decrypted.output.contains("written to \(fixture.path("again.bin")) (mode 0600)"), "\(decrypted.output)")

        // To standard output as base64 (not a terminal), with the kept wrapped copy.
        let wrappedFile = try fixture.write(Array((wrapped + "\n").utf8), to: "wrapped.b64")
        let inline = try await fixture.hsmgw([
            "data-key", "decrypt", "--tenant", fixture.tenant, "--key-id", id, "--context", "app=x",
            "--wrapped-file", wrappedFile, "--json",
        ]).json()
        #expect(Set(inline.keys) == ["tenant", "id", "masterKeyVersion", "context", "wrapped", "plaintext"])
        #expect((inline["plaintext"] as? String).flatMap { Data(base64Encoded: $0) }.map(Array.init) == key)

        // The wrong context: the gateway refuses (65) and no file appears.
        let wrong = try await fixture.hsmgw([
            "data-key", "decrypt", "--tenant", fixture.tenant, "--key-id", id, "--context", "app=y", "--out",
            fixture.path("wrong.bin"),
        ])
        #expect(wrong.code == 65, "\(wrong)")
        #expect(!FileManager.default.fileExists(atPath: fixture.path("wrong.bin")))
    }

    @Test("--no-plaintext returns none; --plaintext-out - prints base64; a terminal and no destination are refused")
    func plaintextChoices() async throws {
        let fixture = try await DataPlaneFixture()
        let without = try await fixture.hsmgw([
            "data-key", "generate", "--tenant", fixture.tenant, "--no-plaintext", "--json",
        ]).json()
        #expect(Set(without.keys) == ["tenant", "id", "masterKeyVersion", "context", "wrapped"])

        let text = try await fixture.hsmgw(["data-key", "generate", "--tenant", fixture.tenant, "--plaintext-out", "-"])
        #expect(text.code == 0, "\(text)")
        let line = try #require(text.output.split(separator: "\n").first { $0.hasPrefix("plaintext") })
        let base64 = String(line.split(separator: " ").last ?? "")
        #expect(Data(base64Encoded: base64)?.count == 32, "\(text.output)")

        let terminal = try await fixture.hsmgw(
            ["data-key", "generate", "--tenant", fixture.tenant, "--plaintext-out", "-"], stdoutIsTerminal: true)
        #expect(terminal.code == 64, "\(terminal)")
        #expect(terminal.error.contains("refusing to print a plaintext data key on a terminal"), "\(terminal.error)")
        #expect(terminal.output.isEmpty)

        let nowhere = try await fixture.hsmgw(["data-key", "generate", "--tenant", fixture.tenant])
        #expect(nowhere.code == 64, "\(nowhere)")
        #expect(nowhere.error.contains("the plaintext key needs a destination"), "\(nowhere.error)")
        let both = try await fixture.hsmgw([
            "data-key", "generate", "--tenant", fixture.tenant, "--no-plaintext", "--plaintext-out", "x",
        ])
        #expect(both.code == 64, "\(both)")

        let existing = try fixture.write([1, 2, 3], to: "existing.bin")
        let refused = try await fixture.hsmgw([
            "data-key", "generate", "--tenant", fixture.tenant, "--plaintext-out", existing,
        ])
        #expect(refused.code == 73, "\(refused)")
        #expect(try fixture.read(existing) == [1, 2, 3])
    }

    @Test("rewrap after a master-key rotation moves the key to v2; it still decrypts to the same bytes")
    func rewrapAfterRotation() async throws {
        let fixture = try await DataPlaneFixture()
        let (_, keyFile, id) = try await generate(fixture, context: "n=1")
        // An envelope under another key of the tenant, to open after the rotation too.
        let input = try fixture.write(DataPlaneFixture.data(5000), to: "doc.bin")
        let sealed = try await fixture.hsmgw([
            "encrypt", "--tenant", fixture.tenant, "--in", input, "--out", fixture.path("doc.hgwe"),
        ])
        #expect(sealed.code == 0, "\(sealed)")

        try await DataPlaneFixture.admin(fixture.gateway, ["master-key", "rotate", fixture.tenant])
        let rewrapped = try await fixture.hsmgw([
            "rewrap", "--tenant", fixture.tenant, "--key-id", id, "--context", "n=1", "--json",
        ]).json()
        #expect(
            Set(rewrapped.keys)
                == ["tenant", "id", "masterKeyVersion", "state", "encryptions", "createdAt", "updatedAt"])
        #expect(rewrapped["masterKeyVersion"] as? Int == 2)
        #expect(rewrapped["id"] as? String == id)

        let after = try await fixture.hsmgw([
            "data-key", "decrypt", "--tenant", fixture.tenant, "--key-id", id, "--context", "n=1", "--json",
        ]).json()
        #expect(after["masterKeyVersion"] as? Int == 2)
        let original = try fixture.read(keyFile)
        #expect((after["plaintext"] as? String).flatMap { Data(base64Encoded: $0) }.map(Array.init) == original)
        let opened = try await fixture.hsmgw([
            "decrypt", "--in", fixture.path("doc.hgwe"), "--out", fixture.path("doc.out"),
        ])
        #expect(opened.code == 0, "\(opened)")
        #expect(try fixture.read(fixture.path("doc.out")) == fixture.read(input))

        let text = try await fixture.hsmgw(["rewrap", "--tenant", fixture.tenant, "--key-id", id, "--context", "n=1"])
        #expect(text.output.contains("master key   v2"), "\(text.output)")
        let wrongContext = try await fixture.hsmgw(["rewrap", "--tenant", fixture.tenant, "--key-id", id])
        #expect(wrongContext.code == 65, "\(wrongContext)")
        let unknown = try await fixture.hsmgw([
            "rewrap", "--tenant", fixture.tenant, "--key-id", "00000000-0000-4000-8000-000000000000",
        ])
        #expect(unknown.code == 2, "\(unknown)")
    }
}
