import GatewayWire
import NIOCore
import NIOPosix

/// One plaintext connection that sends a single Hello exactly as asked (any deadline, any source
/// address) and reports the first frame the gateway answers with: what the client library, which
/// bounds its own handshake and always binds the default address, cannot do.
enum RawHello {
    /// The gateway's first answer.
    struct Answer: Sendable, Equatable {
        var kind: Frame.Kind
        /// For a goaway, or a failed response, the code of its `Status` payload.
        var code: StatusCode
        var reason: String
    }

    /// The gateway's first answer (a response or a goaway), or nil when the connection closed
    /// without one.
    static func send(
        to port: Int,
        from source: String? = nil,
        token: String,
        deadlineMilliseconds: UInt32 = 0,
        timeout: Duration = .seconds(30)
    ) async throws -> Answer? {
        let loop = MultiThreadedEventLoopGroup.singleton.any()
        let promise = loop.makePromise(of: Frame?.self)
        // Completed on every path (a second completion is ignored): NIO traps on a leaked promise.
        defer { promise.succeed(nil) }
        var bootstrap = ClientBootstrap(group: loop)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let pipeline = channel.pipeline.syncOperations
                    try pipeline.addHandler(
                        ByteToMessageHandler(
                            FrameDecoder(limits: FrameLimits(maximumFrameByteCount: FrameLimits.maximumFrameLimit))))
                    try pipeline.addHandler(FirstFrame(promise: promise))
                }
            }
        if let source { bootstrap = bootstrap.bind(to: try SocketAddress(ipAddress: source, port: 0)) }
        let channel = try await bootstrap.connect(host: "127.0.0.1", port: port).get()
        defer { channel.close(promise: nil) }
        var hello = Hsmgw_V1_HelloRequest()
        hello.apiToken = token
        hello.clientName = "raw-hello"
        let frame = Frame(
            kind: .request, method: Method.hello.rawValue, requestID: 1, deadlineMilliseconds: deadlineMilliseconds,
            payload: hello.wirePayload())
        var buffer = ByteBuffer()
        try FrameEncoder().encode(data: frame, out: &buffer)
        try await channel.writeAndFlush(buffer)
        let timer = channel.eventLoop.scheduleTask(in: TimeAmount(timeout)) { promise.succeed(nil) }
        defer { timer.cancel() }
        guard let answer = try await promise.futureResult.get() else { return nil }
        if answer.kind == .response, answer.status == StatusCode.ok.rawValue {
            return Answer(kind: answer.kind, code: .ok, reason: "")
        }
        let status = (try? Hsmgw_V1_Status(wirePayload: answer.payload)) ?? Hsmgw_V1_Status()
        return Answer(kind: answer.kind, code: status.statusCode, reason: status.reason)
    }

    private final class FirstFrame: ChannelInboundHandler {
        typealias InboundIn = Frame
        let promise: EventLoopPromise<Frame?>

        init(promise: EventLoopPromise<Frame?>) { self.promise = promise }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            promise.succeed(unwrapInboundIn(data))
        }

        func channelInactive(context: ChannelHandlerContext) {
            promise.succeed(nil)
            context.fireChannelInactive()
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            promise.succeed(nil)
            context.close(promise: nil)
        }
    }
}
