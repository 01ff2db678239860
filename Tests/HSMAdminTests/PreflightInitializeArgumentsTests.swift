import DevGatewayTestSupport
import Foundation
import PKCS11
import ProcessTestSupport
import SoftHSMTestSupport
import Testing

/// `hsm-admin preflight` on NSS's softoken, which needs `C_Initialize` arguments: given with
/// `--initialize-args` or as `hsm.initialize_args` in the configuration file, run as the built
/// executable so the arguments really travel to a module loaded by another process.
@Suite("hsm-admin preflight with C_Initialize arguments", .serialized)
struct PreflightInitializeArgumentsTests {
    /// An NSS database with its user PIN set, and what reaches it.
    struct NSSToken {
        let label: String
        let pinFile: String
        let initializeArguments: String
    }

    /// Under NSS, a token of the fixture; under SoftHSM2, a database made here through a module
    /// instance of this process (the child process loads its own).
    static func nssToken() throws -> NSSToken {
        if SoftHSMFixture.implementation == .nss {
            let token = try SoftHSMFixture.shared().makeToken("preflight-nss")
            return NSSToken(
                label: token.label, pinFile: token.pinFile, initializeArguments: try #require(token.initializeArguments)
            )
        }
        let directory = try makeTemporaryDirectory("preflight-nss")
        let label = "preflight-nss"
        let arguments = try NSSSoftoken.initializeArguments(databaseDirectory: directory, tokenLabel: label)
        let module = try PKCS11Module.load(path: NSSSoftoken.defaultModulePath, initializeArguments: arguments)
        let pin = "preflight-nss-user-pin"
        try module.withSession(slot: SlotID(rawValue: 2)) { session in
            try session.login(.securityOfficer, pin: SecretBytes(utf8: ""))
            try session.initPIN(SecretBytes(utf8: pin))
        }
        try module.finalize()
        let pinFile = directory + "/user.pin"
        try #require(
            FileManager.default.createFile(
                atPath: pinFile, contents: Data(pin.utf8), attributes: [.posixPermissions: 0o600]))
        return NSSToken(label: label, pinFile: pinFile, initializeArguments: arguments)
    }

    @Test("--initialize-args and hsm.initialize_args reach NSS's softoken; without them a hint, never the string")
    func nssThroughFlagAndFile() throws {
        let token = try Self.nssToken()
        let admin = try DevGatewayProcess.builtExecutable("hsm-admin")
        let common = [
            "preflight", "--module", NSSSoftoken.defaultModulePath, "--token", token.label, "--pin-file",
            token.pinFile, "--rounds", "20",
        ]
        let withFlag = try ChildProcess.run(admin, common + ["--initialize-args", token.initializeArguments])
        #expect(withFlag.status == 0, "\(withFlag)")
        #expect(withFlag.output.contains("PASS  AES-GCM round trip"), "\(withFlag)")
        #expect(withFlag.output.contains("C_GetInterface"), "\(withFlag)")

        // NSS has PKCS#11 3.0 message-based encryption: `--gcm-iv message` probes it for real.
        let message = try ChildProcess.run(
            admin, common + ["--initialize-args", token.initializeArguments, "--gcm-iv", "message"])
        #expect(message.status == 0, "\(message)")
        #expect(message.output.contains("message: the module's PKCS#11 3.0 IV generator makes the IV"), "\(message)")

        let directory = try makeTemporaryDirectory("preflight-nss-config")
        let config = directory + "/gateway.yaml"
        try """
        hsm:
          module: \(NSSSoftoken.defaultModulePath)
          token_label: \(token.label)
          initialize_args: "\(token.initializeArguments)"
          pin:
            file: \(token.pinFile)

        """.write(toFile: config, atomically: true, encoding: .utf8)
        let withFile = try ChildProcess.run(admin, ["preflight", "--config", config, "--rounds", "0"])
        #expect(withFile.status == 0, "\(withFile)")

        let without = try ChildProcess.run(admin, common)
        #expect(without.status == 1, "\(without)")
        #expect(without.output.contains("hsm.initialize_args"), "\(without)")
        for run in [withFlag, withFile, without] {
            #expect(!run.output.contains("configdir"))
            #expect(!run.error.contains("configdir"))
        }
    }
}
