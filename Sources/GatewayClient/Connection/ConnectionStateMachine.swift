import NIOCore

/// The bookkeeping of one multiplexed connection, without I/O: which calls are in flight under
/// which request id, which wait for a slot, and whether the connection still takes new calls.
/// The channel handler performs the actions it returns (write a request, write a cancel, close).
///
/// Rules it keeps:
/// - at most `maximumInFlight` requests are in flight (the server's limit from `HelloResponse`);
///   further calls wait in a queue of at most `maximumQueued`, oldest first;
/// - a call abandoned while in flight (deadline, task cancellation) keeps its request id reserved
///   until the server answers it, because the server still counts it in flight and a reused id
///   would meet the late answer (or make the server close the connection);
/// - after a goaway (or a local drain), nothing new is sent: queued calls are refused as never
///   sent, in-flight calls finish, and the connection closes when the last one has.
struct ConnectionStateMachine: Sendable {
    /// A call, named before it has a request id.
    struct CallID: Hashable, Sendable, CustomStringConvertible {
        let rawValue: UInt64
        var description: String { "call-\(rawValue)" }
    }

    /// Whether the connection takes new calls.
    enum Phase: Hashable, Sendable {
        /// Sends new calls (up to the limit) and queues the rest.
        case active
        /// A goaway arrived or the client is shutting down: in-flight calls finish, nothing new.
        case draining
        /// The channel is gone.
        case closed
    }

    /// What to do with a submitted call.
    enum SubmitAction: Hashable, Sendable {
        /// Write the request with this id now.
        case send(requestID: UInt32)
        /// It waits for a slot.
        case queued
        /// Refuse it: it was never sent.
        case refuse(Refusal)
    }

    /// Why a call was refused before sending.
    enum Refusal: Hashable, Sendable {
        /// The connection is going away.
        case draining
        /// The connection is closed.
        case closed
        /// The local queue is at its limit.
        case queueFull
    }

    /// A queued call that now gets a slot: write it with this id.
    struct Dispatch: Hashable, Sendable {
        var call: CallID
        var requestID: UInt32
    }

    /// What an answer from the server leads to.
    struct ResponseOutcome: Hashable, Sendable {
        /// The call to complete; nil when it had been abandoned (its answer is dropped).
        var completed: CallID?
        /// Queued calls that now get the freed slot.
        var dispatch: [Dispatch]
        /// The connection is draining and this was the last request in flight.
        var closeConnection: Bool
    }

    /// What abandoning a call leads to.
    enum AbandonAction: Hashable, Sendable {
        /// It was in flight: send a cancel frame for this id (the id stays reserved).
        case sendCancel(requestID: UInt32)
        /// It was waiting: nothing was sent.
        case removedFromQueue
        /// The call is not known (already completed).
        case unknown
    }

    /// What a goaway or a local drain leads to.
    struct DrainOutcome: Hashable, Sendable {
        /// Queued calls to refuse as never sent.
        var refused: [CallID]
        /// Nothing is in flight: close now.
        var closeConnection: Bool
    }

    /// What the end of the channel leads to.
    struct CloseOutcome: Hashable, Sendable {
        /// Calls that were in flight: they may have run.
        var inFlight: [CallID]
        /// Calls that were waiting: never sent.
        var queued: [CallID]
    }

    private enum Slot: Hashable, Sendable {
        case call(CallID)
        /// Abandoned by the caller; the id waits for the server's answer.
        case abandoned
    }

    private(set) var phase: Phase = .active
    private var allocator: RequestIDAllocator
    private var inFlight: [UInt32: Slot] = [:]
    private var requestIDs: [CallID: UInt32] = [:]
    /// Waiting calls, oldest first; a call abandoned while waiting leaves `waiting` at once and
    /// is skipped when it reaches the head.
    private var queue = CircularBuffer<CallID>()
    private var waiting: Set<CallID> = []

    /// Requests allowed in flight. Starts at 1 (only the Hello) until the handshake says more.
    private(set) var maximumInFlight: Int
    /// Calls allowed to wait.
    let maximumQueued: Int

    init(maximumInFlight: Int = 1, maximumQueued: Int, firstRequestID: UInt32 = 1) {
        precondition(maximumInFlight >= 1, "at least one request must be able to be in flight")
        self.maximumInFlight = maximumInFlight
        self.maximumQueued = maximumQueued
        self.allocator = RequestIDAllocator(startingAt: firstRequestID)
    }

    /// Requests the server counts in flight, abandoned ones included.
    var inFlightCount: Int { inFlight.count }
    /// Calls waiting for a slot.
    var queuedCount: Int { waiting.count }
    /// Whether the call has been written and not yet answered.
    func requestID(of call: CallID) -> UInt32? { requestIDs[call] }

    /// A new call.
    mutating func submit(_ call: CallID) -> SubmitAction {
        switch phase {
        case .draining: return .refuse(.draining)
        case .closed: return .refuse(.closed)
        case .active: break
        }
        if inFlight.count < maximumInFlight, waiting.isEmpty, let id = allocate() {
            inFlight[id] = .call(call)
            requestIDs[call] = id
            return .send(requestID: id)
        }
        guard waiting.count < maximumQueued else { return .refuse(.queueFull) }
        queue.append(call)
        waiting.insert(call)
        return .queued
    }

    /// The server answered `requestID`. Nil when no request with that id is in flight.
    mutating func responseReceived(requestID: UInt32) -> ResponseOutcome? {
        guard let slot = inFlight.removeValue(forKey: requestID) else { return nil }
        var completed: CallID?
        if case .call(let call) = slot {
            requestIDs[call] = nil
            completed = call
        }
        let dispatch = dispatchWaiting()
        return ResponseOutcome(
            completed: completed,
            dispatch: dispatch,
            closeConnection: phase == .draining && inFlight.isEmpty
        )
    }

    /// The caller gave up on `call` (deadline or cancellation); it is failed locally.
    mutating func abandon(_ call: CallID) -> AbandonAction {
        if let id = requestIDs.removeValue(forKey: call) {
            inFlight[id] = .abandoned
            return .sendCancel(requestID: id)
        }
        if waiting.remove(call) != nil {
            // Drop the skipped entries once they outnumber the live ones, so a stalled queue
            // that keeps losing callers does not grow.
            if queue.count > 2 * waiting.count + 64 {
                queue = CircularBuffer(queue.filter { waiting.contains($0) })
            }
            return .removedFromQueue
        }
        return .unknown
    }

    /// The handshake told the limits: more calls may now be in flight.
    mutating func setMaximumInFlight(_ maximum: Int) -> [Dispatch] {
        precondition(maximum >= 1, "at least one request must be able to be in flight")
        maximumInFlight = maximum
        return dispatchWaiting()
    }

    /// A goaway arrived, or the client drains the connection to shut down.
    mutating func drain() -> DrainOutcome {
        guard phase == .active else {
            return DrainOutcome(refused: [], closeConnection: phase == .draining && inFlight.isEmpty)
        }
        phase = .draining
        let refused = takeWaiting()
        return DrainOutcome(refused: refused, closeConnection: inFlight.isEmpty)
    }

    /// The channel is gone: every call still here fails.
    mutating func closed() -> CloseOutcome {
        phase = .closed
        let inFlightCalls = inFlight.values.compactMap { slot -> CallID? in
            if case .call(let call) = slot { return call }
            return nil
        }
        inFlight.removeAll()
        requestIDs.removeAll()
        return CloseOutcome(inFlight: inFlightCalls, queued: takeWaiting())
    }

    private mutating func allocate() -> UInt32? {
        let inFlight = self.inFlight
        return allocator.allocate(inFlightCount: inFlight.count) { inFlight[$0] != nil }
    }

    private mutating func dispatchWaiting() -> [Dispatch] {
        guard phase == .active else { return [] }
        var dispatch: [Dispatch] = []
        while inFlight.count < maximumInFlight, let call = queue.popFirst() {
            guard waiting.remove(call) != nil else { continue }  // abandoned while waiting
            guard let id = allocate() else {
                queue.prepend(call)
                waiting.insert(call)
                break
            }
            inFlight[id] = .call(call)
            requestIDs[call] = id
            dispatch.append(Dispatch(call: call, requestID: id))
        }
        return dispatch
    }

    private mutating func takeWaiting() -> [CallID] {
        var calls: [CallID] = []
        while let call = queue.popFirst() {
            if waiting.remove(call) != nil { calls.append(call) }
        }
        return calls
    }
}
