import NIOConcurrencyHelpers
import Testing

@testable import GatewayTransport

/// Drives the state machine as the scheduler does: admissions remembered, each finishing after
/// `latency` on a clock that advances by it.
private struct Driver {
    var machine: TenantAdmissionStateMachine
    var running: [UInt64: TenantAdmissionStateMachine.Admission] = [:]
    var now: Duration = .zero

    init(concurrency: Int, maxQueuedPerTenant: Int) {
        machine = TenantAdmissionStateMachine(concurrency: concurrency, maxQueuedPerTenant: maxQueuedPerTenant)
    }

    init(_ machine: TenantAdmissionStateMachine) { self.machine = machine }

    /// "admitted", "queued", "full" or "shed".
    mutating func arrive(_ id: UInt64, tenant: String) -> String {
        switch machine.arrive(id, tenant: tenant, now: now) {
        case .admitted(let admission):
            running[id] = admission
            return "admitted"
        case .queued: return "queued"
        case .queueFull: return "full"
        case .wouldWaitTooLong: return "shed"
        }
    }

    /// Finishes `id` after `latency`; returns the ids admitted in its place.
    @discardableResult
    mutating func finish(_ id: UInt64, latency: Duration = .milliseconds(1)) -> [UInt64] {
        now += latency
        let admitted = machine.finished(running.removeValue(forKey: id)!, latency: latency, now: now)
        for admission in admitted { running[admission.id] = admission }
        return admitted.map(\.id)
    }

    /// Finishes the oldest-admitted running body one at a time until none runs; returns the
    /// order in which queued ones were admitted.
    mutating func drain(after first: UInt64) -> [UInt64] {
        var order: [UInt64] = []
        var next: [UInt64] = [first]
        while let id = next.first {
            next.removeFirst()
            let admitted = finish(id)
            order += admitted
            next += admitted
        }
        return order
    }
}

@Suite("Tenant fair scheduler: admission state machine")
struct TenantAdmissionStateMachineTests {
    @Test("free slots admit at once; then requests queue per tenant")
    func admitThenQueue() {
        var driver = Driver(concurrency: 2, maxQueuedPerTenant: 10)
        #expect(driver.arrive(1, tenant: "a") == "admitted")
        #expect(driver.arrive(2, tenant: "a") == "admitted")
        #expect(driver.arrive(3, tenant: "a") == "queued")
        #expect(driver.machine.running == 2)
        #expect(driver.finish(1) == [3])
        #expect(driver.machine.running == 2)
        #expect(driver.finish(2) == [])
        #expect(driver.machine.running == 1)
    }

    @Test("a full tenant queue refuses that tenant only")
    func queueFull() {
        var driver = Driver(concurrency: 1, maxQueuedPerTenant: 2)
        #expect(driver.arrive(1, tenant: "a") == "admitted")
        #expect(driver.arrive(2, tenant: "a") == "queued")
        #expect(driver.arrive(3, tenant: "a") == "queued")
        #expect(driver.arrive(4, tenant: "a") == "full")
        #expect(driver.arrive(5, tenant: "b") == "queued")
    }

    @Test("fairness: tenant B's 5 requests behind tenant A's 200 are admitted within the first 10 slots")
    func fairness() {
        var driver = Driver(concurrency: 1, maxQueuedPerTenant: 256)
        #expect(driver.arrive(0, tenant: "a") == "admitted")
        for id in UInt64(1)...200 { #expect(driver.arrive(id, tenant: "a") == "queued") }
        for id in UInt64(1001)...1005 { #expect(driver.arrive(id, tenant: "b") == "queued") }
        let order = driver.drain(after: 0)
        #expect(order.count == 205)
        let positionsOfB = order.indices.filter { order[$0] > 1000 }
        #expect(positionsOfB == [1, 3, 5, 7, 9])
        // Each tenant's own requests keep their order.
        #expect(order.filter { $0 <= 200 } == Array(1...200))
    }

    @Test("round-robin over three tenants")
    func roundRobin() {
        var driver = Driver(concurrency: 1, maxQueuedPerTenant: 10)
        _ = driver.arrive(0, tenant: "a")
        for (id, tenant) in [(1, "a"), (2, "a"), (3, "b"), (4, "c"), (5, "c")] as [(UInt64, String)] {
            _ = driver.arrive(id, tenant: tenant)
        }
        #expect(driver.drain(after: 0) == [1, 3, 4, 2, 5])
    }

    @Test("a waiter that leaves frees its place; an empty tenant leaves the rotation")
    func leave() {
        var driver = Driver(concurrency: 1, maxQueuedPerTenant: 1)
        _ = driver.arrive(0, tenant: "a")
        #expect(driver.arrive(1, tenant: "b") == "queued")
        #expect(driver.arrive(2, tenant: "b") == "full")
        driver.machine.leave(1)
        #expect(driver.machine.waiting("b") == 0)
        #expect(driver.arrive(3, tenant: "c") == "queued")
        #expect(driver.finish(0) == [3])
        #expect(driver.finish(3) == [])
    }

    @Test("a request that would wait longer than the longest wait is shed at once")
    func shedByExpectedWait() {
        // A fixed limit of 2, requests taking 100 ms, a 1 s longest wait: slots free at 20 a
        // second, so a tenant alone can queue 20 and the 21st is shed; with two tenants waiting,
        // each queue holds 10.
        var driver = Driver(
            TenantAdmissionStateMachine(concurrency: 2, maxQueuedPerTenant: 256, maxWait: .seconds(1)))
        #expect(driver.arrive(1, tenant: "a") == "admitted")
        driver.finish(1, latency: .milliseconds(100))
        #expect(driver.arrive(2, tenant: "a") == "admitted")
        #expect(driver.arrive(3, tenant: "a") == "admitted")
        var outcomes: [String] = []
        for id in UInt64(10)..<40 { outcomes.append(driver.arrive(id, tenant: "a")) }
        #expect(outcomes.filter { $0 == "queued" }.count == 20)
        #expect(outcomes.filter { $0 == "shed" }.count == 10)
        // Tenant b arrives behind a's 20 with nothing running: it takes the slot kept back for it
        // at once; with two tenants active, a's share is one slot.
        #expect(driver.arrive(100, tenant: "b") == "admitted")
        #expect(driver.finish(2, latency: .milliseconds(100)) == [])
        #expect(driver.finish(3, latency: .milliseconds(100)) == [10])
    }

    @Test("a tenant alone uses the whole limit; once another is active, a slot is kept for it")
    func reserveForOtherTenants() {
        var driver = Driver(concurrency: 4, maxQueuedPerTenant: 256)
        for id in UInt64(1)...4 { #expect(driver.arrive(id, tenant: "flood") == "admitted") }
        for id in UInt64(5)...20 { #expect(driver.arrive(id, tenant: "flood") == "queued") }
        // The quiet tenant, with nothing running, may go over the limit by the slots kept back
        // (the flood's bodies above its new share have yet to finish), so it never waits for
        // them; the flood runs at most 3 of the 4 while the quiet tenant is active.
        #expect(driver.arrive(100, tenant: "quiet") == "admitted")
        #expect(driver.running.count == 5)
        #expect(driver.finish(1) == [])
        #expect(driver.finish(100) == [])
        #expect(driver.finish(2) == [5])
        #expect(driver.arrive(101, tenant: "quiet") == "admitted")
        #expect(driver.finish(101) == [])
        #expect(driver.arrive(102, tenant: "quiet") == "admitted")
        #expect(driver.finish(102) == [])
        // The quiet tenant's reserve lapses a second after its last arrival: the flood gets
        // the whole limit back.
        driver.now += .seconds(2)
        #expect(driver.arrive(21, tenant: "flood") == "queued")
        #expect(driver.finish(3) == [6, 7])
        #expect(driver.running.count == 4)
    }

    @Test("the learnt limit binds only while another tenant is active; a tenant alone may run the maximum")
    func learntLimitBindsWithTwoTenants() {
        // Learnt between 2 and 8; starts at 8, taught to shrink by slow bodies.
        var driver = Driver(
            TenantAdmissionStateMachine(
                limit: AdaptiveConcurrencyLimit.Settings(minimum: 2, maximum: 8, initial: 8),
                maxQueuedPerTenant: 256))
        _ = driver.arrive(1, tenant: "alone")
        driver.finish(1, latency: .milliseconds(1))
        for id in UInt64(10)..<18 { #expect(driver.arrive(id, tenant: "alone") == "admitted") }
        // 200 bodies 50 times slower than the idle one, the tenant keeping 8 in flight.
        for next in UInt64(1000)..<1200 {
            driver.finish(driver.running.keys.min()!, latency: .milliseconds(50))
            _ = driver.arrive(next, tenant: "alone")
        }
        #expect(driver.machine.limiter.current == 2)
        #expect(driver.machine.limit == 8)
        #expect(driver.machine.running == 8)
        // A second tenant: the learnt limit applies to both from now on. The newcomer, with
        // nothing running, starts at once (up to one and a half times the maximum in all); the
        // busy tenant waits until its bodies are below its share.
        #expect(driver.arrive(200, tenant: "other") == "admitted")
        for (id, tenant) in [(203, "third"), (204, "fourth"), (205, "fifth")] {
            #expect(driver.arrive(UInt64(id), tenant: tenant) == "admitted")
        }
        #expect(driver.arrive(206, tenant: "sixth") == "queued")
        driver.machine.leave(206)
        driver.finish(203, latency: .milliseconds(1))
        driver.finish(204, latency: .milliseconds(1))
        driver.finish(205, latency: .milliseconds(1))
        #expect(driver.machine.limit == 2)
        #expect(driver.arrive(201, tenant: "alone") == "queued")
        // A second without the other tenant: the maximum again.
        driver.finish(200, latency: .milliseconds(1))
        driver.now += .seconds(2)
        #expect(driver.arrive(202, tenant: "alone") == "queued")
        #expect(driver.machine.limit == 8)
    }

    @Test("at most half the limit is kept back, whatever the number of active tenants")
    func reserveIsAtMostHalf() {
        var machine = TenantAdmissionStateMachine(concurrency: 8, maxQueuedPerTenant: 256)
        for (index, tenant) in (0..<20).map({ "t\($0)" }).enumerated() {
            _ = machine.arrive(UInt64(index), tenant: tenant, now: .zero)
        }
        #expect(machine.share(of: "t0") == 4)
        #expect(machine.share(of: "new") == 4)
        var alone = TenantAdmissionStateMachine(concurrency: 8, maxQueuedPerTenant: 256)
        _ = alone.arrive(1, tenant: "only", now: .zero)
        #expect(alone.share(of: "only") == 8)
    }
}

@Suite("Adaptive concurrency limit")
struct AdaptiveConcurrencyLimitTests {
    /// Feeds `count` completions of `latency` with `inFlight` admitted and `running` still
    /// running, 1 ms apart.
    private static func feed(
        _ limit: inout AdaptiveConcurrencyLimit, _ count: Int, latency: Duration, inFlight: Int,
        running: Int? = nil, clock: inout Duration
    ) {
        for _ in 0..<count {
            clock += .milliseconds(1)
            limit.record(latency: latency, inFlight: inFlight, running: running ?? inFlight - 1, now: clock)
        }
    }

    @Test("grows to the maximum while busy requests finish as fast as idle ones")
    func grows() {
        var limit = AdaptiveConcurrencyLimit(settings: .init(minimum: 4, maximum: 64))
        var clock = Duration.zero
        #expect(limit.current == 16)
        Self.feed(&limit, 5, latency: .milliseconds(2), inFlight: 1, clock: &clock)
        Self.feed(&limit, 500, latency: .milliseconds(2), inFlight: 60, clock: &clock)
        #expect(limit.current == 64)
    }

    @Test("an unused limit does not grow")
    func idleDoesNotGrow() {
        var limit = AdaptiveConcurrencyLimit(settings: .init(minimum: 4, maximum: 64))
        var clock = Duration.zero
        Self.feed(&limit, 1000, latency: .milliseconds(2), inFlight: 1, clock: &clock)
        #expect(limit.current == 16)
    }

    @Test("shrinks to the minimum when requests take far longer than idle ones, and recovers")
    func shrinksAndRecovers() {
        var limit = AdaptiveConcurrencyLimit(settings: .init(minimum: 4, maximum: 64))
        var clock = Duration.zero
        Self.feed(&limit, 5, latency: .milliseconds(2), inFlight: 1, clock: &clock)
        Self.feed(&limit, 200, latency: .milliseconds(20), inFlight: 16, clock: &clock)
        #expect(limit.current == 4)
        for _ in 0..<500 {
            Self.feed(&limit, 1, latency: .milliseconds(2), inFlight: limit.current, clock: &clock)
        }
        #expect(limit.current == 64)
    }

    @Test("settles where latency is about the tolerance over the idle latency")
    func settles() {
        // A store whose latency grows with the requests in flight (a group commit): 2 ms alone,
        // plus 0.5 ms per request. At the tolerance of 1.5 that is 3 ms, about 2 in flight; the
        // minimum of 4 holds it there.
        var limit = AdaptiveConcurrencyLimit(settings: .init(minimum: 4, maximum: 64))
        var clock = Duration.zero
        Self.feed(&limit, 5, latency: .milliseconds(2), inFlight: 1, clock: &clock)
        for _ in 0..<2000 {
            let inFlight = limit.current
            let latency = Duration.microseconds(2000 + 500 * inFlight)
            Self.feed(&limit, 1, latency: latency, inFlight: inFlight, clock: &clock)
        }
        #expect(limit.current == 4)
        // 0.05 ms per request: 1.5 x 2 ms is reached near 20 in flight.
        var other = AdaptiveConcurrencyLimit(settings: .init(minimum: 4, maximum: 64))
        Self.feed(&other, 5, latency: .milliseconds(2), inFlight: 1, clock: &clock)
        for _ in 0..<4000 {
            let inFlight = other.current
            Self.feed(&other, 1, latency: .microseconds(2000 + 50 * inFlight), inFlight: inFlight, clock: &clock)
        }
        #expect((12...28).contains(other.current), "settled at \(other.current)")
    }

    @Test("busy for the probe interval without an idle measurement: the limit is one until one comes")
    func probes() {
        var limit = AdaptiveConcurrencyLimit(settings: .init(minimum: 4, maximum: 64))
        var clock = Duration.zero
        Self.feed(&limit, 5, latency: .milliseconds(2), inFlight: 1, clock: &clock)
        Self.feed(&limit, 9_000, latency: .milliseconds(2), inFlight: 30, clock: &clock)
        #expect(!limit.probing)
        Self.feed(&limit, 1_100, latency: .milliseconds(2), inFlight: 30, clock: &clock)
        #expect(limit.probing)
        #expect(limit.current == 1)
        let before = limit.estimate
        Self.feed(&limit, 1, latency: .milliseconds(3), inFlight: 1, clock: &clock)
        #expect(!limit.probing)
        #expect(limit.current == Int(before))
        #expect(limit.idleLatency! > 0.002)
    }

    @Test("a fixed limit (minimum = maximum) never moves")
    func fixed() {
        var limit = AdaptiveConcurrencyLimit(settings: .init(minimum: 8, maximum: 8))
        var clock = Duration.zero
        Self.feed(&limit, 5, latency: .milliseconds(2), inFlight: 1, clock: &clock)
        Self.feed(&limit, 500, latency: .milliseconds(50), inFlight: 8, clock: &clock)
        #expect(limit.current == 8)
    }
}

/// Holds bodies until released, and records which ran.
private final class Gate: Sendable {
    private let state = NIOLockedValueBox<(admitted: [String], open: Bool)>(([], false))

    var admitted: [String] { state.withLockedValue { $0.admitted } }

    func enter(_ label: String) async {
        state.withLockedValue { $0.admitted.append(label) }
        while !state.withLockedValue({ $0.open }) { try? await Task.sleep(for: .milliseconds(2)) }
    }

    func open() { state.withLockedValue { $0.open = true } }
}

@Suite("Tenant fair scheduler: async gate")
struct TenantFairSchedulerTests {
    /// A wait bound no test reaches even on a loaded machine (the default 5 s was reached by 200
    /// queued requests while the whole test suite ran on two cores).
    static let patientWait = Duration.seconds(300)

    private static func waitUntil(_ condition: () -> Bool) async throws {
        let clock = ContinuousClock()
        let end = clock.now + .seconds(10)
        while !condition() {
            guard clock.now < end else { throw CancellationError() }
            try await Task.sleep(for: .milliseconds(2))
        }
    }

    @Test("at most `concurrency` bodies run at once; results and errors pass through")
    func concurrencyBound() async throws {
        let scheduler = TenantFairScheduler(
            configuration: .init(concurrency: 3, maxQueuedPerTenant: 100, maxWait: Self.patientWait))
        let running = NIOLockedValueBox((now: 0, peak: 0))
        try await withThrowingTaskGroup(of: Int.self) { group in
            for index in 0..<30 {
                group.addTask {
                    try await scheduler.run(tenant: "t\(index % 2)") {
                        running.withLockedValue {
                            $0.now += 1
                            $0.peak = max($0.peak, $0.now)
                        }
                        try await Task.sleep(for: .milliseconds(5))
                        running.withLockedValue { $0.now -= 1 }
                        return index
                    }
                }
            }
            var sum = 0
            for try await value in group { sum += value }
            #expect(sum == (0..<30).reduce(0, +))
        }
        #expect(running.withLockedValue { $0.peak } == 3)

        struct Boom: Error {}
        await #expect(throws: Boom.self) { try await scheduler.run(tenant: "x") { throw Boom() } }
        // The failed body released its slot.
        #expect(try await scheduler.run(tenant: "x") { 7 } == 7)
    }

    @Test("fairness with real tasks: B's 5 requests are admitted within the first slots after A's flood")
    func fairnessAsync() async throws {
        let scheduler = TenantFairScheduler(
            configuration: .init(concurrency: 1, maxQueuedPerTenant: 256, maxWait: Self.patientWait))
        let gate = Gate()
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await scheduler.run(tenant: "a") { await gate.enter("first") } }
            try await Self.waitUntil { gate.admitted == ["first"] }
            for index in 0..<200 {
                group.addTask {
                    try await scheduler.run(tenant: "a") { await gate.enter("a\(index)") }
                }
            }
            // A's flood is queued before B arrives.
            try await Self.waitUntil { scheduler.waiting("a") == 200 }
            for index in 0..<5 {
                group.addTask { try await scheduler.run(tenant: "b") { await gate.enter("b\(index)") } }
            }
            try await Self.waitUntil { scheduler.waiting("b") == 5 }
            gate.open()
            try await group.waitForAll()
        }
        let order = gate.admitted
        #expect(order.count == 206)
        let lastB = try #require(order.lastIndex { $0.hasPrefix("b") })
        #expect(lastB <= 12, "B's requests were admitted at \(order.indices.filter { order[$0].hasPrefix("b") })")
    }

    @Test("a full tenant queue refuses at once with queueFull; other tenants still queue")
    func queueFull() async throws {
        let scheduler = TenantFairScheduler(configuration: .init(concurrency: 1, maxQueuedPerTenant: 2))
        let gate = Gate()
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await scheduler.run(tenant: "a") { await gate.enter("first") } }
            try await Self.waitUntil { gate.admitted.count == 1 }
            for index in 0..<2 {
                group.addTask { try await scheduler.run(tenant: "a") { await gate.enter("a\(index)") } }
            }
            try await Self.waitUntil { scheduler.waiting("a") == 2 }
            let error = await #expect(throws: TenantAdmissionError.self) {
                try await scheduler.run(tenant: "a") { 1 }
            }
            #expect(error?.code == .queueFull)
            #expect(error?.statusReason == "OVERLOADED")
            group.addTask { try await scheduler.run(tenant: "b") { await gate.enter("b") } }
            try await Self.waitUntil { scheduler.waiting("b") == 1 }
            gate.open()
            try await group.waitForAll()
        }
        #expect(gate.admitted.sorted() == ["a0", "a1", "b", "first"])
    }

    @Test("a waiter gets waitExceeded after maxWait, and its place is freed")
    func waitBound() async throws {
        let scheduler = TenantFairScheduler(
            configuration: .init(concurrency: 1, maxQueuedPerTenant: 1, maxWait: .milliseconds(100))
        )
        let gate = Gate()
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await scheduler.run(tenant: "a") { await gate.enter("first") } }
            try await Self.waitUntil { gate.admitted.count == 1 }
            let clock = ContinuousClock()
            let start = clock.now
            let error = await #expect(throws: TenantAdmissionError.self) {
                try await scheduler.run(tenant: "a") { 1 }
            }
            #expect(error?.code == .waitExceeded)
            #expect(clock.now - start >= .milliseconds(100))
            // The queue has room again.
            group.addTask { try await scheduler.run(tenant: "a") { await gate.enter("second") } }
            try await Self.waitUntil { scheduler.waiting("a") == 1 }
            gate.open()
            try await group.waitForAll()
        }
        #expect(gate.admitted == ["first", "second"])
    }

    @Test("cancelling a waiter removes it from its queue and throws CancellationError")
    func cancellation() async throws {
        let scheduler = TenantFairScheduler(configuration: .init(concurrency: 1, maxQueuedPerTenant: 1))
        let gate = Gate()
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await scheduler.run(tenant: "a") { await gate.enter("first") } }
            try await Self.waitUntil { gate.admitted.count == 1 }
            let waiter = Task { try await scheduler.run(tenant: "a") { await gate.enter("cancelled") } }
            try await Self.waitUntil { scheduler.waiting("a") == 1 }
            waiter.cancel()
            await #expect(throws: CancellationError.self) { try await waiter.value }
            // Its place in the one-deep queue is free again.
            group.addTask { try await scheduler.run(tenant: "a") { await gate.enter("second") } }
            try await Self.waitUntil { scheduler.waiting("a") == 1 }
            gate.open()
            try await group.waitForAll()
        }
        #expect(gate.admitted == ["first", "second"])
    }
}
