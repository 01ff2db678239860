import GatewayTransport
import GatewayWire
import NIOCore
import NIOPosix
import ServiceLifecycle
import Testing

@Suite("Transport server over loopback: handshake, requests, limits, timeouts, shutdown")
struct GatewayTransportServerTests {
    @Test("a request before Hello is refused UNAUTHENTICATED, HANDSHAKE_REQUIRED; Hello then opens the connection")
    func handshakeRequired() async throws {
        try await withTestServer { address, handler in
            let client = try await TestFrameClient.connect(to: address)
            try await client.request(5, .listTenants)
            let refused = try await client.nextFrame()
            #expect(refused.kind == .response && refused.requestID == 5 && refused.statusCode == .unauthenticated)
            #expect(refused.statusMessage?.reason == "HANDSHAKE_REQUIRED")

            let hello = try await client.hello()
            #expect(hello.statusCode == .ok && hello.requestID == 1 && hello.method == Method.hello.rawValue)
            let response = try Hsmgw_V1_HelloResponse(wirePayload: hello.payload)
            #expect(response.principal == "token-user")
            let connection = try #require(handler.log.withLockedValue { $0.helloConnections.first })
            #expect(connection.remoteAddress.hasPrefix("127.0.0.1:") && !connection.isTLS)

            try await client.request(6, .listTenants, payload: ByteBuffer(string: "hi"))
            let answer = try await client.nextFrame()
            #expect(answer.requestID == 6 && answer.statusCode == .ok && String(buffer: answer.payload) == "hi")
            await client.close()
        }
    }

    @Test("a refused Hello is answered UNAUTHENTICATED and the connection is closed")
    func helloRefused() async throws {
        try await withTestServer { address, _ in
            let client = try await TestFrameClient.connect(to: address)
            var hello = Hsmgw_V1_HelloRequest()
            hello.apiToken = "not-a-token"
            try await client.request(1, .hello, payload: hello.wirePayload())
            let frames = try await client.framesUntilClosed()
            #expect(frames.map(\.kind) == [.response])
            #expect(frames.first?.statusCode == .unauthenticated)
        }
    }

    @Test("duplicate request id: goaway REQUEST_ID_IN_USE, the request in flight still answered, then close")
    func duplicateRequestID() async throws {
        try await withTestServer { address, _ in
            let client = try await TestFrameClient.connect(to: address)
            try await client.hello()
            try await client.request(7, .getDataKey, payload: ByteBuffer(string: "sleep:200|first"))
            try await client.request(7, .getDataKey, payload: ByteBuffer(string: "again"))
            let frames = try await client.framesUntilClosed()
            #expect(frames.map(\.kind) == [.goaway, .response])
            #expect(frames[0].statusMessage?.statusCode == .invalidArgument)
            #expect(frames[0].statusMessage?.reason == "REQUEST_ID_IN_USE")
            #expect(frames[1].requestID == 7 && String(buffer: frames[1].payload) == "sleep:200|first")
        }
    }

    @Test("request id 0: goaway INVALID_ARGUMENT and close")
    func requestIDZero() async throws {
        try await withTestServer { address, _ in
            let client = try await TestFrameClient.connect(to: address)
            try await client.hello()
            try await client.request(0, .getDataKey)
            let frames = try await client.framesUntilClosed()
            #expect(frames.map(\.kind) == [.goaway])
            #expect(frames.first?.statusMessage?.statusCode == .invalidArgument)
        }
    }

    @Test("over max requests in flight: RESOURCE_EXHAUSTED for that request; the others and the connection carry on")
    func tooManyInFlight() async throws {
        var limits = ServerLimits()
        limits.maxRequestsInFlightPerConnection = 2
        try await withTestServer(limits: limits) { address, _ in
            let client = try await TestFrameClient.connect(to: address)
            try await client.hello()
            try await client.request(10, .getDataKey, payload: ByteBuffer(string: "sleep:300|a"))
            try await client.request(11, .getDataKey, payload: ByteBuffer(string: "sleep:300|b"))
            try await client.request(12, .getDataKey, payload: ByteBuffer(string: "c"))
            let refused = try await client.nextFrame()
            #expect(refused.requestID == 12 && refused.statusCode == .resourceExhausted)
            #expect(refused.statusMessage?.reason == "TOO_MANY_REQUESTS_IN_FLIGHT")
            let answered = try await client.nextFrames(2)
            #expect(Set(answered.map(\.requestID)) == [10, 11])
            try await client.request(13, .getDataKey, payload: ByteBuffer(string: "d"))
            #expect(try await client.nextFrame().requestID == 13)
            await client.close()
        }
    }

    @Test("an unknown method number reaches the handler, which answers UNIMPLEMENTED")
    func unknownMethod() async throws {
        try await withTestServer { address, handler in
            let client = try await TestFrameClient.connect(to: address)
            try await client.hello()
            try await client.request(3, Method(rawValue: 4242))
            let answer = try await client.nextFrame()
            #expect(answer.requestID == 3 && answer.method == 4242 && answer.statusCode == .unimplemented)
            #expect(handler.log.withLockedValue { $0.handled.map(\.method) } == [4242])
            await client.close()
        }
    }

    @Test("ping is answered by pong with the same id and payload")
    func pingPong() async throws {
        try await withTestServer { address, _ in
            let client = try await TestFrameClient.connect(to: address)
            try await client.send(Frame(kind: .ping, requestID: 99, payload: ByteBuffer(string: "are you there")))
            let pong = try await client.nextFrame()
            #expect(pong.kind == .pong && pong.requestID == 99 && String(buffer: pong.payload) == "are you there")
            await client.close()
        }
    }

    @Test("the server pings an idle connection and closes it when no pong comes")
    func keepalive() async throws {
        var limits = ServerLimits()
        limits.keepaliveInterval = .milliseconds(200)
        limits.keepaliveTimeout = .seconds(1)  // room for a loaded test machine to answer
        try await withTestServer(limits: limits) { address, _ in
            let answering = try await TestFrameClient.connect(to: address)
            let silent = try await TestFrameClient.connect(to: address)
            // One client answers two pings and stays; the other ignores its ping and is closed.
            for _ in 0..<2 {
                let ping = try await answering.nextFrame()
                #expect(ping.kind == .ping)
                try await answering.send(Frame(kind: .pong, requestID: ping.requestID, payload: ping.payload))
            }
            let frames = try await silent.framesUntilClosed()
            #expect(frames.map(\.kind) == [.ping, .goaway])
            #expect(frames.last?.statusMessage?.reason == "KEEPALIVE_TIMEOUT")
            #expect(!answering.isClosed)
            await answering.close()
        }
    }

    @Test("cancel: the caller gets CANCELLED and the handler's task is cancelled")
    func cancel() async throws {
        try await withTestServer { address, handler in
            let client = try await TestFrameClient.connect(to: address)
            try await client.hello()
            try await client.request(21, .encrypt, payload: ByteBuffer(string: "wait|cancel me"))
            try await handler.waitUntil { $0.running.contains(21) }
            try await client.send(Frame(kind: .cancel, requestID: 21))
            let answer = try await client.nextFrame()
            #expect(answer.requestID == 21 && answer.statusCode == .cancelled)
            try await handler.waitUntil { $0.cancelled.contains(21) }
            await client.close()
        }
    }

    @Test("deadline: DEADLINE_EXCEEDED when it passes, and the handler's task is cancelled")
    func deadline() async throws {
        try await withTestServer { address, handler in
            let client = try await TestFrameClient.connect(to: address)
            try await client.hello()
            let clock = ContinuousClock()
            let start = clock.now
            try await client.request(
                22,
                .decrypt,
                payload: ByteBuffer(string: "sleep:5000|slow"),
                deadlineMilliseconds: 150
            )
            let answer = try await client.nextFrame()
            #expect(answer.requestID == 22 && answer.statusCode == .deadlineExceeded)
            #expect(clock.now - start < .seconds(3))
            try await handler.waitUntil { $0.cancelled.contains(22) }
            await client.close()
        }
    }

    @Test("1,000 concurrent requests on one connection are answered out of order and matched by id")
    func thousandConcurrentRequests() async throws {
        var limits = ServerLimits()
        limits.maxRequestsInFlightPerConnection = 1000
        try await withTestServer(limits: limits) { address, _ in
            let client = try await TestFrameClient.connect(to: address)
            try await client.hello()
            var sent: [UInt32: String] = [:]
            for id in UInt32(1)...1000 {
                let payload = "sleep:\((id * 7919) % 50)|request \(id)"
                sent[id + 1] = payload
                try await client.request(id + 1, .getDataKey, payload: ByteBuffer(string: payload))
            }
            let answers = try await client.nextFrames(1000)
            #expect(Set(answers.map(\.requestID)) == Set(sent.keys))
            for answer in answers {
                #expect(answer.statusCode == .ok)
                #expect(String(buffer: answer.payload) == sent[answer.requestID])
            }
            #expect(answers.map(\.requestID) != answers.map(\.requestID).sorted(), "answers came in request order")
            await client.close()
        }
    }

    @Test("max connections: one more is sent a goaway RESOURCE_EXHAUSTED and closed; the others are served")
    func maxConnections() async throws {
        var limits = ServerLimits()
        limits.maxConnections = 2
        try await withTestServer(limits: limits) { address, _ in
            let first = try await TestFrameClient.connect(to: address)
            let second = try await TestFrameClient.connect(to: address)
            try await first.hello()
            try await second.hello()
            let third = try await TestFrameClient.connect(to: address)
            let frames = try await third.framesUntilClosed()
            #expect(frames.map(\.kind) == [.goaway])
            #expect(frames.first?.statusMessage?.statusCode == .resourceExhausted)
            #expect(frames.first?.statusCode == .resourceExhausted, "the goaway's header status is not its code")
            #expect(frames.first?.statusMessage?.reason == "TOO_MANY_CONNECTIONS")

            try await first.request(2, .getDataKey, payload: ByteBuffer(string: "still here"))
            #expect(try await first.nextFrame().statusCode == .ok)
            // A slot freed is usable again.
            await second.close()
            try await Task.sleep(for: .milliseconds(100))
            let fourth = try await TestFrameClient.connect(to: address)
            #expect(try await fourth.hello().statusCode == .ok)
            await first.close()
            await fourth.close()
        }
    }

    @Test("idle timeout: goaway UNAVAILABLE, IDLE, then close")
    func idleTimeout() async throws {
        var limits = ServerLimits()
        limits.idleTimeout = .milliseconds(300)
        try await withTestServer(limits: limits) { address, _ in
            let client = try await TestFrameClient.connect(to: address)
            // Taken before Hello goes out: the server's idle timer starts after it has answered,
            // so the goaway cannot arrive sooner than the timeout after this instant, however
            // slowly this task is scheduled (a bound that holds on a loaded machine).
            let clock = ContinuousClock()
            let start = clock.now
            try await client.hello()
            let frames = try await client.framesUntilClosed()
            #expect(frames.map(\.kind) == [.goaway])
            #expect(frames.first?.statusMessage?.statusCode == .unavailable)
            #expect(frames.first?.statusMessage?.reason == "IDLE")
            #expect(clock.now - start >= .milliseconds(290))
        }
    }

    @Test("handshake timeout: a connection that never says Hello is sent a goaway and closed")
    func handshakeTimeout() async throws {
        var limits = ServerLimits()
        limits.handshakeTimeout = .milliseconds(200)
        try await withTestServer(limits: limits) { address, _ in
            let client = try await TestFrameClient.connect(to: address)
            let frames = try await client.framesUntilClosed()
            #expect(frames.map(\.kind) == [.goaway])
            #expect(frames.first?.statusMessage?.reason == "HANDSHAKE_TIMEOUT")
        }
    }

    @Test("the client closing its side still gets its answers, then the server closes")
    func clientHalfClose() async throws {
        try await withTestServer { address, _ in
            let client = try await TestFrameClient.connect(to: address)
            try await client.hello()
            try await client.request(2, .getDataKey, payload: ByteBuffer(string: "sleep:100|last"))
            try await client.closeOutput()
            let frames = try await client.framesUntilClosed()
            #expect(frames.map(\.requestID) == [2])
            #expect(frames.first?.statusCode == .ok)
        }
    }

    @Test("graceful shutdown: goaway, requests in flight answered OK, later ones UNAVAILABLE, close, run returns")
    func gracefulShutdown() async throws {
        let handler = TestGatewayHandler()
        let server = GatewayTransportServer(
            configuration: ServerConfiguration(listeners: [.tcp(host: "127.0.0.1", port: 0)]),
            handler: handler,
            logger: testLogger
        )
        let group = ServiceGroup(
            configuration: ServiceGroupConfiguration(
                services: [server], gracefulShutdownSignals: [], logger: testLogger)
        )
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            let address = try await server.listeningAddresses()[0]
            let client = try await TestFrameClient.connect(to: address)
            try await client.hello()
            try await client.request(2, .getDataKey, payload: ByteBuffer(string: "sleep:400|in flight"))
            try await handler.waitUntil { $0.handled.count == 1 }

            await group.triggerGracefulShutdown()
            let goaway = try await client.nextFrame()
            #expect(goaway.kind == .goaway)
            #expect(goaway.statusMessage?.statusCode == .unavailable)
            #expect(goaway.statusMessage?.reason == "SHUTTING_DOWN")

            try await client.request(3, .getDataKey, payload: ByteBuffer(string: "too late"))
            let frames = try await client.framesUntilClosed()
            #expect(frames.map(\.requestID) == [3, 2])
            #expect(frames.first?.statusCode == .unavailable)
            #expect(frames.first?.statusMessage?.reason == "SHUTTING_DOWN")
            #expect(frames.last?.statusCode == .ok)
            #expect(String(buffer: frames.last?.payload ?? ByteBuffer()) == "sleep:400|in flight")

            // No new connection is served: refused by the kernel, or (in a race with the close of
            // the listener) sent a goaway and closed.
            if let late = try? await TestFrameClient.connect(to: address) {
                let lateFrames = try await late.framesUntilClosed()
                #expect(lateFrames.map(\.kind) == [.goaway])
                #expect(lateFrames.first?.statusMessage?.reason == "SHUTTING_DOWN")
            }
            try await tasks.waitForAll()  // run() returned
        }
    }

    @Test("graceful shutdown: a request still running at the drain timeout is answered UNAVAILABLE")
    func drainTimeout() async throws {
        var limits = ServerLimits()
        limits.drainTimeout = .milliseconds(200)
        let handler = TestGatewayHandler()
        let server = GatewayTransportServer(
            configuration: ServerConfiguration(listeners: [.tcp(host: "127.0.0.1", port: 0)], limits: limits),
            handler: handler,
            logger: testLogger
        )
        let group = ServiceGroup(
            configuration: ServiceGroupConfiguration(
                services: [server], gracefulShutdownSignals: [], logger: testLogger)
        )
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            let client = try await TestFrameClient.connect(to: try await server.listeningAddresses()[0])
            try await client.hello()
            try await client.request(2, .getDataKey, payload: ByteBuffer(string: "wait|forever"))
            try await handler.waitUntil { $0.running.contains(2) }
            await group.triggerGracefulShutdown()
            let frames = try await client.framesUntilClosed()
            #expect(frames.map(\.kind) == [.goaway, .response])
            #expect(frames.last?.statusCode == .unavailable)
            #expect(frames.last?.statusMessage?.reason == "SHUTTING_DOWN")
            try await handler.waitUntil { $0.cancelled.contains(2) }
            try await tasks.waitForAll()
        }
    }

    @Test("a Unix socket listener serves plaintext")
    func unixSocket() async throws {
        let path = "/tmp/hsmgw-transport-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        try await withTestServer(listeners: [.unixDomainSocket(path: path)]) { address, handler in
            let client = try await TestFrameClient.connect(to: address)
            #expect(try await client.hello().statusCode == .ok)
            #expect(handler.log.withLockedValue { $0.helloConnections.first?.remoteAddress } == "unix")
            await client.close()
        }
    }
}
