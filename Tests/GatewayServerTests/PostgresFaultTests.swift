import Foundation
import GatewayClient
import GatewayServer
import GatewayWire
import PostgresTestSupport
import Synchronization
import Testing

/// A gateway on a PostgreSQL server of its own, under load from 16 callers, while the server is
/// stopped, frozen, restarted or has its backends killed. What must hold (issue 12): while the
/// server cannot be reached calls fail fast with UNAVAILABLE; a frozen server (a partition without
/// resets) ends in DEADLINE_EXCEEDED; service resumes by itself when the server is back; and
/// every call acknowledged before, during and after the fault still decrypts, with the audit
/// chain intact. Times are printed, not asserted (tests never fail on timing), except that an
/// UNAVAILABLE arriving well before the callers' deadline is what "fast" means here.
@Suite("PostgreSQL faults under load", .serialized)
struct PostgresFaultTests {
    /// What the callers saw.
    final class Timeline: Sendable {
        struct Event: Sendable {
            let at: ContinuousClock.Instant
            let ok: Bool
            let code: String
        }
        private let state = Mutex<(events: [Event], keys: [(id: String, plaintext: [UInt8])])>(([], []))

        func record(ok: Bool, code: String) {
            state.withLock { $0.events.append(Event(at: .now, ok: ok, code: code)) }
        }
        func acknowledge(_ id: String, _ plaintext: [UInt8]) {
            state.withLock { $0.keys.append((id, plaintext)) }
        }
        var events: [Event] { state.withLock { $0.events } }
        var keys: [(id: String, plaintext: [UInt8])] { state.withLock { $0.keys } }
        func randomKey() -> (id: String, plaintext: [UInt8])? { state.withLock { $0.keys.randomElement() } }

        /// The first failure at or after `since`, and the failures since then by code.
        func failures(since: ContinuousClock.Instant) -> (first: Event?, codes: [String: Int]) {
            let failed = events.filter { !$0.ok && $0.at >= since }
            return (failed.first, failed.reduce(into: [:]) { $0[$1.code, default: 0] += 1 })
        }

        /// How many acknowledged keys no longer decrypt to what the caller was given.
        func lostKeys(_ client: GatewayClient, tenant: String) async -> Int {
            var lost = 0
            for key in keys {
                let decrypted = try? await client.decryptDataKey(tenant: tenant, id: key.id, deadline: .seconds(30))
                if decrypted?.plaintext?.copyBytes() != key.plaintext { lost += 1 }
            }
            return lost
        }
    }

    /// A flag shared by tasks.
    final class Flag: Sendable {
        private let value = Mutex(false)
        var isSet: Bool { value.withLock { $0 } }
        func set(_ new: Bool = true) { value.withLock { $0 = new } }
    }

    /// Runs 16 callers alternating GenerateDataKey and DecryptDataKey (deadline `deadline`)
    /// until `stop` is set.
    static func load(
        _ client: GatewayClient,
        tenant: String,
        deadline: Duration,
        timeline: Timeline,
        stop: Flag
    ) async {
        await withTaskGroup(of: Void.self) { group in
            for caller in 0..<16 {
                group.addTask {
                    var generate = caller % 2 == 0
                    while !stop.isSet {
                        do {
                            if generate || timeline.randomKey() == nil {
                                let key = try await client.generateDataKey(tenant: tenant, deadline: deadline)
                                timeline.acknowledge(key.id, key.plaintext?.copyBytes() ?? [])
                            } else if let known = timeline.randomKey() {
                                let key = try await client.decryptDataKey(
                                    tenant: tenant, id: known.id, deadline: deadline)
                                if key.plaintext?.copyBytes() != known.plaintext {
                                    timeline.record(ok: false, code: "WRONG_PLAINTEXT")
                                    continue
                                }
                            }
                            timeline.record(ok: true, code: "OK")
                        } catch let error as GatewayError {
                            timeline.record(ok: false, code: "\(error.code)")
                            // A refused call is retried by the caller after a short pause.
                            try? await Task.sleep(for: .milliseconds(50))
                        } catch {
                            timeline.record(ok: false, code: "\(error)")
                        }
                        generate.toggle()
                    }
                }
            }
        }
    }

    struct Outcome: CustomStringConvertible {
        var firstErrorAfterFault: Duration?
        var firstErrorCode: String?
        var errorCodesDuringFault: [String: Int]
        var firstSuccessAfterHeal: Duration?
        var acknowledged: Int
        var lost: Int

        var description: String {
            "first error \(firstErrorAfterFault.map { "\($0)" } ?? "none") (\(firstErrorCode ?? "-")), "
                + "errors during the fault \(errorCodesDuringFault), "
                + "first success after the fault ended \(firstSuccessAfterHeal.map { "\($0)" } ?? "never"), "
                + "acknowledged \(acknowledged), lost \(lost)"
        }
    }

    /// Starts a gateway on `cluster`, runs the load, applies `fault` for `duration`, then `heal`,
    /// keeps the load running until `settle` after the first success, and checks every
    /// acknowledged key.
    static func run(
        _ name: String,
        cluster: PostgresTestCluster,
        deadline: Duration,
        duration: Duration,
        settings: PostgresSettings? = nil,
        fault: @escaping () async throws -> Void,
        heal: @escaping () async throws -> Void
    ) async throws -> Outcome {
        let own: (inout GatewayConfiguration) -> Void = {
            $0.store = .postgres(
                settings
                    ?? PostgresSettings(
                        port: cluster.port, user: cluster.username, database: "postgres",
                        passwordFile: cluster.directory + "/password", maximumConnections: 8))
        }
        return try await withGateway(.postgres, name, security: .plaintext, configure: own) { gateway in
            let admin = try gateway.client(token: gateway.adminToken, poolSize: 2)
            defer { Task { await admin.shutdown() } }
            _ = try await admin.createTenant("acme")
            let timeline = Timeline()
            let stop = Flag()
            let loadTask = Task {
                await load(admin, tenant: "acme", deadline: deadline, timeline: timeline, stop: stop)
            }
            try await Task.sleep(for: .seconds(2))
            let faultAt = ContinuousClock.now
            try await fault()
            try await Task.sleep(for: duration)
            let healAt = ContinuousClock.now
            try await heal()
            // Until the load has succeeded again for a while (or gave up after 60 s).
            var recoveredAt: ContinuousClock.Instant?
            while ContinuousClock.now - healAt < .seconds(60) {
                try await Task.sleep(for: .milliseconds(200))
                if recoveredAt == nil,
                    let first = timeline.events.first(where: { $0.ok && $0.at > healAt && $0.at - healAt > .zero })
                {
                    recoveredAt = first.at
                }
                if let recoveredAt, ContinuousClock.now - recoveredAt > .seconds(2) { break }
            }
            stop.set()
            await loadTask.value

            let (firstError, codes) = timeline.failures(since: faultAt)
            let lost = await timeline.lostKeys(admin, tenant: "acme")
            #expect(try await admin.verifyAuditLog().intact)
            return Outcome(
                firstErrorAfterFault: firstError.map { $0.at - faultAt },
                firstErrorCode: firstError?.code,
                errorCodesDuringFault: codes,
                firstSuccessAfterHeal: recoveredAt.map { $0 - healAt },
                acknowledged: timeline.keys.count,
                lost: lost
            )
        }
    }

    @Test("PostgreSQL stopped (-m immediate) for 10 s: UNAVAILABLE at once, service resumes by itself")
    func stopped() async throws {
        let cluster = try PostgresTestCluster.startOwn()
        defer { cluster.stop() }
        let outcome = try await Self.run(
            "pg-stopped", cluster: cluster, deadline: .seconds(8), duration: .seconds(10),
            fault: { try await cluster.halt(mode: "immediate") }, heal: { try await cluster.resume() })
        print("PostgreSQL stopped for 10 s: \(outcome)")
        #expect(outcome.lost == 0)
        #expect(outcome.acknowledged > 0)
        // Well before the 8 s deadline: the callers were told, not left waiting.
        #expect(outcome.errorCodesDuringFault.keys.contains("\(StatusCode.unavailable)"))
        #expect(outcome.errorCodesDuringFault["\(StatusCode.deadlineExceeded)"] == nil, "\(outcome)")
        #expect(outcome.errorCodesDuringFault["\(StatusCode.internalError)"] == nil, "\(outcome)")
        #expect(outcome.firstSuccessAfterHeal != nil, "service never resumed")
    }

    @Test("PostgreSQL frozen (SIGSTOP) for 6 s, as behind a partition: DEADLINE_EXCEEDED, then it resumes")
    func frozen() async throws {
        let cluster = try PostgresTestCluster.startOwn()
        defer {
            cluster.thawSynchronously()
            cluster.stop()
        }
        let outcome = try await Self.run(
            "pg-frozen", cluster: cluster, deadline: .seconds(2), duration: .seconds(6),
            fault: { try await cluster.freeze() }, heal: { try await cluster.thaw() })
        print("PostgreSQL frozen for 6 s: \(outcome)")
        #expect(outcome.lost == 0)
        #expect(outcome.errorCodesDuringFault.keys.contains("\(StatusCode.deadlineExceeded)"), "\(outcome)")
        #expect(outcome.errorCodesDuringFault["\(StatusCode.internalError)"] == nil, "\(outcome)")
        #expect(outcome.firstSuccessAfterHeal != nil, "service never resumed")
    }

    @Test("backends terminated every 300 ms for 3 s: errors are UNAVAILABLE, nothing acknowledged is lost")
    func backendsTerminated() async throws {
        let cluster = try PostgresTestCluster.startOwn()
        defer { cluster.stop() }
        let killing = Flag()
        let outcome = try await Self.run(
            "pg-terminated", cluster: cluster, deadline: .seconds(8), duration: .seconds(3),
            fault: {
                killing.set()
                Task.detached {
                    while killing.isSet {
                        _ = try? await cluster.terminateBackends("postgres")
                        try? await Task.sleep(for: .milliseconds(300))
                    }
                }
            },
            heal: { killing.set(false) })
        print("PostgreSQL backends terminated for 3 s: \(outcome)")
        #expect(outcome.lost == 0)
        #expect(outcome.errorCodesDuringFault["\(StatusCode.internalError)"] == nil, "\(outcome)")
        #expect(outcome.errorCodesDuringFault["\(StatusCode.deadlineExceeded)"] == nil, "\(outcome)")
        #expect(outcome.firstSuccessAfterHeal != nil, "service never resumed")
    }

    @Test("PostgreSQL restarted (-m fast) during group commits: nothing acknowledged is lost")
    func restarted() async throws {
        let cluster = try PostgresTestCluster.startOwn()
        defer { cluster.stop() }
        let outcome = try await Self.run(
            "pg-restarted", cluster: cluster, deadline: .seconds(8), duration: .zero,
            fault: {
                try await cluster.halt(mode: "fast")
                try await cluster.resume()
            }, heal: {})
        print("PostgreSQL restarted: \(outcome)")
        #expect(outcome.lost == 0)
        #expect(outcome.errorCodesDuringFault["\(StatusCode.internalError)"] == nil, "\(outcome)")
        #expect(outcome.firstSuccessAfterHeal != nil, "service never resumed")
    }

    @Test("the primary killed under load, its synchronous standby promoted: service moves to it, nothing lost")
    func failoverToAPromotedStandby() async throws {
        let primary = try PostgresTestCluster.startOwn()
        defer { primary.stop() }
        let standby = try primary.startStandby(synchronous: true)
        defer { standby.stop() }
        var settings = PostgresSettings(
            port: primary.port, user: primary.username, database: "postgres",
            passwordFile: primary.directory + "/password", maximumConnections: 8)
        settings.failoverServers = [.init(host: "127.0.0.1", port: standby.port)]
        settings.standbyDurability = .refuse
        // The fault: the primary dies (-m immediate: a crash); 2 s later, as a failover manager
        // would after its own checks, the standby is promoted.
        let outcome = try await Self.run(
            "pg-failover", cluster: primary, deadline: .seconds(8), duration: .seconds(2), settings: settings,
            fault: { try await primary.halt(mode: "immediate") }, heal: { try await standby.promote() })
        print("PostgreSQL primary killed, standby promoted 2 s later: \(outcome)")
        #expect(outcome.lost == 0)
        #expect(outcome.acknowledged > 0)
        #expect(outcome.errorCodesDuringFault.keys.contains("\(StatusCode.unavailable)"), "\(outcome)")
        #expect(outcome.errorCodesDuringFault["\(StatusCode.deadlineExceeded)"] == nil, "\(outcome)")
        #expect(outcome.errorCodesDuringFault["\(StatusCode.internalError)"] == nil, "\(outcome)")
        #expect(outcome.firstSuccessAfterHeal != nil, "service never moved to the promoted standby")
    }
}
