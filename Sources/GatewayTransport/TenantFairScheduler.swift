import DequeModule
import GatewayWire
import Synchronization

/// Why a tenant-scoped request was not admitted. The handler answers RESOURCE_EXHAUSTED, reason
/// `OVERLOADED` (``statusReason``), so the caller backs off.
public struct TenantAdmissionError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The kind of refusal. An open set: `switch` with a `default`.
    public struct Code: Sendable, Hashable, CustomStringConvertible {
        private enum Value: Sendable, Hashable {
            case queueFull
            case waitExceeded
        }
        private let value: Value
        private init(_ value: Value) { self.value = value }

        /// The tenant already has its maximum of waiting requests.
        public static let queueFull = Code(.queueFull)
        /// The request waited the maximum wait without being admitted.
        public static let waitExceeded = Code(.waitExceeded)

        /// A short text for logs.

        public var description: String {
            switch value {
            case .queueFull: return "queueFull"
            case .waitExceeded: return "waitExceeded"
            }
        }
    }

    /// What happened.
    public var code: Code
    /// A safe sentence for the `Status` message.
    public var message: String

    /// The `Status.reason` a response carries: `OVERLOADED`.
    public var statusReason: String { StatusReason.overloaded }

    /// An admission error.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    /// A short text for logs.

    public var description: String { "\(code): \(message)" }
}

/// An admission gate for tenant-scoped work: at most a limit of bodies run at once, learnt from
/// their latency while more than one tenant is active (``AdaptiveConcurrencyLimit``: it grows
/// while bodies finish about as fast as on an idle gateway and shrinks when they slow down,
/// between `minimumConcurrency` and `concurrency`; a tenant alone may run `concurrency`); others
/// wait in one queue per tenant, and free slots go round-robin over the tenants that wait, so
/// one tenant's flood queues behind itself and cannot starve another. A waiter is refused at
/// once when its tenant's queue is full (`maxQueuedPerTenant`) or when the wait it can expect
/// (its place in its tenant's queue, times the tenants that wait, times the recent latency, over
/// the limit) is longer than `maxWait`, so a flood is shed at once instead of waiting out its
/// deadline. A waiter still queued after `maxWait` is refused; a cancelled waiter leaves its
/// queue.
public final class TenantFairScheduler: Sendable {
    /// The gate's bounds.
    public struct Configuration: Sendable, Hashable {
        /// The most bodies running at once over all tenants: the capacity of what the bodies
        /// contend for (HSM sessions, database connections). 64 by default.
        public var concurrency: Int
        /// The least the adaptive limit falls to (4 by default); equal to `concurrency`, the limit
        /// is fixed.
        public var minimumConcurrency: Int
        /// Waiting requests per tenant (`ServerLimits.maxQueuedRequestsPerTenant`, 256).
        public var maxQueuedPerTenant: Int
        /// How long a request may wait for admission (`ServerLimits.maxTenantQueueWait`, 5 s).
        public var maxWait: Duration

        /// Explicit bounds; `concurrency` and `maxQueuedPerTenant` must be at least 1 and
        /// `minimumConcurrency` from 1 to `concurrency` (nil: 4, or `concurrency` when smaller).
        public init(
            concurrency: Int = 64, minimumConcurrency: Int? = nil, maxQueuedPerTenant: Int = 256,
            maxWait: Duration = .seconds(5)
        ) {
            precondition(concurrency >= 1 && maxQueuedPerTenant >= 1, "the scheduler needs at least one slot")
            let minimum = minimumConcurrency ?? min(4, concurrency)
            precondition((1...concurrency).contains(minimum), "the minimum must be from 1 to the maximum")
            self.concurrency = concurrency
            self.minimumConcurrency = minimum
            self.maxQueuedPerTenant = maxQueuedPerTenant
            self.maxWait = maxWait
        }

        /// The queue bounds of `limits` with these concurrency bounds.
        public init(limits: ServerLimits, concurrency: Int = 64, minimumConcurrency: Int? = nil) {
            self.init(
                concurrency: concurrency,
                minimumConcurrency: minimumConcurrency,
                maxQueuedPerTenant: limits.maxQueuedRequestsPerTenant,
                maxWait: limits.maxTenantQueueWait
            )
        }
    }

    private struct State {
        var machine: TenantAdmissionStateMachine
        var waiters: [TenantAdmissionStateMachine.WaiterID: Waiter] = [:]
        var nextWaiterID: TenantAdmissionStateMachine.WaiterID = 1
    }

    private struct Waiter {
        var continuation: CheckedContinuation<TenantAdmissionStateMachine.Admission, any Error>
        var timeout: Task<Void, Never>?
    }

    /// The bounds this gate enforces.
    public let configuration: Configuration
    private let state: Mutex<State>
    private let clock = ContinuousClock()
    private let epoch: ContinuousClock.Instant

    /// A gate with these bounds.
    public init(configuration: Configuration = Configuration()) {
        self.configuration = configuration
        self.epoch = clock.now
        self.state = Mutex(
            State(
                machine: TenantAdmissionStateMachine(
                    limit: AdaptiveConcurrencyLimit.Settings(
                        minimum: configuration.minimumConcurrency, maximum: configuration.concurrency),
                    maxQueuedPerTenant: configuration.maxQueuedPerTenant,
                    maxWait: configuration.maxWait
                )
            )
        )
    }

    /// The number of bodies that may run at once now.
    public var currentLimit: Int { state.withLock { $0.machine.limit } }

    /// Requests of `tenant` waiting for admission now.
    func waiting(_ tenant: String) -> Int { state.withLock { $0.machine.waiting(tenant) } }

    /// Runs `body` once admitted for `tenant`. Throws ``TenantAdmissionError`` when the tenant's
    /// queue is full or the wait bound passes, `CancellationError` when the caller is cancelled
    /// while waiting, and whatever `body` throws.
    public func run<T: Sendable>(tenant: String, _ body: @Sendable () async throws -> T) async throws -> T {
        let admission = try await admit(tenant: tenant)
        let started = clock.now
        defer { release(admission, latency: clock.now - started) }
        return try await body()
    }

    private func admit(tenant: String) async throws -> TenantAdmissionStateMachine.Admission {
        let id = state.withLock { state in
            defer { state.nextWaiterID += 1 }
            return state.nextWaiterID
        }
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation {
                (continuation: CheckedContinuation<TenantAdmissionStateMachine.Admission, any Error>) in
                let arrival = state.withLock { state -> TenantAdmissionStateMachine.Arrival? in
                    // Checked under the lock: a cancellation after this finds the waiter.
                    guard !Task.isCancelled else { return nil }
                    let arrival = state.machine.arrive(id, tenant: tenant, now: clock.now - epoch)
                    if arrival == .queued { state.waiters[id] = Waiter(continuation: continuation) }
                    return arrival
                }
                switch arrival {
                case nil:
                    continuation.resume(throwing: CancellationError())
                case .admitted(let admission):
                    continuation.resume(returning: admission)
                case .queueFull:
                    continuation.resume(
                        throwing: TenantAdmissionError(
                            .queueFull, "too many requests are waiting for this tenant; retry with backoff")
                    )
                case .wouldWaitTooLong:
                    continuation.resume(
                        throwing: TenantAdmissionError(
                            .waitExceeded, "the gateway is at its limit for this tenant; retry with backoff")
                    )
                case .queued:
                    let maxWait = configuration.maxWait
                    let timeout = Task {
                        try? await Task.sleep(for: maxWait)
                        guard !Task.isCancelled else { return }
                        self.leave(
                            id,
                            TenantAdmissionError(.waitExceeded, "the request waited too long for admission")
                        )
                    }
                    let stillWaiting = state.withLock { state -> Bool in
                        guard state.waiters[id] != nil else { return false }
                        state.waiters[id]?.timeout = timeout
                        return true
                    }
                    if !stillWaiting { timeout.cancel() }
                }
            }
        } onCancel: {
            leave(id, CancellationError())
        }
    }

    /// Removes a waiter that is still queued and fails it with `error`.
    private func leave(_ id: TenantAdmissionStateMachine.WaiterID, _ error: any Error) {
        let waiter = state.withLock { state -> Waiter? in
            guard let waiter = state.waiters.removeValue(forKey: id) else { return nil }
            state.machine.leave(id)
            return waiter
        }
        waiter?.timeout?.cancel()
        waiter?.continuation.resume(throwing: error)
    }

    private func release(_ admission: TenantAdmissionStateMachine.Admission, latency: Duration) {
        let now = clock.now - epoch
        let next = state.withLock { state -> [(Waiter, TenantAdmissionStateMachine.Admission)] in
            state.machine.finished(admission, latency: latency, now: now).compactMap { admitted in
                state.waiters.removeValue(forKey: admitted.id).map { ($0, admitted) }
            }
        }
        for (waiter, admitted) in next {
            waiter.timeout?.cancel()
            waiter.continuation.resume(returning: admitted)
        }
    }
}

/// The scheduler's bookkeeping without tasks or clocks: who runs, who waits, who is next, and
/// the limit learnt from the latencies it is told.
struct TenantAdmissionStateMachine {
    typealias WaiterID = UInt64

    /// A body admitted to run: what its completion reports back.
    struct Admission: Equatable, Sendable {
        var id: WaiterID
        var tenant: String
        /// Bodies running when it was admitted, itself included.
        var inFlight: Int
    }

    enum Arrival: Equatable {
        /// Runs now: a slot was free and nobody waited.
        case admitted(Admission)
        /// Waits in its tenant's queue.
        case queued
        /// Refused: the tenant's queue is full.
        case queueFull
        /// Refused: the expected wait is longer than the longest wait.
        case wouldWaitTooLong
    }

    /// How recently a tenant must have arrived to count as active for the reserve (1 s).
    static let activeWindow = 1.0

    let maxQueuedPerTenant: Int
    /// The longest wait in seconds, for shedding at arrival (nil: never shed by expected wait).
    let maxWait: Double?
    private(set) var limiter: AdaptiveConcurrencyLimit
    private(set) var running = 0
    private var queues: [String: Deque<WaiterID>] = [:]
    /// Tenants with waiters, in the order they get the next slots.
    private var rotation: Deque<String> = []
    private var tenantOf: [WaiterID: String] = [:]
    /// Bodies running per tenant (only tenants with some).
    private var runningBy: [String: Int] = [:]
    /// When each tenant last arrived (seconds on the caller's clock), for the active count.
    private var lastArrival: [String: Double] = [:]
    private var lastPruned = 0.0

    init(limit: AdaptiveConcurrencyLimit.Settings, maxQueuedPerTenant: Int, maxWait: Duration? = nil) {
        self.limiter = AdaptiveConcurrencyLimit(settings: limit)
        self.maxQueuedPerTenant = maxQueuedPerTenant
        self.maxWait = maxWait?.inSeconds
    }

    /// A fixed limit of `concurrency` (for tests of the queueing alone).
    init(concurrency: Int, maxQueuedPerTenant: Int, maxWait: Duration? = nil) {
        self.init(
            limit: AdaptiveConcurrencyLimit.Settings(minimum: concurrency, maximum: concurrency),
            maxQueuedPerTenant: maxQueuedPerTenant, maxWait: maxWait)
    }

    /// Bodies that may run at once now: the learnt limit while more than one tenant is active,
    /// the maximum for a tenant alone. The learnt limit is there to keep the shared commit path
    /// quick for the others; a tenant alone only competes with itself, and under group commit
    /// more of its calls in flight make bigger batches (twice the GenerateDataKey throughput at
    /// c=64 on SQLite, and a lower p99, than the learnt limit gave it). It keeps learning either
    /// way, so a second tenant meets a limit that fits the load.
    var limit: Int { severalActive ? limiter.current : limiter.settings.maximum }

    /// Whether more than one tenant is active (see ``noteArrival(_:now:)``).
    private var severalActive: Bool { lastArrival.count > 1 }

    /// Waiters in `tenant`'s queue.
    func waiting(_ tenant: String) -> Int { queues[tenant]?.count ?? 0 }

    /// The most bodies `tenant` may run at once: the whole limit while it is the only active
    /// tenant; otherwise one slot fewer for each other active tenant (at most half the limit
    /// kept back), so a tenant that sends one request at a time finds a slot free instead of
    /// waiting for the busy tenant's next body to finish. Work-conserving for a tenant alone.
    func share(of tenant: String) -> Int {
        let others = lastArrival.count - (lastArrival[tenant] == nil ? 0 : 1)
        return max(1, limit - min(others, limit / 2))
    }

    /// Records `tenant`'s arrival and, four times a second, forgets the tenants that are no
    /// longer active: active is arrived within ``activeWindow``, or running, or waiting.
    private mutating func noteArrival(_ tenant: String, now: Double) {
        lastArrival[tenant] = now
        guard now - lastPruned >= Self.activeWindow / 4 else { return }
        lastPruned = now
        lastArrival = lastArrival.filter { tenant, arrived in
            now - arrived < Self.activeWindow || runningBy[tenant] != nil || queues[tenant] != nil
        }
    }

    /// Whether `tenant` may start a body now: below its share, and below the limit; or, for a
    /// tenant with nothing running while others are active, at once, up to ``overLimitCap``.
    /// When the limit shrinks (a second tenant arrives, or the learnt limit falls) the busy
    /// tenant's bodies above it have yet to finish; the slot kept for a quiet tenant must not
    /// wait for them.
    private func mayRun(_ tenant: String) -> Bool {
        let mine = runningBy[tenant, default: 0]
        guard mine < share(of: tenant) else { return false }
        if running < limit { return true }
        return mine == 0 && severalActive && running < overLimitCap
    }

    /// The most bodies that may run when tenants with nothing running start over the limit: one
    /// and a half times the maximum (a tenant alone may hold the maximum, so one that arrives
    /// next still starts at once).
    private var overLimitCap: Int { limiter.settings.maximum + limiter.settings.maximum / 2 }

    private mutating func start(_ id: WaiterID, tenant: String) -> Admission {
        running += 1
        runningBy[tenant, default: 0] += 1
        return Admission(id: id, tenant: tenant, inFlight: running)
    }

    mutating func arrive(_ id: WaiterID, tenant: String, now: Duration) -> Arrival {
        noteArrival(tenant, now: now.inSeconds)
        // A free slot with waiters left is one no waiter may take (their tenants are at their
        // share): it goes to a tenant with nobody of its own waiting.
        if queues[tenant] == nil, mayRun(tenant) {
            return .admitted(start(id, tenant: tenant))
        }
        let queued = queues[tenant]?.count ?? 0
        guard queued < maxQueuedPerTenant else { return .queueFull }
        // Slots come free at about limit / latency a second and go round-robin over the tenants
        // that wait, this one's next after the others ahead of it; a tenant over its share gets
        // only its share.
        if let maxWait, let latency = limiter.recentLatency {
            let tenantsWaiting = rotation.count + (queued == 0 ? 1 : 0)
            let slots = min(limit, share(of: tenant))
            let expected = Double(queued + 1) * Double(tenantsWaiting) * latency / Double(slots)
            if expected > maxWait { return .wouldWaitTooLong }
        }
        if queued == 0 { rotation.append(tenant) }
        queues[tenant, default: []].append(id)
        tenantOf[id] = tenant
        return .queued
    }

    /// A body finished after `latency` (at `now` on the caller's clock): the limit learns from
    /// it, and the free slots go to the next waiters in the rotation (returned; they now count
    /// as running). None when the limit shrank below the bodies still running.
    mutating func finished(_ admission: Admission, latency: Duration, now: Duration) -> [Admission] {
        precondition(running > 0, "finished without a running body")
        running -= 1
        if let count = runningBy[admission.tenant], count > 1 {
            runningBy[admission.tenant] = count - 1
        } else {
            runningBy[admission.tenant] = nil
        }
        limiter.record(latency: latency, inFlight: admission.inFlight, running: running, now: now)
        var admitted: [Admission] = []
        // The first tenant in the rotation below its share gets the slot; the ones passed over
        // keep their places.
        while let position = rotation.firstIndex(where: mayRun) {
            let tenant = rotation.remove(at: position)
            let id = queues[tenant]!.removeFirst()
            tenantOf[id] = nil
            if queues[tenant]!.isEmpty {
                queues[tenant] = nil
            } else {
                rotation.append(tenant)
            }
            admitted.append(start(id, tenant: tenant))
        }
        return admitted
    }

    /// A waiter gave up (timeout or cancellation).
    mutating func leave(_ id: WaiterID) {
        guard let tenant = tenantOf.removeValue(forKey: id) else { return }
        queues[tenant]?.removeAll { $0 == id }
        if queues[tenant]?.isEmpty == true {
            queues[tenant] = nil
            rotation.removeAll { $0 == tenant }
        }
    }
}
