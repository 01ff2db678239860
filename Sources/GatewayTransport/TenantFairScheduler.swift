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

/// An admission gate for tenant-scoped work: at most `concurrency` bodies run at once; others wait
/// in one queue per tenant, and free slots go round-robin over the tenants that wait, so one
/// tenant's flood queues behind itself and cannot starve another. A waiter is refused at once
/// when its tenant's queue is full, and after `maxWait` if still not admitted; a cancelled waiter
/// leaves its queue.
public final class TenantFairScheduler: Sendable {
    /// The gate's bounds.
    public struct Configuration: Sendable, Hashable {
        /// Bodies running at once over all tenants: the capacity of what the bodies contend for
        /// (HSM sessions, database connections). 64 by default.
        public var concurrency: Int
        /// Waiting requests per tenant (`ServerLimits.maxQueuedRequestsPerTenant`, 256).
        public var maxQueuedPerTenant: Int
        /// How long a request may wait for admission (`ServerLimits.maxTenantQueueWait`, 5 s).
        public var maxWait: Duration

        /// Explicit bounds; `concurrency` and `maxQueuedPerTenant` must be at least 1.
        public init(concurrency: Int = 64, maxQueuedPerTenant: Int = 256, maxWait: Duration = .seconds(5)) {
            precondition(concurrency >= 1 && maxQueuedPerTenant >= 1, "the scheduler needs at least one slot")
            self.concurrency = concurrency
            self.maxQueuedPerTenant = maxQueuedPerTenant
            self.maxWait = maxWait
        }

        /// The queue bounds of `limits` with `concurrency` slots.
        public init(limits: ServerLimits, concurrency: Int = 64) {
            self.init(
                concurrency: concurrency,
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
        var continuation: CheckedContinuation<Void, any Error>
        var timeout: Task<Void, Never>?
    }

    /// The bounds this gate enforces.
    public let configuration: Configuration
    private let state: Mutex<State>

    /// A gate with these bounds.
    public init(configuration: Configuration = Configuration()) {
        self.configuration = configuration
        self.state = Mutex(
            State(
                machine: TenantAdmissionStateMachine(
                    concurrency: configuration.concurrency,
                    maxQueuedPerTenant: configuration.maxQueuedPerTenant
                )
            )
        )
    }

    /// Runs `body` once admitted for `tenant`. Throws ``TenantAdmissionError`` when the tenant's
    /// queue is full or the wait bound passes, `CancellationError` when the caller is cancelled
    /// while waiting, and whatever `body` throws.
    public func run<T: Sendable>(tenant: String, _ body: @Sendable () async throws -> T) async throws -> T {
        try await admit(tenant: tenant)
        defer { release() }
        return try await body()
    }

    private func admit(tenant: String) async throws {
        let id = state.withLock { state in
            defer { state.nextWaiterID += 1 }
            return state.nextWaiterID
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                let arrival = state.withLock { state -> TenantAdmissionStateMachine.Arrival? in
                    // Checked under the lock: a cancellation after this finds the waiter.
                    guard !Task.isCancelled else { return nil }
                    let arrival = state.machine.arrive(id, tenant: tenant)
                    if arrival == .queued { state.waiters[id] = Waiter(continuation: continuation) }
                    return arrival
                }
                switch arrival {
                case nil:
                    continuation.resume(throwing: CancellationError())
                case .admitted:
                    continuation.resume()
                case .queueFull:
                    continuation.resume(
                        throwing: TenantAdmissionError(.queueFull, "too many requests are waiting for this tenant")
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

    private func release() {
        let next = state.withLock { state -> Waiter? in
            guard let id = state.machine.finished() else { return nil }
            return state.waiters.removeValue(forKey: id)
        }
        next?.timeout?.cancel()
        next?.continuation.resume()
    }
}

/// The scheduler's bookkeeping without tasks or clocks: who runs, who waits, who is next.
struct TenantAdmissionStateMachine {
    typealias WaiterID = UInt64

    enum Arrival: Equatable {
        /// Runs now: a slot was free and nobody waited.
        case admitted
        /// Waits in its tenant's queue.
        case queued
        /// Refused: the tenant's queue is full.
        case queueFull
    }

    let concurrency: Int
    let maxQueuedPerTenant: Int
    private(set) var running = 0
    private var queues: [String: Deque<WaiterID>] = [:]
    /// Tenants with waiters, in the order they get the next slots.
    private var rotation: Deque<String> = []
    private var tenantOf: [WaiterID: String] = [:]

    init(concurrency: Int, maxQueuedPerTenant: Int) {
        self.concurrency = concurrency
        self.maxQueuedPerTenant = maxQueuedPerTenant
    }

    /// Waiters in `tenant`'s queue.
    func waiting(_ tenant: String) -> Int { queues[tenant]?.count ?? 0 }

    mutating func arrive(_ id: WaiterID, tenant: String) -> Arrival {
        if running < concurrency, rotation.isEmpty {
            running += 1
            return .admitted
        }
        let queued = queues[tenant]?.count ?? 0
        guard queued < maxQueuedPerTenant else { return .queueFull }
        if queued == 0 { rotation.append(tenant) }
        queues[tenant, default: []].append(id)
        tenantOf[id] = tenant
        return .queued
    }

    /// A body finished: its slot goes to the next waiter in the rotation, if any (returned; it now
    /// counts as running).
    mutating func finished() -> WaiterID? {
        precondition(running > 0, "finished without a running body")
        running -= 1
        guard let tenant = rotation.popFirst() else { return nil }
        let id = queues[tenant]!.removeFirst()
        tenantOf[id] = nil
        if queues[tenant]!.isEmpty {
            queues[tenant] = nil
        } else {
            rotation.append(tenant)
        }
        running += 1
        return id
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
