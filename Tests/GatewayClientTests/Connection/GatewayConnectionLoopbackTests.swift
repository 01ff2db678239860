import GatewayWire
import NIOCore
import Synchronization
import Testing

@testable import GatewayClient

/// The client's connection against a scripted fake gateway on loopback (real sockets).
@Suite("Gateway connection over loopback")
struct GatewayConnectionLoopbackTests {
    @Test("the handshake sends the token and client name and applies the server's limits")
    func handshake() async throws {
        let hellos = Recorder<Hsmgw_V1_HelloRequest>()
        try await FakeGateway.run { connection in
            hellos.append(try await connection.acceptHello(maximumInFlight: 7, maximumFrame: 4096))
            while let request = try await connection.nextRequest() { try await connection.echoTenant(request) }
        } body: { port in
            let connection = try await GatewayConnection.connect(configuration: fakeConfiguration(port: port))
            #expect(connection.helloResponse?.principal == "tester")
            #expect(connection.maximumRequestsInFlight == 7)
            let hello = try #require(hellos.all.first)
            #expect(hello.apiToken == "hsmgw_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8")
            #expect(hello.clientName == "gateway-client-tests")
            // A request over the server's 4 KiB frame limit is refused locally, never sent.
            let error = await #expect(throws: GatewayError.self) {
                try await connection.call(
                    method: .getTenant,
                    request: tenantRequest(String(repeating: "x", count: 5000)),
                    responseType: Hsmgw_V1_GetTenantResponse.self,
                    deadline: nil
                )
            }
            #expect(error?.reason == GatewayError.LocalReason.requestTooLarge)
            #expect(error?.requestProvablyNotProcessed == true)
            let answer = try await connection.call(
                method: .getTenant,
                request: tenantRequest("acme"),
                responseType: Hsmgw_V1_GetTenantResponse.self,
                deadline: nil
            )
            #expect(answer.tenant.id == "acme")
            await connection.close()
        }
    }

    @Test("a refused Hello fails the connect with the server's status and no token in sight")
    func refusedHello() async throws {
        try await FakeGateway.run { connection in
            guard let hello = try await connection.nextRequest() else { return }
            try await connection.fail(hello, .unauthenticated, message: "invalid credentials")
        } body: { port in
            let client = try GatewayClient(configuration: fakeConfiguration(port: port))
            let error = await #expect(throws: GatewayError.self) { try await client.getTenant("acme") }
            #expect(error?.code == .unauthenticated)
            #expect(error?.origin == .server)
            #expect(error?.description.contains("AAECAwQF") == false)
            await client.shutdown()
        }
    }

    @Test("responses are matched by request id in whatever order they come")
    func outOfOrder() async throws {
        try await FakeGateway.run { connection in
            try await connection.acceptHello()
            var requests: [Frame] = []
            while requests.count < 5, let request = try await connection.nextRequest() {
                requests.append(request)
            }
            // Answer in reverse order, then a shuffled second batch.
            for request in requests.reversed() { try await connection.echoTenant(request) }
            while let request = try await connection.nextRequest() { try await connection.echoTenant(request) }
        } body: { port in
            let connection = try await GatewayConnection.connect(configuration: fakeConfiguration(port: port))
            try await withThrowingTaskGroup(of: (String, String).self) { group in
                for index in 0..<5 {
                    group.addTask {
                        let tenant = "tenant-\(index)"
                        let answer = try await connection.call(
                            method: .getTenant,
                            request: tenantRequest(tenant),
                            responseType: Hsmgw_V1_GetTenantResponse.self,
                            deadline: nil
                        )
                        return (tenant, answer.tenant.id)
                    }
                }
                for try await (asked, answered) in group {
                    #expect(asked == answered)
                }
            }
            await connection.close()
        }
    }

    @Test("1,000 concurrent calls: never more in flight than the server allows, no id reused while in flight")
    func thousandCalls() async throws {
        let limit = 16
        let violations = Recorder<String>()
        let peak = Locked(0)
        try await FakeGateway.run { connection in
            try await connection.acceptHello(maximumInFlight: UInt32(limit))
            // Each request is answered from its own task, so answers overtake each other.
            let inFlight = Locked<(ids: Set<UInt32>, peak: Int)>(([], 0))
            let responder = connection.responder
            try await withThrowingTaskGroup(of: Void.self) { group in
                while let request = try await connection.nextRequest() {
                    let problem = inFlight.withLock { state -> String? in
                        defer {
                            state.peak = max(state.peak, state.ids.count)
                            peak.withLock { $0 = max($0, state.peak) }
                        }
                        if request.requestID == 0 { return "request id 0" }
                        guard state.ids.insert(request.requestID).inserted else {
                            return "id \(request.requestID) reused while in flight"
                        }
                        return state.ids.count > limit ? "\(state.ids.count) in flight" : nil
                    }
                    if let problem { violations.append(problem) }
                    group.addTask {
                        // Hold each request until the connection is full (or 50 ms passed), so the
                        // limit is really reached, then answer after a random delay.
                        let arrival = ContinuousClock.now
                        while inFlight.withLock({ $0.ids.count }) < limit,
                            ContinuousClock.now - arrival < .milliseconds(50)
                        {
                            try await Task.sleep(for: .milliseconds(1))
                        }
                        try await Task.sleep(for: .microseconds(Int.random(in: 0...2000)))
                        inFlight.withLock { _ = $0.ids.remove(request.requestID) }
                        try await responder.echoTenant(request)
                    }
                }
                try await group.waitForAll()
            }
        } body: { port in
            let client = try GatewayClient(configuration: fakeConfiguration(port: port, poolSize: 2))
            try await withThrowingTaskGroup(of: Bool.self) { group in
                for index in 0..<1000 {
                    group.addTask {
                        let tenant = "t\(index)"
                        return try await client.getTenant(tenant).id == tenant
                    }
                }
                var matched = 0
                for try await ok in group where ok { matched += 1 }
                #expect(matched == 1000)
            }
            let connections = await client.connections
            #expect(connections.count == 2)
            #expect(connections.allSatisfy { $0.maximumRequestsInFlight == limit })
            await client.shutdown()
        }
        #expect(violations.all.isEmpty, "\(violations.all.prefix(5))")
        // The limit was reached, so the check above means something.
        #expect(peak.withLock { $0 } == limit)
    }

    @Test("a deadline goes in the header; when it passes, the call fails and a cancel frame is sent")
    func deadlineSendsCancel() async throws {
        let seen = Recorder<Frame>()
        let answeredLate = Signal()
        try await FakeGateway.run { connection in
            try await connection.acceptHello()
            guard let request = try await connection.nextRequest() else { return }
            seen.append(request)
            // Never answered in time: wait for the cancel, then answer it as the server would.
            while let frame = try await connection.next() {
                seen.append(frame)
                if frame.kind == .cancel {
                    try await connection.fail(request, .cancelled, message: "cancelled")
                    answeredLate.fire()
                } else if frame.kind == .request {
                    try await connection.echoTenant(frame)
                }
            }
        } body: { port in
            let connection = try await GatewayConnection.connect(configuration: fakeConfiguration(port: port))
            let start = ContinuousClock.now
            let error = await #expect(throws: GatewayError.self) {
                try await connection.call(
                    method: .getTenant,
                    request: tenantRequest("slow"),
                    responseType: Hsmgw_V1_GetTenantResponse.self,
                    deadline: .now + .milliseconds(300)
                )
            }
            let elapsed = ContinuousClock.now - start
            #expect(error?.code == .deadlineExceeded)
            #expect(error?.origin == .client)
            #expect(elapsed >= .milliseconds(340))  // the deadline plus the 50 ms grace
            #expect(elapsed < .seconds(3))
            await answeredLate.wait()
            // The late CANCELLED answer is dropped; the connection keeps working.
            let answer = try await connection.call(
                method: .getTenant,
                request: tenantRequest("next"),
                responseType: Hsmgw_V1_GetTenantResponse.self,
                deadline: .now + .seconds(5)
            )
            #expect(answer.tenant.id == "next")
            await connection.close()
        }
        let frames = seen.all
        let request = try #require(frames.first)
        #expect(request.deadlineMilliseconds > 0 && request.deadlineMilliseconds <= 300)
        let cancel = try #require(frames.first { $0.kind == .cancel })
        #expect(cancel.requestID == request.requestID)
        #expect(cancel.method == 0)
        #expect(cancel.payload.readableBytes == 0)
        let next = try #require(frames.last { $0.kind == .request })
        #expect(next.requestID != request.requestID)
    }

    @Test("cancelling the calling task sends a cancel frame and fails the call with CANCELLED")
    func taskCancellation() async throws {
        let cancels = Recorder<UInt32>()
        let received = Signal()
        try await FakeGateway.run { connection in
            try await connection.acceptHello()
            guard let request = try await connection.nextRequest() else { return }
            received.fire()
            while let frame = try await connection.next() {
                guard frame.kind == .cancel else { continue }
                cancels.append(frame.requestID)
                try await connection.fail(request, .cancelled)
            }
        } body: { port in
            let connection = try await GatewayConnection.connect(configuration: fakeConfiguration(port: port))
            let task = Task {
                try await connection.call(
                    method: .getTenant,
                    request: tenantRequest("forever"),
                    responseType: Hsmgw_V1_GetTenantResponse.self,
                    deadline: nil
                )
            }
            await received.wait()
            task.cancel()
            let result = await task.result
            #expect(throws: GatewayError.self) { try result.get() }
            if case .failure(let error as GatewayError) = result {
                #expect(error.code == .cancelled)
                #expect(error.reason == GatewayError.LocalReason.taskCancelled)
            }
            // Give the cancel frame time to arrive.
            for _ in 0..<100 where cancels.all.isEmpty { try await Task.sleep(for: .milliseconds(10)) }
            #expect(cancels.all.count == 1)
            await connection.close()
        }
    }

    @Test("answers the server's pings with a pong carrying the same id and payload")
    func ping() async throws {
        let pongs = Recorder<Frame>()
        try await FakeGateway.run { connection in
            try await connection.acceptHello()
            var payload = ByteBuffer()
            payload.writeString("are you there?")
            try await connection.send(Frame(kind: .ping, requestID: 77, payload: payload))
            while let frame = try await connection.next() {
                if frame.kind == .pong { pongs.append(frame) }
            }
        } body: { port in
            let connection = try await GatewayConnection.connect(configuration: fakeConfiguration(port: port))
            for _ in 0..<200 where pongs.all.isEmpty { try await Task.sleep(for: .milliseconds(10)) }
            await connection.close()
        }
        let pong = try #require(pongs.all.first)
        #expect(pong.requestID == 77)
        #expect(
            pong.payload.getString(at: pong.payload.readerIndex, length: pong.payload.readableBytes) == "are you there?"
        )
    }

    @Test("after a goaway: in-flight calls finish, nothing new is sent, the client closes when done")
    func goaway() async throws {
        let afterGoaway = Recorder<Frame>()
        let goawaySent = Signal()
        let closedByClient = Signal()
        try await FakeGateway.run { connection in
            try await connection.acceptHello()
            var requests: [Frame] = []
            while requests.count < 2, let request = try await connection.nextRequest() { requests.append(request) }
            try await connection.goaway(.unavailable, reason: StatusReason.shuttingDown)
            goawaySent.fire()
            try await Task.sleep(for: .milliseconds(200))
            for request in requests { try await connection.echoTenant(request) }
            while let frame = try await connection.next() { afterGoaway.append(frame) }
            closedByClient.fire()
        } body: { port in
            let connection = try await GatewayConnection.connect(configuration: fakeConfiguration(port: port))
            async let first = connection.call(
                method: .getTenant,
                request: tenantRequest("one"),
                responseType: Hsmgw_V1_GetTenantResponse.self,
                deadline: nil
            )
            async let second = connection.call(
                method: .getTenant,
                request: tenantRequest("two"),
                responseType: Hsmgw_V1_GetTenantResponse.self,
                deadline: nil
            )
            await goawaySent.wait()
            for _ in 0..<100 where connection.isAcceptingCalls { try await Task.sleep(for: .milliseconds(5)) }
            #expect(!connection.isAcceptingCalls)
            let refused = await #expect(throws: GatewayError.self) {
                try await connection.call(
                    method: .getTenant,
                    request: tenantRequest("three"),
                    responseType: Hsmgw_V1_GetTenantResponse.self,
                    deadline: nil
                )
            }
            #expect(refused?.code == .unavailable)
            #expect(refused?.reason == GatewayError.LocalReason.notSent)
            #expect(refused?.requestProvablyNotProcessed == true)
            #expect(refused?.message.contains("UNAVAILABLE SHUTTING_DOWN") == true, "\(refused?.message ?? "")")
            #expect(try await first.tenant.id == "one")
            #expect(try await second.tenant.id == "two")
            await closedByClient.wait()
        }
        #expect(afterGoaway.all.isEmpty)
    }

    @Test("a goaway's code is read from its header, as protocol §3.2 gives it, even when its payload is unreadable")
    func goawayHeaderStatus() async throws {
        let goawaySent = Signal()
        try await FakeGateway.run { connection in
            try await connection.acceptHello()
            try await connection.send(
                Frame(
                    kind: .goaway, status: StatusCode.resourceExhausted.rawValue,
                    payload: ByteBuffer(bytes: [0xFF, 0xFF])
                )
            )
            goawaySent.fire()
            while try await connection.next() != nil {}
        } body: { port in
            let connection = try await GatewayConnection.connect(configuration: fakeConfiguration(port: port))
            await goawaySent.wait()
            for _ in 0..<100 where connection.isAcceptingCalls { try await Task.sleep(for: .milliseconds(5)) }
            let refused = await #expect(throws: GatewayError.self) {
                try await connection.call(
                    method: .getTenant,
                    request: tenantRequest("late"),
                    responseType: Hsmgw_V1_GetTenantResponse.self,
                    deadline: nil
                )
            }
            #expect(refused?.message.contains("RESOURCE_EXHAUSTED") == true, "\(refused?.message ?? "")")
            await connection.close()
        }
    }

    @Test("through the client, a goaway moves new calls to a new connection")
    func goawayNewConnection() async throws {
        try await FakeGateway.run { connection in
            try await connection.acceptHello()
            guard let request = try await connection.nextRequest() else { return }
            if connection.number == 0 {
                try await connection.goaway(.unavailable, reason: StatusReason.shuttingDown)
            }
            try await connection.echoTenant(request)
            while let request = try await connection.nextRequest() { try await connection.echoTenant(request) }
        } body: { port in
            let client = try GatewayClient(configuration: fakeConfiguration(port: port))
            #expect(try await client.getTenant("first").id == "first")
            let firstHello = try await client.hello()
            #expect(try await client.getTenant("second").id == "second")
            let connections = await client.connections
            #expect(connections.count == 1)
            #expect(connections.first?.helloResponse?.instanceID == "fake-1")
            #expect(firstHello.instanceID == "fake-0" || firstHello.instanceID == "fake-1")
            await client.shutdown()
        }
    }

    @Test("a lost connection fails calls in flight with UNAVAILABLE; only idempotent ones are retried")
    func connectionLoss() async throws {
        let requests = Recorder<String>()
        try await FakeGateway.run { connection in
            try await connection.acceptHello()
            while let request = try await connection.nextRequest() {
                requests.append("\(connection.number):\(Method(rawValue: request.method))")
                // The first three connections break with their first request in flight.
                if connection.number < 3 { return }
                try await connection.echoTenant(request)
            }
        } body: { port in
            let connection = try await GatewayConnection.connect(configuration: fakeConfiguration(port: port))
            let error = await #expect(throws: GatewayError.self) {
                try await connection.call(
                    method: .getTenant,
                    request: tenantRequest("lost"),
                    responseType: Hsmgw_V1_GetTenantResponse.self,
                    deadline: nil
                )
            }
            #expect(error?.code == .unavailable)
            #expect(error?.reason == GatewayError.LocalReason.connectionLost)
            #expect(error?.requestProvablyNotProcessed == false)
            await connection.waitUntilClosed()
            #expect(!connection.isAcceptingCalls)

            // Through the client: Encrypt is not idempotent, so the loss is final...
            let client = try GatewayClient(configuration: fakeConfiguration(port: port))
            let encryptError = await #expect(throws: GatewayError.self) {
                try await client.encrypt(tenant: "acme", dataKeyID: "k", plaintext: [1])
            }
            #expect(encryptError?.reason == GatewayError.LocalReason.connectionLost)
            // ...while GetTenant is retried on a new connection (connection 3 answers).
            #expect(try await client.getTenant("acme").id == "acme")
            await client.shutdown()
        }
        #expect(requests.all == ["0:GetTenant", "1:Encrypt", "2:GetTenant", "3:GetTenant"])
    }

    @Test("UNAVAILABLE from the server is retried for idempotent calls and with an idempotency key only")
    func serverUnavailableRetries() async throws {
        let seen = Recorder<String>()
        try await FakeGateway.run { connection in
            try await connection.acceptHello()
            var count: [String: Int] = [:]
            while let request = try await connection.nextRequest() {
                let method = Method(rawValue: request.method)
                let generate = method == .generateDataKey
                let key =
                    generate ? try Hsmgw_V1_GenerateDataKeyRequest(wirePayload: request.payload).idempotencyKey : ""
                let call = "\(method) \(key)"
                seen.append(call)
                count[call, default: 0] += 1
                // Every call's first attempt fails, and every attempt of a generate without a key.
                if count[call]! == 1 || (generate && key.isEmpty) {
                    try await connection.fail(request, .unavailable, message: "sealed")
                } else if method == .getTenant {
                    try await connection.echoTenant(request)
                } else {
                    var response = Hsmgw_V1_GenerateDataKeyResponse()
                    response.key.id = "dk-1"
                    response.key.plaintext = .init([UInt8](repeating: 9, count: 32))
                    try await connection.respond(to: request, with: response)
                }
            }
        } body: { port in
            let client = try GatewayClient(configuration: fakeConfiguration(port: port))
            #expect(try await client.getTenant("acme").id == "acme")
            let error = await #expect(throws: GatewayError.self) {
                try await client.generateDataKey(tenant: "acme")
            }
            #expect(error?.code == .unavailable)
            #expect(error?.origin == .server)
            let key = try await client.generateDataKey(tenant: "acme", idempotencyKey: "op-1")
            #expect(key.id == "dk-1")
            #expect(key.plaintext?.count == 32)
            #expect(!"\(key)".contains("9, 9"))
            await client.shutdown()
        }
        #expect(
            seen.all == [
                "GetTenant ", "GetTenant ", "GenerateDataKey ", "GenerateDataKey op-1", "GenerateDataKey op-1",
            ])
    }

    @Test("the client's overall deadline bounds its retries")
    func deadlineBoundsRetries() async throws {
        let attempts = Mutex(0)
        try await FakeGateway.run { connection in
            try await connection.acceptHello()
            while let request = try await connection.nextRequest() {
                attempts.withLock { $0 += 1 }
                try await connection.fail(request, .unavailable, message: "sealed")
            }
        } body: { port in
            let policy = RetryPolicy(
                maximumAttempts: 10, initialBackoff: .milliseconds(200), maximumBackoff: .seconds(1))
            let client = try GatewayClient(configuration: fakeConfiguration(port: port, retryPolicy: policy))
            let error = await #expect(throws: GatewayError.self) {
                try await client.getTenant("acme", deadline: .milliseconds(300))
            }
            // Backoffs of 200 ms and more (full jitter) fit only a few attempts into 300 ms; ten
            // attempts would mean the deadline did not bound them. Counted, not timed, so a
            // loaded machine cannot fail it.
            #expect(attempts.withLock { $0 } < 10)
            #expect(error?.code == .unavailable || error?.code == .deadlineExceeded)
            await client.shutdown()
        }
    }

    @Test("a server that cannot be reached fails with CONNECT_FAILED after the retries")
    func connectFailure() async throws {
        // Bind a port, then close it, so nothing listens there.
        let port = try await FakeGateway.run(script: { _ in }, body: { port in port })
        let client = try GatewayClient(configuration: fakeConfiguration(port: port))
        let error = await #expect(throws: GatewayError.self) { try await client.listTenants() }
        #expect(error?.code == .unavailable)
        #expect(error?.reason == GatewayError.LocalReason.connectFailed)
        #expect(error?.requestProvablyNotProcessed == true)
        await client.shutdown()
    }
}
