import GatewayWire
import NIOCore
import NIOPosix
import NIOSSL
import SwiftProtobuf
import Synchronization

@testable import GatewayClient

/// A tiny gateway on loopback that speaks raw frames, driven by a script per connection: enough
/// to test the client's connection handling before the real server exists.
struct FakeGateway {
    /// One accepted connection, as its script sees it.
    final class Connection {
        let number: Int
        private var inbound: NIOAsyncChannelInboundStream<Frame>.AsyncIterator
        private let outbound: NIOAsyncChannelOutboundWriter<Frame>

        init(number: Int, inbound: NIOAsyncChannelInboundStream<Frame>, outbound: NIOAsyncChannelOutboundWriter<Frame>)
        {
            self.number = number
            self.inbound = inbound.makeAsyncIterator()
            self.outbound = outbound
        }

        /// The next frame from the client; nil when it closed.
        func next() async throws -> Frame? {
            try await inbound.next()
        }

        /// The next request (answering pings is not needed: the client does not ping).
        func nextRequest() async throws -> Frame? {
            while let frame = try await next() {
                if frame.kind == .request { return frame }
            }
            return nil
        }

        func send(_ frame: Frame) async throws {
            try await outbound.write(frame)
        }

        /// Something that can answer from other tasks.
        var responder: Responder { Responder(outbound: outbound) }

        /// Reads the Hello and accepts it with these limits.
        @discardableResult
        func acceptHello(maximumInFlight: UInt32 = 128, maximumFrame: UInt32 = 1 << 20) async throws
            -> Hsmgw_V1_HelloRequest
        {
            guard let frame = try await nextRequest() else { throw FakeGatewayError.closed }
            guard frame.method == Method.hello.rawValue else { throw FakeGatewayError.unexpected("\(frame.method)") }
            let hello = try Hsmgw_V1_HelloRequest(wirePayload: frame.payload)
            var response = Hsmgw_V1_HelloResponse()
            response.serverVersion = "fake"
            response.instanceID = "fake-\(number)"
            response.principal = "tester"
            response.maxRequestsInFlight = maximumInFlight
            response.maxFrameBytes = maximumFrame
            response.keepaliveSeconds = 30
            try await respond(to: frame, with: response)
            return hello
        }

        func respond(to request: Frame, with message: some SwiftProtobuf.Message) async throws {
            try await send(
                Frame(
                    kind: .response, method: request.method, requestID: request.requestID,
                    payload: message.wirePayload())
            )
        }

        func fail(_ request: Frame, _ code: StatusCode, reason: String = "", message: String = "refused") async throws {
            try await send(
                Frame(
                    kind: .response,
                    method: request.method,
                    status: code.rawValue,
                    requestID: request.requestID,
                    payload: Hsmgw_V1_Status(code, message, reason: reason).wirePayload()
                )
            )
        }

        func goaway(_ code: StatusCode, reason: String) async throws {
            try await send(Frame.goaway(Hsmgw_V1_Status(code, "going away", reason: reason)))
        }

        /// Answers a GetTenant with a tenant whose id is the requested one.
        func echoTenant(_ request: Frame) async throws {
            let asked = try Hsmgw_V1_GetTenantRequest(wirePayload: request.payload)
            var response = Hsmgw_V1_GetTenantResponse()
            response.tenant.id = asked.tenant
            response.tenant.state = "enabled"
            try await respond(to: request, with: response)
        }
    }

    /// Answers requests from any task (the outbound writer may be shared).
    struct Responder: Sendable {
        let outbound: NIOAsyncChannelOutboundWriter<Frame>

        /// Answers a GetTenant with a tenant whose id is the requested one.
        func echoTenant(_ request: Frame) async throws {
            let asked = try Hsmgw_V1_GetTenantRequest(wirePayload: request.payload)
            var response = Hsmgw_V1_GetTenantResponse()
            response.tenant.id = asked.tenant
            try await outbound.write(
                Frame(
                    kind: .response, method: request.method, requestID: request.requestID,
                    payload: response.wirePayload())
            )
        }
    }

    enum FakeGatewayError: Error {
        case closed
        case unexpected(String)
    }

    typealias Script = @Sendable (Connection) async throws -> Void

    /// Runs `body` with the port of a fake gateway whose every connection runs `script`.
    /// With `tls`, the server speaks TLS with that context.
    static func run<Result: Sendable>(
        tls: NIOSSLContext? = nil,
        script: @escaping Script,
        body: (Int) async throws -> Result
    ) async throws -> Result {
        let server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .bind(host: "127.0.0.1", port: 0) { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls {
                        try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls))
                    }
                    try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(FrameDecoder()))
                    try channel.pipeline.syncOperations.addHandler(MessageToByteHandler(FrameEncoder()))
                    return try NIOAsyncChannel<Frame, Frame>(wrappingChannelSynchronously: channel)
                }
            }
        let port = server.channel.localAddress!.port!
        return try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                try await server.executeThenClose { accepted in
                    try await withThrowingTaskGroup(of: Void.self) { connections in
                        var number = 0
                        for try await connection in accepted {
                            let current = number
                            number += 1
                            connections.addTask {
                                try? await connection.executeThenClose { inbound, outbound in
                                    try await script(Connection(number: current, inbound: inbound, outbound: outbound))
                                }
                            }
                        }
                    }
                }
            }
            let result = try await body(port)
            group.cancelAll()
            try? await server.channel.close()
            return result
        }
    }
}

/// Things a script saw, for the test to check.
final class Recorder<Value: Sendable>: Sendable {
    private let values = Mutex<[Value]>([])

    func append(_ value: Value) { values.withLock { $0.append(value) } }
    var all: [Value] { values.withLock { $0 } }
}

/// A value shared between tasks, behind a lock.
final class Locked<Value: Sendable>: Sendable {
    private let value: Mutex<Value>

    init(_ value: Value) { self.value = Mutex(value) }

    func withLock<Result>(_ body: (inout Value) -> Result) -> Result {
        value.withLock { body(&$0) }
    }
}

/// A one-shot signal between a script and a test.
final class Signal: Sendable {
    private let stream: AsyncStream<Void>
    private let continuation: AsyncStream<Void>.Continuation

    init() {
        (stream, continuation) = AsyncStream<Void>.makeStream()
    }

    func fire() { continuation.yield() }

    func wait() async {
        for await _ in stream { return }
    }
}

func fakeConfiguration(
    port: Int,
    poolSize: Int = 1,
    retryPolicy: RetryPolicy = RetryPolicy(
        maximumAttempts: 3, initialBackoff: .milliseconds(5), maximumBackoff: .milliseconds(20)),
    defaultDeadline: Duration? = .seconds(20)
) -> GatewayClientConfiguration {
    GatewayClientConfiguration(
        target: .host("127.0.0.1", port: port),
        transportSecurity: .plaintext,
        apiToken: APIToken("hsmgw_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"),
        clientName: "gateway-client-tests",
        poolSize: poolSize,
        connectTimeout: .seconds(5),
        defaultDeadline: defaultDeadline,
        retryPolicy: retryPolicy,
        localDeadlineGrace: .milliseconds(50)
    )
}

/// A GetTenant request for `tenant`.
func tenantRequest(_ tenant: String) -> Hsmgw_V1_GetTenantRequest {
    var request = Hsmgw_V1_GetTenantRequest()
    request.tenant = tenant
    return request
}
