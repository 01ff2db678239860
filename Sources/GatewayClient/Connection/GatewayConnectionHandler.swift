import GatewayWire
import Logging
import NIOCore
import Synchronization

/// What the pool may read of a connection from any thread: written by the handler on the event
/// loop after every change.
final class ConnectionStatus: Sendable {
    /// A consistent view of the connection's load.
    struct Snapshot: Sendable, Hashable {
        var phase: ConnectionStateMachine.Phase
        var inFlight: Int
        var queued: Int
        var maximumInFlight: Int
    }

    private let snapshot = Mutex(Snapshot(phase: .active, inFlight: 0, queued: 0, maximumInFlight: 1))

    /// The latest snapshot.
    var current: Snapshot { snapshot.withLock { $0 } }

    func update(_ value: Snapshot) {
        snapshot.withLock { $0 = value }
    }
}

/// Set by a task's cancellation handler, read on the event loop: closes the race where the
/// cancellation arrives before the call reached the handler.
final class CancellationFlag: Sendable {
    private let flag = Atomic<Bool>(false)
    func set() { flag.store(true, ordering: .releasing) }
    var isSet: Bool { flag.load(ordering: .acquiring) }
}

/// The client end of one connection, on its event loop: it performs what
/// `ConnectionStateMachine` decides, matches responses to calls by request id, runs each call's
/// deadline timer, answers pings, and fails every call when the channel goes.
///
/// Every method runs on the channel's event loop; other threads reach it through
/// `NIOLoopBound` and `EventLoop.execute`.
final class GatewayConnectionHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = Frame
    typealias OutboundOut = Frame

    typealias Continuation = CheckedContinuation<Result<ByteBuffer, GatewayError>, Never>

    private struct PendingCall {
        var method: Method
        /// The request payload until it is written.
        var payload: ByteBuffer?
        var deadline: NIODeadline?
        var continuation: Continuation
        var timer: Scheduled<Void>?
    }

    private var state: ConnectionStateMachine
    private var calls: [ConnectionStateMachine.CallID: PendingCall] = [:]
    private var context: ChannelHandlerContext?
    private let status: ConnectionStatus
    private let logger: Logger
    /// How long after a call's deadline the local timer fires.
    private let deadlineGrace: TimeAmount
    /// Why the connection is going away, for the messages of the calls it refuses.
    private var goawayNote: String?

    init(status: ConnectionStatus, maximumQueued: Int, deadlineGrace: TimeAmount, logger: Logger) {
        self.state = ConnectionStateMachine(maximumInFlight: 1, maximumQueued: maximumQueued)
        self.status = status
        self.deadlineGrace = deadlineGrace
        self.logger = logger
    }

    // MARK: Calls (from other threads, through the event loop)

    /// Starts a call: sends it, queues it, or refuses it.
    func submit(
        _ call: ConnectionStateMachine.CallID,
        method: Method,
        payload: ByteBuffer,
        deadline: NIODeadline?,
        cancellation: CancellationFlag,
        continuation: Continuation
    ) {
        if cancellation.isSet {
            continuation.resume(returning: .failure(Self.cancelledError(sent: false)))
            return
        }
        if let deadline, deadline <= .now() {
            continuation.resume(returning: .failure(Self.deadlineError(sent: false)))
            return
        }
        let action = state.submit(call)
        switch action {
        case .send, .queued:
            var pending = PendingCall(
                method: method,
                payload: payload,
                deadline: deadline,
                continuation: continuation,
                timer: nil
            )
            if let deadline, let loop = context?.eventLoop {
                // The server's DEADLINE_EXCEEDED normally arrives first; the timer is the backstop.
                pending.timer = loop.assumeIsolated().scheduleTask(deadline: deadline + deadlineGrace) { [self] in
                    self.abandon(call, because: .deadline)
                }
            }
            calls[call] = pending
            if case .send(let requestID) = action {
                write(call, requestID: requestID)
                context?.flush()
            }
        case .refuse(.queueFull):
            continuation.resume(
                returning: .failure(
                    .notSent(
                        .resourceExhausted,
                        reason: GatewayError.LocalReason.queueFull,
                        "\(state.maximumQueued) calls already wait for this connection"
                    )
                )
            )
        case .refuse(.draining), .refuse(.closed):
            continuation.resume(returning: .failure(notSentError()))
        }
        publishStatus()
    }

    /// Why a caller gives up on a call.
    enum AbandonReason {
        case deadline
        case cancelled
    }

    /// Fails `call` (deadline or cancellation) and cancels it on the server if it was sent.
    func abandon(_ call: ConnectionStateMachine.CallID, because reason: AbandonReason) {
        guard let pending = calls.removeValue(forKey: call) else { return }
        pending.timer?.cancel()
        let sent: Bool
        switch state.abandon(call) {
        case .sendCancel(let requestID):
            let cancel = Frame(kind: .cancel, requestID: requestID)
            context?.writeAndFlush(wrapOutboundOut(cancel), promise: nil)
            sent = true
        case .removedFromQueue, .unknown:
            sent = false
        }
        let error = reason == .deadline ? Self.deadlineError(sent: sent) : Self.cancelledError(sent: sent)
        pending.continuation.resume(returning: .failure(error))
        publishStatus()
    }

    /// Applies the server's in-flight limit after the handshake.
    func setMaximumInFlight(_ maximum: Int) {
        let dispatch = state.setMaximumInFlight(maximum)
        send(dispatch)
        publishStatus()
    }

    /// Stops taking calls; closes once the calls in flight are answered.
    func drain(note: String) {
        if goawayNote == nil { goawayNote = note }
        let outcome = state.drain()
        for call in outcome.refused {
            fail(call, with: notSentError())
        }
        if outcome.closeConnection {
            context?.close(promise: nil)
        }
        publishStatus()
    }

    // MARK: Channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    func channelInactive(context: ChannelHandlerContext) {
        let outcome = state.closed()
        let note = goawayNote.map { " after a goaway (\($0))" } ?? ""
        for call in outcome.inFlight {
            fail(
                call,
                with: GatewayError(
                    local: .unavailable,
                    reason: GatewayError.LocalReason.connectionLost,
                    message: "the connection closed\(note) while the request was in flight; it may have run",
                    transmission: .maybeProcessed
                )
            )
        }
        for call in outcome.queued {
            fail(call, with: notSentError())
        }
        // Abandoned calls have no entry left; any others (none expected) fail as lost.
        for call in Array(calls.keys) {
            fail(call, with: notSentError())
        }
        publishStatus()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // A frame the client cannot read, a TLS failure, a reset: the connection is unusable.
        logger.warning(
            "gateway connection failed",
            metadata: ["error": "\(String(describing: type(of: error))): \(String(describing: error))"]
        )
        context.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        switch frame.kind {
        case .response:
            responseReceived(frame, context: context)
        case .ping:
            let pong = Frame(kind: .pong, requestID: frame.requestID, payload: frame.payload)
            context.writeAndFlush(wrapOutboundOut(pong), promise: nil)
        case .pong:
            break  // The client sends no pings of its own; a stray pong is harmless.
        case .goaway:
            let status = try? Hsmgw_V1_Status(wirePayload: frame.payload)
            // The header's status is the goaway's code (protocol §3.2); earlier gateways left it
            // 0, so the payload's code stands in for a 0.
            let code = frame.status != 0 ? StatusCode(rawValue: frame.status) : status?.statusCode
            let note = [code?.name, status?.reason].compactMap { $0 }.filter { !$0.isEmpty }
                .joined(separator: " ")
            logger.debug("gateway sent goaway", metadata: ["status": "\(note)"])
            drain(note: note.isEmpty ? "goaway" : note)
        default:
            // Requests and cancels only flow from client to server.
            logger.warning("gateway sent a frame a client never receives", metadata: ["kind": "\(frame.kind)"])
            context.close(promise: nil)
        }
    }

    // MARK: Internals

    private func responseReceived(_ frame: Frame, context: ChannelHandlerContext) {
        guard let outcome = state.responseReceived(requestID: frame.requestID) else {
            // No request with this id is in flight: a server bug; the frame is dropped.
            logger.warning(
                "gateway answered a request id not in flight", metadata: ["request_id": "\(frame.requestID)"])
            return
        }
        if let call = outcome.completed, let pending = calls.removeValue(forKey: call) {
            pending.timer?.cancel()
            pending.continuation.resume(returning: Self.result(of: frame, for: pending.method))
        }
        send(outcome.dispatch)
        if outcome.closeConnection {
            context.close(promise: nil)
        }
        publishStatus()
        if StatusCode(rawValue: frame.status) == .unauthenticated {
            // The credentials no longer work on this connection (revoked, expired, disabled):
            // take no new calls here; the calls in flight finish (section 7.4).
            drain(note: "UNAUTHENTICATED")
        }
    }

    private static func result(of frame: Frame, for method: Method) -> Result<ByteBuffer, GatewayError> {
        guard frame.method == method.rawValue else {
            return .failure(
                GatewayError(
                    local: .internalError,
                    reason: GatewayError.LocalReason.malformedResponse,
                    message: "the response names method \(frame.method), the request was \(method)",
                    transmission: .maybeProcessed
                )
            )
        }
        let code = StatusCode(rawValue: frame.status)
        guard code != .ok else { return .success(frame.payload) }
        let status = (try? Hsmgw_V1_Status(wirePayload: frame.payload)) ?? Hsmgw_V1_Status()
        return .failure(GatewayError(status: status, headerStatus: code))
    }

    private func send(_ dispatch: [ConnectionStateMachine.Dispatch]) {
        guard !dispatch.isEmpty else { return }
        for item in dispatch {
            write(item.call, requestID: item.requestID)
        }
        context?.flush()
    }

    /// Writes the request of `call` (not flushed).
    private func write(_ call: ConnectionStateMachine.CallID, requestID: UInt32) {
        guard var pending = calls[call], let payload = pending.payload, let context else { return }
        var deadlineMilliseconds: UInt32 = 0
        if let deadline = pending.deadline {
            // How long the caller still waits, rounded up; at least 1 ms (0 would mean none).
            let remaining = max((deadline - .now()).nanoseconds, 1)
            let milliseconds = (remaining + 999_999) / 1_000_000
            deadlineMilliseconds = UInt32(clamping: milliseconds)
        }
        let frame = Frame(
            kind: .request,
            method: pending.method.rawValue,
            requestID: requestID,
            deadlineMilliseconds: deadlineMilliseconds,
            payload: payload
        )
        pending.payload = nil
        calls[call] = pending
        context.write(wrapOutboundOut(frame), promise: nil)
    }

    private func fail(_ call: ConnectionStateMachine.CallID, with error: GatewayError) {
        guard let pending = calls.removeValue(forKey: call) else { return }
        pending.timer?.cancel()
        pending.continuation.resume(returning: .failure(error))
    }

    private func notSentError() -> GatewayError {
        let note = goawayNote.map { " (\($0))" } ?? ""
        return .notSent(
            .unavailable,
            reason: GatewayError.LocalReason.notSent,
            "the connection is going away\(note); the request was not sent"
        )
    }

    static func deadlineError(sent: Bool) -> GatewayError {
        GatewayError(
            local: .deadlineExceeded,
            reason: GatewayError.LocalReason.deadline,
            message: sent
                ? "the deadline passed before the gateway answered; the request was cancelled"
                : "the deadline passed before the request could be sent",
            transmission: sent ? .maybeProcessed : .notSent
        )
    }

    static func cancelledError(sent: Bool) -> GatewayError {
        GatewayError(
            local: .cancelled,
            reason: GatewayError.LocalReason.taskCancelled,
            message: sent
                ? "the calling task was cancelled; the request was cancelled" : "the calling task was cancelled",
            transmission: sent ? .maybeProcessed : .notSent
        )
    }

    private func publishStatus() {
        status.update(
            ConnectionStatus.Snapshot(
                phase: state.phase,
                inFlight: state.inFlightCount,
                queued: state.queuedCount,
                maximumInFlight: state.maximumInFlight
            )
        )
    }
}
