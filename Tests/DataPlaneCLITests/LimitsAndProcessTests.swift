import DataPlaneCLI
import DevGatewayTestSupport
import Foundation
import HSMAdmin
import ProcessTestSupport
import Testing

/// Flag limits, checked before any connection (exit 64), as pure functions and through the
/// runner; no gateway is needed for them.
@Suite("hsmgw flag limits")
struct FlagLimitTests {
    /// Runs `hsmgw` with a gateway address nothing serves: a usage error never gets that far.
    func run(_ arguments: [String]) async -> (code: Int32, error: String, output: String) {
        let capture = CapturedOutput()
        let console = DataPlaneConsole(output: capture.output, standardInput: -1, standardOutput: -1)
        let code = await DataPlaneRunner.main(
            arguments: arguments, environment: ["HOME": "/nonexistent", "HSMGW_SERVER": "127.0.0.1:1"],
            console: console)
        return (code, capture.standardError, capture.standardOutput)
    }

    @Test("--context: KEY=VALUE with = allowed in values, unique keys, the gateway's limits")
    func context() throws {
        #expect(try DataPlaneArguments.context(["a=b=c", "empty=", "k=v"]) == ["a": "b=c", "empty": "", "k": "v"])
        #expect(throws: AdminError.self) { try DataPlaneArguments.context(["novalue"]) }
        #expect(throws: AdminError.self) { try DataPlaneArguments.context(["=v"]) }
        #expect(throws: AdminError.self) { try DataPlaneArguments.context(["k=1", "k=2"]) }
        let maximum = (0..<64).map { "k\($0)=v" }
        #expect(try DataPlaneArguments.context(maximum).count == 64)
        #expect(throws: AdminError.self) { try DataPlaneArguments.context(maximum + ["k64=v"]) }
        let longKey = String(repeating: "k", count: 256)
        #expect(try DataPlaneArguments.context(["\(longKey)=v"]).count == 1)
        #expect(throws: AdminError.self) { try DataPlaneArguments.context(["\(longKey)k=v"]) }
        let longValue = String(repeating: "v", count: 4096)
        #expect(try DataPlaneArguments.context(["k=\(longValue)"]).count == 1)
        #expect(throws: AdminError.self) { try DataPlaneArguments.context(["k=\(longValue)v"]) }
        // Each pair is within its limits; together they are over the 8 KiB encoding.
        #expect(throws: AdminError.self) {
            try DataPlaneArguments.context(["a=\(longValue)", "b=\(longValue)", "c=\(longValue)"])
        }
        do {
            _ = try DataPlaneArguments.context(["k=secret-value", "k=secret-value"])
        } catch {
            #expect(error.exitCode == 64)
            #expect(!error.message.contains("secret-value"))
        }
    }

    @Test("--frame-size from 1024 to 4 MiB; --key-id printable ASCII up to 64 bytes")
    func frameSizeAndKeyID() throws {
        #expect(try DataPlaneArguments.frameSize("1024") == 1024)
        #expect(try DataPlaneArguments.frameSize("4194304") == 4 << 20)
        for bad in ["1023", "4194305", "64k", "", "-1", String(repeating: "9", count: 40)] {
            #expect(throws: AdminError.self) { try DataPlaneArguments.frameSize(bad) }
        }
        #expect(try DataPlaneArguments.dataKeyID("3f1c0c1e-0000-4000-8000-000000000000").count == 36)
        #expect(throws: AdminError.self) { try DataPlaneArguments.dataKeyID("") }
        #expect(throws: AdminError.self) { try DataPlaneArguments.dataKeyID("has space") }
        #expect(throws: AdminError.self) { try DataPlaneArguments.dataKeyID(String(repeating: "a", count: 65)) }
    }

    @Test(
        "bad flags exit 64 before connecting, with a message naming the rule",
        arguments: [
            (["encrypt", "--tenant", "Acme"], "tenant id"),
            (["encrypt", "--tenant", "acme", "--frame-size", "512"], "--frame-size"),
            (["encrypt", "--tenant", "acme", "--context", "novalue"], "KEY=VALUE"),
            (["encrypt", "--tenant", "acme", "--json"], "--json prints a summary"),
            (["encrypt", "--tenant", "acme", "--in", "same", "--out", "same"], "same file"),
            (["decrypt", "--json", "--out", "-"], "--json prints a summary"),
            (["data-key", "decrypt", "--tenant", "acme", "--key-id", "a b"], "--key-id"),
            (["rewrap", "--tenant", "acme"], "--key-id"),
            (["frobnicate"], "Unexpected argument"),
        ])
    func usage(arguments: [String], message: String) async {
        let (code, error, output) = await run(arguments)
        #expect(code == 64, "\(error)")
        #expect(output.isEmpty)
        #expect(error.contains(message), "\(error)")
    }

    @Test("help and a bare group print help on stdout with exit 0")
    func help() async {
        for arguments in [["--help"], ["data-key"], ["help", "encrypt"]] {
            let (code, error, output) = await run(arguments)
            #expect(code == 0, "\(arguments): \(error)")
            #expect(output.contains("USAGE: hsmgw"), "\(output)")
        }
    }

    @Test("an input file that does not exist exits 66; an unreachable gateway 69")
    func inputAndGateway() async throws {
        let directory = try makeTemporaryDirectory("hsmgw-limits")
        let tokenFile = directory + "/t.token"
        try Data("hsmgw_notarealtoken".utf8).write(to: URL(fileURLWithPath: tokenFile))
        try FileManager.default.setAttributes([.posixPermissions: 0o600], ofItemAtPath: tokenFile)
        let missing = await run([
            "encrypt", "--tenant", "acme", "--in", directory + "/missing", "--out", directory + "/o",
            "--token-file", tokenFile,
        ])
        // The gateway is asked for a key only after the input opened.
        #expect(missing.code == 66, "\(missing.error)")
        #expect(missing.error.contains("cannot open"), "\(missing.error)")
        let input = directory + "/in"
        try Data("x".utf8).write(to: URL(fileURLWithPath: input))
        let unreachable = await run([
            "encrypt", "--tenant", "acme", "--in", input, "--out", directory + "/o", "--token-file", tokenFile,
        ])
        #expect(unreachable.code == 69, "\(unreachable.error)")
        #expect(!FileManager.default.fileExists(atPath: directory + "/o"))
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory).sorted() == ["in", "t.token"])
    }
}

/// The built `hsmgw` executable on a large input, standard input to standard output, with its
/// peak resident memory as the kernel counts it.
@Suite("hsmgw executable", .serialized)
struct ExecutableTests {
    /// The input: large next to the memory bound, so a copy held whole would show.
    static let inputByteCount = 64 << 20
    /// The most resident memory `hsmgw` may reach on it: the executable's own baseline (runtime,
    /// linked libraries, NIO's threads: ~39 MiB measured in a debug build, the same for 1 MiB as
    /// for 64 MiB) plus one frame and one read chunk, with margin; below the input's 64 MiB, so
    /// an input held whole would fail.
    static let maximumResidentByteCount = 56 << 20

    /// Runs `argv[3:]` with standard input and output from and to the files `argv[1]` and
    /// `argv[2]`, and prints the child's peak RSS. Measured from a small parent because Linux
    /// carries `ru_maxrss` across `execve`: a child spawned straight from this test process
    /// (`posix_spawn` shares its memory until the exec) would report this process's own peak.
    static let measuringScript = """
        import resource, subprocess, sys
        with open(sys.argv[1], "rb") as source, open(sys.argv[2], "wb") as target:
            status = subprocess.run(sys.argv[3:], stdin=source, stdout=target).returncode
        print("maxrss-kib=%d" % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
        sys.exit(status)
        """

    @Test("64 MiB through encrypt and decrypt via stdin/stdout: peak RSS stays bounded")
    func largeStream() async throws {
        let fixture = try await DataPlaneFixture()
        let executable = try DevGatewayProcess.builtExecutable("hsmgw")
        // 1 MiB of pattern, repeated: writing 64 MiB of generated bytes would be slow.
        let block = DataPlaneFixture.data(1 << 20)
        let input = fixture.path("large.bin")
        FileManager.default.createFile(atPath: input, contents: nil)
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: input))
        for _ in 0..<(Self.inputByteCount >> 20) { try handle.write(contentsOf: block) }
        try handle.close()

        func run(_ arguments: [String], from: String, to: String) throws -> (status: Int32, peak: Int, error: String) {
            let result = try ChildProcess.run(
                "/usr/bin/python3", ["-c", Self.measuringScript, from, to, executable] + arguments,
                environment: fixture.environment(), inheritEnvironment: false, timeout: .seconds(300))
            let marker = result.error.split(separator: "\n").last { $0.hasPrefix("maxrss-kib=") }
            let kibibytes = try #require(marker.flatMap { Int($0.dropFirst("maxrss-kib=".count)) }, "\(result)")
            return (result.status, kibibytes * 1024, result.error)
        }
        let encrypted = try run(
            ["encrypt", "--tenant", fixture.tenant, "--context", "size=64MiB"], from: input,
            to: fixture.path("large.hgwe"))
        #expect(encrypted.status == 0, "\(encrypted.error)")
        let decrypted = try run(["decrypt"], from: fixture.path("large.hgwe"), to: fixture.path("large.out"))
        #expect(decrypted.status == 0, "\(decrypted.error)")
        let size = try FileManager.default.attributesOfItem(atPath: fixture.path("large.out"))[.size] as? Int
        #expect(size == Self.inputByteCount)
        #expect(try fixture.read(fixture.path("large.out")) == fixture.read(input))
        let (encryptPeak, decryptPeak) = (encrypted.peak, decrypted.peak)
        // Reported in the test log, for docs/cli.md.
        print(
            "hsmgw peak RSS on \(Self.inputByteCount >> 20) MiB: encrypt \(encryptPeak >> 10) KiB, decrypt \(decryptPeak >> 10) KiB"
        )
        #expect(encryptPeak < Self.maximumResidentByteCount, "encrypt peak \(encryptPeak)")
        #expect(decryptPeak < Self.maximumResidentByteCount, "decrypt peak \(decryptPeak)")
    }

    @Test("Ctrl-C during a decrypt to a file removes the partial plaintext's temporary file")
    func interrupted() async throws {
        let fixture = try await DataPlaneFixture()
        let executable = try DevGatewayProcess.builtExecutable("hsmgw")
        let input = try fixture.write(DataPlaneFixture.data(64 * 1024), to: "doc.bin")
        let sealed = try await fixture.hsmgw([
            "encrypt", "--tenant", fixture.tenant, "--in", input, "--out", fixture.path("doc.hgwe"), "--frame-size",
            "1024",
        ])
        try #require(sealed.code == 0, "\(sealed)")
        let envelope = try fixture.read(fixture.path("doc.hgwe"))
        let fifo = fixture.path("pipe")
        try #require(mkfifo(fifo, 0o600) == 0)
        let child = try SpawnedProcess(
            executable, ["decrypt", "--in", fifo, "--out", fixture.path("doc.out")],
            environment: fixture.environment(), inheritEnvironment: false, outputPath: fixture.path("child.log"))
        // The write end opens once the child has opened the read end.
        var writer: Int32 = -1
        let openBy = ContinuousClock.now + .seconds(60)
        while writer < 0, ContinuousClock.now < openBy, child.poll() == nil {
            writer = open(fifo, O_WRONLY | O_NONBLOCK | O_CLOEXEC)
            if writer < 0 { try await Task.sleep(for: .milliseconds(10)) }
        }
        try #require(writer >= 0, "\(child.output())")
        defer { close(writer) }
        _ = fcntl(writer, F_SETFL, 0)
        // Half the envelope: the header and about 32 frames, which authenticate and are written.
        let half = Array(envelope.prefix(envelope.count / 2))
        let written = half.withUnsafeBytes { write(writer, $0.baseAddress, $0.count) }
        try #require(written == half.count)
        // Await the temporary file holding plaintext, then interrupt.
        func temporary() throws -> String? {
            try FileManager.default.contentsOfDirectory(atPath: fixture.directory).first {
                $0.hasPrefix(".doc.out.hsmgw-")
            }
        }
        let seenBy = ContinuousClock.now + .seconds(60)
        var partial = 0
        while partial == 0, ContinuousClock.now < seenBy, child.poll() == nil {
            if let name = try temporary() {
                partial = (try? FileManager.default.attributesOfItem(atPath: fixture.path(name))[.size] as? Int) ?? 0
            }
            if partial == 0 { try await Task.sleep(for: .milliseconds(10)) }
        }
        try #require(partial > 0, "no partial output appeared: \(child.output())")
        child.send(SIGINT)
        let status = await child.wait(timeout: .seconds(30))
        #expect(status == 128 + SIGINT, "\(child.output())")
        #expect(try temporary() == nil)
        #expect(!FileManager.default.fileExists(atPath: fixture.path("doc.out")))
    }
}
