import Foundation
import GatewayConfig
import Testing

@Suite("PIN sources")
struct PINSourceTests {
    let directory: String

    init() throws {
        directory =
            FileManager.default.temporaryDirectory
            .appendingPathComponent("pin-tests-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    }

    func write(_ name: String, _ contents: [UInt8], mode: Int) throws -> String {
        let path = directory + "/" + name
        #expect(
            FileManager.default.createFile(
                atPath: path, contents: Data(contents), attributes: [.posixPermissions: mode]))
        return path
    }

    @Test("a 0600 file: one trailing newline (or CRLF) is dropped, other bytes kept")
    func fileContents() throws {
        let plain = try write("plain", Array("1234".utf8), mode: 0o600)
        #expect(try PINSource.file(plain).read().copyBytes() == Array("1234".utf8))
        let newline = try write("newline", Array("1234\n".utf8), mode: 0o400)
        #expect(try PINSource.file(newline).read().copyBytes() == Array("1234".utf8))
        let crlf = try write("crlf", Array("12 34\r\n".utf8), mode: 0o600)
        #expect(try PINSource.file(crlf).read().copyBytes() == Array("12 34".utf8))
        let twoNewlines = try write("two", Array("1234\n\n".utf8), mode: 0o600)
        #expect(try PINSource.file(twoNewlines).read().copyBytes() == Array("1234\n".utf8))
    }

    @Test("files readable by group or others, empty, too long, missing or not regular are refused")
    func fileErrors() throws {
        let open = try write("open", Array("1234".utf8), mode: 0o644)
        let error = #expect(throws: ConfigurationError.self) { try PINSource.file(open).read() }
        #expect(error?.description.contains("chmod 600") == true)
        #expect(error?.description.contains("1234") == false)
        let group = try write("group", Array("1234".utf8), mode: 0o640)
        #expect(throws: ConfigurationError.self) { try PINSource.file(group).read() }
        let empty = try write("empty", Array("\n".utf8), mode: 0o600)
        let emptyError = #expect(throws: ConfigurationError.self) { try PINSource.file(empty).read() }
        #expect(emptyError?.description.contains("is empty") == true)
        let exactlyFull = try write("full", [UInt8](repeating: 0x61, count: PINSource.maximumPINByteCount), mode: 0o600)
        #expect(try PINSource.file(exactlyFull).read().count == PINSource.maximumPINByteCount)
        let long = try write("long", [UInt8](repeating: 0x61, count: PINSource.maximumPINByteCount + 1), mode: 0o600)
        let longError = #expect(throws: ConfigurationError.self) { try PINSource.file(long).read() }
        #expect(longError?.description.contains("longer than") == true)
        let huge = try write("huge", [UInt8](repeating: 0x61, count: 1 << 20), mode: 0o600)
        #expect(throws: ConfigurationError.self) { try PINSource.file(huge).read() }
        #expect(throws: ConfigurationError.self) { try PINSource.file(directory + "/missing").read() }
        #expect(throws: ConfigurationError.self) { try PINSource.file(directory).read() }
        let link = directory + "/link"
        try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: exactlyFull)
        let linkError = #expect(throws: ConfigurationError.self) { try PINSource.file(link).read() }
        #expect(linkError != nil, "a symlink could point the gateway at any file")
    }

    @Test("environment variables: set, unset, empty, too long; the description names only the variable")
    func environment() throws {
        let source = PINSource.environment("HSMGW_TEST_PIN")
        #expect(try source.read(environment: ["HSMGW_TEST_PIN": "9876"]).copyBytes() == Array("9876".utf8))
        #expect(throws: ConfigurationError.self) { try source.read(environment: [:]) }
        #expect(throws: ConfigurationError.self) { try source.read(environment: ["HSMGW_TEST_PIN": ""]) }
        let long = String(repeating: "x", count: PINSource.maximumPINByteCount + 1)
        #expect(throws: ConfigurationError.self) { try source.read(environment: ["HSMGW_TEST_PIN": long]) }
        #expect(source.description == "PIN environment variable HSMGW_TEST_PIN")
    }
}
