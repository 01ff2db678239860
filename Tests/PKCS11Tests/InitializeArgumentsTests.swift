import Foundation
import PKCS11
import SoftHSMTestSupport
import Testing

/// `PKCS11Module.load(path:initializeArguments:)`: the string in `CK_C_INITIALIZE_ARGS.pReserved`,
/// its limits, and NSS's softoken, which needs it.
@Suite("C_Initialize arguments", .serialized)
struct InitializeArgumentsTests {
    /// A recognisable string that must never show in an error.
    static let marker = "configdir='sql:/secret-looking-marker-4711' flags="

    @Test("too long, empty or holding a NUL: invalidArgument before the module is opened, the string never quoted")
    func limits() throws {
        let cases = [
            String(repeating: "a", count: PKCS11Module.maximumInitializeArgumentsByteCount + 1) + Self.marker,
            "",
            Self.marker + "\u{0}",
        ]
        for arguments in cases {
            let error = #expect(throws: PKCS11Error.self) {
                try PKCS11Module.load(path: SoftHSMFixture.modulePath, initializeArguments: arguments)
            }
            #expect(error?.code == .invalidArgument)
            #expect(error?.function == .initialize)
            #expect(error?.description.contains("secret-looking-marker") == false)
        }
    }

    @Test(
        "NSS's softoken: without arguments a hint, without configdir refused (not a crash), with them a labelled token",
        .enabled(
            if: SoftHSMFixture.implementation == .softHSM2,
            "under NSS the fixture has initialised NSS's softoken in this process already")
    )
    func nssSoftoken() throws {
        let path = NSSSoftoken.defaultModulePath
        try #require(FileManager.default.fileExists(atPath: path), "libnss3 is installed by `make deps`")
        let missing = #expect(throws: PKCS11Error.self) { try PKCS11Module.load(path: path) }
        #expect(missing?.function == .initialize)
        #expect(missing?.returnValue == .argumentsBad)
        #expect(missing?.detail?.contains("hsm.initialize_args") == true)

        // NSS 3.87 crashes the process on parameters without a database directory.
        let noDirectory = #expect(throws: PKCS11Error.self) {
            try PKCS11Module.load(path: path, initializeArguments: "flags= secret-looking-marker=1")
        }
        #expect(noDirectory?.code == .invalidArgument)
        #expect(noDirectory?.description.contains("secret-looking-marker") == false)

        let directory = try makeDatabaseDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let arguments = try NSSSoftoken.initializeArguments(databaseDirectory: directory, tokenLabel: "init-args-nss")
        let module = try PKCS11Module.load(path: path, initializeArguments: arguments)
        #expect(module.ownsInitialization)
        #expect(module.hasInitializeArguments)
        #expect(module.loadedViaGetInterface)
        #expect(module.interfaceVersion.major == 3)
        #expect(module.hasVersion3Interface)
        // A new database is not initialised until the user PIN is set; then it is found by label.
        let databaseSlot = SlotID(rawValue: 2)
        #expect(try module.tokenInfo(databaseSlot).label == "init-args-nss")
        #expect(try module.tokenInfo(databaseSlot).initialized == false)
        try module.withSession(slot: databaseSlot) { session in
            try session.login(.securityOfficer, pin: SecretBytes(utf8: ""))
            try session.initPIN(SecretBytes(utf8: "a-user-pin"))
        }
        #expect(try module.slot(tokenLabel: "init-args-nss") == databaseSlot)
        // Re-initialisation passes the same arguments again.
        try module.reinitialize()
        #expect(try module.slot(tokenLabel: "init-args-nss") == databaseSlot)
        try module.finalize()

        // A database directory that does not exist: NSS's own code (CKR_NSS_CERTDB_FAILED), as a
        // number, with C_Initialize named; the process carries on.
        let missingDirectory = #expect(throws: PKCS11Error.self) {
            try PKCS11Module.load(
                path: path,
                initializeArguments: try NSSSoftoken.initializeArguments(
                    databaseDirectory: directory + "/missing", tokenLabel: "missing"))
        }
        #expect(missingDirectory?.function == .initialize)
        #expect(missingDirectory?.returnValue == PKCS11ReturnValue(rawValue: 0xCE53_4351))
        #expect(missingDirectory?.description.contains("CKR_VENDOR_DEFINED+0x4e534351") == true)
    }

    @Test("NSS's parameter syntax: quotes and brackets in a directory or label are refused")
    func nssParameterSyntax() {
        for (directory, label) in [
            ("/tmp/a'b", "x"), ("/tmp/ok", "a]b"), ("/tmp/ok", ""), ("/tmp/ok", String(repeating: "l", count: 33)),
        ] {
            #expect(throws: PKCS11Error.self) {
                try NSSSoftoken.initializeArguments(databaseDirectory: directory, tokenLabel: label)
            }
        }
    }

    private func makeDatabaseDirectory() throws -> String {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent(
            "hsmgw-nss-args-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        ).path
        try FileManager.default.createDirectory(
            atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        return directory
    }
}
