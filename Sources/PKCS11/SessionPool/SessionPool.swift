internal import CPKCS11Shim
import Logging
import NIOPosix
import Synchronization

/// Settings of a `SessionPool`. Each limit protects the token or the callers.
public struct SessionPoolConfiguration: Sendable {
    /// The most sessions the pool keeps open. The pool also stays within the token's
    /// `ulMaxRwSessionCount` (or `ulMaxSessionCount` for read-only pools). HSMs allow a few dozen
    /// to a few thousand sessions across all clients; the gateway needs about one per core.
    public var maximumSessions: Int = 8
    /// How long a task waits for a free session before failing with `sessionAcquireTimeout`:
    /// bounded waits turn an overloaded or hung token into errors instead of a pile-up.
    public var acquireTimeout: Duration = .seconds(5)
    /// The most tasks waiting at once; beyond it callers fail at once with
    /// `sessionPoolQueueFull` instead of queueing without bound.
    public var maximumWaiters: Int = 4096
    /// How often one operation is tried when its session turns out to be unusable (closed
    /// underneath, token removed, login lost): the first try plus replacements.
    public var maximumAttempts: Int = 2
    /// Read-write sessions (needed to create or destroy token objects).
    public var readWrite: Bool = true
    /// The least time between two attempts to reach a token found unreachable, each made only
    /// when a request asks for a session (the gateway's readiness sampler asks every second, so
    /// recovery goes on without traffic). Short enough that a token that comes back serves again
    /// within about a second; long enough that a dead HSM, whose client may re-initialise on
    /// each attempt, is not hammered, and that the requests in between fail at once instead of
    /// each waiting for an attempt.
    public var retryInterval: Duration = .milliseconds(500)

    public init() {}
}

/// A bounded pool of logged-in PKCS#11 sessions on one token, the way servers use the token.
///
/// `withSession` leases a session to one task at a time and runs the task's closure on the
/// pool's own threads (a `NIOThreadPool`), so blocking PKCS#11 calls never run on an event loop or
/// Swift's cooperative pool. A task waits at most `acquireTimeout` for a session. A session that
/// fails with `CKR_SESSION_HANDLE_INVALID`, `CKR_SESSION_CLOSED` or `CKR_USER_NOT_LOGGED_IN` is
/// closed and replaced by a new session (logged in again when the token forgot the login), and the
/// operation is tried again on it. (`CKR_DEVICE_REMOVED` and `CKR_TOKEN_NOT_PRESENT` say more than
/// that: the pool resets, below.)
///
/// A session on which an operation may still be active (`PKCS11Error.leavesSessionUnusable`, or
/// `Session.isMarkedUnusable` even when the closure caught the error) is closed alone and replaced
/// on demand; the error goes to the caller. `CKR_OPERATION_ACTIVE` from an `*Init` call (a session
/// some module left dirty) closes that session and runs the closure once more on another.
///
/// When the token as a whole cannot be reached (`PKCS11Error.isTokenUnreachable`: a device error,
/// the token removed or not present, its slot or its label gone, the module not initialised), on
/// opening a session or in any call of a leased one (even one the caller caught), the pool resets.
/// An answer that only may mean it (`PKCS11Error.castsDoubtOnToken`: `CKR_GENERAL_ERROR`, an
/// unknown object handle, which is what SoftHSM2 answers once its token directory is gone) is
/// checked with one `C_GetTokenInfo` (`Session.confirmTokenReachable()`) before the lease or the
/// open ends; when the token does not answer, that counts as unreachable too. To reset, the pool
/// stops leasing, lets leased sessions come back (their calls fail fast), closes every session,
/// then finds the token's slot again by label, opens a session and logs in once. When that fails
/// and the pool's module is its own (`PKCS11Module.ownsInitialization`), it re-initialises the
/// module (`C_Finalize`, `C_Initialize`) and tries once more. Requests wait for the outcome
/// within their acquire timeout; once an attempt failed, they fail at once with
/// `PKCS11Error.Code.tokenUnreachable`, and a new attempt starts with the first request that
/// comes `retryInterval` or more after the last one failed. `epoch` counts the attempts: a
/// session never outlives the epoch it was opened in, so object handles cached in an earlier
/// epoch must be found again. A refused PIN during a reset is as final as at any other time.
/// A session whose `C_CloseSession` the token did not confirm is closed again at the next attempt
/// and at shutdown (`Statistics.unconfirmedCloses`), unless `C_Finalize` closed it meanwhile.
///
/// Logins happen one at a time. When `C_Login` answers that the PIN is wrong, locked, expired or
/// malformed, the pool stops logging in altogether ("login refused"): every request fails at once
/// with `PKCS11Error.Code.loginRefused`, with no PKCS#11 call, until `resumeLogin(pin:)` supplies
/// a PIN (or the process restarts), so ordinary traffic can never burn the token's failed-login
/// counter.
///
/// The decisions are made by `SessionPoolStateMachine`; this class performs its actions.
public final class SessionPool: Sendable {
    /// The pool's module.
    public let module: PKCS11Module
    /// The token label the pool was opened for; used to find the slot again if it changes.
    public let tokenLabel: String?
    /// The effective maximum: the configured one bounded by the token's session limit.
    public let maximumSessions: Int
    /// The configuration the pool was created with.
    public let configuration: SessionPoolConfiguration

    /// The PIN, behind the lock that makes logins one at a time (held across `C_Login`, on the
    /// pool's threads only): a burst of session opens costs one login attempt, not one each.
    private let login: Mutex<SecretBytes?>
    private let threadPool: NIOThreadPool
    private let logger: Logger
    private let state: Mutex<RunnerState>

    private struct Lease: Sendable {
        let id: SessionPoolStateMachine.SessionID
        let handle: CK_SESSION_HANDLE
        let slot: SlotID
        /// The pool's epoch when the session was opened.
        let epoch: Int
    }

    /// A session the pool closed whose close the token did not confirm (it answered as a token
    /// that cannot be reached, or with an error): the token may still hold it, and with it one of
    /// its sessions and the login.
    private struct UnconfirmedClose: Sendable {
        let handle: CK_SESSION_HANDLE
        let slot: SlotID
        /// `PKCS11Module.epoch` when it was closed: a later `C_Finalize` closed it for good.
        let moduleEpoch: Int
    }

    /// The most sessions remembered whose close the token did not confirm (see
    /// `Statistics.unconfirmedCloses`); beyond it the oldest are forgotten. Far above what a pool
    /// of `maximumSessions` leaves behind in one outage, small enough to cost nothing.
    public static let maximumUnconfirmedCloses = 1024

    private struct RunnerState: ~Copyable {
        var machine: SessionPoolStateMachine
        var slot: SlotID
        var nextWaiterID = 0
        var handles: [SessionPoolStateMachine.SessionID: (handle: CK_SESSION_HANDLE, slot: SlotID, epoch: Int)] = [:]
        var continuations: [SessionPoolStateMachine.WaiterID: CheckedContinuation<Lease, any Error>] = [:]
        var timers: [SessionPoolStateMachine.WaiterID: Task<Void, Never>] = [:]
        /// Why the last session open failed, for the waiters failed because of it.
        var lastOpenError: (any Error)?
        /// Why the pool refuses to log in (set with the machine's `loginRefused()`).
        var loginRefusal: PKCS11Error?
        /// Why the last reset attempt failed, for the requests failed because of it.
        var lastResetError: PKCS11Error?
        /// When the token was found unreachable, while it is.
        var unreachableSince: ContinuousClock.Instant?
        var retryTimer: Task<Void, Never>?
        /// Sessions whose `C_CloseSession` the token did not confirm; see `closeUnconfirmedSessions()`.
        var unconfirmedCloses: [UnconfirmedClose] = []
        var shutdownWaiters: [CheckedContinuation<Void, Never>] = []
        var shutdownCompleted = false
        /// `seal()` calls waiting for the last session to close.
        var sealWaiters: [CheckedContinuation<Void, Never>] = []
        /// Sealed on purpose (`sealed(...)`, `seal()`), not refused by the token; until
        /// `resumeLogin(pin:)`.
        var sealed = false
    }

    /// Opens a pool on the token labelled `tokenLabel` and opens and logs in one session at once,
    /// so a wrong PIN or a missing token fails here rather than on first use.
    public convenience init(
        module: PKCS11Module,
        tokenLabel: String,
        pin: SecretBytes?,
        configuration: SessionPoolConfiguration = SessionPoolConfiguration(),
        logger: Logger = Logger(label: "hsm-gateway.pkcs11.pool")
    ) async throws {
        let slot = try module.slot(tokenLabel: tokenLabel)
        try await self.init(
            module: module, slot: slot, tokenLabel: tokenLabel, pin: pin, configuration: configuration, logger: logger)
    }

    /// Opens a pool that starts sealed: no session is opened and every request fails at once with
    /// `loginRefused` (detail "sealed") until `resumeLogin(pin:)` gives it the PIN.
    public static func sealed(
        module: PKCS11Module,
        tokenLabel: String,
        configuration: SessionPoolConfiguration = SessionPoolConfiguration(),
        logger: Logger = Logger(label: "hsm-gateway.pkcs11.pool")
    ) async throws -> SessionPool {
        let slot = try module.slot(tokenLabel: tokenLabel)
        return try await SessionPool(
            module: module, slot: slot, tokenLabel: tokenLabel, pin: nil, startSealed: true,
            configuration: configuration, logger: logger)
    }

    /// Opens a pool on `slot` (`tokenLabel`, when given, lets the pool find the token again after
    /// its slot number changes).
    public init(
        module: PKCS11Module,
        slot: SlotID,
        tokenLabel: String? = nil,
        pin: SecretBytes?,
        startSealed: Bool = false,
        configuration: SessionPoolConfiguration = SessionPoolConfiguration(),
        logger: Logger = Logger(label: "hsm-gateway.pkcs11.pool")
    ) async throws {
        guard configuration.maximumSessions >= 1, configuration.maximumAttempts >= 1,
            configuration.maximumWaiters >= 0, configuration.acquireTimeout > .zero
        else {
            throw PKCS11Error(code: .invalidArgument, detail: "session pool configuration out of range")
        }
        let token = try module.tokenInfo(slot)
        let tokenLimit = configuration.readWrite ? token.maximumReadWriteSessionCount : token.maximumSessionCount
        let maximum = min(configuration.maximumSessions, tokenLimit.count.map { max($0, 1) } ?? .max)

        self.module = module
        self.tokenLabel = tokenLabel
        self.maximumSessions = maximum
        self.configuration = configuration
        self.login = Mutex(pin)
        self.logger = logger
        self.threadPool = NIOThreadPool(numberOfThreads: maximum)
        self.state = Mutex(
            RunnerState(
                machine: SessionPoolStateMachine(
                    maximumSessions: maximum, maximumWaiters: configuration.maximumWaiters),
                slot: slot
            )
        )
        threadPool.start()
        if startSealed {
            // No session exists yet, so entering the state has nothing to close or fail.
            state.withLock { state in
                state.loginRefusal = Self.sealedRefusal
                state.sealed = true
                _ = state.machine.sealed()
            }
            return
        }
        do {
            try await withSession { _ in }
        } catch {
            await shutdown()
            throw error
        }
    }

    /// Counts of sessions by state and of waiting tasks, for metrics.
    public struct Statistics: Hashable, Sendable {
        public let maximumSessions: Int
        public let opening: Int
        public let idle: Int
        public let leased: Int
        public let closing: Int
        public let waiting: Int
        /// Sessions discarded after failing (each replaced on demand).
        public let discarded: Int
        /// Failed attempts to open (or log in) a session.
        public let openFailures: Int
        /// True while the pool refuses every request because the token refused the PIN (not
        /// while it is sealed on purpose: see `sealed`).
        public let loginRefused: Bool
        /// True while the pool is sealed (`sealed(...)` or `seal()`, until `resumeLogin(pin:)`):
        /// it has no PIN and refuses every request.
        public let sealed: Bool
        /// True from the moment the token was found unreachable until the pool reached it again
        /// (while it closes its sessions, tries to reach the token, and waits between attempts).
        public let tokenUnreachable: Bool
        /// Reset attempts so far (`SessionPool.epoch`).
        public let epoch: Int
        /// Sessions the pool closed whose close the token did not confirm (it answered as a token
        /// that cannot be reached): the token may still hold them. The pool closes them again at
        /// its next reset attempt and at shutdown, and forgets them once confirmed or once the
        /// module was re-initialised (`C_Finalize` closes every session). Zero when nothing leaked.
        public let unconfirmedCloses: Int
    }

    /// The pool's current counts.
    public var statistics: Statistics {
        let (s, unconfirmedCloses, sealed) = state.withLock {
            ($0.machine.statistics, $0.unconfirmedCloses.count, $0.sealed)
        }
        return Statistics(
            maximumSessions: maximumSessions,
            opening: s.opening,
            idle: s.idle,
            leased: s.leased,
            closing: s.closing,
            waiting: s.waiting,
            discarded: s.discarded,
            openFailures: s.openFailures,
            loginRefused: s.loginRefused && !sealed,
            sealed: sealed,
            tokenUnreachable: s.tokenUnreachable,
            epoch: s.epoch,
            unconfirmedCloses: unconfirmedCloses
        )
    }

    /// How many times the pool has begun a reset: each one starts with every session closed and
    /// may re-initialise the module, after which object handles may name other objects. A
    /// session never outlives its epoch, so inside `withSession` this number is the leased
    /// session's epoch; a handle cached under another epoch must be found again.
    public var epoch: Int { state.withLock { $0.machine.epoch } }

    /// The error every request fails with while the token refuses the PIN, else nil.
    public var loginRefusal: PKCS11Error? { state.withLock { $0.loginRefusal } }

    /// Leases a session, runs `body` with it on the pool's threads and returns the session.
    ///
    /// When the session proves unusable (`PKCS11Error.invalidatesSession`), it is discarded with
    /// the idle ones and `body` runs again on another session, up to `maximumAttempts` times in
    /// all; likewise, once, when an `*Init` call finds the session dirty (`foundSessionDirty`).
    /// `body` must therefore be safe to repeat (PKCS#11 calls that failed this way had no effect).
    /// When `body` leaves its session unusable (`leavesSessionUnusable`, or
    /// `Session.isMarkedUnusable`), that session alone is closed and the outcome goes to the
    /// caller as it is.
    ///
    /// When a call of `body` says the token cannot be reached (`Session.sawTokenUnreachable`),
    /// the pool resets (see the type's documentation) and `body` is not run again; its error
    /// comes back as `tokenUnreachable` (its function and return value kept), or its result when
    /// it caught the error itself.
    ///
    /// - Throws: `sessionAcquireTimeout`, `sessionPoolQueueFull`, `sessionPoolShutDown`,
    ///   `loginRefused`, `tokenUnreachable`, the error that stopped a session from opening, or
    ///   what `body` throws.
    public func withSession<T: Sendable>(_ body: @escaping @Sendable (borrowing Session) throws -> T) async throws -> T
    {
        var attempt = 1
        while true {
            let lease = try await acquire()
            let module = self.module
            let outcome: Result<T, any Error>
            let leftUnusable: Bool
            let sawTokenUnreachable: Bool
            do {
                (outcome, leftUnusable, sawTokenUnreachable) = try await threadPool.runIfActive {
                    let session = Session(module: module, handle: lease.handle, slot: lease.slot, epoch: lease.epoch)
                    let outcome = Result { try body(session) }
                    if session.sawAnswerInDoubt && !session.sawTokenUnreachable {
                        // An answer that may mean the token is gone: ask the token before the
                        // lease ends (this marks the session when it does not answer).
                        try? session.confirmTokenReachable()
                    }
                    return (outcome, session.isMarkedUnusable, session.sawTokenUnreachable)
                }
            } catch {
                // The thread pool refused the work (shutdown or cancellation): nothing ran.
                release(lease, reusable: true)
                throw error
            }
            let failedUnreachable: PKCS11Error? =
                if case .failure(let error as PKCS11Error) = outcome, error.isTokenUnreachable { error } else { nil }
            if sawTokenUnreachable || failedUnreachable != nil {
                let effects = state.withLock { apply($0.machine.tokenUnreachable(releasing: lease.id), to: &$0) }
                perform(effects)
                if let failedUnreachable { throw failedUnreachable.asTokenUnreachable() }
                if case .failure(let error as PKCS11Error) = outcome {
                    // An answer in doubt, and then the token did not answer: it is gone.
                    throw error.asTokenUnreachable(detail: "the token then did not answer C_GetTokenInfo")
                }
                return try outcome.get()
            }
            switch outcome {
            case .success(let value):
                if leftUnusable {
                    // `body` caught the error itself; the session still must not be reused.
                    discard(lease, error: nil)
                } else {
                    release(lease, reusable: true)
                }
                return value
            case .failure(let error as PKCS11Error) where error.invalidatesSession:
                release(lease, reusable: false)
                logger.warning(
                    "discarding unusable PKCS#11 session",
                    metadata: ["error": "\(error)", "attempt": "\(attempt)"]
                )
                guard attempt < configuration.maximumAttempts else { throw error }
                attempt += 1
            case .failure(let error as PKCS11Error) where error.foundSessionDirty:
                discard(lease, error: error)
                guard attempt < configuration.maximumAttempts else { throw error }
                attempt += 1
            case .failure(let error):
                if leftUnusable || (error as? PKCS11Error)?.leavesSessionUnusable == true {
                    discard(lease, error: error)
                } else {
                    release(lease, reusable: true)
                }
                throw error
            }
        }
    }

    /// Leaves the login-refused state with `pin` (the PIN the token now expects), and logs in at
    /// once with it to confirm: one `C_Login` attempt. When the pool is not refusing, `pin`
    /// replaces the PIN for the next login (the token may still hold the current one).
    ///
    /// - Throws: `loginRefused` when the token refuses `pin` too (the pool refuses again),
    ///   `sessionPoolShutDown`, or why no session could be opened.
    public func resumeLogin(pin: SecretBytes) async throws {
        // The login lock may be held across a slow C_Login: take it on the pool's threads, never
        // on Swift's cooperative pool.
        try await threadPool.runIfActive { [self] in
            login.withLock { current in
                current = pin
                let effects = state.withLock { state -> Effects in
                    state.loginRefusal = nil
                    state.sealed = false
                    return apply(state.machine.loginResumed(), to: &state)
                }
                perform(effects)
            }
        }
        logger.notice("PKCS#11 login resumed with a new PIN")
        try await withSession { _ in }
    }

    /// What requests fail with while the pool is sealed.
    static let sealedRefusal = PKCS11Error(
        code: .loginRefused, function: .login, detail: "sealed: no PIN until the gateway is unsealed")

    /// Seals the pool: forgets the PIN (its buffer is zeroed once the caller's copies are gone
    /// too), fails waiting tasks and every new request at once with `loginRefused` ("sealed"),
    /// closes idle sessions now and leased ones when their work returns (it finishes, or fails as
    /// the token decides), and returns once no session is left, so the token holds no login of
    /// this process. `resumeLogin(pin:)` unseals. No PKCS#11 call is made with the PIN meanwhile.
    public func seal() async {
        try? await threadPool.runIfActive { [self] in
            // Under the login lock: a login in progress completes first, none starts after.
            login.withLock { current in
                current = nil
                let effects = state.withLock { state -> Effects in
                    state.loginRefusal = Self.sealedRefusal
                    state.sealed = true
                    return apply(state.machine.sealed(), to: &state)
                }
                perform(effects)
            }
        }
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let done = state.withLock { state -> Bool in
                guard !Self.holdsSessions(state.machine) else {
                    state.sealWaiters.append(continuation)
                    return false
                }
                return true
            }
            if done { continuation.resume() }
        }
        logger.notice("PKCS#11 pool sealed: PIN dropped, every session closed")
    }

    /// Whether the pool is sealed or refusing the PIN (requests fail at once).
    public var isRefusingLogin: Bool { state.withLock { $0.machine.mode == .loginRefused } }

    /// Whether the pool is sealed on purpose (`sealed(...)`, `seal()`), until `resumeLogin(pin:)`.
    public var isSealed: Bool { state.withLock { $0.sealed } }

    private static func holdsSessions(_ machine: borrowing SessionPoolStateMachine) -> Bool {
        let statistics = machine.statistics
        return statistics.opening + statistics.idle + statistics.leased + statistics.closing > 0
    }

    /// Stops leasing, fails waiting tasks with `sessionPoolShutDown`, waits for leased sessions to
    /// come back, closes every session and stops the pool's threads. Call it before
    /// `PKCS11Module.finalize()`.
    public func shutdown() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let effects = state.withLock { state -> Effects in
                if state.shutdownCompleted {
                    return Effects(resumeShutdown: [continuation])
                }
                state.shutdownWaiters.append(continuation)
                var effects = apply(state.machine.shutdown(), to: &state)
                if let timer = state.retryTimer {
                    effects.cancelTimers.append(timer)
                    state.retryTimer = nil
                }
                return effects
            }
            perform(effects)
        }
        // Every session is closed; those the token did not confirm get one more try.
        try? await threadPool.runIfActive { [self] in closeUnconfirmedSessions() }
        try? await threadPool.shutdownGracefully()
    }

    // MARK: - Acquire and release

    private func acquire() async throws -> Lease {
        let waiter = state.withLock { state in
            defer { state.nextWaiterID += 1 }
            return state.nextWaiterID
        }
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Lease, any Error>) in
                let effects = state.withLock { state -> Effects in
                    state.continuations[waiter] = continuation
                    return apply(state.machine.leaseRequested(waiter), to: &state)
                }
                perform(effects)
                // A cancellation that arrived before the waiter was queued found nothing to cancel.
                if Task.isCancelled {
                    perform(state.withLock { apply($0.machine.waiterCancelled(waiter), to: &$0) })
                }
            }
        } onCancel: {
            let effects = state.withLock { apply($0.machine.waiterCancelled(waiter), to: &$0) }
            perform(effects)
        }
    }

    private func release(_ lease: Lease, reusable: Bool) {
        let effects = state.withLock { apply($0.machine.sessionReleased(lease.id, reusable: reusable), to: &$0) }
        perform(effects)
    }

    /// Closes this session only (an operation may still be active on it); the others stay.
    private func discard(_ lease: Lease, error: (any Error)?) {
        logger.warning(
            "closing a PKCS#11 session left unusable by a failed operation",
            metadata: ["error": "\(error.map { "\($0)" } ?? "caught by the caller")"]
        )
        let effects = state.withLock { apply($0.machine.sessionDiscarded(lease.id), to: &$0) }
        perform(effects)
    }

    // MARK: - Performing actions

    /// What to do outside the lock once the machine has decided.
    private struct Effects: ~Copyable {
        var resume: [(CheckedContinuation<Lease, any Error>, Result<Lease, any Error>)] = []
        var cancelTimers: [Task<Void, Never>] = []
        var startTimer: SessionPoolStateMachine.WaiterID?
        var open: (id: SessionPoolStateMachine.SessionID, slot: SlotID, reset: Bool)?
        var close: [(id: SessionPoolStateMachine.SessionID, handle: CK_SESSION_HANDLE, slot: SlotID)] = []
        var resumeShutdown: [CheckedContinuation<Void, Never>] = []
        /// `seal()` calls to return: the pool is sealed and holds no session.
        var resumeSeal: [CheckedContinuation<Void, Never>] = []
        /// The token was just found unreachable (true) or reached again (false), to log once.
        var reachabilityChanged: (unreachable: Bool, after: Duration)?
        /// The first reset attempt of an outage failed (logged as an error; later ones quietly).
        var firstResetFailure = false
    }

    /// Turns an action into effects, updating the runner's bookkeeping; runs under the lock.
    private func apply(_ action: SessionPoolStateMachine.Action, to state: inout RunnerState) -> Effects {
        var effects = Effects()
        switch action.waiter {
        case .none:
            break
        case .lease(let session, let waiter):
            if let continuation = state.continuations.removeValue(forKey: waiter), let entry = state.handles[session] {
                effects.resume.append(
                    (
                        continuation,
                        .success(Lease(id: session, handle: entry.handle, slot: entry.slot, epoch: entry.epoch))
                    ))
            }
            if let timer = state.timers.removeValue(forKey: waiter) {
                effects.cancelTimers.append(timer)
            }
        case .enqueued(let waiter):
            effects.startTimer = waiter
        case .fail(let waiters, let failure):
            for waiter in waiters {
                if let continuation = state.continuations.removeValue(forKey: waiter) {
                    effects.resume.append((continuation, .failure(error(for: failure, state: state))))
                }
                if let timer = state.timers.removeValue(forKey: waiter) {
                    effects.cancelTimers.append(timer)
                }
            }
        }
        switch action.session {
        case .none:
            break
        case .open(let session):
            effects.open = (session, state.slot, false)
        case .reset(let session):
            effects.open = (session, state.slot, true)
        case .close(let sessions):
            for session in sessions {
                if let entry = state.handles.removeValue(forKey: session) {
                    effects.close.append((session, entry.handle, entry.slot))
                }
            }
        }
        if !state.sealWaiters.isEmpty, state.machine.mode == .loginRefused, !Self.holdsSessions(state.machine) {
            effects.resumeSeal = state.sealWaiters
            state.sealWaiters.removeAll()
        }
        if action.shutdownCompleted {
            state.shutdownCompleted = true
            effects.resumeShutdown = state.shutdownWaiters
            state.shutdownWaiters.removeAll()
        }
        if action.startRetryTimer {
            let interval = configuration.retryInterval
            state.retryTimer = Task { [weak self] in
                guard (try? await Task.sleep(for: interval)) != nil else { return }
                self?.retryTimerFired()
            }
        }
        let now = ContinuousClock.now
        switch (state.machine.isTokenUnreachable, state.unreachableSince) {
        case (true, nil):
            state.unreachableSince = now
            effects.reachabilityChanged = (true, .zero)
        case (false, let since?):
            state.unreachableSince = nil
            // Shutdown or a refused PIN also end the reset; only serving again is a recovery.
            if state.machine.mode == .serving {
                effects.reachabilityChanged = (false, now - since)
            }
        default:
            break
        }
        if !state.machine.isTokenUnreachable {
            // Also when an attempt's failure (a refused PIN) is reported after the reset ended.
            state.lastResetError = nil
        }
        if let waiter = effects.startTimer {
            let timeout = configuration.acquireTimeout
            state.timers[waiter] = Task { [weak self] in
                guard (try? await Task.sleep(for: timeout)) != nil else { return }
                self?.timerFired(waiter)
            }
        }
        return effects
    }

    private func error(for failure: SessionPoolStateMachine.Failure, state: borrowing RunnerState) -> any Error {
        switch failure {
        case .timeout:
            PKCS11Error(
                code: .sessionAcquireTimeout,
                detail: "no PKCS#11 session free within \(configuration.acquireTimeout) (\(maximumSessions) sessions)"
            )
        case .queueFull:
            PKCS11Error(
                code: .sessionPoolQueueFull,
                detail: "\(configuration.maximumWaiters) tasks already wait for a PKCS#11 session"
            )
        case .shutDown:
            PKCS11Error(code: .sessionPoolShutDown)
        case .cancelled:
            CancellationError()
        case .openFailed:
            state.lastOpenError ?? PKCS11Error(code: .sessionPoolShutDown, detail: "no session could be opened")
        case .loginRefused:
            state.loginRefusal ?? PKCS11Error(code: .loginRefused, function: .login)
        case .tokenUnreachable:
            (state.lastResetError ?? PKCS11Error(code: .tokenUnreachable)).asTokenUnreachable(
                detail: "the token is unreachable; the next attempt to reach it comes with a request at least "
                    + "\(configuration.retryInterval) after the last one failed")
        }
    }

    private func perform(_ effects: consuming Effects) {
        for timer in effects.cancelTimers {
            timer.cancel()
        }
        if let change = effects.reachabilityChanged {
            if change.unreachable {
                logger.error(
                    """
                    the PKCS#11 token is unreachable: requests fail with UNAVAILABLE while the pool closes its \
                    sessions and tries to reach it again
                    """,
                    metadata: ["token": "\(tokenLabel ?? "slot")"])
            } else {
                logger.notice(
                    "the PKCS#11 token is reachable again; sessions are logged in",
                    metadata: ["token": "\(tokenLabel ?? "slot")", "unreachable_for": "\(change.after)"])
            }
        }
        for (continuation, result) in effects.resume {
            continuation.resume(with: result)
        }
        if let open = effects.open {
            threadPool.submit { [self] workState in
                let result: Result<CK_SESSION_HANDLE, any Error> =
                    workState != .active
                    ? .failure(PKCS11Error(code: .sessionPoolShutDown))
                    : open.reset
                        ? Result { try self.reachToken(slot: open.slot) }
                        : Result { try self.openLoggedInSession(slot: open.slot) }
                self.openCompleted(open.id, result: result, reset: open.reset)
            }
        }
        for close in effects.close {
            threadPool.submit { [self] _ in
                closeSession(close.handle, slot: close.slot)
                let effects = state.withLock { apply($0.machine.sessionClosed(close.id), to: &$0) }
                perform(effects)
            }
        }
        for continuation in effects.resumeShutdown + effects.resumeSeal {
            continuation.resume()
        }
    }

    private func timerFired(_ waiter: SessionPoolStateMachine.WaiterID) {
        let effects = state.withLock { state -> Effects in
            state.timers[waiter] = nil
            return apply(state.machine.waiterTimedOut(waiter), to: &state)
        }
        perform(effects)
    }

    private func retryTimerFired() {
        let effects = state.withLock { state -> Effects in
            state.retryTimer = nil
            return apply(state.machine.retryTimerFired(), to: &state)
        }
        perform(effects)
    }

    private func openCompleted(
        _ session: SessionPoolStateMachine.SessionID, result: Result<CK_SESSION_HANDLE, any Error>, reset: Bool
    ) {
        let effects = state.withLock { state -> Effects in
            switch result {
            case .success(let handle):
                state.handles[session] = (handle, state.slot, state.machine.epoch)
                return apply(state.machine.sessionOpened(session), to: &state)
            case .failure(let error):
                let pkcs11Error = error as? PKCS11Error
                let unreachable = pkcs11Error.map { $0.isTokenUnreachable || $0.code == .tokenNotFound } ?? false
                let firstFailure = reset && state.lastResetError == nil
                if reset {
                    state.lastResetError = pkcs11Error ?? PKCS11Error(code: .tokenUnreachable, detail: "\(error)")
                } else {
                    state.lastOpenError = error
                }
                var effects = apply(state.machine.sessionOpenFailed(session, tokenUnreachable: unreachable), to: &state)
                effects.firstResetFailure = firstFailure
                return effects
            }
        }
        // A refused login has logged its own line, once; a token that stays unreachable is
        // logged on the first failed attempt only.
        if case .failure(let error) = result, (error as? PKCS11Error)?.code != .loginRefused {
            if !reset {
                logger.error("opening a PKCS#11 session failed", metadata: ["error": "\(error)"])
            } else if effects.firstResetFailure {
                logger.error(
                    "the PKCS#11 token cannot be reached yet; trying again on demand",
                    metadata: ["error": "\(error)", "retry_interval": "\(configuration.retryInterval)"])
            } else {
                logger.debug("the PKCS#11 token cannot be reached yet", metadata: ["error": "\(error)"])
            }
        }
        perform(effects)
    }

    // MARK: - Blocking work (runs on the pool's threads)

    /// Closes a session of the pool; one whose close the token does not confirm is remembered
    /// (`unconfirmedCloses`) to be closed again later.
    private func closeSession(_ handle: CK_SESSION_HANDLE, slot: SlotID) {
        let moduleEpoch = module.epoch
        let confirmed: Bool
        do {
            confirmed = try module.closeSessionHandle(handle, slot: slot)
        } catch let error as PKCS11Error where error.isTokenUnreachable {
            // Expected while the token is gone; the reset that follows says so once.
            logger.debug("closing a PKCS#11 session failed", metadata: ["error": "\(error)"])
            confirmed = false
        } catch {
            logger.warning("closing a PKCS#11 session failed", metadata: ["error": "\(error)"])
            confirmed = false
        }
        guard !confirmed else { return }
        state.withLock { state in
            if state.unconfirmedCloses.count >= Self.maximumUnconfirmedCloses {
                state.unconfirmedCloses.removeFirst()
            }
            state.unconfirmedCloses.append(UnconfirmedClose(handle: handle, slot: slot, moduleEpoch: moduleEpoch))
        }
    }

    /// Closes again, with no session of the pool open (at a reset attempt, at shutdown), the
    /// sessions whose close the token did not confirm, so a token that comes back does not keep
    /// sessions nobody will use (HSMs limit them per client). Those of an earlier module epoch are
    /// forgotten (`C_Finalize` closed them), and so is a handle this module has since handed out
    /// again to a session open now: that number names another session, never closed here.
    private func closeUnconfirmedSessions() {
        let pending = state.withLock { state in
            defer { state.unconfirmedCloses.removeAll() }
            return state.unconfirmedCloses
        }
        guard !pending.isEmpty else { return }
        let moduleEpoch = module.epoch
        var unconfirmed: [UnconfirmedClose] = []
        for session in pending
        where session.moduleEpoch == moduleEpoch && !module.isSessionOpen(session.handle, slot: session.slot) {
            if (try? module.closeSessionHandle(session.handle, slot: session.slot)) != true {
                unconfirmed.append(session)
            }
        }
        let closed = pending.count - unconfirmed.count
        logger.debug(
            "closed again the PKCS#11 sessions whose close the token had not confirmed",
            metadata: ["closed": "\(closed)", "still_unconfirmed": "\(unconfirmed.count)"])
        guard !unconfirmed.isEmpty else { return }
        state.withLock { state in
            state.unconfirmedCloses = Array(
                (unconfirmed + state.unconfirmedCloses).suffix(Self.maximumUnconfirmedCloses))
        }
    }

    /// A reset attempt, with no session of the pool open: finds the token's slot again by label
    /// (or keeps `slot`), opens a session and logs in. When that fails (other than a refused PIN)
    /// and the module is this process's own to initialise, re-initialises it and tries once more.
    private func reachToken(slot: SlotID) throws -> CK_SESSION_HANDLE {
        closeUnconfirmedSessions()
        do {
            return try findAndOpen(slot: slot)
        } catch let error as PKCS11Error where error.code != .loginRefused && module.ownsInitialization {
            // Said once per outage; the attempts that follow every retry interval do the same.
            let firstAttempt = state.withLock { $0.lastResetError == nil }
            logger.log(
                level: firstAttempt ? .notice : .debug,
                "re-initialising the PKCS#11 module (C_Finalize, C_Initialize) to reach the token again",
                metadata: ["module": "\(module.path)", "error": "\(error)"])
            try module.reinitialize()
            // C_Finalize closed every session: forget those whose close was not confirmed.
            closeUnconfirmedSessions()
            return try findAndOpen(slot: slot)
        }
    }

    private func findAndOpen(slot: SlotID) throws -> CK_SESSION_HANDLE {
        var slot = slot
        if let tokenLabel {
            slot = try module.slot(tokenLabel: tokenLabel)
            state.withLock { $0.slot = slot }
        }
        return try openLoggedInSession(onSlot: slot)
    }

    /// Opens a session and logs the user in unless the token still holds the login.
    private func openLoggedInSession(slot: SlotID) throws -> CK_SESSION_HANDLE {
        do {
            return try openLoggedInSession(onSlot: slot)
        } catch let error as PKCS11Error
            where tokenLabel != nil
            && [.slotIdInvalid, .tokenNotPresent, .deviceRemoved, .tokenNotRecognized].contains(error.returnValue)
        {
            // The token may be back under another slot number (re-inserted, renumbered).
            let newSlot = try module.slot(tokenLabel: tokenLabel!)
            guard newSlot != slot else { throw error }
            state.withLock { $0.slot = newSlot }
            logger.notice("PKCS#11 token moved", metadata: ["from": "\(slot)", "to": "\(newSlot)"])
            return try openLoggedInSession(onSlot: newSlot)
        } catch let error as PKCS11Error where error.castsDoubtOnToken {
            // SoftHSM2 answers C_Login with CKR_GENERAL_ERROR once its token directory is gone:
            // ask the token before calling this an ordinary failure.
            if let unreachable = module.unreachableToken(in: slot) {
                throw error.asTokenUnreachable(detail: unreachable.description)
            }
            throw error
        }
    }

    private func openLoggedInSession(onSlot slot: SlotID) throws -> CK_SESSION_HANDLE {
        let handle = try module.openSessionHandle(slot: slot, readWrite: configuration.readWrite)
        do {
            try logInIfNeeded(Session(module: module, handle: handle, slot: slot))
            return handle
        } catch {
            closeSession(handle, slot: slot)
            throw error
        }
    }

    /// Logs the user in on `session` unless the token still holds the login (it is shared by every
    /// session of the process), one login at a time. A final refusal (`isFinalLoginFailure`)
    /// puts the pool in the login-refused state before the lock is released, so no other open
    /// tries the same PIN again.
    private func logInIfNeeded(_ session: borrowing Session) throws {
        try login.withLock { pin in
            // The refusal first: a sealed pool has no PIN, and must not hand out a session that
            // a reset opened without a login.
            if let refusal = state.withLock({ $0.loginRefusal }) { throw refusal }
            guard let pin else { return }
            if try session.state().isUserLoggedIn { return }
            do {
                try session.login(.user, pin: pin)
            } catch let error as PKCS11Error where error.isFinalLoginFailure {
                let refusal = PKCS11Error(
                    code: .loginRefused,
                    function: .login,
                    returnValue: error.returnValue,
                    detail: "the token refused the user PIN; no further login is attempted until an operator "
                        + "supplies the right one"
                )
                logger.error(
                    """
                    the HSM refused the user PIN: no further login is attempted and every request that needs \
                    the HSM fails at once; set the correct PIN (hsm.pin) and restart the gateway
                    """,
                    metadata: [
                        "token": "\(tokenLabel ?? "slot \(session.slot)")",
                        "error": "\(error.returnValue.map(\.name) ?? "unknown")",
                    ]
                )
                let effects = state.withLock { state -> Effects in
                    state.loginRefusal = refusal
                    return apply(state.machine.loginRefused(), to: &state)
                }
                perform(effects)
                throw refusal
            }
        }
    }
}
