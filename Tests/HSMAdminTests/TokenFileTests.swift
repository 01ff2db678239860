import Foundation
import Testing

@testable import HSMAdmin

/// Reading the API token from real files with real modes.
@Suite("hsm-admin token files")
struct TokenFileTests {
    let directory: String

    init() throws {
        directory =
            FileManager.default.temporaryDirectory.appendingPathComponent(
                "hsm-admin-token-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            ).path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    }

    func write(_ name: String, _ content: String, mode: Int) throws -> String {
        let path = directory + "/" + name
        try Data(content.utf8).write(to: URL(fileURLWithPath: path))
        try FileManager.default.setAttributes([.posixPermissions: mode], ofItemAtPath: path)
        return path
    }

    @Test("a private file's token is read, surrounding whitespace removed")
    func privateFile() throws {
        let path = try write("ok.token", "hsmgw_abc\n", mode: 0o600)
        #expect(try TokenFile.load(path: path).value == "hsmgw_abc")
        let readOnly = try write("ro.token", "  hsmgw_def  ", mode: 0o400)
        #expect(try TokenFile.load(path: readOnly).value == "hsmgw_def")
        let link = directory + "/link.token"
        try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: path)
        #expect(try TokenFile.load(path: link).value == "hsmgw_abc")
    }

    @Test("a file that group or others can access is refused, with its mode and the fix")
    func groupReadable() throws {
        for mode in [0o640, 0o604, 0o620, 0o644, 0o660] {
            let path = try write("open-\(mode).token", "hsmgw_secret", mode: mode)
            let error = #expect(throws: AdminError.self) { try TokenFile.load(path: path) }
            #expect(error?.exitCode == 78)
            #expect(error?.message.contains("has mode 0\(String(mode, radix: 8))") == true, "\(error?.message ?? "")")
            #expect(error?.message.contains("chmod 600 \(path)") == true)
            #expect(error?.message.contains("hsmgw_secret") == false)
        }
    }

    @Test("missing, empty, oversized, multi-word files and directories are refused without quoting them")
    func badFiles() throws {
        let missing = #expect(throws: AdminError.self) { try TokenFile.load(path: directory + "/none") }
        #expect(missing?.message.contains("cannot open token file") == true)
        let empty = try write("empty.token", "\n", mode: 0o600)
        #expect(
            (#expect(throws: AdminError.self) { try TokenFile.load(path: empty) })?.message.contains("is empty") == true
        )
        let large = try write("large.token", String(repeating: "a", count: TokenFile.maximumByteCount + 1), mode: 0o600)
        #expect(
            (#expect(throws: AdminError.self) { try TokenFile.load(path: large) })?.message.contains("larger") == true)
        let words = try write("words.token", "hsmgw_one hsmgw_two", mode: 0o600)
        let wordsError = #expect(throws: AdminError.self) { try TokenFile.load(path: words) }
        #expect(wordsError?.message.contains("does not hold one token") == true)
        #expect(wordsError?.message.contains("hsmgw_one") == false)
        let subdirectory = directory + "/dir"
        try FileManager.default.createDirectory(
            atPath: subdirectory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        #expect(
            (#expect(throws: AdminError.self) { try TokenFile.load(path: subdirectory) })?.message.contains(
                "not a regular file") == true)
    }
}
