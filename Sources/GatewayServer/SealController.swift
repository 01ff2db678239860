import Foundation
import GatewayConfig
import KeyHierarchy
import Logging
import PKCS11
import PKCS11KeyToken
import Sealing
import Synchronization

/// The gateway's seal: runs `SealStateMachine` and performs its actions on the session pool
/// (`resumeLogin` to unseal, `seal()` to drain and drop the login). In `auto` mode it only
/// reports "unsealed"; every seal call is refused.
///
/// `isSealed` is read on every request (the handler's gate), so it is a lock-free flag set
/// before a seal starts draining and after an unseal's login and checks succeeded.
final class SealController: Sendable {
    /// Where the gateway gets its PIN.
    let mode: UnsealMode
    private let pool: SessionPool
    private let token: PKCS11KeyToken
    private let logger: Logger
    /// Runs once after each successful unseal (the audit anchor's check), with the token usable.
    private let afterUnseal: @Sendable () async -> Void
    private let sealed: Atomic<Bool>
    /// Called after every change of `isSealed` (the server forgets cached readiness).
    private let observer = Mutex<(@Sendable () -> Void)?>(nil)
    /// The machine; nil in auto mode. Held only briefly, never across an await.
    private let machine: Mutex<SealStateMachine?>

    /// Why an unseal or seal call was refused: the client-safe refusal.
    typealias Refusal = UnsealRefusal

    /// A controller for `mode`; shamir mode reads the check file now (so a missing or damaged one
    /// stops the start) and starts sealed.
    init(
        mode: UnsealMode, pool: SessionPool, token: PKCS11KeyToken, logger: Logger,
        afterUnseal: @escaping @Sendable () async -> Void
    ) throws(GatewayStartupError) {
        self.mode = mode
        self.pool = pool
        self.token = token
        self.logger = logger
        self.afterUnseal = afterUnseal
        switch mode {
        case .auto:
            self.machine = Mutex(nil)
            self.sealed = Atomic(false)
        case .shamir(let checkFile):
            let check: SealCheck
            do {
                check = try Self.readCheck(checkFile)
            } catch {
                throw GatewayStartupError(.configuration, "hsm.unseal_check_file \(checkFile): \(error.message)")
            }
            self.machine = Mutex(SealStateMachine(check: check))
            self.sealed = Atomic(true)
        }
    }

    /// Sets what to call after every change of `isSealed`.
    func observeChanges(_ body: @escaping @Sendable () -> Void) {
        observer.withLock { $0 = body }
    }

    private func setSealed(_ value: Bool) {
        sealed.store(value, ordering: .releasing)
        observer.withLock { $0 }?()
    }

    /// Whether key operations are refused.
    var isSealed: Bool { sealed.load(ordering: .acquiring) }

    /// The progress for ServerInfo, `/readyz` and the seal calls' answers.
    var progress: SealProgress {
        machine.withLock { machine in
            machine?.progress ?? SealProgress(sealed: false, submitted: 0, threshold: 0, shareCount: 0)
        }
    }

    /// Takes one share (its text form). On the K-th, verified share: logs in with the rebuilt PIN
    /// (`resumeLogin`), checks the token can do what the gateway needs, then admits key
    /// operations. The PIN is not kept here: the pool holds it until the next seal.
    func submit(shareText: SecretBytes) async throws(Refusal) -> SealProgress {
        guard case .shamir(let checkFile) = mode else {
            throw Refusal(.notSealed, "the gateway runs with hsm.unseal: auto; there is nothing to unseal")
        }
        let share: SecretShare
        do {
            share = try shareText.withUnsafeBytes { (text) throws(SecretSharingError) in try SecretShare(text: text) }
        } catch {
            throw Refusal(parsing: error)
        }
        // A fresh unseal reads the check file again, so `operator rekey` takes effect without a
        // restart (an unreadable file leaves the one read before).
        let reloaded = try? Self.readCheck(checkFile)
        let outcome = try machine.withLock { (machine) throws(Refusal) -> SealStateMachine.SubmitOutcome in
            if case .sealed = machine!.state, let reloaded, reloaded != machine!.check {
                machine = SealStateMachine(check: reloaded)
            }
            return try machine!.submit(share)
        }
        switch outcome {
        case .accepted(let progress):
            logger.notice(
                "unseal: share accepted",
                metadata: ["submitted": "\(progress.submitted)", "threshold": "\(progress.threshold)"])
            return progress
        case .logIn(let pin):
            return try await logIn(pin)
        }
    }

    private func logIn(_ pin: SecretBytes) async throws(Refusal) -> SealProgress {
        do {
            try await pool.resumeLogin(pin: pin)
            try await token.prepareProbeKey()
            try await token.checkHealth()
        } catch {
            machine.withLock { $0!.loginFailed() }
            await pool.seal()
            logger.error(
                "unseal: the rebuilt PIN was verified but the token did not serve", metadata: ["error": "\(error)"])
            throw Refusal(
                .verificationFailed,
                "the shares were accepted but the HSM did not serve with the rebuilt PIN; every share was discarded "
                    + "(see the gateway's log)")
        }
        let kept = machine.withLock { $0!.loginSucceeded() }
        guard kept else {
            // A seal came in during the login: it wins.
            await pool.seal()
            machine.withLock { $0!.sealCompleted() }
            return progress
        }
        await afterUnseal()
        setSealed(false)
        logger.notice("unsealed: key operations are served")
        return progress
    }

    /// Discards the shares given so far; returns whether there were any.
    func reset() throws(Refusal) -> (discarded: Bool, progress: SealProgress) {
        guard case .shamir = mode else {
            throw Refusal(.notSealed, "the gateway runs with hsm.unseal: auto; there is nothing to reset")
        }
        let discarded = machine.withLock { $0!.reset() }
        if discarded { logger.notice("unseal: the shares given so far were discarded") }
        return (discarded, progress)
    }

    /// Seals: refuses new key operations at once, waits for those holding an HSM session, closes
    /// every session (the token then holds no login) and drops the PIN.
    func seal() async throws(Refusal) -> SealProgress {
        guard case .shamir = mode else {
            throw Refusal(
                .notSealed,
                "the gateway runs with hsm.unseal: auto: it would log in again at the next start; use shamir")
        }
        setSealed(true)
        let action = machine.withLock { $0!.seal() }
        if action == .drainAndLogOut {
            await pool.seal()
            machine.withLock { $0!.sealCompleted() }
            logger.notice("sealed: the HSM login was dropped; key operations are refused until an unseal")
        }
        return progress
    }

    private static func readCheck(_ path: String) throws(SecretSharingError) -> SealCheck {
        // At most one byte past the limit is read, so a wrong path (a log, a device) costs nothing.
        guard let handle = FileHandle(forReadingAtPath: path),
            let data = try? handle.read(upToCount: SealCheck.maximumFileSize + 1)
        else {
            throw SecretSharingError(.malformedShare, "cannot read the check file")
        }
        try? handle.close()
        return try SealCheck(encoded: Array(data))
    }
}
