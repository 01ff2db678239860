import KeyHierarchy
import Logging
import PostgresNIO
import Synchronization

/// The connection pool a `PostgresKeyStore` leases from, and whether the server can be reached.
///
/// postgres-nio's pool, when the server stops answering, queues every lease until its circuit
/// breaker trips (15 s) and then retries with a backoff that grows to a minute, so callers would
/// wait out their deadlines during an outage and keep failing well after the server is back. The
/// gateway promises better (DESIGN.md: fail fast with UNAVAILABLE, resume by itself), so a monitor
/// watches the server on a connection of its own:
///
/// - every `pingInterval` it runs `SELECT 1`; when that fails it connects again at once, and when
///   a new connection is refused (connection refused or reset, the server starting or shutting
///   down, a login refused) the server is *unreachable*: the pool is retired (its queued leases
///   fail at once, its connections close) and a fresh one takes its place, and every call fails at
///   once with `StorageError(.unavailable)` instead of waiting;
/// - while unreachable it tries to connect every `retryInterval`; the first success makes the
///   server *reachable* again, and calls lease from the fresh pool, which has no backoff to wait
///   out.
///
/// A connection or a ping that merely times out (a frozen server, a partition dropping packets)
/// changes nothing: the server may be slow rather than gone, and retiring a pool would abort work
/// in flight. Calls then wait up to their deadlines, and resume when the server answers again.
///
/// With several servers (a primary and standbys), the monitor's ping also asks whether the server
/// still accepts writes, and its connection goes to the first server that does: when the primary
/// dies or is demoted and a standby has been promoted, the ping fails, the probe finds the new
/// primary, and the pool is replaced by one on it (`PostgresKeyStore.connectToPrimary`).
///
/// The monitor also retires a pool that has stopped handing out connections while the server is
/// reachable: calls wait for a lease, none holds a connection, and none was granted for
/// `wedgeTimeout`. (postgres-nio 1.33's pool was seen to stop granting leases for good after its
/// connections were terminated while being created.) Its waiting calls fail with
/// `.unavailable`; a busy pool, whose connections are all leased, is never retired.
final class PostgresPool: Sendable {
    /// How often the monitor pings the server while it is reachable.
    static let pingInterval: Duration = .milliseconds(500)
    /// How long a ping may take before it counts as inconclusive (not as a failure).
    static let pingTimeout: Duration = .seconds(1)
    /// How often the monitor tries to connect while the server is unreachable: the bound on how
    /// late service resumes after the server accepts logins again.
    static let retryInterval: Duration = .milliseconds(250)
    /// How long one connection attempt of the monitor may take before it counts as inconclusive.
    static let probeConnectTimeout: Duration = .seconds(2)
    /// How long calls may wait for a lease, with no connection leased and none granted, before the
    /// pool counts as wedged and is replaced.
    static let wedgeTimeout: Duration = .seconds(2)

    private struct State {
        var client: PostgresClient
        /// The index of the server `client` connects to.
        var server: Int
        var clientTask: Task<Void, Never>
        /// Pools retired on an outage, still shutting down; awaited by `close`.
        var retired: [Task<Void, Never>] = []
        var reachable = true
        var unreachableSince: ContinuousClock.Instant?
        var reason = ""
        var generation = 0
        var closed = false
        /// Calls waiting for a lease, by ticket, with when they started.
        var waiting: [Int: ContinuousClock.Instant] = [:]
        /// Connections leased to calls now.
        var leased = 0
        var lastGrant = ContinuousClock.now
        var nextTicket = 0
    }

    private let makeClient: @Sendable (Int) -> PostgresClient
    private let probe: @Sendable () async throws -> (PostgresConnection, Int)
    private let describe: @Sendable (Int) -> String
    private let logger: Logger
    private let state: Mutex<State>
    private let monitorTask = Mutex<[Task<Void, Never>]>([])

    /// `makeClient` builds a pool (not yet running) on the server of the given index, starting
    /// with `server`; `probe` opens one connection to a server that accepts writes and says
    /// which, throwing `ProbeTimeout` when that is inconclusive; `describe` names a server for logs.
    init(
        server: Int = 0,
        describe: @escaping @Sendable (Int) -> String = { "server \($0)" },
        makeClient: @escaping @Sendable (Int) -> PostgresClient,
        probe: @escaping @Sendable () async throws -> (PostgresConnection, Int),
        logger: Logger
    ) {
        self.makeClient = makeClient
        self.probe = probe
        self.describe = describe
        self.logger = logger
        let client = makeClient(server)
        self.state = Mutex(State(client: client, server: server, clientTask: Self.run(client)))
    }

    /// Starts the monitor with `connection`, the first connection `open` made (or nil), and the
    /// watchdog that replaces a wedged pool.
    func startMonitor(with connection: PostgresConnection?) {
        let monitoring = Task { [self] in await monitor(connection) }
        let watchdog = Task { [self] in
            while !Task.isCancelled {
                try? await Task.sleep(for: Self.pingInterval)
                retireIfWedged()
            }
        }
        monitorTask.withLock { $0 = [monitoring, watchdog] }
    }

    /// A call's lease, from asking for a connection to giving it back.
    final class Lease: Sendable {
        let client: PostgresClient
        fileprivate let ticket: Int
        fileprivate let granted = Mutex(false)

        fileprivate init(client: PostgresClient, ticket: Int) {
            self.client = client
            self.ticket = ticket
        }
    }

    /// Starts a lease on the current pool, or throws `.unavailable` at once while the server
    /// cannot be reached. Pair with `granted` (when the connection arrives) and `ended`.
    func beginLease() throws -> Lease {
        try state.withLock { state in
            let client = try Self.current(&state)
            let ticket = state.nextTicket
            state.nextTicket += 1
            state.waiting[ticket] = .now
            return Lease(client: client, ticket: ticket)
        }
    }

    func granted(_ lease: Lease) {
        lease.granted.withLock { $0 = true }
        state.withLock { state in
            state.waiting.removeValue(forKey: lease.ticket)
            state.leased += 1
            state.lastGrant = .now
        }
    }

    func ended(_ lease: Lease) {
        let wasGranted = lease.granted.withLock { $0 }
        state.withLock { state in
            if wasGranted {
                state.leased -= 1
            } else {
                state.waiting.removeValue(forKey: lease.ticket)
            }
        }
    }

    private static func current(_ state: inout State) throws -> PostgresClient {
        guard !state.closed else { throw StorageError(.unavailable, "the postgres key store is closed") }
        guard state.reachable else {
            let since = state.unreachableSince.map { ContinuousClock.now - $0 } ?? .zero
            throw StorageError(
                .unavailable,
                "the database cannot be reached (for \(since.formatted(.units(allowed: [.seconds])))): \(state.reason)"
            )
        }
        return state.client
    }

    /// Whether the monitor last found the server reachable.
    var isReachable: Bool { state.withLock { $0.reachable } }

    /// How many times the pool was replaced after an outage (for tests and logs).
    var generation: Int { state.withLock { $0.generation } }

    /// Stops the monitor and every pool, and waits for them.
    func close() async {
        let (tasks, monitors) = state.withLock { state -> ([Task<Void, Never>], [Task<Void, Never>]) in
            state.closed = true
            return (state.retired + [state.clientTask], monitorTask.withLock { $0 })
        }
        for task in monitors + tasks { task.cancel() }
        for task in monitors + tasks { await task.value }
    }

    /// A probe that did not finish in time: inconclusive.
    struct ProbeTimeout: Error {}

    // MARK: - The monitor

    private func monitor(_ first: PostgresConnection?) async {
        var connection = first
        while !Task.isCancelled {
            if let open = connection {
                do {
                    let logger = self.logger
                    let inRecovery = try await Self.withTimeout(Self.pingTimeout) {
                        try await PostgresKeyStore.isInRecovery(open, logger: logger)
                    }
                    if inRecovery {
                        // Demoted, or a standby after a failover: find the server that accepts writes.
                        Self.discard(open)
                        connection = nil
                        continue
                    }
                } catch is ProbeTimeout {
                    // A slow server is not a gone one; but a ping that never ends would pile
                    // others up behind it on this connection: close it and connect again (an
                    // inconclusive probe changes nothing either).
                    Self.discard(open)
                    connection = nil
                    continue
                } catch {
                    Self.discard(open)
                    connection = nil
                    continue  // connect again at once: this tells a dropped connection from a gone server
                }
                try? await Task.sleep(for: Self.pingInterval)
                continue
            }
            do {
                let (opened, server) = try await probe()
                connection = opened
                moveIfNeeded(to: server)
                markReachable()
            } catch is ProbeTimeout {
                // Inconclusive: keep the current state.
            } catch is CancellationError {
                break
            } catch {
                markUnreachable(PostgresErrorMapping.storageError(error, operation: "connect").detail)
            }
            if connection == nil { try? await Task.sleep(for: Self.retryInterval) }
        }
        if let connection { Self.discard(connection) }
    }

    /// Closes a connection without waiting: closing one to a server that froze or went away must
    /// not hold the monitor.
    private static func discard(_ connection: PostgresConnection) {
        Task { try? await connection.close() }
    }

    private func markUnreachable(_ reason: String) {
        let retired = state.withLock { state -> Task<Void, Never>? in
            guard state.reachable, !state.closed else {
                state.reason = reason
                return nil
            }
            state.reachable = false
            state.unreachableSince = .now
            state.reason = reason
            // The retired pool fails its queued leases at once and closes its connections; a fresh
            // pool waits, without connections or backoff, for the server to answer again.
            let old = state.clientTask
            Self.retire(&state, makeClient, server: state.server)
            return old
        }
        if retired != nil {
            logger.error(
                "postgres cannot be reached; calls fail at once with UNAVAILABLE until it answers again",
                metadata: ["reason": "\(reason)"]
            )
        }
    }

    /// Replaces the pool when calls wait for leases that never come although the server answers
    /// the monitor and no connection is leased.
    private func retireIfWedged() {
        let now = ContinuousClock.now
        let waiting = state.withLock { state -> Int? in
            guard state.reachable, !state.closed, state.leased == 0, let oldest = state.waiting.values.min(),
                now - oldest > Self.wedgeTimeout, now - state.lastGrant > Self.wedgeTimeout
            else { return nil }
            Self.retire(&state, makeClient, server: state.server)
            state.lastGrant = now
            return state.waiting.count
        }
        if let waiting {
            logger.error(
                "the postgres connection pool stopped handing out connections; replaced with a fresh one",
                metadata: ["waiting_calls": "\(waiting)"]
            )
        }
    }

    /// Retires the current pool (it fails its queued leases at once and closes its connections)
    /// and starts a fresh one.
    private static func retire(_ state: inout State, _ makeClient: @Sendable (Int) -> PostgresClient, server: Int) {
        let old = state.clientTask
        old.cancel()
        state.retired.append(old)
        state.server = server
        state.client = makeClient(server)
        state.clientTask = run(state.client)
        state.generation += 1
    }

    /// Replaces the pool with one on `server` when the probe found the writable server elsewhere
    /// (a standby promoted): the old pool's calls fail at once and new ones go to `server`.
    private func moveIfNeeded(to server: Int) {
        let from = state.withLock { state -> Int? in
            guard state.server != server, !state.closed else { return nil }
            let from = state.server
            Self.retire(&state, makeClient, server: server)
            return from
        }
        if let from {
            logger.notice(
                "postgres: another server accepts writes now; serving from a pool on it",
                metadata: ["from": "\(describe(from))", "to": "\(describe(server))"]
            )
        }
    }

    /// The index of the server the pool connects to now.
    var server: Int { state.withLock { $0.server } }

    private func markReachable() {
        let downtime = state.withLock { state -> Duration? in
            guard !state.reachable else { return nil }
            state.reachable = true
            defer { state.unreachableSince = nil }
            // Retired pools that finished shutting down need no awaiting any more.
            return state.unreachableSince.map { ContinuousClock.now - $0 } ?? .zero
        }
        if let downtime {
            logger.notice(
                "postgres reachable again; serving from a fresh connection pool",
                metadata: ["unreachable_for": "\(downtime)"]
            )
        }
    }

    private static func run(_ client: PostgresClient) -> Task<Void, Never> {
        // `Task.immediate` enters `run()` at once, so a lease never finds the pool not yet running
        // (postgres-nio warns about that, though the lease would wait).
        if #available(macOS 26.0, iOS 26.0, tvOS 26.0, watchOS 26.0, visionOS 26.0, *) {
            return Task.immediate { await client.run() }
        } else {
            return Task { await client.run() }
        }
    }

    /// Runs `body` in a task of its own and returns its result, or throws `ProbeTimeout` after
    /// `timeout` without waiting for it: a call blocked on a frozen server (an `EventLoopFuture`
    /// does not answer cancellation) must not hold the monitor. A value that arrives after the
    /// timeout goes to `late` (a connection to close).
    static func withTimeout<T: Sendable>(
        _ timeout: Duration,
        late: @escaping @Sendable (T) async -> Void = { _ in },
        _ body: @escaping @Sendable () async throws -> T
    ) async throws -> T {
        let outcome = OneShot<T>()
        return try await withCheckedThrowingContinuation { continuation in
            outcome.set(continuation)
            let timer = Task {
                try? await Task.sleep(for: timeout)
                _ = outcome.finish(.failure(ProbeTimeout()))
            }
            Task {
                let result: Result<T, any Error>
                do {
                    result = .success(try await body())
                } catch {
                    result = .failure(error)
                }
                if !outcome.finish(result), case .success(let value) = result { await late(value) }
                timer.cancel()
            }
        }
    }
}

/// A continuation resumed once, by whichever comes first.
private final class OneShot<T: Sendable>: Sendable {
    private let state = Mutex<(resumed: Bool, continuation: CheckedContinuation<T, any Error>?)>((false, nil))

    func set(_ continuation: CheckedContinuation<T, any Error>) {
        state.withLock { $0.continuation = continuation }
    }

    /// Resumes with `result` unless something did already; true when this call did.
    func finish(_ result: Result<T, any Error>) -> Bool {
        let continuation = state.withLock { state -> CheckedContinuation<T, any Error>? in
            guard !state.resumed else { return nil }
            state.resumed = true
            return state.continuation
        }
        continuation?.resume(with: result)
        return continuation != nil
    }
}
