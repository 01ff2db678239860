import Foundation
import PKCS11
import SoftHSMTestSupport
import Synchronization
import Testing

/// Everything that runs through the fault-injecting module (Tests/FaultInjection), which forwards
/// to this process's SoftHSM2. Its rules and trace are process-wide, so every suite that uses it
/// is nested here and the whole tree runs one test at a time.
@Suite(
    "Through the fault-injecting module", .serialized,
    .enabled(
        if: TestPKCS11Implementation.isSoftHSM2,
        "SoftHSM2 only: the fault-injecting module forwards to SoftHSM2 and counts its sessions"))
struct FaultInjectionTests {
    /// A token, the fault module with no rules, and a master key on the token.
    struct Setup {
        let fixture: SoftHSMFixture
        let fault: FaultInjectingModule
        let token: TestToken
        let keyID: [UInt8] = [0xfa, 0x01]

        init(_ name: String) throws {
            fixture = try SoftHSMFixture.shared()
            fault = try FaultInjectingModule.shared()
            try fault.clearRules()
            token = try fixture.makeToken(name)
            try fixture.module.withSession(slot: token.slot) { [token, keyID] session in
                try session.login(.user, pin: token.pin)
                _ = try session.generateMasterKey(label: MasterKeyPolicy.labelPrefix + "fault", id: keyID)
            }
        }

        /// A pool on the token through the fault module.
        func pool(sessions: Int = 1, pin: SecretBytes? = nil, timeout: Duration = .seconds(30)) async throws
            -> SessionPool
        {
            var configuration = SessionPoolConfiguration()
            configuration.maximumSessions = sessions
            configuration.acquireTimeout = timeout
            return try await SessionPool(
                module: fault.module, tokenLabel: token.label, pin: pin ?? token.pin, configuration: configuration)
        }

        /// Seals `plaintext` under the master key through `pool`.
        func seal(_ plaintext: [UInt8], aad: [UInt8] = [1], in pool: SessionPool) async throws -> AESGCMSealedBox {
            try await pool.withSession { [keyID] session in
                let key = try #require(try session.findMasterKey(id: keyID))
                return try plaintext.withUnsafeBytes { try session.sealAESGCM(key: key, aad: aad, plaintext: $0) }
            }
        }

        /// Opens `box` under the master key through `pool`.
        func open(_ box: AESGCMSealedBox, aad: [UInt8] = [1], in pool: SessionPool) async throws -> [UInt8] {
            try await pool.withSession { [keyID] session in
                let key = try #require(try session.findMasterKey(id: keyID))
                return try session.openAESGCM(key: key, aad: aad, box: box).copyBytes()
            }
        }
    }
}

// MARK: - Sessions left with an active operation

extension FaultInjectionTests {
    @Suite("A session whose operation failed after an *Init call is never reused as is")
    struct SessionReuse {
        let setup: Setup
        init() throws { setup = try Setup("fault-reuse") }

        @Test("control: after CKR_BUFFER_TOO_SMALL from C_Decrypt, SoftHSM2 keeps the operation active")
        func bufferTooSmallKeepsOperationActive() throws {
            // What the pool guards against, shown on a bare session: the next C_DecryptInit fails.
            let fault = setup.fault
            let token = setup.token
            let keyID = setup.keyID
            try fault.module.withSession(slot: token.slot) { session in
                try session.login(.user, pin: token.pin)
                let key = try #require(try session.findMasterKey(id: keyID))
                let box = try [UInt8]([1, 2, 3]).withUnsafeBytes {
                    try session.sealAESGCM(key: key, aad: [], plaintext: $0)
                }
                try fault.setRules("C_Decrypt rv=CKR_BUFFER_TOO_SMALL count=1")
                let first = #expect(throws: PKCS11Error.self) { try session.openAESGCM(key: key, aad: [], box: box) }
                #expect(first?.returnValue == .bufferTooSmall)
                #expect(first?.leavesSessionUnusable == true)
                let marked = session.isMarkedUnusable
                #expect(marked)
                let second = #expect(throws: PKCS11Error.self) { try session.openAESGCM(key: key, aad: [], box: box) }
                #expect(second?.function == .decryptInit)
                #expect(second?.returnValue == .operationActive)
                #expect(second?.foundSessionDirty == true)
            }
        }

        @Test("CKR_BUFFER_TOO_SMALL from C_Decrypt: the caller gets it, that session is replaced, the next call works")
        func bufferTooSmallOnDecrypt() async throws {
            let pool = try await setup.pool(sessions: 1)
            let box = try await setup.seal([9, 8, 7], in: pool)
            let before = pool.statistics.discarded
            try setup.fault.setRules("C_Decrypt rv=CKR_BUFFER_TOO_SMALL count=1")
            let mark = setup.fault.traceMark()
            let error = await #expect(throws: PKCS11Error.self) { try await setup.open(box, in: pool) }
            #expect(error?.function == .decrypt)
            #expect(error?.returnValue == .bufferTooSmall)
            #expect(error?.leavesSessionUnusable == true)
            // No automatic retry of the body: one C_Decrypt, the injected one.
            #expect(setup.fault.calls(of: "C_Decrypt", since: mark).map(\.injected) == [true])
            #expect(pool.statistics.discarded == before + 1)
            // The pool's only session was closed and replaced: the next call decrypts.
            #expect(try await setup.open(box, in: pool) == [9, 8, 7])
            #expect(setup.fault.calls(of: "C_DecryptInit", since: mark).allSatisfy { $0.returnValue == .ok })
            await pool.shutdown()
        }

        @Test("a body that catches the error itself still gets its session replaced")
        func caughtErrorStillDiscards() async throws {
            let pool = try await setup.pool(sessions: 1)
            let box = try await setup.seal([5], in: pool)
            let before = pool.statistics.discarded
            try setup.fault.setRules("C_Decrypt rv=CKR_BUFFER_TOO_SMALL count=1")
            let keyID = setup.keyID
            let swallowed = try await pool.withSession { session -> Bool in
                let key = try #require(try session.findMasterKey(id: keyID))
                do {
                    _ = try session.openAESGCM(key: key, aad: [1], box: box)
                    return false
                } catch {
                    return true
                }
            }
            #expect(swallowed)
            #expect(pool.statistics.discarded == before + 1)
            #expect(try await setup.open(box, in: pool) == [5])
            await pool.shutdown()
        }

        @Test("a ciphertext that does not authenticate ends the operation: the session is kept")
        func authenticationFailureKeepsSession() async throws {
            let pool = try await setup.pool(sessions: 1)
            let box = try await setup.seal([1, 2, 3, 4], in: pool)
            var tampered = box.ciphertextAndTag
            tampered[0] ^= 1
            let before = pool.statistics.discarded
            let error = await #expect(throws: PKCS11Error.self) {
                try await setup.open(AESGCMSealedBox(iv: box.iv, ciphertextAndTag: tampered), in: pool)
            }
            #expect(error?.isDecryptAuthenticationFailure == true)
            #expect(error?.leavesSessionUnusable == false)
            #expect(pool.statistics.discarded == before)
            #expect(try await setup.open(box, in: pool) == [1, 2, 3, 4])
            await pool.shutdown()
        }

        @Test("a C_Decrypt failure that is not an authentication failure leaves the session unusable")
        func otherDecryptFailureDiscards() async throws {
            let pool = try await setup.pool(sessions: 1)
            let box = try await setup.seal([3], in: pool)
            let before = pool.statistics.discarded
            try setup.fault.setRules("C_Decrypt rv=CKR_DEVICE_ERROR count=1")
            let error = await #expect(throws: PKCS11Error.self) { try await setup.open(box, in: pool) }
            #expect(error?.returnValue == .deviceError)
            #expect(error?.leavesSessionUnusable == true)
            #expect(pool.statistics.discarded == before + 1)
            #expect(try await setup.open(box, in: pool) == [3])
            await pool.shutdown()
        }

        @Test("a C_Encrypt failure leaves the session unusable; the next call works")
        func encryptFailureDiscards() async throws {
            let pool = try await setup.pool(sessions: 1)
            let before = pool.statistics.discarded
            try setup.fault.setRules("C_Encrypt rv=CKR_BUFFER_TOO_SMALL count=1")
            let error = await #expect(throws: PKCS11Error.self) { try await setup.seal([1], in: pool) }
            #expect(error?.function == .encrypt)
            #expect(error?.leavesSessionUnusable == true)
            #expect(pool.statistics.discarded == before + 1)
            let box = try await setup.seal([2], in: pool)
            #expect(try await setup.open(box, in: pool) == [2])
            await pool.shutdown()
        }

        @Test("CKR_OPERATION_ACTIVE from C_EncryptInit: that session is closed and the body runs once more on another")
        func operationActiveOnInitRetries() async throws {
            let pool = try await setup.pool(sessions: 2)
            let before = pool.statistics.discarded
            try setup.fault.setRules("C_EncryptInit rv=CKR_OPERATION_ACTIVE count=1")
            let mark = setup.fault.traceMark()
            let runs = Atomic(0)
            let keyID = setup.keyID
            let box = try await pool.withSession { session in
                runs.add(1, ordering: .relaxed)
                let key = try #require(try session.findMasterKey(id: keyID))
                return try [UInt8]([4, 2]).withUnsafeBytes { try session.sealAESGCM(key: key, aad: [1], plaintext: $0) }
            }
            #expect(runs.load(ordering: .relaxed) == 2)
            #expect(setup.fault.calls(of: "C_EncryptInit", since: mark).map(\.returnValue) == [.operationActive, .ok])
            #expect(pool.statistics.discarded == before + 1)
            #expect(try await setup.open(box, in: pool) == [4, 2])
            await pool.shutdown()
        }

        @Test("CKR_OPERATION_ACTIVE twice in a row: retried once only, then the caller gets it")
        func operationActiveRetriedOnce() async throws {
            let pool = try await setup.pool(sessions: 2)
            try setup.fault.setRules("C_EncryptInit rv=CKR_OPERATION_ACTIVE count=2")
            let runs = Atomic(0)
            let keyID = setup.keyID
            let error = await #expect(throws: PKCS11Error.self) {
                try await pool.withSession { session in
                    runs.add(1, ordering: .relaxed)
                    let key = try #require(try session.findMasterKey(id: keyID))
                    _ = try [UInt8]([1]).withUnsafeBytes { try session.sealAESGCM(key: key, aad: [], plaintext: $0) }
                }
            }
            #expect(error?.foundSessionDirty == true)
            #expect(runs.load(ordering: .relaxed) == 2)
            _ = try await setup.seal([1], in: pool)
            await pool.shutdown()
        }
    }
}

// MARK: - Lengths a module reports

extension FaultInjectionTests {
    @Suite("A length the module reports beyond the buffer is an error, never a crash")
    struct ReportedLengths {
        let setup: Setup
        init() throws { setup = try Setup("fault-length") }

        @Test("C_Encrypt reporting one byte more than its buffer: moduleMisbehaved, session replaced, next call works")
        func encryptOverreport() async throws {
            let pool = try await setup.pool(sessions: 1)
            let before = pool.statistics.discarded
            try setup.fault.setRules("C_Encrypt overreport=1 count=1")
            let error = await #expect(throws: PKCS11Error.self) { try await setup.seal([1, 2, 3], in: pool) }
            #expect(error?.code == .moduleMisbehaved)
            #expect(error?.function == .encrypt)
            #expect(error?.detail == "reported 20 bytes for a buffer of 19")
            #expect(error?.leavesSessionUnusable == true)
            #expect(pool.statistics.discarded == before + 1)
            let box = try await setup.seal([1, 2, 3], in: pool)
            #expect(try await setup.open(box, in: pool) == [1, 2, 3])
            await pool.shutdown()
        }

        @Test("C_Decrypt reporting more than its buffer (a crash before): moduleMisbehaved, next call works")
        func decryptOverreport() async throws {
            let pool = try await setup.pool(sessions: 1)
            let box = try await setup.seal([7, 7], in: pool)
            let before = pool.statistics.discarded
            // The decrypt buffer holds ciphertext and tag (18 bytes); SoftHSM2 writes 2.
            try setup.fault.setRules("C_Decrypt overreport=17 count=1")
            let error = await #expect(throws: PKCS11Error.self) { try await setup.open(box, in: pool) }
            #expect(error?.code == .moduleMisbehaved)
            #expect(error?.function == .decrypt)
            #expect(error?.detail == "reported 19 bytes for a buffer of 18")
            #expect(pool.statistics.discarded == before + 1)
            // Within the buffer but not the GCM plaintext length: also refused.
            try setup.fault.setRules("C_Decrypt overreport=1 count=1")
            let wrongLength = await #expect(throws: PKCS11Error.self) { try await setup.open(box, in: pool) }
            #expect(wrongLength?.code == .moduleMisbehaved)
            #expect(wrongLength?.detail == "reported 3 bytes of GCM plaintext, expected 2")
            #expect(try await setup.open(box, in: pool) == [7, 7])
            await pool.shutdown()
        }

        /// Runs `body` on a logged-in session of the fault module.
        func withSession<T>(_ body: (borrowing Session) throws -> T) throws -> T {
            let token = setup.token
            return try setup.fault.module.withSession(slot: token.slot) { session in
                try session.login(.user, pin: token.pin)
                return try body(session)
            }
        }

        @Test("C_WrapKey announcing a huge length or overreporting: moduleMisbehaved, no allocation, no crash")
        func wrapKeyLengths() throws {
            try withSession { session in
                let kek = try session.generateKey(
                    .aesKeyGen, template: [.token(false), .valueLength(32), .wrap(true), .unwrap(true)])
                let key = try session.generateKey(
                    .aesKeyGen, template: [.token(false), .valueLength(32), .extractable(true), .sensitive(true)])
                let mechanism = try #require(
                    Session.keyWrapWithPadding(among: try setup.fault.module.mechanisms(setup.token.slot)))
                #expect(try session.wrapKey(key, with: kek, mechanism: mechanism).count == 40)
                try setup.fault.setRules("C_WrapKey announce=1099511627776 count=1")
                let huge = #expect(throws: PKCS11Error.self) {
                    try session.wrapKey(key, with: kek, mechanism: mechanism)
                }
                #expect(huge?.code == .moduleMisbehaved)
                #expect(huge?.detail?.contains("1099511627776") == true)
                try setup.fault.setRules("C_WrapKey skip=1 overreport=1 count=1")
                let over = #expect(throws: PKCS11Error.self) {
                    try session.wrapKey(key, with: kek, mechanism: mechanism)
                }
                #expect(over?.code == .moduleMisbehaved)
                #expect(over?.detail == "reported 41 bytes for a buffer of 40")
            }
        }

        @Test("C_GetAttributeValue: a CKA_VALUE or attribute length beyond the buffer or the limit is moduleMisbehaved")
        func attributeLengths() throws {
            try withSession { session in
                let secret = try session.createObject([
                    .objectClass(.secretKey), .keyType(.genericSecret), .token(false), .sensitive(false),
                    .extractable(true), .label("fault-attr"), .value(SecretBytes(copying: [1, 2, 3, 4])),
                ])
                #expect(try session.secretValue(of: secret).constantTimeEquals([1, 2, 3, 4]))
                // The size query (no buffer) announces more than any attribute may be.
                try setup.fault.setRules("C_GetAttributeValue announce=18446744073709551615 count=1")
                let unavailable = #expect(throws: PKCS11Error.self) { try session.secretValue(of: secret) }
                // ULONG_MAX is CK_UNAVAILABLE_INFORMATION: refused, not allocated.
                #expect(unavailable?.code == .moduleMisbehaved)
                try setup.fault.setRules("C_GetAttributeValue announce=4294967296 count=1")
                let huge = #expect(throws: PKCS11Error.self) { try session.secretValue(of: secret) }
                #expect(huge?.code == .moduleMisbehaved)
                // The second call (with the buffer) reports more than it holds.
                try setup.fault.setRules("C_GetAttributeValue skip=1 overreport=1 count=1")
                let over = #expect(throws: PKCS11Error.self) { try session.secretValue(of: secret) }
                #expect(over?.code == .moduleMisbehaved)
                #expect(over?.detail == "reported 5 bytes for a buffer of 4")
                // The same for attributes(_:of:).
                #expect(try session.attributes([.label], of: secret).string(.label) == "fault-attr")
                try setup.fault.setRules("C_GetAttributeValue skip=1 overreport=3 count=1")
                let label = #expect(throws: PKCS11Error.self) { try session.attributes([.label], of: secret) }
                #expect(label?.code == .moduleMisbehaved)
                #expect(label?.detail == "reported 13 bytes for a buffer of 10")
                try setup.fault.setRules("C_GetAttributeValue announce=1048576 count=1")
                let tooLong = #expect(throws: PKCS11Error.self) { try session.attributes([.label], of: secret) }
                #expect(tooLong?.code == .moduleMisbehaved)
                try setup.fault.clearRules()
                #expect(try session.attributes([.label], of: secret).string(.label) == "fault-attr")
            }
        }

        @Test("C_FindObjects returning more handles than asked for: moduleMisbehaved, the search still ends")
        func findObjectsOverreport() throws {
            try withSession { session in
                try setup.fault.setRules("C_FindObjects overreport=1000 count=1")
                let mark = setup.fault.traceMark()
                let error = #expect(throws: PKCS11Error.self) { try session.findMasterKey(id: setup.keyID) }
                #expect(error?.code == .moduleMisbehaved)
                #expect(error?.function == .findObjects)
                #expect(setup.fault.calls(of: "C_FindObjectsFinal", since: mark).map(\.returnValue) == [.ok])
                #expect(try session.findMasterKey(id: setup.keyID) != nil)
            }
        }

        @Test("C_GetSlotList and C_GetMechanismList counts beyond their limits or buffers: moduleMisbehaved")
        func slotAndMechanismCounts() throws {
            let module = setup.fault.module
            try setup.fault.setRules("C_GetSlotList announce=1099511627776 count=1")
            #expect((#expect(throws: PKCS11Error.self) { try module.slotIDs() })?.code == .moduleMisbehaved)
            try setup.fault.setRules("C_GetSlotList skip=1 overreport=1 count=1")
            #expect((#expect(throws: PKCS11Error.self) { try module.slotIDs() })?.code == .moduleMisbehaved)
            try setup.fault.setRules("C_GetMechanismList skip=1 overreport=1 count=1")
            let mechanisms = #expect(throws: PKCS11Error.self) { try module.mechanisms(setup.token.slot) }
            #expect(mechanisms?.code == .moduleMisbehaved)
            try setup.fault.clearRules()
            #expect(try module.slotIDs().contains(setup.token.slot))
        }
    }
}
