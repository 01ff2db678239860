import KeyHierarchy
import SQLiteNIO
import Synchronization

/// A FIFO lease of a few SQLite connections to one task at a time, without blocking a thread.
///
/// The writer queue holds one connection (SQLite has one writer; queueing in-process keeps tasks
/// from spinning in SQLite's busy handler), the reader queue a few. A task waits in arrival order,
/// at most `timeout`, behind at most `maximumWaiters` others; a released connection goes straight
/// to the oldest waiter, so no newcomer can overtake it.
final class ConnectionQueue: Sendable {
    /// What the queue is called in errors and logs ("writer", "reader").
    let name: String
    /// How long a task waits for a connection before failing with `StorageError(.conflict)`.
    let timeout: Duration
    /// The most tasks waiting at once; beyond it callers fail at once with `.unavailable`.
    let maximumWaiters: Int

    private let state: Mutex<State>

    private struct Waiter {
        let id: Int
        let continuation: CheckedContinuation<SQLiteConnection, any Error>
        var timer: Task<Void, Never>?
    }

    private struct State: ~Copyable {
        var idle: [SQLiteConnection]
        var leased = 0
        /// Oldest first.
        var waiters: [Waiter] = []
        var nextWaiterID = 0
        var closed = false
        /// `drain` calls waiting for leased connections to come back.
        var drainWaiters: [CheckedContinuation<[SQLiteConnection], Never>] = []
    }

    init(name: String, connections: [SQLiteConnection], timeout: Duration, maximumWaiters: Int) {
        self.name = name
        self.timeout = timeout
        self.maximumWaiters = maximumWaiters
        self.state = Mutex(State(idle: connections))
    }

    /// Waits for a connection in FIFO order. Throws `StorageError(.conflict)` after `timeout`,
    /// `.unavailable` when the queue is full or closed, `CancellationError` when the task is
    /// cancelled while waiting.
    func acquire() async throws -> SQLiteConnection {
        let id = state.withLock { state in
            defer { state.nextWaiterID += 1 }
            return state.nextWaiterID
        }
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation {
                (continuation: CheckedContinuation<SQLiteConnection, any Error>) in
                enum Decision {
                    case resume(Result<SQLiteConnection, any Error>)
                    case queued
                }
                let decision = state.withLock { state -> Decision in
                    if state.closed {
                        return .resume(.failure(closedError))
                    }
                    if state.waiters.isEmpty, let connection = state.idle.popLast() {
                        state.leased += 1
                        return .resume(.success(connection))
                    }
                    if state.waiters.count >= maximumWaiters {
                        return .resume(
                            .failure(
                                StorageError(
                                    .unavailable,
                                    "\(maximumWaiters) tasks already wait for the SQLite \(name) connection"
                                )
                            )
                        )
                    }
                    state.waiters.append(Waiter(id: id, continuation: continuation))
                    return .queued
                }
                switch decision {
                case .resume(let result):
                    continuation.resume(with: result)
                case .queued:
                    let timeout = self.timeout
                    let timer = Task { [weak self] in
                        guard (try? await Task.sleep(for: timeout)) != nil, let self else { return }
                        self.failWaiter(id, with: self.timeoutError)
                    }
                    let stored = state.withLock { state -> Bool in
                        guard let index = state.waiters.firstIndex(where: { $0.id == id }) else { return false }
                        state.waiters[index].timer = timer
                        return true
                    }
                    if !stored {
                        timer.cancel()
                    }
                    // A cancellation that arrived before the waiter was queued found nothing to cancel.
                    if Task.isCancelled {
                        failWaiter(id, with: CancellationError())
                    }
                }
            }
        } onCancel: {
            failWaiter(id, with: CancellationError())
        }
    }

    /// Returns a connection: to the oldest waiter if there is one, else to the idle list.
    func release(_ connection: SQLiteConnection) {
        enum Next {
            case handOver(Waiter)
            case drained([CheckedContinuation<[SQLiteConnection], Never>], [SQLiteConnection])
            case none
        }
        let next = state.withLock { state -> Next in
            if !state.waiters.isEmpty {
                return .handOver(state.waiters.removeFirst())
            }
            state.leased -= 1
            state.idle.append(connection)
            if state.closed, state.leased == 0, !state.drainWaiters.isEmpty {
                let waiters = state.drainWaiters
                state.drainWaiters.removeAll()
                let connections = state.idle
                state.idle.removeAll()
                return .drained(waiters, connections)
            }
            return .none
        }
        switch next {
        case .handOver(let waiter):
            waiter.timer?.cancel()
            waiter.continuation.resume(returning: connection)
        case .drained(let waiters, let connections):
            resumeDrainWaiters(waiters, with: connections)
        case .none:
            break
        }
    }

    /// Closes the queue: waiting and later `acquire` calls fail with `.unavailable`; returns once
    /// every leased connection is back, with all the connections (to the first caller only; later
    /// callers get none).
    func drain() async -> [SQLiteConnection] {
        await withCheckedContinuation { (continuation: CheckedContinuation<[SQLiteConnection], Never>) in
            let (failed, ready) = state.withLock { state -> ([Waiter], [SQLiteConnection]?) in
                state.closed = true
                let failed = state.waiters
                state.waiters.removeAll()
                guard state.leased == 0 else {
                    state.drainWaiters.append(continuation)
                    return (failed, nil)
                }
                let connections = state.idle
                state.idle.removeAll()
                return (failed, connections)
            }
            for waiter in failed {
                waiter.timer?.cancel()
                waiter.continuation.resume(throwing: closedError)
            }
            if let ready {
                continuation.resume(returning: ready)
            }
        }
    }

    private func resumeDrainWaiters(
        _ waiters: [CheckedContinuation<[SQLiteConnection], Never>],
        with connections: [SQLiteConnection]
    ) {
        for (index, waiter) in waiters.enumerated() {
            waiter.resume(returning: index == 0 ? connections : [])
        }
    }

    private func failWaiter(_ id: Int, with error: any Error) {
        let waiter = state.withLock { state -> Waiter? in
            guard let index = state.waiters.firstIndex(where: { $0.id == id }) else { return nil }
            return state.waiters.remove(at: index)
        }
        guard let waiter else { return }
        waiter.timer?.cancel()
        waiter.continuation.resume(throwing: error)
    }

    private var closedError: StorageError {
        StorageError(.unavailable, "the SQLite key store is closed")
    }

    private var timeoutError: StorageError {
        StorageError(.conflict, "no SQLite \(name) connection free within \(timeout)")
    }
}
