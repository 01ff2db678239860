import GatewayWire
import NIOCore
import NIOPosix
import Testing

@testable import GatewayTransport

/// What an unauthenticated peer can make the server hold: the small frame limit until the Hello
/// succeeds, one Hello at a time per connection (an abandoned one included), and the per-address
/// connection cap. State-machine transcripts first, then real sockets on loopback.
@Suite("Before authentication: frame limit, one Hello at a time, connections per address")
struct PreAuthenticationTests {
    // MARK: State machine

    private static let peer = AuthenticatedPeer(principal: "alice", apiTokenID: nil, clientName: "test")

    private static func hello(_ id: UInt32, deadline: UInt32 = 0) -> Frame {
        Frame(kind: .request, method: Method.hello.rawValue, requestID: id, deadlineMilliseconds: deadline)
    }

    private static func taskStarted(_ actions: [ConnectionStateMachine.Action]) -> ConnectionStateMachine.TaskID? {
        for case .startHello(let taskID, _) in actions { return taskID }
        return nil
    }

    private static func answers(_ actions: [ConnectionStateMachine.Action]) -> [(UInt32, StatusCode)] {
        actions.compactMap {
            guard case .respond(let response) = $0 else { return nil }
            return (response.frame.requestID, response.status)
        }
    }

    /// The reasons of the goaways sent; one whose header status is not its `Status.code`
    /// (protocol §3.2) shows as a mismatch instead, so every test of a goaway checks its header.
    private static func goawayReasons(_ actions: [ConnectionStateMachine.Action]) -> [String] {
        actions.compactMap {
            guard case .send(let frame) = $0, frame.kind == .goaway else { return nil }
            let status = (try? Hsmgw_V1_Status(wirePayload: frame.payload)) ?? Hsmgw_V1_Status()
            guard UInt32(frame.status) == status.code else {
                return "header status \(frame.status) != Status.code \(status.code)"
            }
            return status.reason
        }
    }

    @Test("the inbound frame limit is the small pre-Hello one until the Hello succeeds, then max_frame_bytes")
    func frameLimitRisesWithHello() throws {
        var limits = ServerLimits()
        var now = NIODeadline.uptimeNanoseconds(1_000_000_000)
        var machine = ConnectionStateMachine(limits: limits)
        _ = machine.connectionActive(now: now)
        #expect(machine.inboundFrameLimit == ServerLimits.maxFrameBytesBeforeHello)
        #expect(ServerLimits.maxFrameBytesBeforeHello == 4096)
        let task = try #require(Self.taskStarted(machine.frameReceived(Self.hello(1), now: now)))
        #expect(machine.inboundFrameLimit == 4096, "a Hello in flight has not succeeded yet")
        now = now + .milliseconds(3)
        let response = OutgoingResponse(status: .ok, payload: ByteBuffer())
        _ = machine.helloFinished(task, .accepted(Self.peer, response: response), now: now)
        #expect(machine.inboundFrameLimit == limits.maxFrameBytes)

        // A frame limit configured below 4 KiB applies before the Hello too.
        limits.maxFrameBytes = 2048
        #expect(ConnectionStateMachine(limits: limits).inboundFrameLimit == 2048)
    }

    @Test("a length over the limit: goaway FRAME_TOO_LARGE_BEFORE_HELLO before the Hello, FRAME_TOO_LARGE after")
    func frameTooLargeReason() throws {
        let now = NIODeadline.uptimeNanoseconds(1_000_000_000)
        var before = ConnectionStateMachine(limits: ServerLimits())
        _ = before.connectionActive(now: now)
        let refused = before.frameError(FrameError(.lengthTooLarge, "too large"), now: now)
        #expect(Self.goawayReasons(refused) == ["FRAME_TOO_LARGE_BEFORE_HELLO"])
        #expect(refused.contains { if case .close = $0 { true } else { false } })

        var after = ConnectionStateMachine(limits: ServerLimits())
        _ = after.connectionActive(now: now)
        let task = try #require(Self.taskStarted(after.frameReceived(Self.hello(1), now: now)))
        _ = after.helloFinished(
            task, .accepted(Self.peer, response: OutgoingResponse(status: .ok, payload: ByteBuffer())), now: now)
        #expect(Self.goawayReasons(after.frameError(FrameError(.lengthTooLarge, "x"), now: now)) == ["FRAME_TOO_LARGE"])
    }

    @Test("an abandoned Hello keeps the handshake busy until its task returns: no second Hello runs meanwhile")
    func abandonedHelloStillCounts() throws {
        var now = NIODeadline.uptimeNanoseconds(1_000_000_000)
        var machine = ConnectionStateMachine(limits: ServerLimits())
        _ = machine.connectionActive(now: now)
        let first = try #require(Self.taskStarted(machine.frameReceived(Self.hello(1, deadline: 1), now: now)))
        now = now + .milliseconds(1)
        let expired = machine.requestDeadlinePassed(first, now: now)
        #expect(Self.answers(expired).map(\.1) == [.deadlineExceeded])
        #expect(expired.contains { if case .cancelTask(first) = $0 { true } else { false } })

        // 127 more Hellos, each with a 1 ms deadline: none starts while the first still runs.
        for id in UInt32(2)...128 {
            let actions = machine.frameReceived(Self.hello(id, deadline: 1), now: now)
            #expect(Self.taskStarted(actions) == nil)
            #expect(Self.answers(actions).map(\.1) == [.failedPrecondition])
        }
        // The first Hello's task returns (its result is dropped): now another may start.
        let late = machine.helloFinished(
            first, .refused(OutgoingResponse(status: .unauthenticated, payload: ByteBuffer())), now: now)
        #expect(late.isEmpty)
        #expect(!machine.isClosed)
        let next = machine.frameReceived(Self.hello(200), now: now)
        let second = try #require(Self.taskStarted(next))
        _ = machine.helloFinished(
            second, .accepted(Self.peer, response: OutgoingResponse(status: .ok, payload: ByteBuffer())), now: now)
        #expect(machine.isAuthenticated)
    }

    @Test("a cancelled Hello keeps the handshake busy too")
    func cancelledHelloStillCounts() throws {
        let now = NIODeadline.uptimeNanoseconds(1_000_000_000)
        var machine = ConnectionStateMachine(limits: ServerLimits())
        _ = machine.connectionActive(now: now)
        let first = try #require(Self.taskStarted(machine.frameReceived(Self.hello(1), now: now)))
        let cancelled = machine.frameReceived(Frame(kind: .cancel, requestID: 1), now: now)
        #expect(Self.answers(cancelled).map(\.1) == [.cancelled])
        #expect(Self.answers(machine.frameReceived(Self.hello(2), now: now)).map(\.1) == [.failedPrecondition])
        _ = machine.helloFinished(
            first, .refused(OutgoingResponse(status: .unauthenticated, payload: ByteBuffer())), now: now)
        #expect(Self.taskStarted(machine.frameReceived(Self.hello(3), now: now)) != nil)
    }

    // MARK: Real sockets

    /// A request frame's first bytes: the length prefix and the 16-byte header of a Hello.
    private static func helloHeader(length: UInt32, id: UInt32 = 1) -> [UInt8] {
        var buffer = ByteBuffer()
        buffer.writeInteger(length)
        buffer.writeInteger(UInt8(1))  // version
        buffer.writeInteger(UInt8(1))  // request
        buffer.writeInteger(UInt16(0))
        buffer.writeInteger(Method.hello.rawValue)
        buffer.writeInteger(UInt16(0))
        buffer.writeInteger(id)
        buffer.writeInteger(UInt32(0))
        return Array(buffer.readableBytesView)
    }

    @Test("a frame over 4 KiB before the Hello is refused from its length prefix; after the Hello 200 KiB is fine")
    func preHelloFrameLimitOverLoopback() async throws {
        try await withTestServer { address, _ in
            let authenticated = try await TestFrameClient.connect(to: address)
            defer { Task { await authenticated.close() } }
            #expect(try await authenticated.hello().statusCode == .ok)

            // Only the prefix and the header of a 4,097-byte frame: the goaway comes without the
            // payload ever being sent.
            let early = try await TestFrameClient.connect(to: address)
            try await early.sendRaw(Self.helloHeader(length: 4097))
            let frames = try await early.framesUntilClosed()
            #expect(frames.count == 1)
            let goaway = try #require(frames.first)
            #expect(goaway.kind == .goaway)
            #expect(goaway.statusMessage?.statusCode == .resourceExhausted)
            #expect(goaway.statusCode == .resourceExhausted, "the goaway's header status is not its code")
            #expect(goaway.statusMessage?.reason == TransportStatusReason.frameTooLargeBeforeHello)
            #expect(goaway.statusMessage?.message.contains("4096") == true)

            // Exactly 4,096 bytes is within the limit: the Hello is heard (and refused: junk token).
            let boundary = try await TestFrameClient.connect(to: address)
            defer { Task { await boundary.close() } }
            try await boundary.sendRaw(
                Self.helloHeader(length: 4096) + Array(repeating: 0, count: 4096 - Frame.headerByteCount))
            let answer = try await boundary.nextFrame()
            #expect(answer.kind == .response && answer.statusCode == .unauthenticated)

            // The authenticated connection sends a 200 KiB request and gets it echoed.
            let big = String(repeating: "a", count: 200 * 1024)
            try await authenticated.request(2, .listTenants, payload: ByteBuffer(string: big))
            let echoed = try await authenticated.nextFrame()
            #expect(echoed.statusCode == .ok && echoed.payload.readableBytes == big.utf8.count)
            // ... and over max_frame_bytes it gets the ordinary FRAME_TOO_LARGE.
            try await authenticated.sendRaw(MalformedInput.prefix((1 << 20) + 1))
            let over = try await authenticated.framesUntilClosed()
            #expect(over.last?.statusMessage?.reason == TransportStatusReason.frameTooLarge)
        }
    }

    @Test("Hellos with a 1 ms deadline cannot stack up: one runs per connection, abandoned or not")
    func abandonedHellosOverLoopback() async throws {
        try await withTestServer { address, handler in
            let client = try await TestFrameClient.connect(to: address)
            defer { Task { await client.close() } }
            var slow = Hsmgw_V1_HelloRequest()
            slow.apiToken = "slow:1500"
            try await client.request(1, .hello, payload: slow.wirePayload(), deadlineMilliseconds: 1)
            #expect(try await client.nextFrame().statusCode == .deadlineExceeded)
            // 127 more, as fast as they go: each is refused while the first still runs.
            for id in UInt32(2)...128 {
                try await client.request(id, .hello, payload: slow.wirePayload(), deadlineMilliseconds: 1)
            }
            let refused = try await client.nextFrames(127)
            #expect(refused.allSatisfy { $0.statusCode == .failedPrecondition }, "\(refused.map(\.statusCode))")
            #expect(handler.log.withLockedValue { $0.maximumHellosRunning } == 1)
            #expect(handler.log.withLockedValue { $0.helloConnections.count } == 1)

            // Once the first has returned, a new Hello is served on the same connection.
            try await handler.waitUntil { $0.hellosRunning == 0 }
            try await Task.sleep(for: .milliseconds(50))  // its result hops back to the event loop
            #expect(try await client.hello(id: 500).statusCode == .ok)
        }
    }

    @Test("over the per-address cap the next connection gets TOO_MANY_CONNECTIONS_FROM_ADDRESS; others connect")
    func connectionCapPerAddress() async throws {
        var limits = ServerLimits()
        limits.maxConnectionsPerAddress = 2
        try await withTestServer(limits: limits) { address, _ in
            let first = try await TestFrameClient.connect(to: address)
            let second = try await TestFrameClient.connect(to: address)
            #expect(try await first.hello().statusCode == .ok)
            #expect(try await second.hello().statusCode == .ok)

            let third = try await TestFrameClient.connect(to: address)
            let frames = try await third.framesUntilClosed()
            let goaway = try #require(frames.first)
            #expect(goaway.kind == .goaway && goaway.statusMessage?.statusCode == .resourceExhausted)
            #expect(goaway.statusCode == .resourceExhausted, "the goaway's header status is not its code")
            #expect(goaway.statusMessage?.reason == TransportStatusReason.tooManyConnectionsFromAddress)
            #expect(goaway.statusMessage?.message.contains("maximum of 2 connections from this address") == true)

            // Another loopback address is another source: it connects.
            let elsewhere = try await TestFrameClient.connect(
                to: address, from: try SocketAddress(ipAddress: "127.0.0.2", port: 0))
            defer { Task { await elsewhere.close() } }
            #expect(try await elsewhere.hello().statusCode == .ok)

            // A closed connection frees its slot.
            await first.close()
            var reconnected: TestFrameClient?
            for _ in 0..<100 where reconnected == nil {
                let candidate = try await TestFrameClient.connect(to: address)
                if let frame = try? await candidate.hello(), frame.statusCode == .ok {
                    reconnected = candidate
                } else {
                    await candidate.close()
                    try await Task.sleep(for: .milliseconds(20))
                }
            }
            #expect(reconnected != nil)
            await reconnected?.close()
            await second.close()
        }
    }

    @Test("IPv6 peers are counted by their /64: a second connection from ::1 is over a cap of one")
    func connectionCapIPv6() async throws {
        var limits = ServerLimits()
        limits.maxConnectionsPerAddress = 1
        try await withTestServer(limits: limits, listeners: [.tcp(host: "::1", port: 0)]) { address, _ in
            let first = try await TestFrameClient.connect(to: address)
            defer { Task { await first.close() } }
            #expect(try await first.hello().statusCode == .ok)
            let second = try await TestFrameClient.connect(to: address)
            let frames = try await second.framesUntilClosed()
            #expect(frames.first?.statusMessage?.reason == TransportStatusReason.tooManyConnectionsFromAddress)
        }
    }

    @Test("a per-address cap outside 1–65,536 is refused at start, naming it")
    func capValidation() {
        var limits = ServerLimits()
        #expect(limits.maxConnectionsPerAddress == 64)
        limits.maxConnectionsPerAddress = 0
        #expect(throws: GatewayTransportError.self) { try limits.validate() }
        do {
            try limits.validate()
        } catch {
            #expect(error.message == "maxConnectionsPerAddress is 0; it must be between 1 and 65536")
        }
    }
}
