import Synchronization

/// Runs the requests of concurrent callers together: a caller that finds a free round and nothing
/// waiting runs its request at once, in its own task (no added wait or hop when idle); requests
/// that arrive while every round is busy
/// queue, and the next round takes all of them (up to `maximumWeight`) in one go. So N callers
/// cost about one round trip to the database, or one session lease on the token, per round rather
/// than one each, and a single caller costs what it did before.
///
/// Each request gets its own result: `run` answers one `Result` per request, in order; when `run`
/// throws, every request of the round gets the error (what each would have got alone, since a
/// round fails only when the database or the token does).
///
/// Written here rather than taken from a library: the shape is group commit's (``GroupCommitter``)
/// without the transaction, and neither swift-nio nor swift-async-algorithms has a batching
/// primitive that starts the first request at once.
final class Coalescer<Request: Sendable, Response: Sendable>: Sendable {
    typealias Run = @Sendable ([Request]) async throws -> [Result<Response, any Error>]

    private struct Waiting: Sendable {
        let request: Request
        let weight: Int
        let lane: String
        let continuation: CheckedContinuation<Response, any Error>
    }

    private struct State: Sendable {
        var queue: [Waiting] = []
        var rounds = 0
    }

    private let maximumRounds: Int
    private let maximumWeight: Int
    private let weight: @Sendable (Request) -> Int
    private let lane: @Sendable (Request) -> String
    private let run: Run
    private let state = Mutex(State())

    /// - Parameters:
    ///   - maximumRounds: rounds running at once (the connections or sessions worth using).
    ///   - maximumWeight: the most weight one round takes (a request heavier than it runs alone).
    ///   - lane: the fairness lane of a request (its tenant): a round takes requests round-robin
    ///     over the lanes that wait, so one tenant's backlog cannot keep another's request out of
    ///     the next round.
    init(
        maximumRounds: Int,
        maximumWeight: Int,
        weight: @escaping @Sendable (Request) -> Int,
        lane: @escaping @Sendable (Request) -> String = { _ in "" },
        run: @escaping Run
    ) {
        precondition(maximumRounds >= 1 && maximumWeight >= 1)
        self.maximumRounds = maximumRounds
        self.maximumWeight = maximumWeight
        self.weight = weight
        self.lane = lane
        self.run = run
    }

    /// Requests queued now (for tests).
    var queued: Int { state.withLock { $0.queue.count } }

    func submit(_ request: Request) async throws -> Response {
        // Nothing waits and a round is free: run it here, in the caller's own task, so a lone caller
        // costs no task and no thread hop; whatever queued meanwhile is handed to a task after.
        let leads = state.withLock { state in
            guard state.queue.isEmpty, state.rounds < maximumRounds else { return false }
            state.rounds += 1
            return true
        }
        if leads {
            let result: Result<Response, any Error>
            do {
                let results = try await run([request])
                result = results.count == 1 ? results[0] : .failure(CoalescerError.resultCountMismatch)
            } catch {
                result = .failure(error)
            }
            let next = state.withLock { state in
                let next = Self.take(&state.queue, maximumWeight)
                if next.isEmpty { state.rounds -= 1 }
                return next
            }
            if !next.isEmpty { Task { await self.drain(first: next) } }
            return try result.get()
        }
        return try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Response, any Error>) in
            let waiting = Waiting(
                request: request, weight: weight(request), lane: lane(request), continuation: continuation)
            let round: [Waiting]? = state.withLock { state in
                state.queue.append(waiting)
                guard state.rounds < maximumRounds else { return nil }
                state.rounds += 1
                return Self.take(&state.queue, maximumWeight)
            }
            if let round {
                Task { await self.drain(first: round) }
            }
        }
    }

    /// Runs `first`, then further rounds while requests wait; gives the round back when none does.
    private func drain(first: [Waiting]) async {
        var round = first
        while !round.isEmpty {
            await execute(round)
            round = state.withLock { state in
                let next = Self.take(&state.queue, maximumWeight)
                if next.isEmpty { state.rounds -= 1 }
                return next
            }
        }
    }

    private func execute(_ round: [Waiting]) async {
        do {
            let results = try await run(round.map(\.request))
            guard results.count == round.count else {
                for waiting in round {
                    waiting.continuation.resume(throwing: CoalescerError.resultCountMismatch)
                }
                return
            }
            for (waiting, result) in zip(round, results) {
                waiting.continuation.resume(with: result)
            }
        } catch {
            for waiting in round { waiting.continuation.resume(throwing: error) }
        }
    }

    /// The next round: requests taken round-robin over their lanes (lanes in the order their
    /// oldest request arrived, oldest first within a lane) while they fit in `maximumWeight`; at
    /// least one.
    private static func take(_ queue: inout [Waiting], _ maximumWeight: Int) -> [Waiting] {
        guard !queue.isEmpty else { return [] }
        var byLane: [String: [Int]] = [:]
        var order: [String] = []
        for (index, waiting) in queue.enumerated() {
            if byLane[waiting.lane] == nil { order.append(waiting.lane) }
            byLane[waiting.lane, default: []].append(index)
        }
        var chosen: [Int] = []
        var total = 0
        var turn = 0
        filling: while true {
            var took = false
            for lane in order {
                guard let positions = byLane[lane], turn < positions.count else { continue }
                let weight = queue[positions[turn]].weight
                if !chosen.isEmpty && total + weight > maximumWeight { break filling }
                chosen.append(positions[turn])
                total += weight
                took = true
            }
            if !took { break }
            turn += 1
        }
        let taken = chosen.map { queue[$0] }
        for index in chosen.sorted(by: >) { queue.remove(at: index) }
        return taken
    }
}

/// A round's `run` broke its contract (a programming error, reported rather than trapped).
enum CoalescerError: Error {
    case resultCountMismatch
}
