import GatewayWire
import Logging
import NIOCore
import NIOSSL

/// Asks a connection to drain: goaway (UNAVAILABLE, `SHUTTING_DOWN`), finish, close.
struct DrainConnectionEvent: Sendable {}

/// One server connection: decodes frames, feeds the ``ConnectionStateMachine`` and performs its
/// actions. Handler calls run as Swift tasks; their results hop back to the event loop, so the
/// loop never waits for one. Every error ends in a goaway or a close of this connection only.
///
/// Pipeline: [NIOSSLServerHandler] → MessageToByteHandler(FrameEncoder) → this handler.
final class GatewayConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = Frame
    typealias OutboundOut = Frame

    /// How long a closing connection may take to flush its last frames (a goaway, answers) to a
    /// peer that does not read, before it is closed anyway.
    static let closeFlushTimeout: TimeAmount = .seconds(5)

    private var machine: ConnectionStateMachine
    private let processor: NIOSingleStepByteToMessageProcessor<InboundFrameDecoder>
    /// What the decoder accepts now: the pre-Hello limit, raised when the Hello succeeds.
    private let inboundFrameLimit: InboundFrameLimit
    private let requestHandler: any GatewayRequestHandler
    private let metrics: TransportMetrics
    private var asksForClientCertificate: Bool
    private var connection: ConnectionInfo
    private var logger: Logger

    private var context: ChannelHandlerContext?
    private var tasks: [ConnectionStateMachine.TaskID: Task<Void, Never>] = [:]
    private var requestDeadlines: [ConnectionStateMachine.TaskID: Scheduled<Void>] = [:]
    private var timers: [ConnectionTimer: Scheduled<Void>] = [:]
    private var lastWrite: EventLoopFuture<Void>?
    private var inputStopped = false
    private var isReading = false
    private var needsFlush = false
    private var readPending = false
    private var closing = false
    /// The channel has closed: no new task may start (nothing would cancel it).
    private var inactive = false

    init(
        connection: ConnectionInfo,
        limits: ServerLimits,
        requestHandler: any GatewayRequestHandler,
        asksForClientCertificate: Bool,
        metrics: TransportMetrics,
        logger: Logger
    ) {
        let machine = ConnectionStateMachine(limits: limits)
        let inboundFrameLimit = InboundFrameLimit(bytes: machine.inboundFrameLimit)
        self.machine = machine
        self.inboundFrameLimit = inboundFrameLimit
        self.processor = NIOSingleStepByteToMessageProcessor(
            InboundFrameDecoder(limits: limits.frameLimits, current: inboundFrameLimit))
        self.connection = connection
        self.requestHandler = requestHandler
        self.asksForClientCertificate = asksForClientCertificate
        self.metrics = metrics
        var logger = logger
        logger[metadataKey: "connection_id"] = "\(connection.id)"
        logger[metadataKey: "remote_address"] = "\(connection.remoteAddress)"
        self.logger = logger
    }

    // MARK: Channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        if context.channel.isActive { activate(context: context) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        activate(context: context)
        context.fireChannelActive()
    }

    private var activated = false
    private func activate(context: ChannelHandlerContext) {
        guard !activated else { return }
        activated = true
        metrics.connectionOpened()
        logger.debug("connection opened", metadata: ["tls": "\(connection.isTLS)"])
        perform(machine.connectionActive(now: .now()), context: context)
    }

    func channelInactive(context: ChannelHandlerContext) {
        inactive = true
        perform(machine.channelInactive(), context: context)
        for timer in timers.values { timer.cancel() }
        for deadline in requestDeadlines.values { deadline.cancel() }
        timers = [:]
        requestDeadlines = [:]
        if activated { metrics.connectionClosed() }
        logger.debug("connection closed")
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !inputStopped else { return }
        let buffer = unwrapInboundIn(data)
        if asksForClientCertificate {
            // The first bytes after TLS: the handshake (and certificate check) is complete.
            asksForClientCertificate = false
            readClientCertificate(context: context)
        }
        isReading = true
        defer { isReading = false }
        do {
            try processor.process(buffer: buffer) { frame in
                guard !self.inputStopped else { return }
                self.perform(self.machine.frameReceived(frame, now: .now()), context: context)
            }
            if !inputStopped {
                let partial = processor.unprocessedBytes > 0
                perform(machine.readCompleted(partialFrameBuffered: partial, now: .now()), context: context)
            }
        } catch {
            inputFailed(error, context: context)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        flushIfNeeded(context: context)
        context.fireChannelReadComplete()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        switch event {
        case ChannelEvent.inputClosed:
            guard !inputStopped else { return }
            isReading = true
            defer { isReading = false }
            do {
                try processor.finishProcessing(seenEOF: true) { frame in
                    guard !self.inputStopped else { return }
                    self.perform(self.machine.frameReceived(frame, now: .now()), context: context)
                }
                inputStopped = true
                perform(machine.inputClosed(now: .now()), context: context)
            } catch {
                inputFailed(error, context: context)
            }
            flushIfNeeded(context: context)
        case is DrainConnectionEvent:
            perform(machine.shutdownRequested(now: .now()), context: context)
        default:
            context.fireUserInboundEventTriggered(event)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if let refusal = error as? ClientCertificateRefusal {
            // The TLS handshake failed on our own check of a certificate the CA verified.
            metrics.frameRefused(reason: ClientCertificateRefusal.metricsReason)
            logger.notice(
                "client certificate refused",
                metadata: [
                    "cause": "\(refusal.cause.rawValue)",
                    "client_cn": "\(refusal.commonName ?? "-")",
                    "extended_key_usage": "\(refusal.purposes.isEmpty ? "-" : refusal.purposes.joined(separator: ","))",
                ]
            )
            stopAndClose(context: context)
            return
        }
        // TLS failures (no or bad client certificate, protocol errors) and socket errors: this
        // connection alone is closed.
        logger.info("connection error; closing", metadata: ["error": "\(String(describing: error).prefix(200))"])
        stopAndClose(context: context)
    }

    // MARK: Backpressure: stop reading while the peer does not take our writes.

    func read(context: ChannelHandlerContext) {
        if context.channel.isWritable || closing {
            context.read()
        } else {
            readPending = true
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable, readPending {
            readPending = false
            context.read()
        }
        context.fireChannelWritabilityChanged()
    }

    // MARK: Performing actions

    private func perform(_ actions: [ConnectionStateMachine.Action], context: ChannelHandlerContext) {
        for action in actions {
            switch action {
            case .respond(let response):
                write(response.frame, context: context)
                let duration = response.receivedAt.map { Duration(NIODeadline.now() - $0) }
                metrics.requestAnswered(method: response.method, status: response.status, duration: duration)
                if logger.logLevel <= .debug {
                    var metadata: Logger.Metadata = [
                        "request_id": "\(response.frame.requestID)",
                        "method": "\(response.method)",
                        "status": "\(response.status)",
                    ]
                    if let duration { metadata["duration"] = "\(duration)" }
                    logger.debug("answered", metadata: metadata)
                }
            case .send(let frame):
                if frame.kind == .goaway { logGoaway(frame) }
                write(frame, context: context)
            case .refused(let reason):
                metrics.frameRefused(reason: reason)
            case .startHello(let taskID, let head):
                startHello(taskID, head, context: context)
            case .startHandler(let taskID, let head, let peer):
                startHandler(taskID, head, peer, context: context)
            case .cancelTask(let taskID):
                tasks[taskID]?.cancel()
            case .scheduleTimer(let timer, let deadline):
                timers[timer]?.cancel()
                timers[timer] = context.eventLoop.assumeIsolated().scheduleTask(deadline: deadline) {
                    self.timers[timer] = nil
                    guard let context = self.context else { return }
                    self.perform(self.machine.timerFired(timer, now: .now()), context: context)
                }
            case .scheduleRequestDeadline(let taskID, let deadline):
                requestDeadlines[taskID] = context.eventLoop.assumeIsolated().scheduleTask(deadline: deadline) {
                    self.requestDeadlines[taskID] = nil
                    guard let context = self.context else { return }
                    self.perform(self.machine.requestDeadlinePassed(taskID, now: .now()), context: context)
                }
            case .cancelRequestDeadline(let taskID):
                requestDeadlines.removeValue(forKey: taskID)?.cancel()
            case .authenticated(let peer):
                inboundFrameLimit.bytes = machine.inboundFrameLimit
                logger.info(
                    "authenticated",
                    metadata: [
                        "principal": "\(peer.principal)",
                        "client_name": "\(peer.clientName)",
                        "api_token_id": "\(peer.apiTokenID ?? "-")",
                    ]
                )
            case .close:
                stopAndClose(context: context)
            }
        }
        if !isReading { flushIfNeeded(context: context) }
    }

    private func write(_ frame: Frame, context: ChannelHandlerContext) {
        guard !closing else { return }
        let promise = context.eventLoop.makePromise(of: Void.self)
        context.write(wrapOutboundOut(frame), promise: promise)
        lastWrite = promise.futureResult
        needsFlush = true
    }

    private func flushIfNeeded(context: ChannelHandlerContext) {
        guard needsFlush else { return }
        needsFlush = false
        context.flush()
    }

    private func logGoaway(_ frame: Frame) {
        let status = (try? Hsmgw_V1_Status(wirePayload: frame.payload)) ?? Hsmgw_V1_Status()
        logger.info(
            "goaway",
            metadata: [
                "status": "\(status.statusCode)",
                "reason": "\(status.reason)",
                "message": "\(status.message)",
            ]
        )
    }

    /// Flushes what was written, then closes; a peer that does not read gets
    /// `closeFlushTimeout`.
    private func stopAndClose(context: ChannelHandlerContext) {
        inputStopped = true
        guard !closing else { return }
        closing = true
        needsFlush = false
        context.flush()
        let channel = context.channel
        let forceClose = context.eventLoop.assumeIsolated().scheduleTask(in: Self.closeFlushTimeout) {
            channel.close(promise: nil)
        }
        let close: () -> Void = {
            forceClose.cancel()
            guard let context = self.context else { return }
            context.close(promise: nil)
        }
        if let lastWrite {
            lastWrite.assumeIsolated().whenComplete { _ in close() }
        } else {
            close()
        }
    }

    private func inputFailed(_ error: any Error, context: ChannelHandlerContext) {
        inputStopped = true
        if let frameError = error as? FrameError {
            perform(machine.frameError(frameError, now: .now()), context: context)
        } else {
            logger.error("reading frames failed", metadata: ["error": "\(String(describing: error).prefix(200))"])
            stopAndClose(context: context)
        }
    }

    private func readClientCertificate(context: ChannelHandlerContext) {
        // NIOSSL reports the peer certificate only when it verified it against the client CA.
        guard let certificate = try? context.pipeline.syncOperations.nioSSL_peerCertificate(),
            let der = try? certificate.toDERBytes()
        else { return }
        connection.clientCertificateCommonName = CertificateSubject.commonName(fromDER: der)
        logger.debug(
            "client certificate verified",
            metadata: ["client_cn": "\(connection.clientCertificateCommonName ?? "-")"]
        )
    }

    // MARK: Handler tasks

    private func incomingRequest(_ head: ConnectionStateMachine.RequestHead) -> IncomingRequest {
        IncomingRequest(
            method: head.method,
            requestID: head.requestID,
            payload: head.payload,
            deadline: head.deadline,
            connection: connection
        )
    }

    private func startHello(
        _ taskID: ConnectionStateMachine.TaskID,
        _ head: ConnectionStateMachine.RequestHead,
        context: ChannelHandlerContext
    ) {
        let request = incomingRequest(head)
        let handler = requestHandler
        startTask(taskID, context: context) {
            let outcome = await handler.hello(request)
            return { machine in machine.helloFinished(taskID, outcome, now: .now()) }
        }
    }

    private func startHandler(
        _ taskID: ConnectionStateMachine.TaskID,
        _ head: ConnectionStateMachine.RequestHead,
        _ peer: AuthenticatedPeer,
        context: ChannelHandlerContext
    ) {
        let request = incomingRequest(head)
        let handler = requestHandler
        startTask(taskID, context: context) {
            let response = await handler.handle(request, peer: peer)
            return { machine in machine.handlerFinished(taskID, response, now: .now()) }
        }
    }

    /// Runs `body` as a task; the event it returns is fed to the state machine on the loop.
    private func startTask(
        _ taskID: ConnectionStateMachine.TaskID,
        context: ChannelHandlerContext,
        _ body:
            @escaping @Sendable () async -> @Sendable (inout ConnectionStateMachine) -> [ConnectionStateMachine.Action]
    ) {
        guard !inactive else { return }
        let eventLoop = context.eventLoop
        let this = NIOLoopBound(self, eventLoop: eventLoop)
        metrics.taskStarted()
        // The task's completion hops to the loop after this method returns, so `tasks[taskID]`
        // is always set before it is removed.
        tasks[taskID] = Task {
            let event = await body()
            eventLoop.execute {
                let handler = this.value
                handler.tasks[taskID] = nil
                handler.metrics.taskFinished()
                guard let context = handler.context else { return }
                handler.perform(event(&handler.machine), context: context)
            }
        }
    }
}
