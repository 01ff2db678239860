import GatewayWire
import NIOCore

/// The timers a connection runs. The state machine keeps each one's deadline; the glue schedules
/// a wake-up when asked and reports it with ``ConnectionStateMachine/timerFired(_:now:)``. A
/// wake-up that comes early (the deadline moved later meanwhile) is rescheduled, so activity never
/// has to cancel a timer.
enum ConnectionTimer: Hashable, Sendable, CaseIterable {
    /// No successful Hello yet.
    case handshake
    /// Time to ping: no frame received for the keepalive interval.
    case keepalive
    /// The server's ping is waiting for its pong.
    case pong
    /// No request in flight and no request or cancel frame for the idle timeout.
    case idle
    /// A frame has begun and must complete.
    case read
    /// A goaway was sent; requests still running get this long.
    case drain
}

/// The wire protocol of one server connection, without I/O (docs/protocol-rules.md): the
/// handshake, the table of requests in flight and its limits, cancel, deadlines, keepalive, idle
/// and read timeouts, goaway and drain. Events go in, actions come out; the NIO handler performs
/// them. Time is passed in with every event, so tests drive it by hand.
struct ConnectionStateMachine {
    /// Identifies one handler task, unique per connection. A request id can be reused once its
    /// request is answered, while its task may still be stopping: results are matched by task.
    typealias TaskID = UInt64

    /// A request as the state machine hands it to a task.
    struct RequestHead: Sendable {
        var method: Method
        var requestID: UInt32
        var payload: ByteBuffer
        var deadline: NIODeadline?
        var receivedAt: NIODeadline
    }

    /// A response frame and what the glue records about it (logs, metrics).
    struct Response: Sendable {
        var frame: Frame
        var method: Method
        var status: StatusCode { StatusCode(rawValue: frame.status) }
        /// When the request arrived; nil for a request answered without ever being in flight.
        var receivedAt: NIODeadline?
    }

    enum Action {
        /// Write this response.
        case respond(Response)
        /// Write a ping, pong or goaway.
        case send(Frame)
        /// The transport refused a frame or request for this reason (a metric).
        case refused(reason: String)
        /// Run the handler's `hello` for this request.
        case startHello(TaskID, RequestHead)
        /// Run the handler's `handle` for this request.
        case startHandler(TaskID, RequestHead, AuthenticatedPeer)
        /// Cancel this task; its result, if any, will be dropped.
        case cancelTask(TaskID)
        /// Wake the state machine at `deadline` with `timerFired`.
        case scheduleTimer(ConnectionTimer, at: NIODeadline)
        /// Wake the state machine at `deadline` with `requestDeadlinePassed`.
        case scheduleRequestDeadline(TaskID, at: NIODeadline)
        /// The task's request was answered: its deadline wake-up is not needed.
        case cancelRequestDeadline(TaskID)
        /// The handshake succeeded (for the log).
        case authenticated(AuthenticatedPeer)
        /// Flush what was written, then close the channel.
        case close
    }

    private enum Handshake {
        case awaitingHello
        case helloInFlight(TaskID)
        case authenticated(AuthenticatedPeer)
    }

    private enum Phase: Equatable {
        case open
        /// A goaway was sent: requests already received finish, new ones are refused with
        /// `lateRequestReason`.
        case draining(lateRequestReason: String)
        case closed
    }

    private struct InFlight {
        var taskID: TaskID
        var method: Method
        var receivedAt: NIODeadline
        var hasDeadline: Bool
    }

    let limits: ServerLimits
    private var phase: Phase = .open
    private var handshake: Handshake = .awaitingHello
    private var inFlight: [UInt32: InFlight] = [:]
    /// Tasks whose request was answered (cancel, deadline) but that have not returned yet.
    private var abandoned: Set<TaskID> = []
    /// The request id each unanswered task serves.
    private var requestIDs: [TaskID: UInt32] = [:]
    private var nextTaskID: TaskID = 1
    private var inputClosed = false
    private var lastFrameAt: NIODeadline = .uptimeNanoseconds(0)
    private var outstandingPingID: UInt32?
    private var nextPingID: UInt32 = 1
    private var frameSinceReadCheck = false
    /// When each armed timer expires.
    private var deadlines: [ConnectionTimer: NIODeadline] = [:]
    /// What the glue has been asked to wake us for (at most one wake-up per timer).
    private var wakeUps: [ConnectionTimer: NIODeadline] = [:]

    init(limits: ServerLimits) {
        self.limits = limits
    }

    /// Requests answered by nobody yet.
    var requestsInFlight: Int { inFlight.count }
    /// Whether the handshake has succeeded.
    var isAuthenticated: Bool {
        if case .authenticated = handshake { return true }
        return false
    }
    /// Whether the connection has been told to close.
    var isClosed: Bool { phase == .closed }
    /// The largest frame the peer may send now: the small pre-Hello limit until the handshake
    /// succeeds (an unauthenticated peer cannot make the server buffer a large frame), then
    /// ``ServerLimits/maxFrameBytes``. The decoder checks each length prefix against it.
    var inboundFrameLimit: Int { isAuthenticated ? limits.maxFrameBytes : limits.frameBytesBeforeHello }

    // MARK: Events

    /// The connection is established (before TLS completes, for TLS listeners).
    mutating func connectionActive(now: NIODeadline) -> [Action] {
        lastFrameAt = now
        var actions: [Action] = []
        arm(.handshake, at: now + TimeAmount(limits.handshakeTimeout), &actions)
        arm(.keepalive, at: now + TimeAmount(limits.keepaliveInterval), &actions)
        arm(.idle, at: now + TimeAmount(limits.idleTimeout), &actions)
        return actions
    }

    /// A complete, well-formed frame arrived.
    mutating func frameReceived(_ frame: Frame, now: NIODeadline) -> [Action] {
        guard phase != .closed else { return [] }
        lastFrameAt = now
        frameSinceReadCheck = true
        var actions: [Action] = []
        if outstandingPingID == nil { arm(.keepalive, at: now + TimeAmount(limits.keepaliveInterval), &actions) }
        switch frame.kind {
        case .request:
            requestReceived(frame, now: now, &actions)
        case .cancel:
            cancelReceived(frame, now: now, &actions)
        case .ping:
            guard frame.payload.readableBytes <= ServerLimits.maxPingPayloadBytes else {
                return actions
                    + connectionError(
                        .invalidArgument,
                        "a ping payload may hold at most \(ServerLimits.maxPingPayloadBytes) bytes",
                        reason: TransportStatusReason.pingPayloadTooLarge,
                        now: now
                    )
            }
            actions.append(.send(Frame(kind: .pong, requestID: frame.requestID, payload: frame.payload)))
        case .pong:
            // An unsolicited or late pong is harmless.
            if let outstanding = outstandingPingID, frame.requestID == outstanding {
                outstandingPingID = nil
                deadlines[.pong] = nil
                arm(.keepalive, at: now + TimeAmount(limits.keepaliveInterval), &actions)
            }
        default:
            // Response and goaway frames are the server's to send.
            return actions
                + connectionError(
                    .invalidArgument,
                    "a client must not send \(frame.kind) frames",
                    reason: TransportStatusReason.unexpectedFrame,
                    now: now
                )
        }
        return actions
    }

    /// The frame decoder refused the stream: goaway naming the problem, then close.
    mutating func frameError(_ error: FrameError, now: NIODeadline) -> [Action] {
        guard phase != .closed else { return [] }
        let (code, reason): (StatusCode, String)
        switch error.kind {
        case .lengthTooLarge:
            // Before the Hello succeeds the decoder applies `inboundFrameLimit`'s small limit.
            (code, reason) = (
                .resourceExhausted,
                isAuthenticated ? TransportStatusReason.frameTooLarge : TransportStatusReason.frameTooLargeBeforeHello
            )
        case .lengthTooSmall: (code, reason) = (.invalidArgument, TransportStatusReason.frameTooSmall)
        case .unsupportedVersion: (code, reason) = (.invalidArgument, TransportStatusReason.unsupportedVersion)
        case .unknownKind: (code, reason) = (.invalidArgument, TransportStatusReason.unknownFrameKind)
        case .reservedFlags: (code, reason) = (.invalidArgument, TransportStatusReason.reservedFlags)
        case .truncated: (code, reason) = (.invalidArgument, TransportStatusReason.truncatedFrame)
        }
        return connectionError(code, error.message, reason: reason, now: now)
    }

    /// After each read: whether bytes of an incomplete frame are buffered. Starts the read
    /// timeout when a new frame has begun, stops it when none is pending.
    mutating func readCompleted(partialFrameBuffered: Bool, now: NIODeadline) -> [Action] {
        defer { frameSinceReadCheck = false }
        guard phase != .closed else { return [] }
        guard partialFrameBuffered else {
            deadlines[.read] = nil
            return []
        }
        var actions: [Action] = []
        if deadlines[.read] == nil || frameSinceReadCheck {
            arm(.read, at: now + TimeAmount(limits.readTimeout), &actions)
        }
        return actions
    }

    /// The peer closed its sending side with no partial frame pending: requests in flight are
    /// still answered, then the connection closes.
    mutating func inputClosed(now: NIODeadline) -> [Action] {
        guard phase != .closed else { return [] }
        inputClosed = true
        if inFlight.isEmpty { return close() }
        return []
    }

    /// The handler's `hello` returned.
    mutating func helloFinished(_ taskID: TaskID, _ outcome: HelloOutcome, now: NIODeadline) -> [Action] {
        if abandoned.remove(taskID) != nil {
            // Answered already (cancel, deadline), but it kept running until now: only now may
            // another Hello start, so a connection never has two credential checks at once.
            if case .helloInFlight(taskID) = handshake { handshake = .awaitingHello }
            return []
        }
        guard phase != .closed, let (requestID, request) = request(of: taskID) else { return [] }
        var actions: [Action] = []
        switch outcome {
        case .accepted(let peer, let response):
            handshake = .authenticated(peer)
            deadlines[.handshake] = nil
            actions.append(.authenticated(peer))
            answer(requestID, request, response.status, response.payload, now: now, &actions)
        case .refused(let response):
            // Answered, then closed: nothing more is read.
            handshake = .awaitingHello
            inputClosed = true
            answer(requestID, request, response.status, response.payload, now: now, &actions)
            actions += close()
        }
        return actions
    }

    /// The handler's `handle` returned.
    mutating func handlerFinished(_ taskID: TaskID, _ response: OutgoingResponse, now: NIODeadline) -> [Action] {
        if abandoned.remove(taskID) != nil { return [] }
        guard phase != .closed, let (requestID, request) = request(of: taskID) else { return [] }
        var actions: [Action] = []
        answer(requestID, request, response.status, response.payload, now: now, &actions)
        return actions
    }

    /// A request's deadline passed: DEADLINE_EXCEEDED, and its task is cancelled.
    mutating func requestDeadlinePassed(_ taskID: TaskID, now: NIODeadline) -> [Action] {
        guard phase != .closed, let (requestID, request) = request(of: taskID) else { return [] }
        var actions: [Action] = []
        abandon(request, &actions)
        answerError(
            requestID,
            request,
            .deadlineExceeded,
            "the request's deadline passed before it finished",
            now: now,
            &actions
        )
        return actions
    }

    /// A wake-up asked for with `scheduleTimer` came.
    mutating func timerFired(_ timer: ConnectionTimer, now: NIODeadline) -> [Action] {
        wakeUps[timer] = nil
        guard phase != .closed, let deadline = deadlines[timer] else { return [] }
        guard now >= deadline else {
            wakeUps[timer] = deadline
            return [.scheduleTimer(timer, at: deadline)]
        }
        deadlines[timer] = nil
        switch timer {
        case .handshake:
            guard !isAuthenticated else { return [] }
            return connectionError(
                .unauthenticated,
                "no successful Hello within the handshake timeout",
                reason: TransportStatusReason.handshakeTimeout,
                now: now
            )
        case .keepalive:
            guard deadlines[.read] == nil else {
                // A frame is partly received: the read timeout watches the peer now, and a ping
                // would only precede its READ_TIMEOUT goaway (protocol §6.1). A frame completed
                // meanwhile re-arms the keepalive anyway.
                var actions: [Action] = []
                arm(.keepalive, at: now + TimeAmount(limits.keepaliveInterval), &actions)
                return actions
            }
            let pingID = nextPingID
            nextPingID = nextPingID == .max ? 1 : nextPingID + 1
            outstandingPingID = pingID
            var actions: [Action] = [.send(Frame(kind: .ping, requestID: pingID))]
            arm(.pong, at: now + TimeAmount(limits.keepaliveTimeout), &actions)
            return actions
        case .pong:
            return connectionError(
                .unavailable,
                "no pong to the server's ping within the keepalive timeout",
                reason: TransportStatusReason.keepaliveTimeout,
                now: now
            )
        case .idle:
            // Re-armed when the last request in flight is answered.
            guard inFlight.isEmpty, phase == .open else { return [] }
            return connectionError(
                .unavailable,
                "the connection was idle for the idle timeout",
                reason: TransportStatusReason.idle,
                isRefusal: false,
                now: now
            )
        case .read:
            return connectionError(
                .invalidArgument,
                "a frame did not complete within the read timeout",
                reason: TransportStatusReason.readTimeout,
                now: now
            )
        case .drain:
            var actions: [Action] = []
            if case .draining(StatusReason.shuttingDown) = phase {
                answerAllUnavailable(
                    "the server shut down before the request finished",
                    reason: StatusReason.shuttingDown,
                    now: now,
                    &actions
                )
            } else {
                answerAllUnavailable(
                    "the connection closed before the request finished",
                    reason: TransportStatusReason.connectionClosing,
                    now: now,
                    &actions
                )
            }
            return actions + close()
        }
    }

    /// The server is shutting down: goaway (UNAVAILABLE, `SHUTTING_DOWN`), drain, close.
    mutating func shutdownRequested(now: NIODeadline) -> [Action] {
        switch phase {
        case .closed:
            return []
        case .draining:
            // A protocol error already sent a goaway; later requests now hear why we stop.
            phase = .draining(lateRequestReason: StatusReason.shuttingDown)
            return []
        case .open:
            var actions: [Action] = [
                .send(Self.goaway(.unavailable, "the server is shutting down", reason: StatusReason.shuttingDown))
            ]
            startDraining(lateRequestReason: StatusReason.shuttingDown, now: now, &actions)
            return actions
        }
    }

    /// The channel closed: every task still running is cancelled.
    mutating func channelInactive() -> [Action] {
        phase = .closed
        deadlines = [:]
        var actions: [Action] = inFlight.values.map { .cancelTask($0.taskID) }
        actions += abandoned.map { .cancelTask($0) }
        inFlight = [:]
        requestIDs = [:]
        abandoned = []
        return actions
    }

    // MARK: Requests

    private mutating func requestReceived(_ frame: Frame, now: NIODeadline, _ actions: inout [Action]) {
        let method = Method(rawValue: frame.method)
        if case .draining(let lateRequestReason) = phase {
            // A goaway has gone out; an id error now would only repeat it.
            guard frame.requestID != 0, inFlight[frame.requestID] == nil else { return }
            refuse(
                frame, .unavailable, "the connection is going away; open a new one", reason: lateRequestReason, &actions
            )
            return
        }
        guard frame.requestID != 0 else {
            protocolErrorDrain(
                "request id 0 is reserved", reason: TransportStatusReason.invalidRequestID, now: now, &actions)
            return
        }
        guard inFlight[frame.requestID] == nil else {
            protocolErrorDrain(
                "request id \(frame.requestID) is already in flight on this connection",
                reason: StatusReason.requestIDInUse,
                now: now,
                &actions
            )
            return
        }
        arm(.idle, at: now + TimeAmount(limits.idleTimeout), &actions)

        switch handshake {
        case .awaitingHello:
            guard method == .hello else {
                refuse(
                    frame,
                    .unauthenticated,
                    "the connection has not completed its Hello",
                    reason: StatusReason.handshakeRequired,
                    &actions
                )
                return
            }
        case .helloInFlight:
            if method == .hello {
                refuse(frame, .failedPrecondition, "a Hello is already in progress on this connection", &actions)
            } else {
                refuse(
                    frame,
                    .unauthenticated,
                    "the connection has not completed its Hello",
                    reason: StatusReason.handshakeRequired,
                    &actions
                )
            }
            return
        case .authenticated:
            guard method != .hello else {
                refuse(frame, .failedPrecondition, "the connection is already authenticated", &actions)
                return
            }
        }
        guard inFlight.count + abandoned.count < limits.maxRequestsInFlightPerConnection else {
            refuse(
                frame,
                .resourceExhausted,
                "the connection already has \(limits.maxRequestsInFlightPerConnection) requests in flight",
                reason: StatusReason.tooManyRequestsInFlight,
                &actions
            )
            return
        }

        let taskID = nextTaskID
        nextTaskID += 1
        let deadline = frame.deadlineMilliseconds == 0 ? nil : now + .milliseconds(Int64(frame.deadlineMilliseconds))
        inFlight[frame.requestID] = InFlight(
            taskID: taskID, method: method, receivedAt: now, hasDeadline: deadline != nil)
        requestIDs[taskID] = frame.requestID
        let head = RequestHead(
            method: method,
            requestID: frame.requestID,
            payload: frame.payload,
            deadline: deadline,
            receivedAt: now
        )
        switch handshake {
        case .authenticated(let peer):
            actions.append(.startHandler(taskID, head, peer))
        case .awaitingHello, .helloInFlight:
            handshake = .helloInFlight(taskID)
            actions.append(.startHello(taskID, head))
        }
        if let deadline { actions.append(.scheduleRequestDeadline(taskID, at: deadline)) }
    }

    private mutating func cancelReceived(_ frame: Frame, now: NIODeadline, _ actions: inout [Action]) {
        if phase == .open { arm(.idle, at: now + TimeAmount(limits.idleTimeout), &actions) }
        guard let request = inFlight[frame.requestID] else { return }  // answered already, or never sent
        abandon(request, &actions)
        answerError(frame.requestID, request, .cancelled, "the caller cancelled the request", now: now, &actions)
    }

    /// The request a running task serves, while it is unanswered.
    private func request(of taskID: TaskID) -> (UInt32, InFlight)? {
        guard let requestID = requestIDs[taskID], let request = inFlight[requestID], request.taskID == taskID else {
            return nil
        }
        return (requestID, request)
    }

    /// Answers `requestID` and removes it from the table; closes when draining and done.
    private mutating func answer(
        _ requestID: UInt32,
        _ request: InFlight,
        _ status: StatusCode,
        _ payload: ByteBuffer,
        now: NIODeadline,
        _ actions: inout [Action]
    ) {
        inFlight[requestID] = nil
        requestIDs[request.taskID] = nil
        if request.hasDeadline { actions.append(.cancelRequestDeadline(request.taskID)) }
        var frame = Frame(
            kind: .response,
            method: request.method.rawValue,
            status: status.rawValue,
            requestID: requestID,
            payload: payload
        )
        if Frame.headerByteCount + payload.readableBytes > limits.maxFrameBytes {
            frame.status = StatusCode.resourceExhausted.rawValue
            frame.payload = Hsmgw_V1_Status(
                .resourceExhausted,
                "the response is larger than the frame limit of \(limits.maxFrameBytes) bytes",
                reason: TransportStatusReason.responseTooLarge
            ).wirePayload()
        }
        actions.append(.respond(Response(frame: frame, method: request.method, receivedAt: request.receivedAt)))
        guard inFlight.isEmpty else { return }
        switch phase {
        case .open where inputClosed:
            actions += close()
        case .open:
            arm(.idle, at: now + TimeAmount(limits.idleTimeout), &actions)
        case .draining:
            actions += close()
        case .closed:
            break
        }
    }

    private mutating func answerError(
        _ requestID: UInt32,
        _ request: InFlight,
        _ code: StatusCode,
        _ message: String,
        reason: String = "",
        now: NIODeadline,
        _ actions: inout [Action]
    ) {
        let payload = Hsmgw_V1_Status(code, message, reason: reason).wirePayload()
        answer(requestID, request, code, payload, now: now, &actions)
    }

    /// Answers a request that never entered the table.
    private func refuse(
        _ frame: Frame,
        _ code: StatusCode,
        _ message: String,
        reason: String = "",
        _ actions: inout [Action]
    ) {
        let response = Frame(
            kind: .response,
            method: frame.method,
            status: code.rawValue,
            requestID: frame.requestID,
            payload: Hsmgw_V1_Status(code, message, reason: reason).wirePayload()
        )
        actions.append(.refused(reason: reason.isEmpty ? code.name : reason))
        actions.append(.respond(Response(frame: response, method: Method(rawValue: frame.method), receivedAt: nil)))
    }

    /// Moves a request's task to `abandoned` and cancels it. An abandoned Hello still counts as
    /// the connection's Hello in flight until its task returns (`helloFinished`).
    private mutating func abandon(_ request: InFlight, _ actions: inout [Action]) {
        abandoned.insert(request.taskID)
        actions.append(.cancelTask(request.taskID))
    }

    private mutating func answerAllUnavailable(
        _ message: String,
        reason: String,
        now: NIODeadline,
        _ actions: inout [Action]
    ) {
        for (requestID, request) in inFlight.sorted(by: { $0.key < $1.key }) {
            abandon(request, &actions)
            answerError(requestID, request, .unavailable, message, reason: reason, now: now, &actions)
        }
    }

    // MARK: Goaway and close

    /// A request-level protocol error (request id 0 or in use): goaway, then close once the
    /// requests in flight are answered (or the drain timeout passes).
    private mutating func protocolErrorDrain(
        _ message: String,
        reason: String,
        now: NIODeadline,
        _ actions: inout [Action]
    ) {
        actions.append(.refused(reason: reason))
        actions.append(.send(Self.goaway(.invalidArgument, message, reason: reason)))
        startDraining(lateRequestReason: TransportStatusReason.connectionClosing, now: now, &actions)
    }

    private mutating func startDraining(lateRequestReason: String, now: NIODeadline, _ actions: inout [Action]) {
        phase = .draining(lateRequestReason: lateRequestReason)
        deadlines[.idle] = nil
        if inFlight.isEmpty {
            actions += close()
        } else {
            arm(.drain, at: now + TimeAmount(limits.drainTimeout), &actions)
        }
    }

    /// A connection error: goaway naming it, requests in flight answered UNAVAILABLE, close.
    private mutating func connectionError(
        _ code: StatusCode,
        _ message: String,
        reason: String,
        isRefusal: Bool = true,
        now: NIODeadline
    ) -> [Action] {
        var actions: [Action] = isRefusal ? [.refused(reason: reason)] : []
        actions.append(.send(Self.goaway(code, message, reason: reason)))
        phase = .draining(lateRequestReason: TransportStatusReason.connectionClosing)
        answerAllUnavailable(
            "the connection closed before the request finished",
            reason: TransportStatusReason.connectionClosing,
            now: now,
            &actions
        )
        return actions + close()
    }

    private mutating func close() -> [Action] {
        guard phase != .closed else { return [] }
        phase = .closed
        deadlines = [:]
        return [.close]
    }

    static func goaway(_ code: StatusCode, _ message: String, reason: String) -> Frame {
        Frame.goaway(Hsmgw_V1_Status(code, message, reason: reason))
    }

    // MARK: Timers

    /// Sets `timer` to expire at `deadline`; asks for a wake-up only if none is due by then.
    private mutating func arm(_ timer: ConnectionTimer, at deadline: NIODeadline, _ actions: inout [Action]) {
        deadlines[timer] = deadline
        if let wakeUp = wakeUps[timer], wakeUp <= deadline { return }
        wakeUps[timer] = deadline
        actions.append(.scheduleTimer(timer, at: deadline))
    }
}
