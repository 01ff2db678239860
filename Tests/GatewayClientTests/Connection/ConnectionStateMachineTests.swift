import Testing

@testable import GatewayClient

@Suite("Request ids")
struct RequestIDAllocatorTests {
    @Test("counts up from 1")
    func countsUp() {
        var allocator = RequestIDAllocator()
        let ids = (0..<5).compactMap { _ in allocator.allocate(inFlightCount: 0) { _ in false } }
        #expect(ids == [1, 2, 3, 4, 5])
    }

    @Test("wraps from 2^32−1 to 1, never giving 0")
    func wraps() {
        var allocator = RequestIDAllocator(startingAt: UInt32.max - 1)
        let ids = (0..<4).compactMap { _ in allocator.allocate(inFlightCount: 0) { _ in false } }
        #expect(ids == [UInt32.max - 1, UInt32.max, 1, 2])
        #expect(RequestIDAllocator(startingAt: 0).next == 1)
    }

    @Test("skips ids still in flight")
    func skipsInFlight() {
        var allocator = RequestIDAllocator(startingAt: UInt32.max)
        let inFlight: Set<UInt32> = [UInt32.max, 1, 2, 4]
        let first = allocator.allocate(inFlightCount: inFlight.count) { inFlight.contains($0) }
        let second = allocator.allocate(inFlightCount: inFlight.count) { inFlight.contains($0) }
        #expect(first == 3)
        #expect(second == 5)
    }

    @Test("gives nil rather than loop when every candidate it may try is in flight")
    func exhausted() {
        var allocator = RequestIDAllocator()
        #expect(allocator.allocate(inFlightCount: 3) { _ in true } == nil)
    }
}

@Suite("Connection state machine")
struct ConnectionStateMachineTests {
    typealias CallID = ConnectionStateMachine.CallID

    static func call(_ value: UInt64) -> CallID { CallID(rawValue: value) }

    @Test("sends up to the limit, queues the rest, and dispatches in order as answers free slots")
    func limitAndQueue() {
        var machine = ConnectionStateMachine(maximumInFlight: 2, maximumQueued: 2)
        #expect(machine.submit(Self.call(1)) == .send(requestID: 1))
        #expect(machine.submit(Self.call(2)) == .send(requestID: 2))
        #expect(machine.submit(Self.call(3)) == .queued)
        #expect(machine.submit(Self.call(4)) == .queued)
        #expect(machine.submit(Self.call(5)) == .refuse(.queueFull))
        #expect(machine.inFlightCount == 2)
        #expect(machine.queuedCount == 2)

        // Answers in any order: 2 first.
        let second = machine.responseReceived(requestID: 2)
        #expect(second?.completed == Self.call(2))
        #expect(second?.dispatch == [.init(call: Self.call(3), requestID: 3)])
        let first = machine.responseReceived(requestID: 1)
        #expect(first?.completed == Self.call(1))
        #expect(first?.dispatch == [.init(call: Self.call(4), requestID: 4)])
        #expect(machine.responseReceived(requestID: 1) == nil)  // not in flight any more
        #expect(machine.responseReceived(requestID: 99) == nil)
    }

    @Test("a new call does not overtake waiting ones")
    func fairness() {
        var machine = ConnectionStateMachine(maximumInFlight: 1, maximumQueued: 10)
        #expect(machine.submit(Self.call(1)) == .send(requestID: 1))
        #expect(machine.submit(Self.call(2)) == .queued)
        #expect(machine.submit(Self.call(3)) == .queued)
        let outcome = machine.responseReceived(requestID: 1)
        #expect(outcome?.dispatch.map(\.call) == [Self.call(2)])
    }

    @Test("the handshake's limit releases queued calls")
    func handshakeLimit() {
        var machine = ConnectionStateMachine(maximumQueued: 10)
        #expect(machine.submit(Self.call(1)) == .send(requestID: 1))  // the Hello
        for value in 2...5 { #expect(machine.submit(Self.call(UInt64(value))) == .queued) }
        _ = machine.responseReceived(requestID: 1)  // releases one slot under the limit of 1
        let dispatch = machine.setMaximumInFlight(128)
        #expect(dispatch.map(\.requestID) == [3, 4, 5])
        #expect(machine.inFlightCount == 4)
    }

    @Test("an abandoned call keeps its id reserved until the server answers it")
    func abandonedIDStaysReserved() {
        var machine = ConnectionStateMachine(maximumInFlight: 1, maximumQueued: 10, firstRequestID: UInt32.max)
        #expect(machine.submit(Self.call(1)) == .send(requestID: UInt32.max))
        #expect(machine.submit(Self.call(2)) == .queued)
        #expect(machine.abandon(Self.call(1)) == .sendCancel(requestID: UInt32.max))
        // The slot is still taken: the server counts the request until it answers.
        #expect(machine.inFlightCount == 1)
        #expect(machine.submit(Self.call(3)) == .queued)
        // The late answer completes nobody and frees the slot for the next waiting call.
        let late = machine.responseReceived(requestID: UInt32.max)
        #expect(late?.completed == nil)
        #expect(late?.dispatch == [.init(call: Self.call(2), requestID: 1)])
        #expect(machine.abandon(Self.call(1)) == .unknown)
    }

    @Test("ids in flight are never handed out again, even after wrapping")
    func noReuseInFlight() {
        var machine = ConnectionStateMachine(maximumInFlight: 3, maximumQueued: 0, firstRequestID: UInt32.max - 1)
        #expect(machine.submit(Self.call(1)) == .send(requestID: UInt32.max - 1))
        #expect(machine.submit(Self.call(2)) == .send(requestID: UInt32.max))
        #expect(machine.submit(Self.call(3)) == .send(requestID: 1))
        _ = machine.responseReceived(requestID: UInt32.max)
        // Next candidates 2 (free): fine; then wrapping around later skips 1 while it is in flight.
        #expect(machine.submit(Self.call(4)) == .send(requestID: 2))
    }

    @Test("abandoning a waiting call removes it without sending anything")
    func abandonQueued() {
        var machine = ConnectionStateMachine(maximumInFlight: 1, maximumQueued: 10)
        _ = machine.submit(Self.call(1))
        _ = machine.submit(Self.call(2))
        _ = machine.submit(Self.call(3))
        #expect(machine.abandon(Self.call(2)) == .removedFromQueue)
        #expect(machine.queuedCount == 1)
        #expect(machine.responseReceived(requestID: 1)?.dispatch.map(\.call) == [Self.call(3)])
    }

    @Test("many abandoned waiting calls do not make the queue grow")
    func abandonedQueueCompaction() {
        var machine = ConnectionStateMachine(maximumInFlight: 1, maximumQueued: 10)
        _ = machine.submit(Self.call(0))
        for value in 1...10_000 {
            #expect(machine.submit(Self.call(UInt64(value))) == .queued)
            #expect(machine.abandon(Self.call(UInt64(value))) == .removedFromQueue)
        }
        #expect(machine.queuedCount == 0)
        #expect(machine.submit(Self.call(20_000)) == .queued)
        #expect(machine.responseReceived(requestID: 1)?.dispatch.map(\.call) == [Self.call(20_000)])
    }

    @Test("a goaway refuses waiting calls, lets in-flight ones finish, then closes")
    func drain() {
        var machine = ConnectionStateMachine(maximumInFlight: 2, maximumQueued: 10)
        _ = machine.submit(Self.call(1))
        _ = machine.submit(Self.call(2))
        _ = machine.submit(Self.call(3))
        let outcome = machine.drain()
        #expect(outcome.refused == [Self.call(3)])
        #expect(!outcome.closeConnection)
        #expect(machine.phase == .draining)
        #expect(machine.submit(Self.call(4)) == .refuse(.draining))
        let first = machine.responseReceived(requestID: 1)
        #expect(first?.completed == Self.call(1))
        #expect(first?.dispatch == [])
        #expect(first?.closeConnection == false)
        let second = machine.responseReceived(requestID: 2)
        #expect(second?.closeConnection == true)
        // A drain with nothing in flight closes at once.
        var idle = ConnectionStateMachine(maximumInFlight: 2, maximumQueued: 10)
        #expect(idle.drain().closeConnection)
    }

    @Test("closing fails in-flight calls as maybe processed and waiting ones as not sent")
    func close() {
        var machine = ConnectionStateMachine(maximumInFlight: 2, maximumQueued: 10)
        _ = machine.submit(Self.call(1))
        _ = machine.submit(Self.call(2))
        _ = machine.submit(Self.call(3))
        _ = machine.abandon(Self.call(2))
        let outcome = machine.closed()
        #expect(outcome.inFlight == [Self.call(1)])
        #expect(outcome.queued == [Self.call(3)])
        #expect(machine.phase == .closed)
        #expect(machine.submit(Self.call(4)) == .refuse(.closed))
    }
}
