import Foundation
import PKCS11
import SoftHSMTestSupport
import Testing

/// Loading modules, finding tokens and logging in, against the real SoftHSM2 module.
@Suite("PKCS#11 module", .serialized)
struct PKCS11ModuleTests {
    let fixture: SoftHSMFixture
    let token: TestToken

    init() throws {
        fixture = try SoftHSMFixture.shared()
        token = try fixture.makeToken("module")
    }

    @Test("a path with no file is moduleNotFound")
    func missingFile() {
        let error = #expect(throws: PKCS11Error.self) {
            try PKCS11Module.load(path: "/nonexistent/libnothing.so")
        }
        #expect(error?.code == .moduleNotFound)
        #expect(error?.description.contains("/nonexistent/libnothing.so") == true)
    }

    @Test("a directory is moduleNotLoadable")
    func directory() {
        let error = #expect(throws: PKCS11Error.self) { try PKCS11Module.load(path: "/tmp") }
        #expect(error?.code == .moduleNotLoadable)
    }

    @Test("a file that is not a shared library is moduleNotLoadable, with dlopen's reason")
    func notALibrary() throws {
        let path = fixture.directory + "/not-a-module.so"
        try "this is not an ELF file\n".write(toFile: path, atomically: true, encoding: .utf8)
        let error = #expect(throws: PKCS11Error.self) { try PKCS11Module.load(path: path) }
        #expect(error?.code == .moduleNotLoadable)
        #expect(error?.detail?.isEmpty == false)
    }

    @Test("a shared library that is not a PKCS#11 module is missingEntryPoint")
    func libraryWithoutEntryPoint() throws {
        let candidates = ["/lib/x86_64-linux-gnu/libz.so.1", "/usr/lib/x86_64-linux-gnu/libz.so.1"]
        let libz = try #require(candidates.first { FileManager.default.fileExists(atPath: $0) })
        let error = #expect(throws: PKCS11Error.self) { try PKCS11Module.load(path: libz) }
        #expect(error?.code == .missingEntryPoint)
        #expect(error?.description.contains("C_GetFunctionList") == true)
    }

    @Test("loading the same module again tolerates CKR_CRYPTOKI_ALREADY_INITIALIZED")
    func secondLoad() throws {
        let again = try PKCS11Module.load(path: SoftHSMFixture.modulePath)
        #expect(again.ownsInitialization == false)
        #expect(try again.slot(tokenLabel: token.label) == token.slot)
    }

    @Test("SoftHSM2 2.6 has no C_GetInterface (C_GetFunctionList, a 2.40 table); NSS's softoken gives a 3.0 table")
    func entryPoint() {
        switch SoftHSMFixture.implementation {
        case .softHSM2:
            #expect(fixture.module.loadedViaGetInterface == false)
            #expect(fixture.module.interfaceVersion.major == 2)
            #expect(!fixture.module.hasVersion3Interface)
        case .nss:
            #expect(fixture.module.loadedViaGetInterface)
            #expect(fixture.module.interfaceVersion.major == 3)
            #expect(fixture.module.hasVersion3Interface)
        }
    }

    @Test("a module that exports C_GetInterface is opened through it (OpenSC's pkcs11-spy over SoftHSM2)")
    func getInterfacePath() throws {
        let spy = "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so"
        try #require(FileManager.default.fileExists(atPath: spy), "opensc is installed by `make deps`")
        // The spy forwards to the module named in PKCS11SPY; it reads the variable in C_Initialize.
        setenv("PKCS11SPY", SoftHSMFixture.modulePath, 1)
        setenv("PKCS11SPY_OUTPUT", "/dev/null", 1)
        let module = try PKCS11Module.load(path: spy)
        #expect(module.loadedViaGetInterface)
        let slot = try module.slot(tokenLabel: token.label)
        let random = try module.withSession(slot: slot) { session in
            try session.login(.user, pin: token.pin)
            return try session.generateRandom(count: 16)
        }
        #expect(random.count == 16)
    }

    @Test("module, slot and token information")
    func information() throws {
        let info = try fixture.module.info()
        switch SoftHSMFixture.implementation {
        case .softHSM2:
            #expect(info.manufacturer.contains("SoftHSM"))
            #expect(info.cryptokiVersion.major == 2)
        case .nss:
            #expect(info.manufacturer.contains("Mozilla"))
            #expect(info.cryptokiVersion.major == 3)
        }
        let tokenInfo = try fixture.module.tokenInfo(token.slot)
        #expect(tokenInfo.label == token.label)
        #expect(tokenInfo.initialized)
        #expect(tokenInfo.userPINInitialized)
        #expect(tokenInfo.loginRequired)
        #expect(tokenInfo.hasRNG)
        #expect(try fixture.module.slotInfo(token.slot).tokenPresent)
        #expect(try fixture.module.slotIDs().contains(token.slot))
        #expect(try fixture.module.tokens().contains { $0.label == token.label })
    }

    @Test("find a token by serial number; a serial several tokens share is refused (NSS gives all of them zeros)")
    func findBySerial() throws {
        let serial = try fixture.module.tokenInfo(token.slot).serialNumber
        switch SoftHSMFixture.implementation {
        case .softHSM2:
            #expect(try fixture.module.slot(tokenSerial: serial) == token.slot)
        case .nss:
            #expect(serial == "0000000000000000")
            let shared = #expect(throws: PKCS11Error.self) { try fixture.module.slot(tokenSerial: serial) }
            #expect(shared?.code == .invalidArgument)
        }
        let error = #expect(throws: PKCS11Error.self) { try fixture.module.slot(tokenSerial: "no-such-serial") }
        #expect(error?.code == .tokenNotFound)
    }

    @Test("a wrong token label is tokenNotFound")
    func wrongLabel() {
        let error = #expect(throws: PKCS11Error.self) { try fixture.module.slot(tokenLabel: "no-such-token") }
        #expect(error?.code == .tokenNotFound)
        #expect(error?.detail?.contains("no-such-token") == true)
    }

    @Test("a wrong PIN is C_Login failing with CKR_PIN_INCORRECT, and the message holds no PIN")
    func wrongPIN() throws {
        let wrong = "wrong-pin-0123456789"
        let error = #expect(throws: PKCS11Error.self) {
            try fixture.module.withSession(slot: token.slot) { session in
                try session.login(.user, pin: SecretBytes(utf8: wrong))
            }
        }
        #expect(error?.code == .functionFailed)
        #expect(error?.function == .login)
        #expect(error?.returnValue == .pinIncorrect)
        #expect(error?.description.contains(wrong) == false)
        #expect(error?.description.contains("C_Login") == true)
        #expect(error?.description.contains("CKR_PIN_INCORRECT") == true)
        // The right PIN still works (and the session bookkeeping is balanced).
        let before = fixture.module.openSessionCount(slot: token.slot)
        try fixture.module.withSession(slot: token.slot) { session in
            try session.login(.user, pin: token.pin)
            #expect(try session.state() == .readWriteUser)
        }
        #expect(fixture.module.openSessionCount(slot: token.slot) == before)
    }

    @Test("logging in twice is tolerated (CKR_USER_ALREADY_LOGGED_IN)")
    func doubleLogin() throws {
        try fixture.module.withSession(slot: token.slot) { session in
            try session.login(.user, pin: token.pin)
            try session.login(.user, pin: token.pin)
            #expect(try session.state().isUserLoggedIn)
        }
    }

    @Test("the mechanism list has the gateway's mechanisms with their flags")
    func mechanisms() throws {
        let mechanisms = try fixture.module.mechanisms(token.slot)
        let gcm = try #require(mechanisms.first { $0.mechanism == .aesGCM })
        #expect(gcm.flags.isSuperset(of: [.encrypt, .decrypt]))
        #expect(gcm.maximumKeySize >= 32)
        let keyGen = try #require(mechanisms.first { $0.mechanism == .aesKeyGen })
        #expect(keyGen.flags.contains(.generate))
        #expect(Mechanism.aesGCM.name == "CKM_AES_GCM")
        #expect(Mechanism(rawValue: 0x8000_1234).name == "CKM_0x80001234")
    }

    @Test("an unknown vendor CK_RV survives as its number")
    func vendorReturnValue() {
        let vendor = PKCS11ReturnValue(rawValue: 0x8000_0042)
        #expect(vendor.description.contains("0x80000042"))
        #expect(PKCS11ReturnValue(rawValue: 0xa0) == .pinIncorrect)
        #expect(PKCS11ReturnValue.pinIncorrect.name == "CKR_PIN_INCORRECT")
    }

    @Test("finalize refuses while sessions are open, then succeeds and later calls fail clearly")
    func finalizeAfterDrain() throws {
        // A second instance of the same module: it does not own C_Initialize, so finalizing it
        // does not pull SoftHSM2 from under the other tests.
        let module = try PKCS11Module.load(path: SoftHSMFixture.modulePath)
        try module.withSession(slot: token.slot) { _ in
            let error = #expect(throws: PKCS11Error.self) { try module.finalize() }
            #expect(error?.code == .sessionsStillOpen)
        }
        try module.finalize()
        #expect(module.isFinalized)
        let error = #expect(throws: PKCS11Error.self) { try module.tokens() }
        #expect(error?.code == .moduleFinalized)
        #expect((#expect(throws: PKCS11Error.self) { try module.finalize() })?.code == .moduleFinalized)
    }

    @Test("a forked child gets processForked instead of calling into the module")
    func refuseAfterFork() throws {
        let module = fixture.module
        let child = fork()
        if child == 0 {
            // Child: touch nothing but the module's guard, then leave without running atexit.
            do {
                _ = try module.info()
                _exit(1)
            } catch let error as PKCS11Error where error.code == .processForked {
                _exit(0)
            } catch {
                _exit(2)
            }
        }
        try #require(child > 0)
        var status: Int32 = 0
        let deadline = ContinuousClock.now.advanced(by: .seconds(20))
        while waitpid(child, &status, WNOHANG) == 0 {
            if ContinuousClock.now > deadline {
                kill(child, SIGKILL)
                waitpid(child, &status, 0)
                Issue.record("forked child did not exit")
                return
            }
            usleep(10_000)
        }
        // WIFEXITED / WEXITSTATUS, which do not import into Swift.
        #expect(status & 0x7f == 0, "child was killed by a signal")
        #expect((status >> 8) & 0xff == 0, "child exit code \((status >> 8) & 0xff): 1 = call allowed, 2 = other error")
    }
}
