import GatewayWire
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL

/// A raw-frame client for tests: writes any bytes (valid frames or not) and collects what the
/// server sends until it closes. Not the real client library (Sources/GatewayClient).
final class TestFrameClient: Sendable {
    enum Event: Sendable {
        case frame(Frame)
        /// The server closed the connection (or it failed: `error` says how).
        case closed(error: String?)
    }

    struct TimedOut: Error, CustomStringConvertible {
        var waitingFor: String
        var description: String { "timed out waiting for \(waitingFor)" }
    }

    let channel: any Channel
    private let events: NIOLockedValueBox<[Event]>
    private let cursor = NIOLockedValueBox(0)

    private init(channel: any Channel, events: NIOLockedValueBox<[Event]>) {
        self.channel = channel
        self.events = events
    }

    /// Connects to `address`, with TLS when `tls` is given, from `source` when given (e.g.
    /// 127.0.0.2, another loopback address than the default).
    static func connect(
        to address: SocketAddress,
        from source: SocketAddress? = nil,
        tls: NIOSSLContext? = nil,
        serverHostname: String? = nil
    ) async throws -> TestFrameClient {
        let events = NIOLockedValueBox<[Event]>([])
        var bootstrap = ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
        if let source { bootstrap = bootstrap.bind(to: source) }
        let channel =
            try await bootstrap
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let pipeline = channel.pipeline.syncOperations
                    if let tls {
                        try pipeline.addHandler(NIOSSLClientHandler(context: tls, serverHostname: serverHostname))
                    }
                    // A generous limit: the client must see whatever the server sends.
                    let decoder = FrameDecoder(
                        limits: FrameLimits(maximumFrameByteCount: FrameLimits.maximumFrameLimit))
                    try pipeline.addHandler(ByteToMessageHandler(decoder))
                    try pipeline.addHandler(EventCollector(events: events))
                }
            }
            .connect(to: address)
            .get()
        return TestFrameClient(channel: channel, events: events)
    }

    /// Sends `frame` as encoded by the protocol (no limit check: tests send what they like).
    func send(_ frame: Frame) async throws {
        var buffer = ByteBuffer()
        try FrameEncoder(limits: FrameLimits(maximumFrameByteCount: FrameLimits.maximumFrameLimit))
            .encode(data: frame, out: &buffer)
        try await channel.writeAndFlush(buffer)
    }

    /// Sends raw bytes.
    func sendRaw(_ bytes: [UInt8]) async throws {
        try await channel.writeAndFlush(ByteBuffer(bytes: bytes))
    }

    /// Sends a request frame.
    func request(
        _ id: UInt32,
        _ method: Method,
        payload: ByteBuffer = ByteBuffer(),
        deadlineMilliseconds: UInt32 = 0
    ) async throws {
        try await send(
            Frame(
                kind: .request,
                method: method.rawValue,
                requestID: id,
                deadlineMilliseconds: deadlineMilliseconds,
                payload: payload
            )
        )
    }

    /// Sends Hello with `token` and waits for its response.
    @discardableResult
    func hello(token: String = TestGatewayHandler.goodToken, id: UInt32 = 1) async throws -> Frame {
        var hello = Hsmgw_V1_HelloRequest()
        hello.apiToken = token
        hello.clientName = "transport-tests"
        try await request(id, .hello, payload: hello.wirePayload())
        return try await nextFrame()
    }

    /// Closes the sending side (TCP FIN); the server may still answer.
    func closeOutput() async throws {
        try await channel.close(mode: .output)
    }

    func close() async {
        try? await channel.close()
    }

    /// The next event, waiting up to `timeout`.
    func next(timeout: Duration = .seconds(10)) async throws -> Event {
        let clock = ContinuousClock()
        let end = clock.now + timeout
        while true {
            let event = cursor.withLockedValue { index -> Event? in
                let all = events.withLockedValue { $0 }
                guard index < all.count else { return nil }
                index += 1
                return all[index - 1]
            }
            if let event { return event }
            guard clock.now < end else { throw TimedOut(waitingFor: "an event from the server") }
            try await Task.sleep(for: .milliseconds(2))
        }
    }

    /// The next frame; throws if the connection closes first.
    func nextFrame(timeout: Duration = .seconds(10)) async throws -> Frame {
        switch try await next(timeout: timeout) {
        case .frame(let frame): return frame
        case .closed(let error): throw TimedOut(waitingFor: "a frame (the connection closed: \(error ?? "EOF"))")
        }
    }

    /// The next `count` frames.
    func nextFrames(_ count: Int, timeout: Duration = .seconds(30)) async throws -> [Frame] {
        var frames: [Frame] = []
        for _ in 0..<count { frames.append(try await nextFrame(timeout: timeout)) }
        return frames
    }

    /// Waits for the close, returning the frames that came before it.
    func framesUntilClosed(timeout: Duration = .seconds(10)) async throws -> [Frame] {
        var frames: [Frame] = []
        while true {
            switch try await next(timeout: timeout) {
            case .frame(let frame): frames.append(frame)
            case .closed: return frames
            }
        }
    }

    /// Whether the server has closed the connection (without consuming events).
    var isClosed: Bool {
        events.withLockedValue { events in
            events.contains {
                if case .closed = $0 { return true }
                return false
            }
        }
    }
}

/// Appends every decoded frame and the close to the event list.
private final class EventCollector: ChannelInboundHandler {
    typealias InboundIn = Frame

    private let events: NIOLockedValueBox<[TestFrameClient.Event]>
    private var closed = false

    init(events: NIOLockedValueBox<[TestFrameClient.Event]>) {
        self.events = events
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        events.withLockedValue { $0.append(.frame(frame)) }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event { finish(nil, context: context) }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        finish(nil, context: context)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        finish("\(error)", context: context)
        context.close(promise: nil)
    }

    private func finish(_ error: String?, context: ChannelHandlerContext) {
        guard !closed else { return }
        closed = true
        events.withLockedValue { $0.append(.closed(error: error)) }
    }
}

extension Frame {
    /// The `Status` of a failed response or a goaway.
    var statusMessage: Hsmgw_V1_Status? { try? Hsmgw_V1_Status(wirePayload: payload) }
    var statusCode: StatusCode { StatusCode(rawValue: status) }
}
