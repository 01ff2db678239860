import DocumentTestSupport
import GatewayWire
import NIOCore
import Testing

@testable import GatewayTransport

/// A connection driven by hand: the client's frames go in, what the server does comes out.
private struct Transcript {
    var machine: ConnectionStateMachine
    var now: NIODeadline = .uptimeNanoseconds(1_000_000_000_000)
    /// Tasks started and not yet reported finished, by request id.
    var tasks: [UInt32: ConnectionStateMachine.TaskID] = [:]

    init(limits: ServerLimits = ServerLimits()) {
        machine = ConnectionStateMachine(limits: limits)
        _ = machine.connectionActive(now: now)
    }

    /// An authenticated connection.
    static func authenticated(limits: ServerLimits = ServerLimits()) -> Transcript {
        var transcript = Transcript(limits: limits)
        _ = transcript.client(.request(1, .hello))
        _ = transcript.helloAccepted(1)
        return transcript
    }

    mutating func advance(_ amount: TimeAmount) { now = now + amount }

    mutating func client(_ frame: Frame) -> [ConnectionStateMachine.Action] {
        let actions = machine.frameReceived(frame, now: now)
        record(actions)
        return actions
    }

    mutating func helloAccepted(_ requestID: UInt32) -> [ConnectionStateMachine.Action] {
        let peer = AuthenticatedPeer(principal: "alice", apiTokenID: "t1", clientName: "test")
        let response = OutgoingResponse(status: .ok, payload: ByteBuffer(string: "hello-ok"))
        return machine.helloFinished(
            tasks.removeValue(forKey: requestID)!, .accepted(peer, response: response), now: now)
    }

    mutating func helloRefused(_ requestID: UInt32) -> [ConnectionStateMachine.Action] {
        let response = OutgoingResponse(
            status: .unauthenticated,
            payload: Hsmgw_V1_Status(.unauthenticated, "unknown token").wirePayload()
        )
        return machine.helloFinished(tasks.removeValue(forKey: requestID)!, .refused(response), now: now)
    }

    /// The handler returns OK for `requestID`'s task, with `body` as the payload.
    mutating func handlerReturns(_ requestID: UInt32, body: String = "ok") -> [ConnectionStateMachine.Action] {
        let taskID = tasks.removeValue(forKey: requestID)!
        return handlerReturns(task: taskID, body: body)
    }

    mutating func handlerReturns(task: ConnectionStateMachine.TaskID, body: String = "ok") -> [ConnectionStateMachine
        .Action]
    {
        machine.handlerFinished(task, OutgoingResponse(status: .ok, payload: ByteBuffer(string: body)), now: now)
    }

    mutating func fire(_ timer: ConnectionTimer) -> [ConnectionStateMachine.Action] {
        let actions = machine.timerFired(timer, now: now)
        record(actions)
        return actions
    }

    private mutating func record(_ actions: [ConnectionStateMachine.Action]) {
        for action in actions {
            switch action {
            case .startHello(let taskID, let head), .startHandler(let taskID, let head, _):
                tasks[head.requestID] = taskID
            default:
                break
            }
        }
    }
}

/// What a response or goaway said.
private struct Said: Equatable, CustomStringConvertible {
    var requestID: UInt32
    var status: StatusCode
    var reason: String

    init(_ requestID: UInt32, _ status: StatusCode, _ reason: String = "") {
        self.requestID = requestID
        self.status = status
        self.reason = reason
    }

    var description: String { "#\(requestID) \(status) \(reason)" }
}

extension Frame {
    fileprivate static func request(_ id: UInt32, _ method: Method, deadline: UInt32 = 0) -> Frame {
        Frame(kind: .request, method: method.rawValue, requestID: id, deadlineMilliseconds: deadline)
    }

    fileprivate static func cancel(_ id: UInt32) -> Frame { Frame(kind: .cancel, requestID: id) }
}

extension Array where Element == ConnectionStateMachine.Action {
    /// The responses, in order, with the reason of failed ones.
    fileprivate var answers: [Said] {
        compactMap {
            guard case .respond(let response) = $0 else { return nil }
            let reason =
                response.status == .ok ? "" : (try? Hsmgw_V1_Status(wirePayload: response.frame.payload))?.reason
            return Said(response.frame.requestID, response.status, reason ?? "?")
        }
    }

    fileprivate var responseFrames: [Frame] {
        compactMap {
            guard case .respond(let response) = $0 else { return nil }
            return response.frame
        }
    }

    /// The goaways sent, as the header's status and the payload's reason. A goaway whose header
    /// status is not its `Status.code` (protocol §3.2) shows as UNKNOWN, naming both, so every
    /// test that expects a goaway also checks its header.
    fileprivate var goaways: [Said] {
        compactMap {
            guard case .send(let frame) = $0, frame.kind == .goaway else { return nil }
            let status = (try? Hsmgw_V1_Status(wirePayload: frame.payload)) ?? Hsmgw_V1_Status()
            guard UInt32(frame.status) == status.code else {
                return Said(0, .unknown, "header status \(frame.status) != Status.code \(status.code)")
            }
            return Said(0, StatusCode(rawValue: frame.status), status.reason)
        }
    }

    fileprivate var sent: [Frame] {
        compactMap {
            guard case .send(let frame) = $0 else { return nil }
            return frame
        }
    }

    fileprivate var started: [(method: Method, requestID: UInt32)] {
        compactMap {
            switch $0 {
            case .startHello(_, let head), .startHandler(_, let head, _): return (head.method, head.requestID)
            default: return nil
            }
        }
    }

    fileprivate var cancelledTasks: [ConnectionStateMachine.TaskID] {
        compactMap {
            guard case .cancelTask(let taskID) = $0 else { return nil }
            return taskID
        }
    }

    fileprivate var timers: [ConnectionTimer: NIODeadline] {
        var timers: [ConnectionTimer: NIODeadline] = [:]
        for case .scheduleTimer(let timer, let deadline) in self { timers[timer] = deadline }
        return timers
    }

    fileprivate var refusals: [String] {
        compactMap {
            guard case .refused(let reason) = $0 else { return nil }
            return reason
        }
    }

    fileprivate var closes: Bool {
        contains {
            if case .close = $0 { return true }
            return false
        }
    }
}

@Suite("Connection state machine: protocol transcripts")
struct ConnectionStateMachineTests {
    // MARK: Handshake

    @Test("a connection arms the handshake, keepalive and idle timers")
    func activationArmsTimers() {
        var machine = ConnectionStateMachine(limits: ServerLimits())
        let t0 = NIODeadline.uptimeNanoseconds(5_000_000_000)
        let timers = machine.connectionActive(now: t0).timers
        #expect(timers[.handshake] == t0 + .seconds(10))
        #expect(timers[.keepalive] == t0 + .seconds(30))
        #expect(timers[.idle] == t0 + .seconds(300))
    }

    @Test("before Hello: a request is answered UNAUTHENTICATED, HANDSHAKE_REQUIRED, and never runs")
    func requestBeforeHello() {
        var c = Transcript()
        let actions = c.client(.request(7, .generateDataKey))
        #expect(actions.answers == [Said(7, .unauthenticated, "HANDSHAKE_REQUIRED")])
        #expect(actions.started.isEmpty)
        #expect(actions.refusals == ["HANDSHAKE_REQUIRED"])
        #expect(!actions.closes)
    }

    @Test("Hello runs; once accepted, the response goes out and requests run with the peer")
    func helloThenRequest() throws {
        var c = Transcript()
        let hello = c.client(.request(1, .hello))
        #expect(hello.started.map(\.requestID) == [1])
        guard case .startHello = hello.first else {
            Issue.record("expected startHello, got \(hello)")
            return
        }
        // While Hello runs, other requests still need the handshake and a second Hello waits.
        #expect(c.client(.request(2, .listTenants)).answers == [Said(2, .unauthenticated, "HANDSHAKE_REQUIRED")])
        #expect(c.client(.request(3, .hello)).answers == [Said(3, .failedPrecondition)])

        let accepted = c.helloAccepted(1)
        #expect(accepted.answers == [Said(1, .ok)])
        #expect(accepted.responseFrames.first?.payload == ByteBuffer(string: "hello-ok"))
        #expect(c.machine.isAuthenticated)

        let request = c.client(.request(4, .listTenants))
        guard case .startHandler(_, let head, let peer) = request.first else {
            Issue.record("expected startHandler, got \(request)")
            return
        }
        #expect(head.method == .listTenants && head.requestID == 4 && head.deadline == nil)
        #expect(peer.principal == "alice")
        let answered = c.handlerReturns(4, body: "tenants")
        #expect(answered.answers == [Said(4, .ok)])
        let frame = try #require(answered.responseFrames.first)
        #expect(frame.method == Method.listTenants.rawValue && frame.payload == ByteBuffer(string: "tenants"))
    }

    @Test("a refused Hello is answered and the connection closes")
    func helloRefused() {
        var c = Transcript()
        _ = c.client(.request(1, .hello))
        let refused = c.helloRefused(1)
        #expect(refused.answers == [Said(1, .unauthenticated, "")])
        #expect(refused.closes)
        #expect(refused.goaways.isEmpty)
        #expect(c.machine.isClosed)
    }

    @Test("a second Hello on an authenticated connection gets FAILED_PRECONDITION")
    func secondHello() {
        var c = Transcript.authenticated()
        let actions = c.client(.request(9, .hello))
        #expect(actions.answers == [Said(9, .failedPrecondition)])
        #expect(actions.started.isEmpty)
    }

    @Test("no Hello within the handshake timeout: goaway UNAUTHENTICATED, HANDSHAKE_TIMEOUT, close")
    func handshakeTimeout() {
        var c = Transcript()
        c.advance(.seconds(10))
        let actions = c.fire(.handshake)
        #expect(actions.goaways == [Said(0, .unauthenticated, "HANDSHAKE_TIMEOUT")])
        #expect(actions.closes)
    }

    @Test("the handshake timer does nothing once Hello succeeded")
    func handshakeTimerAfterHello() {
        var c = Transcript.authenticated()
        c.advance(.seconds(10))
        #expect(c.fire(.handshake).isEmpty)
    }

    // MARK: Request ids and limits

    @Test("a request id still in flight: goaway REQUEST_ID_IN_USE; later requests refused; close when done")
    func duplicateRequestID() {
        var c = Transcript.authenticated()
        _ = c.client(.request(5, .getDataKey))
        let duplicate = c.client(.request(5, .getDataKey))
        #expect(duplicate.goaways == [Said(0, .invalidArgument, "REQUEST_ID_IN_USE")])
        #expect(duplicate.started.isEmpty && !duplicate.closes)

        let late = c.client(.request(6, .getDataKey))
        #expect(late.answers == [Said(6, .unavailable, "CONNECTION_CLOSING")])

        let done = c.handlerReturns(5)
        #expect(done.answers == [Said(5, .ok)])
        #expect(done.closes)
    }

    @Test("request id 0: goaway INVALID_ARGUMENT, INVALID_REQUEST_ID; nothing in flight, so close at once")
    func requestIDZero() {
        var c = Transcript.authenticated()
        let actions = c.client(.request(0, .getDataKey))
        #expect(actions.goaways == [Said(0, .invalidArgument, "INVALID_REQUEST_ID")])
        #expect(actions.closes)
    }

    @Test("over max requests in flight: that request alone gets RESOURCE_EXHAUSTED; the connection stays")
    func tooManyInFlight() {
        var limits = ServerLimits()
        limits.maxRequestsInFlightPerConnection = 3
        var c = Transcript.authenticated(limits: limits)
        for id: UInt32 in 10...12 { #expect(c.client(.request(id, .getDataKey)).started.count == 1) }
        let over = c.client(.request(13, .getDataKey))
        #expect(over.answers == [Said(13, .resourceExhausted, "TOO_MANY_REQUESTS_IN_FLIGHT")])
        #expect(!over.closes && over.goaways.isEmpty)

        _ = c.handlerReturns(10)
        #expect(c.client(.request(14, .getDataKey)).started.count == 1)
    }

    @Test("a cancelled request's task counts against the limit until it returns")
    func abandonedTasksCount() {
        var limits = ServerLimits()
        limits.maxRequestsInFlightPerConnection = 1
        var c = Transcript.authenticated(limits: limits)
        _ = c.client(.request(10, .getDataKey))
        let task = c.tasks[10]!
        _ = c.client(.cancel(10))
        #expect(
            c.client(.request(11, .getDataKey)).answers == [Said(11, .resourceExhausted, "TOO_MANY_REQUESTS_IN_FLIGHT")]
        )
        #expect(c.handlerReturns(task: task).isEmpty)  // the late result is dropped
        #expect(c.client(.request(12, .getDataKey)).started.count == 1)
    }

    @Test("an unknown method number reaches the handler")
    func unknownMethod() {
        var c = Transcript.authenticated()
        let actions = c.client(.request(3, Method(rawValue: 999)))
        #expect(actions.started.map(\.method.rawValue) == [999])
    }

    // MARK: Cancel and deadlines

    @Test("cancel: CANCELLED at once, the task is cancelled, its result dropped, and the id reusable")
    func cancel() {
        var c = Transcript.authenticated()
        _ = c.client(.request(8, .encrypt))
        let task = c.tasks[8]!
        let cancelled = c.client(.cancel(8))
        #expect(cancelled.answers == [Said(8, .cancelled)])
        #expect(cancelled.cancelledTasks == [task])

        #expect(c.client(.request(8, .encrypt)).started.count == 1)  // id 8 is free again
        #expect(c.handlerReturns(task: task).isEmpty)  // the first task's late result is dropped
        #expect(c.handlerReturns(8).answers == [Said(8, .ok)])
    }

    @Test("a cancel for an id not in flight is ignored")
    func cancelUnknown() {
        var c = Transcript.authenticated()
        #expect(c.client(.cancel(77)).answers.isEmpty)
        #expect(!c.machine.isClosed)
    }

    @Test("deadline: DEADLINE_EXCEEDED when it passes, the task is cancelled, its result dropped")
    func deadline() {
        var c = Transcript.authenticated()
        let start = c.client(.request(4, .decrypt, deadline: 250))
        let task = c.tasks[4]!
        #expect(
            start.contains {
                if case .scheduleRequestDeadline(task, c.now + .milliseconds(250)) = $0 { true } else { false }
            })
        guard case .startHandler(_, let head, _) = start.first else { return }
        #expect(head.deadline == c.now + .milliseconds(250))

        c.advance(.milliseconds(250))
        let expired = c.machine.requestDeadlinePassed(task, now: c.now)
        #expect(expired.answers == [Said(4, .deadlineExceeded)])
        #expect(expired.cancelledTasks == [task])
        #expect(c.handlerReturns(task: task).isEmpty)
    }

    @Test("an answer before the deadline cancels the deadline's wake-up")
    func answerCancelsDeadline() {
        var c = Transcript.authenticated()
        _ = c.client(.request(4, .decrypt, deadline: 1000))
        let task = c.tasks[4]!
        let answered = c.handlerReturns(4)
        #expect(answered.contains { if case .cancelRequestDeadline(task) = $0 { true } else { false } })
        #expect(c.machine.requestDeadlinePassed(task, now: c.now).isEmpty)
    }

    // MARK: Ping, keepalive, idle, read timeout

    @Test("a client ping is answered by a pong with the same id and payload")
    func ping() {
        var c = Transcript()
        let actions = c.client(Frame(kind: .ping, requestID: 42, payload: ByteBuffer(string: "abc")))
        #expect(actions.sent == [Frame(kind: .pong, requestID: 42, payload: ByteBuffer(string: "abc"))])
    }

    @Test("a ping payload over 64 bytes is a connection error")
    func pingTooLarge() {
        var c = Transcript()
        let payload = ByteBuffer(repeating: 1, count: 65)
        let actions = c.client(Frame(kind: .ping, requestID: 1, payload: payload))
        #expect(actions.goaways == [Said(0, .invalidArgument, "PING_PAYLOAD_TOO_LARGE")])
        #expect(actions.closes)
    }

    @Test("keepalive: a ping after the idle interval; the pong re-arms it")
    func keepalive() throws {
        var c = Transcript.authenticated()
        c.advance(.seconds(30))
        let ping = c.fire(.keepalive)
        let frame = try #require(ping.sent.first)
        #expect(frame.kind == .ping)
        #expect(ping.timers[.pong] == c.now + .seconds(10))

        c.advance(.seconds(3))
        let pong = c.client(Frame(kind: .pong, requestID: frame.requestID))
        #expect(pong.timers[.keepalive] == c.now + .seconds(30))
        c.advance(.seconds(7))
        #expect(c.fire(.pong).isEmpty)  // answered: the wake-up finds nothing to do
    }

    @Test("keepalive: no pong within the timeout closes the connection")
    func keepaliveTimeout() {
        var c = Transcript.authenticated()
        c.advance(.seconds(30))
        _ = c.fire(.keepalive)
        c.advance(.seconds(10))
        let actions = c.fire(.pong)
        #expect(actions.goaways == [Said(0, .unavailable, "KEEPALIVE_TIMEOUT")])
        #expect(actions.closes)
    }

    @Test("keepalive: no ping while a frame is partly received; the read timeout's goaway comes alone")
    func noPingDuringPartialFrame() {
        var c = Transcript.authenticated()
        c.advance(.seconds(25))
        // The client starts a frame and stalls in it.
        let begun = c.machine.readCompleted(partialFrameBuffered: true, now: c.now)
        #expect(begun.timers[.read] == c.now + .seconds(30))
        c.advance(.seconds(5))  // 30 s without a complete frame: keepalive time
        let keepalive = c.fire(.keepalive)
        #expect(keepalive.sent.isEmpty, "a ping went out in the middle of a partly received frame")
        #expect(keepalive.timers[.keepalive] == c.now + .seconds(30))
        #expect(c.fire(.pong).isEmpty)  // no ping, so no pong is awaited
        c.advance(.seconds(25))  // the frame began 30 s ago
        let timeout = c.fire(.read)
        #expect(timeout.sent.map(\.kind) == [.goaway])
        #expect(timeout.goaways == [Said(0, .invalidArgument, "READ_TIMEOUT")])
        #expect(timeout.closes)
    }

    @Test("keepalive: once the partial frame completes, the next keepalive pings as usual")
    func pingAfterPartialFrameCompletes() throws {
        var c = Transcript.authenticated()
        c.advance(.seconds(30))
        _ = c.machine.readCompleted(partialFrameBuffered: true, now: c.now)
        #expect(c.fire(.keepalive).sent.isEmpty)
        c.advance(.seconds(2))
        _ = c.client(Frame(kind: .cancel, requestID: 9))  // the frame completes
        let done = c.machine.readCompleted(partialFrameBuffered: false, now: c.now)
        #expect(done.isEmpty)
        c.advance(.seconds(30))
        let ping = try #require(c.fire(.keepalive).sent.first)
        #expect(ping.kind == .ping)
        #expect(ping.status == 0 && ping.method == 0)
    }

    @Test("the shutdown goaway is byte for byte the example of protocol.md §15.6")
    func shutdownGoawayGoldenBytes() throws {
        var c = Transcript.authenticated()
        let actions = c.machine.shutdownRequested(now: c.now)
        let goaway = try #require(actions.sent.first { $0.kind == .goaway })
        var encoded = ByteBuffer()
        try FrameEncoder().encode(data: goaway, out: &encoded)
        let documented = try DocumentedBytes.document("docs/protocol.md").bytes("example", "goaway")
        #expect(Array(encoded.readableBytesView) == documented)
    }

    @Test("a wake-up that comes early (frames arrived meanwhile) is rescheduled, not acted on")
    func earlyWakeUp() {
        var c = Transcript.authenticated()
        c.advance(.seconds(20))
        _ = c.client(Frame(kind: .ping, requestID: 1))
        c.advance(.seconds(10))
        let actions = c.fire(.keepalive)
        #expect(actions.sent.isEmpty)
        #expect(actions.timers[.keepalive] == c.now + .seconds(20))
    }

    @Test("idle: no request for the idle timeout gives goaway UNAVAILABLE, IDLE, and a close")
    func idle() {
        var limits = ServerLimits()
        limits.keepaliveInterval = .seconds(1000)
        var c = Transcript.authenticated(limits: limits)
        c.advance(.seconds(300))
        let actions = c.fire(.idle)
        #expect(actions.goaways == [Said(0, .unavailable, "IDLE")])
        #expect(actions.closes)
        #expect(actions.refusals.isEmpty)
    }

    @Test("idle: a request in flight keeps the connection; the timer restarts when it is answered")
    func idleWithRequestInFlight() {
        var c = Transcript.authenticated()
        _ = c.client(.request(2, .getDataKey))
        c.advance(.seconds(300))
        #expect(c.fire(.idle).isEmpty)
        let answered = c.handlerReturns(2)
        #expect(answered.timers[.idle] == c.now + .seconds(300))
    }

    @Test("idle: pings do not count as activity")
    func pingsAreNotActivity() {
        var c = Transcript.authenticated()
        c.advance(.seconds(299))
        _ = c.client(Frame(kind: .ping, requestID: 3))
        c.advance(.seconds(1))
        #expect(c.fire(.idle).goaways == [Said(0, .unavailable, "IDLE")])
    }

    @Test("read timeout: a frame begun and not completed in time is a connection error")
    func readTimeout() {
        var c = Transcript.authenticated()
        let begun = c.machine.readCompleted(partialFrameBuffered: true, now: c.now)
        #expect(begun.timers[.read] == c.now + .seconds(30))
        c.advance(.seconds(10))
        #expect(c.machine.readCompleted(partialFrameBuffered: true, now: c.now).isEmpty)  // same frame
        c.advance(.seconds(20))
        let actions = c.fire(.read)
        #expect(actions.goaways == [Said(0, .invalidArgument, "READ_TIMEOUT")])
        #expect(actions.closes)
    }

    @Test("read timeout: a completed frame stops it")
    func readTimeoutCleared() {
        var c = Transcript.authenticated()
        _ = c.machine.readCompleted(partialFrameBuffered: true, now: c.now)
        _ = c.client(Frame(kind: .ping, requestID: 1))
        _ = c.machine.readCompleted(partialFrameBuffered: false, now: c.now)
        c.advance(.seconds(30))
        #expect(c.fire(.read).isEmpty)
    }

    // MARK: Connection errors

    @Test(
        "frame errors: goaway with the code and reason of the rules, requests in flight answered, close",
        arguments: [
            (FrameError.Kind.lengthTooSmall, StatusCode.invalidArgument, "FRAME_TOO_SMALL"),
            (.lengthTooLarge, .resourceExhausted, "FRAME_TOO_LARGE"),
            (.unsupportedVersion, .invalidArgument, "UNSUPPORTED_VERSION"),
            (.unknownKind, .invalidArgument, "UNKNOWN_FRAME_KIND"),
            (.reservedFlags, .invalidArgument, "RESERVED_FLAGS"),
            (.truncated, .invalidArgument, "TRUNCATED_FRAME"),
        ]
    )
    func frameErrors(kind: FrameError.Kind, code: StatusCode, reason: String) {
        var c = Transcript.authenticated()
        _ = c.client(.request(3, .getDataKey))
        let task = c.tasks[3]!
        let actions = c.machine.frameError(FrameError(kind, "bad frame"), now: c.now)
        #expect(actions.goaways == [Said(0, code, reason)])
        #expect(actions.answers == [Said(3, .unavailable, "CONNECTION_CLOSING")])
        #expect(actions.cancelledTasks == [task])
        #expect(actions.refusals == [reason])
        #expect(actions.closes)
        #expect(c.client(.request(4, .getDataKey)).isEmpty)  // nothing more is served
    }

    @Test("a response or goaway frame from the client is a connection error")
    func unexpectedFrames() {
        for kind in [Frame.Kind.response, .goaway] {
            var c = Transcript.authenticated()
            let actions = c.client(Frame(kind: kind, requestID: 1))
            #expect(actions.goaways == [Said(0, .invalidArgument, "UNEXPECTED_FRAME")])
            #expect(actions.closes)
        }
    }

    @Test("a response larger than the frame limit is replaced by RESOURCE_EXHAUSTED, RESPONSE_TOO_LARGE")
    func responseTooLarge() {
        var limits = ServerLimits()
        limits.maxFrameBytes = 1024
        var c = Transcript.authenticated(limits: limits)
        _ = c.client(.request(2, .listDataKeys))
        let actions = c.handlerReturns(2, body: String(repeating: "x", count: 1024))
        #expect(actions.answers == [Said(2, .resourceExhausted, "RESPONSE_TOO_LARGE")])
    }

    @Test("the client closing its side: requests in flight are answered, then the connection closes")
    func inputClosed() {
        var c = Transcript.authenticated()
        _ = c.client(.request(2, .getDataKey))
        #expect(c.machine.inputClosed(now: c.now).isEmpty)
        let answered = c.handlerReturns(2)
        #expect(answered.answers == [Said(2, .ok)])
        #expect(answered.closes)
    }

    @Test("the channel closing cancels every task, answered or not")
    func channelInactive() {
        var c = Transcript.authenticated()
        _ = c.client(.request(2, .getDataKey))
        _ = c.client(.request(3, .getDataKey))
        let abandoned = c.tasks[3]!
        _ = c.client(.cancel(3))
        let actions = c.machine.channelInactive()
        #expect(Set(actions.cancelledTasks) == [c.tasks[2]!, abandoned])
        #expect(c.handlerReturns(2).isEmpty)
    }

    // MARK: Shutdown

    @Test("shutdown: goaway SHUTTING_DOWN; requests received before it finish; later ones UNAVAILABLE; close")
    func shutdownDrains() {
        var c = Transcript.authenticated()
        _ = c.client(.request(2, .getDataKey))
        _ = c.client(.request(3, .getDataKey))
        let goaway = c.machine.shutdownRequested(now: c.now)
        #expect(goaway.goaways == [Said(0, .unavailable, "SHUTTING_DOWN")])
        #expect(goaway.timers[.drain] == c.now + .seconds(30))
        #expect(!goaway.closes)

        #expect(c.client(.request(4, .getDataKey)).answers == [Said(4, .unavailable, "SHUTTING_DOWN")])
        #expect(c.handlerReturns(2).answers == [Said(2, .ok)])
        let last = c.handlerReturns(3)
        #expect(last.answers == [Said(3, .ok)])
        #expect(last.closes)
    }

    @Test("shutdown: requests still running at the drain timeout are answered UNAVAILABLE, then close")
    func drainTimeout() {
        var c = Transcript.authenticated()
        _ = c.client(.request(2, .getDataKey))
        let task = c.tasks[2]!
        _ = c.machine.shutdownRequested(now: c.now)
        c.advance(.seconds(30))
        let actions = c.fire(.drain)
        #expect(actions.answers == [Said(2, .unavailable, "SHUTTING_DOWN")])
        #expect(actions.cancelledTasks == [task])
        #expect(actions.closes)
    }

    @Test("shutdown with nothing in flight closes at once after the goaway")
    func shutdownIdle() {
        var c = Transcript.authenticated()
        let actions = c.machine.shutdownRequested(now: c.now)
        #expect(actions.goaways == [Said(0, .unavailable, "SHUTTING_DOWN")])
        #expect(actions.closes)
        #expect(c.machine.shutdownRequested(now: c.now).isEmpty)
    }
}
