import Foundation
import GatewayClient
import GatewayTransport
import GatewayWire
import NIOCore
import PostgresTestSupport
import ProcessTestSupport
import Synchronization
import Testing

@testable import GatewayServer

/// What an unauthenticated or misbehaving peer can make a real gateway do, on loopback: parallel
/// and abandoned Hellos against the failed-authentication throttle, addresses kept apart, a flood
/// of refused Hellos beside key operations, and batches over their entry limit.
@Suite("Unauthenticated abuse end to end", .serialized)
struct UnauthenticatedAbuseTests {
    /// Shared by the flooding tasks.
    final class Flood: Sendable {
        let running = Atomic(true)
        /// Hellos answered UNAUTHENTICATED.
        let refused = Atomic(0)
    }

    /// A well-formed API token nobody issued: each Hello with it costs a store read.
    static let forged = "hsmgw_" + String(repeating: "A", count: 43)

    static func limit(burst: Int, perMinute: Int) -> (inout GatewayConfiguration) -> Void {
        {
            var limit = AuthSettings.FailureLimit()
            limit.burst = burst
            limit.perMinute = perMinute
            $0.auth.failedAuthentications = limit
        }
    }

    @Test("30 refused Hellos sent at once from one address: exactly `burst` are checked, the rest throttled")
    func parallelHellosAreThrottledAtTheBurst() async throws {
        try await withGateway(
            .sqlite, "parallel-hellos", security: .plaintext, configure: Self.limit(burst: 5, perMinute: 1)
        ) { gateway in
            let answers = try await withThrowingTaskGroup(of: RawHello.Answer?.self) { group in
                for _ in 0..<30 { group.addTask { try await RawHello.send(to: gateway.port, token: Self.forged) } }
                var answers: [RawHello.Answer?] = []
                for try await answer in group { answers.append(answer) }
                return answers
            }
            let unauthenticated = answers.filter { $0?.code == .unauthenticated }.count
            let throttled = answers.filter {
                $0?.code == .resourceExhausted && $0?.reason == StatusReason.authThrottled
            }
            #expect(unauthenticated == 5, "\(answers)")
            #expect(throttled.count == 25, "\(answers)")

            // Five refusals checked and audited, and one record for the start of the throttling.
            await gateway.app.handler.flushRefusedHelloAudit()
            let admin = try gateway.client(token: gateway.adminToken)
            defer { Task { await admin.shutdown() } }
            let error = await gatewayError { try await admin.serverInfo() }
            #expect(error?.reason == StatusReason.authThrottled, "even a good token waits out the throttle")
        }
    }

    /// Holds `LOCK TABLE api_tokens` for `seconds` in the gateway's PostgreSQL database, so that
    /// every credential check waits on the store; returns once the lock is held, and a task that
    /// ends when it is released.
    static func lockTokens(_ gateway: GatewayHarness, seconds: Double) async throws -> Task<Void, any Error> {
        guard case .postgres(let settings) = gateway.app.configuration.store else {
            throw TestSetupError("a PostgreSQL gateway is needed")
        }
        let cluster = try PostgresTestCluster.shared()
        // psql blocks while it holds the lock; `psql` runs it on a thread of its own.
        let held = Task {
            _ = try await cluster.psql(
                settings.database,
                "BEGIN; LOCK TABLE api_tokens IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(\(seconds)); COMMIT;"
            )
        }
        let granted = """
            SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
            WHERE c.relname = 'api_tokens' AND l.mode = 'AccessExclusiveLock' AND l.granted
            """
        while try await cluster.psql(settings.database, granted).trimmingCharacters(in: .whitespacesAndNewlines) != "1"
        {
            try await Task.sleep(for: .milliseconds(10))
        }
        return held
    }

    @Test("Hellos abandoned through a 1 ms deadline keep their tries until their checks end; no more start meanwhile")
    func abandonedHellosCount() async throws {
        try await withGateway(
            .postgres, "abandoned-hellos", security: .plaintext, configure: Self.limit(burst: 3, perMinute: 1)
        ) { gateway in
            // The store holds every credential check for 5 s: a Hello with a 1 ms deadline is
            // answered DEADLINE_EXCEEDED while its check runs on. (1.5 s was too short for the 13
            // Hellos and the checks below on a machine at load 7.)
            let lock = try await Self.lockTokens(gateway, seconds: 5)
            var answers: [StatusCode] = []
            for _ in 0..<13 {
                let answer = try await RawHello.send(to: gateway.port, token: Self.forged, deadlineMilliseconds: 1)
                answers.append(answer?.code ?? .unknown)
            }
            #expect(answers.allSatisfy { $0 == .deadlineExceeded }, "\(answers.map(\.name))")
            let throttle = try #require(gateway.app.handler.throttle)
            let loopback = SourceAddressGroup(remoteAddress: "127.0.0.1:1")
            // Three checks hold the three tries; the other ten waited for a try and were cancelled.
            #expect(throttle.triesLeft(loopback) < 1)
            #expect(throttle.waiting(loopback) == 0)
            // At most those three queries wait on the store (the pool would have let eight in).
            guard case .postgres(let settings) = gateway.app.configuration.store else { return }
            let blocked = try await PostgresTestCluster.shared().psql(
                settings.database,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).trimmingCharacters(in: .whitespacesAndNewlines)
            #expect((Int(blocked) ?? 99) <= 3, "\(blocked) queries wait on the lock")
            print("abandoned-hellos: \(blocked) credential checks waiting on the store while 13 Hellos were abandoned")
            try await lock.value

            // The three checks failed once the store answered: the good token is throttled now.
            let good = try await RawHello.send(to: gateway.port, token: gateway.adminToken)
            #expect(
                good?.code == .resourceExhausted && good?.reason == StatusReason.authThrottled,
                "\(String(describing: good))")
            let elsewhere = try await RawHello.send(to: gateway.port, from: "127.0.0.2", token: gateway.adminToken)
            #expect(elsewhere?.code == .ok, "127.0.0.2 is another address: \(String(describing: elsewhere))")

            // At most three credential checks reached the store and the audit log (a check cancelled
            // with its Hello ends without a verdict, so without a record), not thirteen; and one
            // record says the address is throttled.
            await gateway.app.handler.flushRefusedHelloAudit()
            let records = try await gateway.app.service.auditRecords(limit: 1000).map(\.event.detail)
            #expect(records.filter { $0.contains("reason=unknown-token") }.count <= 3, "\(records)")
            #expect(records.filter { $0.contains("reason=throttled source=127.0.0.1") }.count == 1, "\(records)")
        }
    }

    @Test("successful Hellos give their try back: many good ones at once all pass, and failures are what counts")
    func successRefunds() async throws {
        try await withGateway(
            .sqlite, "refund-hellos", security: .plaintext, configure: Self.limit(burst: 3, perMinute: 1)
        ) { gateway in
            let good = try await withThrowingTaskGroup(of: RawHello.Answer?.self) { group in
                for _ in 0..<12 {
                    group.addTask { try await RawHello.send(to: gateway.port, token: gateway.adminToken) }
                }
                var answers: [RawHello.Answer?] = []
                for try await answer in group { answers.append(answer) }
                return answers
            }
            #expect(good.allSatisfy { $0?.code == .ok }, "\(good)")
            for _ in 0..<2 {
                #expect(try await RawHello.send(to: gateway.port, token: Self.forged)?.code == .unauthenticated)
            }
            #expect(try await RawHello.send(to: gateway.port, token: gateway.adminToken)?.code == .ok)
            #expect(try await RawHello.send(to: gateway.port, token: Self.forged)?.code == .unauthenticated)
            let throttled = try await RawHello.send(to: gateway.port, token: gateway.adminToken)
            #expect(throttled?.reason == StatusReason.authThrottled)
        }
    }

    @Test("the per-address connection cap refuses one more from the address, not from another")
    func connectionCapPerAddress() async throws {
        let cap: (inout GatewayConfiguration) -> Void = { $0.limits.maxConnectionsPerAddress = 2 }
        try await withGateway(.sqlite, "address-cap", security: .plaintext, configure: cap) { gateway in
            let first = try await gateway.connection(token: gateway.adminToken)
            let second = try await gateway.connection(token: gateway.adminToken)
            defer {
                Task {
                    await first.close()
                    await second.close()
                }
            }
            let third = try await RawHello.send(to: gateway.port, token: gateway.adminToken)
            #expect(third?.kind == .goaway)
            #expect(third?.code == .resourceExhausted)
            #expect(third?.reason == TransportStatusReason.tooManyConnectionsFromAddress)
            let elsewhere = try await RawHello.send(to: gateway.port, from: "127.0.0.2", token: gateway.adminToken)
            #expect(elsewhere?.code == .ok)
        }
    }

    @Test("a batch of 500,000 empty entries is refused INVALID_ARGUMENT naming the limit, before decoding")
    func batchOverTheLimitIsRefusedBeforeDecoding() async throws {
        try await withGateway(.sqlite, "batch-scan", security: .plaintext) { gateway in
            let admin = try gateway.client(token: gateway.adminToken)
            defer { Task { await admin.shutdown() } }
            _ = try await admin.createTenant("acme")
            let connection = try await gateway.connection(token: gateway.adminToken)
            defer { Task { await connection.close() } }

            var payload = ByteBuffer()
            payload.writeBytes([0x0A, 0x04] + Array("acme".utf8))
            for _ in 0..<500_000 { payload.writeBytes([0x12, 0x00]) }
            // What the gateway reads of it before refusing (the count the test asserts on).
            let rules = try #require(RequestEntryLimits.rules[Hsmgw_V1_DecryptDataKeysRequest.protoMessageName])
            let scanned = RepeatedFieldScan.scan(payload, rules: rules)
            #expect(scanned.fieldsRead == 1 + ServerLimits.maxBatchKeys + 1)

            let clock = ContinuousClock()
            let start = clock.now
            let error = await gatewayError {
                try await connection.call(method: .decryptDataKeys, payload: payload, deadline: nil)
            }
            let elapsed = clock.now - start
            #expect(error?.code == .invalidArgument)
            #expect(
                error?.message.contains("keys holds more than 1000 entries") == true, "\(String(describing: error))")
            // For the report (not asserted): the refusal, and what decoding the whole payload costs.
            let decodeStart = clock.now
            let decoded = try Hsmgw_V1_DecryptDataKeysRequest(wirePayload: payload)
            let decodeTime = clock.now - decodeStart
            print(
                "batch-scan: refusal round trip \(elapsed); scan alone read \(scanned.fieldsRead) fields; "
                    + "decoding all \(decoded.keys.count) entries instead takes \(decodeTime)")

            // A context over 64 pairs inside one entry is named by its entry.
            var request = Hsmgw_V1_DecryptDataKeysRequest()
            request.tenant = "acme"
            var reference = Hsmgw_V1_DataKeyReference()
            reference.id = UUID().uuidString.lowercased()
            request.keys = [reference, reference]
            for pair in 0..<65 { request.keys[1].encryptionContext["k\(pair)"] = "v" }
            let contextError = await gatewayError {
                try await connection.call(method: .decryptDataKeys, payload: request.wirePayload(), deadline: nil)
            }
            #expect(contextError?.code == .invalidArgument)
            #expect(contextError?.message.contains("keys[1].encryption_context holds more than 64 entries") == true)

            // The connection still serves.
            #expect(try await admin.generateDataKey(tenant: "acme").wrapped.count == 83)
        }
    }

    @Test("a flood of bad tokens does not hold up key operations; its audit queue stays bounded")
    func refusedHelloAuditDoesNotDelayKeyOperations() async throws {
        // No throttle: every forged Hello reaches the credential check and is audited.
        let unthrottled: (inout GatewayConfiguration) -> Void = { $0.auth.failedAuthentications = nil }
        try await withGateway(.sqlite, "audit-flood", security: .plaintext, configure: unthrottled) { gateway in
            let client = try gateway.client(token: gateway.adminToken, poolSize: 1)
            defer { Task { await client.shutdown() } }
            _ = try await client.createTenant("acme")
            let before = try await client.listAuditRecords(limit: 1000).last?.sequence ?? 0

            func generate(_ count: Int) async throws -> [Duration] {
                var latencies: [Duration] = []
                let clock = ContinuousClock()
                for _ in 0..<count {
                    let start = clock.now
                    _ = try await client.generateDataKey(tenant: "acme")
                    latencies.append(clock.now - start)
                }
                return latencies
            }
            let baseline = try await generate(100)

            let flood = Flood()
            let flooders = Task {
                await withTaskGroup(of: Void.self) { group in
                    for _ in 0..<16 {
                        group.addTask {
                            while flood.running.load(ordering: .relaxed) {
                                if let answer = try? await RawHello.send(to: gateway.port, token: Self.forged),
                                    answer.code == .unauthenticated
                                {
                                    flood.refused.add(1, ordering: .relaxed)
                                }
                            }
                        }
                    }
                }
            }
            try await Task.sleep(for: .milliseconds(300))  // the flood is under way
            let during = try await generate(300)
            flood.running.store(false, ordering: .relaxed)
            await flooders.value
            #expect(during.count == 300, "every GenerateDataKey during the flood succeeded")

            let audit = gateway.app.handler.refusedHelloAudit
            #expect(audit.depth.highWater <= RefusedHelloAudit.capacity)
            await audit.flush()
            #expect(audit.depth.now == 0)

            // Every refusal is in the log, or counted in a record that says how many were dropped.
            var records: [Hsmgw_V1_AuditRecordInfo] = []
            var after = before
            while true {
                let page = try await client.listAuditRecords(after: after, limit: 1000)
                guard let last = page.last else { break }
                records += page
                after = last.sequence
            }
            let written = records.filter { $0.detail.contains("reason=unknown-token") }.count
            let dropped = records.compactMap { record -> Int? in
                guard record.detail.hasPrefix("method=Hello reason=audit-queue-full ") else { return nil }
                return record.detail.split(separator: " ").first { $0.hasPrefix("dropped=") }
                    .flatMap { Int($0.dropFirst("dropped=".count)) }
            }.reduce(0, +)
            #expect(written + dropped == flood.refused.load(ordering: .relaxed))
            let verification = try await client.verifyAuditLog()
            #expect(verification.intact)

            func percentile(_ values: [Duration], _ p: Double) -> Duration {
                let sorted = values.sorted()
                return sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))]
            }
            print(
                "audit-flood: \(flood.refused.load(ordering: .relaxed)) refused Hellos, \(written) audited, \(dropped) dropped "
                    + "(queue high water \(audit.depth.highWater) of \(RefusedHelloAudit.capacity)); GenerateDataKey "
                    + "p50/p99 baseline \(percentile(baseline, 0.5))/\(percentile(baseline, 0.99)), during the flood "
                    + "\(percentile(during, 0.5))/\(percentile(during, 0.99))")
        }
    }
}
