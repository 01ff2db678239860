import Foundation
import KeyHierarchy
import PKCS11
import PKCS11KeyToken
import SoftHSMTestSupport
import Testing

/// The token adapter under PKCS#11 faults, through the fault-injecting module over SoftHSM2: a
/// lease retried after the session failed does nothing twice (a data key is drawn once, each
/// encryption draws its own IV), and an operation that leaves its session unusable costs its own
/// result only. The module's rules are process-wide: this is the only suite of this target that
/// loads it, and it runs one test at a time.
@Suite(
    "Token adapter under PKCS#11 faults", .serialized,
    .enabled(
        if: TestPKCS11Implementation.isSoftHSM2,
        "SoftHSM2 only: the fault-injecting module forwards to SoftHSM2"))
struct TokenAdapterFaultTests {
    struct Setup {
        let fault: FaultInjectingModule
        let pool: SessionPool
        let token: PKCS11KeyToken
        let key: TokenKeyReference

        static func make(_ name: String) async throws -> Setup {
            let fixture = try SoftHSMFixture.shared()
            let fault = try FaultInjectingModule.shared()
            try fault.clearRules()
            let testToken = try fixture.makeToken(name)
            var configuration = SessionPoolConfiguration()
            configuration.maximumSessions = 1
            let pool = try await SessionPool(
                module: fault.module, tokenLabel: testToken.label, pin: testToken.pin, configuration: configuration)
            let token = PKCS11KeyToken(pool: pool)
            let tenant = tenantID("fault")
            let key = TokenKeyReference(id: .random(), tenant: tenant, version: 1)
            try await token.generateMasterKey(id: key.id, label: key.label)
            return Setup(fault: fault, pool: pool, token: token, key: key)
        }

        func unwrap(_ result: TokenResult, aad: [UInt8]) async throws -> SecretBytes {
            let (iv, sealed): ([UInt8], [UInt8])
            switch result {
            case .generated(_, let resultIV, let ciphertextAndTag), .wrapped(let resultIV, let ciphertextAndTag):
                (iv, sealed) = (resultIV, ciphertextAndTag)
            default:
                throw StoreKindError("not a wrapping: \(result)")
            }
            guard
                case .unwrapped(let plaintext) = try await token.perform([
                    .unwrap(key: key, iv: iv, aad: aad, ciphertextAndTag: sealed)
                ])[0]
            else { throw StoreKindError("does not unwrap") }
            return plaintext
        }
    }

    /// A caller cancelled while it waits for a session (its deadline passed) gets `.cancelled`,
    /// which the key service answers as a cancellation: before, it was `.other`, an INTERNAL
    /// "HSM operation failed" in the server log for what was only an impatient caller.
    @Test
    func cancelledWhileQueuedIsACancellationNotATokenFailure() async throws {
        let setup = try await Setup.make("cancel")
        let held = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        // The pool's only session, held on the pool's thread until the test lets go.
        let holder = Task {
            try await setup.pool.withSession { _ in
                held.signal()
                release.wait()
            }
        }
        await Task.detached { held.wait() }.value
        let queued = Task { () async throws(TokenError) -> [TokenResult] in
            try await setup.token.perform([.generateAndWrap(key: setup.key, aad: [1])])
        }
        try await Task.sleep(for: .milliseconds(50))
        queued.cancel()
        let outcome = await queued.result
        release.signal()
        try await holder.value
        guard case .failure(let error) = outcome else {
            Issue.record("a cancelled wait for a session returned results")
            return
        }
        #expect((error as? TokenError)?.kind == .cancelled, "\(error)")
        // The pool is whole afterwards.
        guard case .generated = try await setup.token.perform([.generateAndWrap(key: setup.key, aad: [1])])[0] else {
            throw StoreKindError("no data key after the cancellation")
        }
    }

    /// The session dies at the first C_Encrypt of a generate: the pool retries the lease on a new
    /// session, which wraps the data key already drawn under a fresh IV.
    @Test
    func retriedLeaseDrawsTheDataKeyOnce() async throws {
        let setup = try await Setup.make("fault-once")
        defer { Task { await setup.pool.shutdown() } }
        let mark = setup.fault.traceMark()
        try setup.fault.setRules("C_Encrypt rv=CKR_SESSION_HANDLE_INVALID count=1")
        let results = try await setup.token.perform([.generateAndWrap(key: setup.key, aad: [1, 2])])
        try setup.fault.clearRules()
        guard case .generated(let plaintext, _, _) = results[0] else {
            Issue.record("generate failed: \(results[0])")
            return
        }
        #expect(setup.fault.calls(of: "C_Encrypt", since: mark).map(\.injected) == [true, false])
        // Every encryption attempt draws its own IV (the retry found its cached handle stale after
        // the new login, so it tried twice more), and the data key was drawn once: one
        // C_GenerateRandom more than C_EncryptInit.
        let encryptions = setup.fault.calls(of: "C_EncryptInit", since: mark).count
        #expect(encryptions >= 2)
        #expect(setup.fault.calls(of: "C_GenerateRandom", since: mark).count == encryptions + 1)
        #expect(try await setup.unwrap(results[0], aad: [1, 2]).copyBytes() == plaintext.copyBytes())
    }

    /// The third of five unwraps leaves its session with an active operation
    /// (CKR_BUFFER_TOO_SMALL): it fails alone, its session is closed, and the other four succeed,
    /// the last two on a new session (no CKR_OPERATION_ACTIVE).
    @Test
    func sessionLeftUnusableCostsOneOperation() async throws {
        let setup = try await Setup.make("fault-unusable")
        defer { Task { await setup.pool.shutdown() } }
        let wrapped = try await setup.token.perform(
            (0..<5).map { index in .generateAndWrap(key: setup.key, aad: [UInt8(index)]) })
        var unwraps: [TokenOperation] = []
        for (index, result) in wrapped.enumerated() {
            guard case .generated(_, let iv, let sealed) = result else { throw StoreKindError("\(result)") }
            unwraps.append(.unwrap(key: setup.key, iv: iv, aad: [UInt8(index)], ciphertextAndTag: sealed))
        }
        let discardedBefore = setup.pool.statistics.discarded
        let mark = setup.fault.traceMark()
        try setup.fault.setRules("C_Decrypt skip=2 count=1 rv=CKR_BUFFER_TOO_SMALL")
        let results = try await setup.token.perform(unwraps)
        try setup.fault.clearRules()
        for (index, result) in results.enumerated() {
            if index == 2 {
                guard case .failed(let error) = result else {
                    Issue.record("the faulty unwrap succeeded")
                    continue
                }
                #expect(error.kind == .other)
            } else {
                guard case .unwrapped(let plaintext) = result, case .generated(let expected, _, _) = wrapped[index]
                else {
                    Issue.record("unwrap \(index) failed: \(result)")
                    continue
                }
                #expect(plaintext.copyBytes() == expected.copyBytes())
            }
        }
        #expect(setup.pool.statistics.discarded == discardedBefore + 1)
        #expect(!setup.fault.calls(of: "C_DecryptInit", since: mark).contains { $0.returnValue == .operationActive })
    }

    /// The audit anchor's HMAC: a failure after C_SignInit fails that MAC only; the next one works.
    @Test
    func failedMACLeavesNoActiveOperation() async throws {
        let setup = try await Setup.make("fault-mac")
        defer { Task { await setup.pool.shutdown() } }
        let (id, created) = try await setup.token.prepareAuditKey(label: AuditAnchoring.keyLabel)
        #expect(created)
        let key = TokenKeyReference(id: id, label: AuditAnchoring.keyLabel)
        try setup.fault.setRules("C_Sign rv=CKR_BUFFER_TOO_SMALL count=1")
        let first = try await setup.token.perform([.mac(key: key, message: [1]), .mac(key: key, message: [1])])
        try setup.fault.clearRules()
        guard case .failed = first[0], case .mac(let mac) = first[1] else {
            Issue.record("unexpected results: \(first)")
            return
        }
        #expect(mac.count == 32)
        guard case .mac(let again) = try await setup.token.perform([.mac(key: key, message: [1])])[0] else {
            Issue.record("the MAC failed")
            return
        }
        #expect(again == mac)
    }
}
