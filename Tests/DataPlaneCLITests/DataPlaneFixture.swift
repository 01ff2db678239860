import DataPlaneCLI
import DevGatewayTestSupport
import Foundation
import GatewayClient
import HSMAdmin
import ProcessTestSupport
import Testing

/// What one `hsmgw` run left: its exit code, its text on standard output and error, and the bytes
/// it wrote to the standard-output descriptor (`--out -`).
struct HSMGWResult: CustomStringConvertible {
    var code: Int32
    var output: String
    var error: String
    var bytes: [UInt8]

    var description: String { "exit \(code)\nstdout:\n\(output)\nstderr:\n\(error)" }

    /// `--json` output as an object.
    func json() throws -> [String: Any] {
        try #require(code == 0, "\(self)")
        let object = try JSONSerialization.jsonObject(with: Data(output.utf8))
        return try #require(object as? [String: Any], "\(output)")
    }
}

/// A tenant on the shared `hsm-gateway --dev`, a key-user principal on it with a token file, and
/// a scratch directory; `hsmgw` runs in-process (`DataPlaneRunner.main`) as that principal.
struct DataPlaneFixture {
    let gateway: DevGatewayProcess
    let tenant: String
    let tokenFile: String
    let directory: String

    init() async throws {
        gateway = try DevGatewayProcess.shared()
        tenant = Self.unique("cli")
        directory = try makeTemporaryDirectory("hsmgw-test")
        try await Self.admin(gateway, ["tenant", "create", tenant])
        tokenFile = try await Self.keyUser(gateway, tenant: tenant)
    }

    static func unique(_ prefix: String) -> String {
        "\(prefix)-\(String(UInt32.random(in: 0...UInt32.max), radix: 36))"
    }

    /// Runs `hsm-admin` in-process as the bootstrap admin; requires success; returns stdout.
    @discardableResult
    static func admin(_ gateway: DevGatewayProcess, _ arguments: [String]) async throws -> String {
        let capture = CapturedOutput()
        let code = await AdminRunner.main(
            arguments: arguments,
            environment: [
                "HOME": gateway.home, "HSMGW_SERVER": gateway.server, "HSMGW_TOKEN_FILE": gateway.adminTokenFile,
            ],
            output: capture.output
        )
        try #require(code == 0, "hsm-admin \(arguments): \(capture.standardError)")
        return capture.standardOutput
    }

    /// A principal with `key-user` on `tenant` and a token file (0600) for it, in the gateway's
    /// HOME (not the scratch directory, whose listing the tests check).
    static func keyUser(_ gateway: DevGatewayProcess, tenant: String) async throws -> String {
        let principal = unique("app")
        try await admin(gateway, ["principal", "create", principal, "--role", "\(tenant):key-user"])
        let token = try await admin(gateway, ["token", "create", "--principal", principal])
        let path = gateway.home + "/\(principal).token"
        try Data(token.utf8).write(to: URL(fileURLWithPath: path))
        try FileManager.default.setAttributes([.posixPermissions: 0o600], ofItemAtPath: path)
        return path
    }

    /// The environment `hsmgw` gets: the gateway, the token file, and a HOME without config.
    func environment(tokenFile: String? = nil) -> [String: String] {
        ["HOME": gateway.home, "HSMGW_SERVER": gateway.server, "HSMGW_TOKEN_FILE": tokenFile ?? self.tokenFile]
    }

    /// Runs `hsmgw` in-process. `stdin` is a file the command reads as standard input (else
    /// /dev/null); the standard-output descriptor goes to a scratch file returned as `bytes`.
    func hsmgw(
        _ arguments: [String],
        stdin: String? = nil,
        tokenFile: String? = nil,
        stdoutIsTerminal: Bool = false,
        stderrIsTerminal: Bool = false
    ) async throws -> HSMGWResult {
        let input = open(stdin ?? "/dev/null", O_RDONLY | O_CLOEXEC)
        try #require(input >= 0)
        defer { close(input) }
        let outputPath = directory + "/.stdout-\(UInt32.random(in: 0...UInt32.max))"
        let output = open(outputPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        try #require(output >= 0)
        defer {
            close(output)
            unlink(outputPath)
        }
        let capture = CapturedOutput()
        var console = DataPlaneConsole(output: capture.output, standardInput: input, standardOutput: output)
        console.standardOutputIsTerminal = stdoutIsTerminal
        console.standardErrorIsTerminal = stderrIsTerminal
        let code = await DataPlaneRunner.main(
            arguments: arguments, environment: environment(tokenFile: tokenFile), console: console)
        let bytes = Array(try Data(contentsOf: URL(fileURLWithPath: outputPath)))
        return HSMGWResult(code: code, output: capture.standardOutput, error: capture.standardError, bytes: bytes)
    }

    /// A Swift client as the key-user principal.
    func client() throws -> GatewayClient {
        let token = try String(contentsOfFile: tokenFile, encoding: .utf8).trimmingCharacters(
            in: .whitespacesAndNewlines)
        return try GatewayClient(
            configuration: .init(
                target: .host("127.0.0.1", port: gateway.port), transportSecurity: .plaintext,
                apiToken: APIToken(token))
        )
    }

    /// A path in the scratch directory.
    func path(_ name: String) -> String { directory + "/" + name }

    /// Writes `bytes` to `name` in the scratch directory; returns its path.
    @discardableResult
    func write(_ bytes: [UInt8], to name: String) throws -> String {
        let path = path(name)
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        return path
    }

    /// The bytes of the file at `path`.
    func read(_ path: String) throws -> [UInt8] {
        Array(try Data(contentsOf: URL(fileURLWithPath: path)))
    }

    /// The names in the scratch directory (temporary files of an output start with `.`).
    func entries() throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: directory).filter { !$0.hasPrefix(".stdout-") }.sorted()
    }

    /// The permission bits of the file at `path`.
    func mode(_ path: String) throws -> Int {
        let attributes = try FileManager.default.attributesOfItem(atPath: path)
        return try #require(attributes[.posixPermissions] as? Int)
    }

    /// `count` bytes of a repeating pseudo-random pattern (deterministic, not compressible by
    /// accident of zeros).
    static func data(_ count: Int, seed: UInt64 = 0x9E37_79B9_7F4A_7C15) -> [UInt8] {
        var state = seed
        return (0..<count).map { _ in
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return UInt8(truncatingIfNeeded: state >> 56)
        }
    }
}
