import SecretMemory
import Testing

@testable import Sealing

/// Transcripts of the seal state machine: shares in, actions out.
@Suite("Seal state machine")
struct SealStateMachineTests {
    struct Fixture {
        let pin: SecretBytes
        let shares: [SecretShare]
        var machine: SealStateMachine

        init(shareCount: Int = 5, threshold: Int = 3) throws {
            pin = secret(Array("0123456789abcdef0123456789abcdef".utf8))
            shares = try SecretSharing.split(pin, shareCount: shareCount, threshold: threshold)
            machine = SealStateMachine(check: SealCheck(secret: pin, shares: shares))
        }
    }

    func expectProgress(_ outcome: SealStateMachine.SubmitOutcome, submitted: Int) {
        guard case .accepted(let progress) = outcome else {
            Issue.record("expected progress, got \(outcome)")
            return
        }
        #expect(progress.sealed && progress.submitted == submitted && progress.threshold == 3)
    }

    @Test("Starts sealed: no key operations, 0 of 3")
    func startsSealed() throws {
        let fixture = try Fixture()
        #expect(!fixture.machine.admitsKeyOperations)
        #expect(fixture.machine.progress == SealProgress(sealed: true, submitted: 0, threshold: 3, shareCount: 5))
    }

    @Test("K shares: progress, then the PIN to log in with, then unsealed")
    func unseal() throws {
        var fixture = try Fixture()
        expectProgress(try fixture.machine.submit(fixture.shares[3]), submitted: 1)
        expectProgress(try fixture.machine.submit(fixture.shares[0]), submitted: 2)
        guard case .logIn(let pin) = try fixture.machine.submit(fixture.shares[4]) else {
            Issue.record("expected a login")
            return
        }
        #expect(fixture.pin.constantTimeEquals(pin.copyBytes()))
        #expect(!fixture.machine.admitsKeyOperations)
        let loginKept1 = fixture.machine.loginSucceeded()
        #expect(loginKept1)
        #expect(fixture.machine.admitsKeyOperations)
        #expect(fixture.machine.progress.sealed == false)
        let error = #expect(throws: UnsealRefusal.self) { try fixture.machine.submit(fixture.shares[1]) }
        #expect(error?.code == .notSealed)
    }

    @Test("A duplicate share is refused and changes nothing")
    func duplicate() throws {
        var fixture = try Fixture()
        _ = try fixture.machine.submit(fixture.shares[1])
        let error = #expect(throws: UnsealRefusal.self) { try fixture.machine.submit(fixture.shares[1]) }
        #expect(error?.code == .duplicateShare)
        #expect(fixture.machine.progress.submitted == 1)
    }

    @Test("A share of another split is refused and changes nothing")
    func foreign() throws {
        var fixture = try Fixture()
        _ = try fixture.machine.submit(fixture.shares[0])
        let other = try SecretSharing.split(fixture.pin, shareCount: 5, threshold: 3)
        let error = #expect(throws: UnsealRefusal.self) { try fixture.machine.submit(other[1]) }
        #expect(error?.code == .foreignShare)
        #expect(fixture.machine.progress.submitted == 1)
        // The message names no other share.
        #expect(!(error?.message.contains("1") ?? true))
    }

    @Test("An altered share (valid checksum, wrong y) fails verification: everything discarded, no login")
    func alteredShare() throws {
        var fixture = try Fixture()
        // Re-encode share 2 with one y byte flipped, as an attacker with the format would.
        var y = yBytes(fixture.shares[2])
        y[0] ^= 0x01
        let altered = SecretShare(
            splitID: fixture.shares[2].splitID, threshold: 3, x: 3, y: SecretBytes(copying: y)
        )
        let reparsed = try altered.encoded.withUnsafeBytes { try SecretShare(encoded: $0) }
        _ = try fixture.machine.submit(fixture.shares[0])
        _ = try fixture.machine.submit(fixture.shares[1])
        let error = #expect(throws: UnsealRefusal.self) { try fixture.machine.submit(reparsed) }
        #expect(error?.code == .verificationFailed)
        #expect(fixture.machine.progress.submitted == 0 && fixture.machine.progress.sealed)
        // A correct set still works afterwards.
        _ = try fixture.machine.submit(fixture.shares[0])
        _ = try fixture.machine.submit(fixture.shares[1])
        guard case .logIn = try fixture.machine.submit(fixture.shares[2]) else {
            Issue.record("expected a login")
            return
        }
    }

    @Test("Reset discards a half-finished unseal")
    func reset() throws {
        var fixture = try Fixture()
        let discarded2 = fixture.machine.reset()
        #expect(!discarded2)
        _ = try fixture.machine.submit(fixture.shares[0])
        _ = try fixture.machine.submit(fixture.shares[1])
        let discarded3 = fixture.machine.reset()
        #expect(discarded3)
        #expect(fixture.machine.progress.submitted == 0)
        // The same shares may be given again.
        expectProgress(try fixture.machine.submit(fixture.shares[1]), submitted: 1)
    }

    @Test("A failed login seals again")
    func loginFailed() throws {
        var fixture = try Fixture(threshold: 2)
        _ = try fixture.machine.submit(fixture.shares[0])
        guard case .logIn = try fixture.machine.submit(fixture.shares[1]) else {
            Issue.record("expected a login")
            return
        }
        let error = #expect(throws: UnsealRefusal.self) { try fixture.machine.submit(fixture.shares[2]) }
        #expect(error?.code == .busy)
        fixture.machine.loginFailed()
        #expect(fixture.machine.progress == SealProgress(sealed: true, submitted: 0, threshold: 2, shareCount: 5))
    }

    @Test("Seal: unsealed drains and logs out; sealed and half-unsealed need nothing")
    func seal() throws {
        var fixture = try Fixture(threshold: 2)
        let sealAction4 = fixture.machine.seal()
        #expect(sealAction4 == .none)
        _ = try fixture.machine.submit(fixture.shares[0])
        let sealAction5 = fixture.machine.seal()
        #expect(sealAction5 == .none)
        #expect(fixture.machine.progress.submitted == 0)
        _ = try fixture.machine.submit(fixture.shares[0])
        _ = try fixture.machine.submit(fixture.shares[1])
        let loginKept6 = fixture.machine.loginSucceeded()
        #expect(loginKept6)
        let sealAction7 = fixture.machine.seal()
        #expect(sealAction7 == .drainAndLogOut)
        #expect(!fixture.machine.admitsKeyOperations)
        let error = #expect(throws: UnsealRefusal.self) { try fixture.machine.submit(fixture.shares[0]) }
        #expect(error?.code == .busy)
        fixture.machine.sealCompleted()
        #expect(fixture.machine.progress == SealProgress(sealed: true, submitted: 0, threshold: 2, shareCount: 5))
    }

    @Test("A seal during the login wins: the caller logs out again at once")
    func sealDuringLogin() throws {
        var fixture = try Fixture(threshold: 2)
        _ = try fixture.machine.submit(fixture.shares[0])
        _ = try fixture.machine.submit(fixture.shares[1])
        let sealAction8 = fixture.machine.seal()
        #expect(sealAction8 == .drainAndLogOut)
        let loginKept9 = fixture.machine.loginSucceeded()
        #expect(!loginKept9)
        #expect(!fixture.machine.admitsKeyOperations)
        fixture.machine.sealCompleted()
        #expect(fixture.machine.progress.sealed)
    }
}
