import Synchronization
import Testing

@testable import KeyHierarchy

@Suite("Coalescer: concurrent requests in shared rounds")
struct CoalescerTests {
    struct Failure: Error, Equatable {}

    /// Records the rounds it ran; each round waits for `gate` when one is given.
    final class Recorder: Sendable {
        let rounds = Mutex<[[Int]]>([])
        let running = Mutex(0)
        let mostRunning = Mutex(0)
        let gate: Gate?
        let failRoundsWith: Set<Int>

        init(gate: Gate? = nil, failRoundsWith: Set<Int> = []) {
            self.gate = gate
            self.failRoundsWith = failRoundsWith
        }

        func run(_ requests: [Int]) async throws -> [Result<Int, any Error>] {
            rounds.withLock { $0.append(requests) }
            let now = running.withLock { running in
                running += 1
                return running
            }
            mostRunning.withLock { $0 = max($0, now) }
            defer { running.withLock { $0 -= 1 } }
            await gate?.wait()
            if requests.contains(where: failRoundsWith.contains) { throw Failure() }
            return requests.map { .success($0 * 10) }
        }
    }

    /// The current task, as a number to compare.
    static func currentTask() -> Int { withUnsafeCurrentTask { $0?.hashValue ?? 0 } }

    /// A lone caller's round runs in the caller's own task: no task is spawned, no thread hop.
    @Test func aLoneRequestRunsInTheCallersTask() async throws {
        let coalescer = Coalescer<Int, Int>(
            maximumRounds: 1, maximumWeight: 10, weight: { _ in 1 },
            run: { requests in requests.map { _ in .success(Self.currentTask()) } })
        #expect(try await coalescer.submit(1) == Self.currentTask())
    }

    @Test func aLoneRequestRunsAtOnce() async throws {
        let recorder = Recorder()
        let coalescer = Coalescer<Int, Int>(
            maximumRounds: 1, maximumWeight: 10, weight: { _ in 1 }, run: { try await recorder.run($0) })
        #expect(try await coalescer.submit(7) == 70)
        #expect(try await coalescer.submit(8) == 80)
        #expect(recorder.rounds.withLock { $0 } == [[7], [8]])
    }

    /// While every round is busy, requests queue; the next round takes them together, up to the
    /// weight limit, and each caller gets its own answer.
    @Test func waitingRequestsShareTheNextRound() async throws {
        let gate = Gate()
        let recorder = Recorder(gate: gate)
        let coalescer = Coalescer<Int, Int>(
            maximumRounds: 2, maximumWeight: 5, weight: { _ in 1 }, run: { try await recorder.run($0) })
        try await withThrowingTaskGroup(of: (Int, Int).self) { group in
            // Two rounds start at once and block at the gate.
            group.addTask { (1, try await coalescer.submit(1)) }
            group.addTask { (2, try await coalescer.submit(2)) }
            while recorder.rounds.withLock({ $0.count }) < 2 { try await Task.sleep(for: .milliseconds(1)) }
            for value in 3...9 { group.addTask { (value, try await coalescer.submit(value)) } }
            while coalescer.queued < 7 { try await Task.sleep(for: .milliseconds(1)) }
            gate.open()
            for try await (value, answer) in group { #expect(answer == value * 10) }
        }
        let rounds = recorder.rounds.withLock { $0 }
        #expect(rounds.count == 4, "rounds: \(rounds)")
        #expect(Set(rounds[0] + rounds[1]) == [1, 2])
        // 3...9 in arrival order (they queued one by one): five, then the two left.
        #expect(rounds[2...].map(\.count).sorted() == [2, 5])
        #expect(rounds[2...].flatMap { $0 }.sorted() == Array(3...9))
        #expect(recorder.mostRunning.withLock { $0 } <= 2)
    }

    /// One lane's backlog does not keep another lane's request out of the next round: rounds take
    /// requests round-robin over lanes. (Requests 1...6 are lane "busy", 100 lane "quiet".)
    @Test func lanesShareEachRound() async throws {
        let gate = Gate()
        let recorder = Recorder(gate: gate)
        let coalescer = Coalescer<Int, Int>(
            maximumRounds: 1, maximumWeight: 3, weight: { _ in 1 }, lane: { $0 == 100 ? "quiet" : "busy" },
            run: { try await recorder.run($0) })
        try await withThrowingTaskGroup(of: Int.self) { group in
            group.addTask { try await coalescer.submit(0) }
            while recorder.rounds.withLock({ $0.count }) < 1 { try await Task.sleep(for: .milliseconds(1)) }
            for value in 1...6 {
                group.addTask { try await coalescer.submit(value) }
                while coalescer.queued < value { try await Task.sleep(for: .milliseconds(1)) }
            }
            group.addTask { try await coalescer.submit(100) }
            while coalescer.queued < 7 { try await Task.sleep(for: .milliseconds(1)) }
            gate.open()
            for try await _ in group {}
        }
        let rounds = recorder.rounds.withLock { $0 }
        #expect(rounds.count == 4, "rounds: \(rounds)")
        // The round after the first: the busy lane's oldest, the quiet one, the busy lane's next.
        #expect(rounds[1] == [1, 100, 2], "rounds: \(rounds)")
        #expect(rounds[1...].flatMap { $0 } == [1, 100, 2, 3, 4, 5, 6])
    }

    /// A request heavier than the limit runs alone; lighter ones fill rounds up to the limit.
    @Test func weightBoundsARound() async throws {
        let gate = Gate()
        let recorder = Recorder(gate: gate)
        let coalescer = Coalescer<Int, Int>(
            maximumRounds: 1, maximumWeight: 10, weight: { $0 }, run: { try await recorder.run($0) })
        try await withThrowingTaskGroup(of: Int.self) { group in
            group.addTask { try await coalescer.submit(1) }
            while recorder.rounds.withLock({ $0.count }) < 1 { try await Task.sleep(for: .milliseconds(1)) }
            // In whatever order they queue, they make three more rounds: the 12 alone, and the
            // three 4s as two and one.
            for value in [12, 4, 4, 4] { group.addTask { try await coalescer.submit(value) } }
            while coalescer.queued < 4 { try await Task.sleep(for: .milliseconds(1)) }
            gate.open()
            for try await _ in group {}
        }
        let rounds = recorder.rounds.withLock { $0 }
        #expect(rounds.count == 4, "rounds: \(rounds)")
        for round in rounds { #expect(round.count == 1 || round.reduce(0, +) <= 10, "rounds: \(rounds)") }
        #expect(rounds.contains([12]))
        #expect(rounds.flatMap { $0 }.sorted() == [1, 4, 4, 4, 12])
    }

    /// A round that fails fails its own requests only.
    @Test func aFailingRoundFailsOnlyItsRequests() async throws {
        let gate = Gate()
        let recorder = Recorder(gate: gate, failRoundsWith: [1])
        let coalescer = Coalescer<Int, Int>(
            maximumRounds: 1, maximumWeight: 10, weight: { _ in 1 }, run: { try await recorder.run($0) })
        let results = await withTaskGroup(of: (Int, Result<Int, Failure>).self) { group in
            group.addTask { (1, await Self.result { try await coalescer.submit(1) }) }
            while recorder.rounds.withLock({ $0.count }) < 1 { try? await Task.sleep(for: .milliseconds(1)) }
            for value in 2...4 { group.addTask { (value, await Self.result { try await coalescer.submit(value) }) } }
            while coalescer.queued < 3 { try? await Task.sleep(for: .milliseconds(1)) }
            gate.open()
            return await group.reduce(into: [Int: Result<Int, Failure>]()) { $0[$1.0] = $1.1 }
        }
        #expect(results[1] == .failure(Failure()))
        for value in 2...4 { #expect(results[value] == .success(value * 10)) }
        #expect(recorder.rounds.withLock { $0 }.count == 2)
    }

    static func result(_ body: () async throws -> Int) async -> Result<Int, Failure> {
        do { return .success(try await body()) } catch { return .failure(Failure()) }
    }
}
