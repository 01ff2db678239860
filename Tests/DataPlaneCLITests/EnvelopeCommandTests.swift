import DataPlaneCLI
import Foundation
import GatewayClient
import Testing

/// `hsmgw encrypt` and `decrypt` against a real `hsm-gateway --dev`: round trips of every shape,
/// both directions with the Swift library, and every way an envelope can be wrong.
@Suite("hsmgw encrypt and decrypt", .serialized)
struct EnvelopeCommandTests {
    @Test(
        "files round-trip: empty, 1 byte, exactly one frame, many frames; outputs are 0600",
        arguments: [0, 1, 1024, 5 * 1024 + 17]
    )
    func fileRoundTrip(size: Int) async throws {
        let fixture = try await DataPlaneFixture()
        let plaintext = DataPlaneFixture.data(size)
        let input = try fixture.write(plaintext, to: "plain.bin")
        let encrypted = try await fixture.hsmgw([
            "encrypt", "--tenant", fixture.tenant, "--context", "doc=\(size)", "--in", input, "--out",
            fixture.path("plain.hgwe"), "--frame-size", "1024",
        ])
        #expect(encrypted.code == 0, "\(encrypted)")
        #expect(encrypted.output.contains("plaintext   \(size) bytes"), "\(encrypted.output)")
        #expect(try fixture.mode(fixture.path("plain.hgwe")) == 0o600)
        let envelope = try fixture.read(fixture.path("plain.hgwe"))
        // Header, then ceil(size / 1024) frames (one final frame for 0 or an exact multiple).
        #expect(envelope.count > size + 16)

        let decrypted = try await fixture.hsmgw([
            "decrypt", "--in", fixture.path("plain.hgwe"), "--out", fixture.path("plain.out"),
        ])
        #expect(decrypted.code == 0, "\(decrypted)")
        #expect(try fixture.read(fixture.path("plain.out")) == plaintext)
        #expect(try fixture.mode(fixture.path("plain.out")) == 0o600)
        #expect(decrypted.output.contains("context     doc=\(size)"), "\(decrypted.output)")
        #expect(try fixture.entries() == ["plain.bin", "plain.hgwe", "plain.out"])
    }

    @Test("standard input to standard output, both ways; nothing else on stdout")
    func standardStreams() async throws {
        let fixture = try await DataPlaneFixture()
        let plaintext = DataPlaneFixture.data(200_000)
        let input = try fixture.write(plaintext, to: "in.bin")
        let encrypted = try await fixture.hsmgw(
            ["encrypt", "--tenant", fixture.tenant, "--context", "a=b"], stdin: input)
        #expect(encrypted.code == 0, "\(encrypted)")
        #expect(encrypted.output.isEmpty)
        #expect(encrypted.error.isEmpty)
        #expect(Array(encrypted.bytes.prefix(4)) == EnvelopeFormat.magic)
        let envelope = try fixture.write(encrypted.bytes, to: "in.hgwe")
        let decrypted = try await fixture.hsmgw(["decrypt", "--in", "-", "--out", "-"], stdin: envelope)
        #expect(decrypted.code == 0, "\(decrypted)")
        #expect(decrypted.bytes == plaintext)
        #expect(decrypted.output.isEmpty)
    }

    @Test("the Swift library seals and hsmgw opens; hsmgw seals and the library opens")
    func libraryInterop() async throws {
        let fixture = try await DataPlaneFixture()
        let client = try fixture.client()
        defer { Task { await client.shutdown() } }
        let plaintext = DataPlaneFixture.data(70_000, seed: 7)

        let sealed = try await EnvelopeEncryptor(provider: client, frameSize: 4096).encrypt(
            plaintext, tenant: fixture.tenant, context: ["origin": "swift", "eq": "a=b"])
        let sealedPath = try fixture.write(sealed, to: "swift.hgwe")
        let opened = try await fixture.hsmgw([
            "decrypt", "--in", sealedPath, "--out", fixture.path("swift.out"), "--context", "origin=swift",
            "--context", "eq=a=b",
        ])
        #expect(opened.code == 0, "\(opened)")
        #expect(try fixture.read(fixture.path("swift.out")) == plaintext)

        let input = try fixture.write(plaintext, to: "cli.bin")
        let made = try await fixture.hsmgw([
            "encrypt", "--tenant", fixture.tenant, "--context", "origin=cli", "--context", "eq=x==y", "--in", input,
            "--out", fixture.path("cli.hgwe"),
        ])
        #expect(made.code == 0, "\(made)")
        let result = try await EnvelopeDecryptor(provider: client).decrypt(
            try fixture.read(fixture.path("cli.hgwe")), requiredContext: ["origin": "cli"])
        #expect(result.plaintext == plaintext)
        #expect(result.header.tenant == fixture.tenant)
        #expect(result.header.context == ["origin": "cli", "eq": "x==y"])
        #expect(result.header.frameSize == EnvelopeFormat.defaultFrameSize)
    }

    /// An envelope of several frames for the failure tests, and its plaintext.
    func sealedFile(_ fixture: DataPlaneFixture) async throws -> (path: String, plaintext: [UInt8]) {
        let plaintext = DataPlaneFixture.data(10 * 1024)
        let input = try fixture.write(plaintext, to: "secret.bin")
        let made = try await fixture.hsmgw([
            "encrypt", "--tenant", fixture.tenant, "--context", "app=billing", "--in", input, "--out",
            fixture.path("secret.hgwe"), "--frame-size", "1024",
        ])
        try #require(made.code == 0, "\(made)")
        return (fixture.path("secret.hgwe"), plaintext)
    }

    /// The decrypt failed with `code` and an error that `says` so, left no output (nor a
    /// temporary file), and printed neither plaintext nor a context value.
    func expectRefused(
        _ result: HSMGWResult, code: Int32, says: String, fixture: DataPlaneFixture, before: [String],
        sourceLocation: SourceLocation = #_sourceLocation
    ) throws {
        #expect(result.code == code, "\(result)", sourceLocation: sourceLocation)
        #expect(try fixture.entries() == before, sourceLocation: sourceLocation)
        #expect(result.output.isEmpty, sourceLocation: sourceLocation)
        #expect(result.bytes.isEmpty, sourceLocation: sourceLocation)
        #expect(!result.error.contains("billing"), sourceLocation: sourceLocation)
        #expect(result.error.contains(says), "\(result.error)", sourceLocation: sourceLocation)
        #expect(result.error.hasPrefix("hsmgw: "), "\(result.error)", sourceLocation: sourceLocation)
    }

    @Test("a wrong --context is refused before the gateway is asked: exit 65, no output file")
    func wrongContext() async throws {
        let fixture = try await DataPlaneFixture()
        let (envelope, _) = try await sealedFile(fixture)
        let before = try fixture.entries()
        let wrong = try await fixture.hsmgw([
            "decrypt", "--in", envelope, "--out", fixture.path("out.bin"), "--context", "app=payroll",
        ])
        try expectRefused(wrong, code: 65, says: "a value differs", fixture: fixture, before: before)
        let extra = try await fixture.hsmgw([
            "decrypt", "--in", envelope, "--out", fixture.path("out.bin"), "--context", "app=billing",
            "--context", "more=1",
        ])
        try expectRefused(extra, code: 65, says: "keys not in both: more", fixture: fixture, before: before)
    }

    @Test("a changed byte (late frame, header), truncation, appended bytes, garbage: exit 65, nothing left behind")
    func alteredEnvelopes() async throws {
        let fixture = try await DataPlaneFixture()
        let (envelope, _) = try await sealedFile(fixture)
        let original = try fixture.read(envelope)
        func flipped(_ offset: Int) -> [UInt8] {
            var bytes = original
            bytes[offset] ^= 0x01
            return bytes
        }
        // A late frame: the frames before it authenticate and reach the temporary file first.
        // Offset 10 is in the header's message id: the key commitment fails.
        let cases: [(name: String, bytes: [UInt8], says: String)] = [
            ("late frame", flipped(original.count - 20), "authenticationFailed"),
            ("message id", flipped(10), "authenticationFailed"),
            ("last byte dropped", Array(original.dropLast(1)), "truncated"),
            ("cut mid-frame", Array(original.prefix(3000)), "truncated"),
            ("byte appended", original + [0], "trailingData"),
            ("empty", [], "truncated"),
            ("not an envelope", Array("not an envelope".utf8), "malformed"),
        ]
        let before = (try fixture.entries() + ["altered.hgwe"]).sorted()
        for (name, bytes, says) in cases {
            let altered = try fixture.write(bytes, to: "altered.hgwe")
            let result = try await fixture.hsmgw(["decrypt", "--in", altered, "--out", fixture.path("out.bin")])
            try expectRefused(result, code: 65, says: says, fixture: fixture, before: before)
        }
    }

    @Test("another tenant's principal cannot open the envelope: exit 77, no output file")
    func anotherTenant() async throws {
        let fixture = try await DataPlaneFixture()
        let (envelope, _) = try await sealedFile(fixture)
        let other = DataPlaneFixture.unique("other")
        try await DataPlaneFixture.admin(fixture.gateway, ["tenant", "create", other])
        let outsider = try await DataPlaneFixture.keyUser(fixture.gateway, tenant: other)
        let before = try fixture.entries()
        let result = try await fixture.hsmgw(
            ["decrypt", "--in", envelope, "--out", fixture.path("out.bin")], tokenFile: outsider)
        try expectRefused(result, code: 77, says: "permission denied", fixture: fixture, before: before)
    }

    @Test("an existing output is refused (73) unless --force, which replaces it only on success")
    func existingOutput() async throws {
        let fixture = try await DataPlaneFixture()
        let (envelope, plaintext) = try await sealedFile(fixture)
        let target = try fixture.write(Array("keep me".utf8), to: "target.bin")
        let refused = try await fixture.hsmgw(["decrypt", "--in", envelope, "--out", target])
        #expect(refused.code == 73, "\(refused)")
        #expect(refused.error.contains("exists: give --force"), "\(refused.error)")
        #expect(try fixture.read(target) == Array("keep me".utf8))

        var bytes = try fixture.read(envelope)
        bytes[bytes.count - 1] ^= 0x80
        let bad = try fixture.write(bytes, to: "bad.hgwe")
        let failed = try await fixture.hsmgw(["decrypt", "--in", bad, "--out", target, "--force"])
        #expect(failed.code == 65, "\(failed)")
        #expect(try fixture.read(target) == Array("keep me".utf8))

        let forced = try await fixture.hsmgw(["decrypt", "--in", envelope, "--out", target, "--force"])
        #expect(forced.code == 0, "\(forced)")
        #expect(try fixture.read(target) == plaintext)
    }

    @Test("--json shapes of encrypt and decrypt")
    func jsonShapes() async throws {
        let fixture = try await DataPlaneFixture()
        let input = try fixture.write(DataPlaneFixture.data(3000), to: "j.bin")
        let encrypted = try await fixture.hsmgw([
            "encrypt", "--tenant", fixture.tenant, "--context", "k=v", "--in", input, "--out", fixture.path("j.hgwe"),
            "--json",
        ]).json()
        #expect(
            Set(encrypted.keys)
                == ["tenant", "dataKeyId", "context", "frameSize", "plaintextBytes", "envelopeBytes", "out"])
        #expect(encrypted["tenant"] as? String == fixture.tenant)
        #expect(encrypted["context"] as? [String: String] == ["k": "v"])
        #expect(encrypted["plaintextBytes"] as? Int == 3000)
        #expect(encrypted["frameSize"] as? Int == 65536)
        let envelopeBytes = try fixture.read(fixture.path("j.hgwe")).count
        #expect(encrypted["envelopeBytes"] as? Int == envelopeBytes)
        let id = try #require(encrypted["dataKeyId"] as? String)
        #expect(id.count == 36)

        let decrypted = try await fixture.hsmgw([
            "decrypt", "--in", fixture.path("j.hgwe"), "--out", fixture.path("j.out"), "--json",
        ]).json()
        #expect(Set(decrypted.keys) == ["tenant", "dataKeyId", "context", "plaintextBytes", "envelopeBytes", "out"])
        #expect(decrypted["dataKeyId"] as? String == id)
        #expect(decrypted["plaintextBytes"] as? Int == 3000)
        #expect(decrypted["envelopeBytes"] as? Int == envelopeBytes)
        #expect(decrypted["out"] as? String == fixture.path("j.out"))
    }

    @Test("progress shows on a terminal's stderr for a large input, and not otherwise")
    func progress() async throws {
        let fixture = try await DataPlaneFixture()
        let input = try fixture.write(DataPlaneFixture.data(16 << 20), to: "large.bin")
        let arguments = ["encrypt", "--tenant", fixture.tenant, "--in", input]
        let terminal = try await fixture.hsmgw(arguments + ["--out", fixture.path("a.hgwe")], stderrIsTerminal: true)
        #expect(terminal.code == 0, "\(terminal)")
        #expect(terminal.error.contains("\rencrypted "), "\(terminal.error)")
        #expect(terminal.error.contains(" of 16.0 MiB ("), "\(terminal.error)")
        let piped = try await fixture.hsmgw(arguments + ["--out", fixture.path("b.hgwe")])
        #expect(piped.code == 0, "\(piped)")
        #expect(piped.error.isEmpty)
        let small = try fixture.write(DataPlaneFixture.data(100), to: "small.bin")
        let quiet = try await fixture.hsmgw(
            ["encrypt", "--tenant", fixture.tenant, "--in", small, "--out", fixture.path("c.hgwe")],
            stderrIsTerminal: true)
        #expect(quiet.error.isEmpty)
    }
}
