import NIOConcurrencyHelpers
import Testing

@testable import GatewayTransport

@Suite("Tenant fair scheduler: admission state machine")
struct TenantAdmissionStateMachineTests {
    @Test("free slots admit at once; then requests queue per tenant")
    func admitThenQueue() {
        var machine = TenantAdmissionStateMachine(concurrency: 2, maxQueuedPerTenant: 10)
        #expect(machine.arrive(1, tenant: "a") == .admitted)
        #expect(machine.arrive(2, tenant: "a") == .admitted)
        #expect(machine.arrive(3, tenant: "a") == .queued)
        #expect(machine.running == 2)
        #expect(machine.finished() == 3)
        #expect(machine.running == 2)
        #expect(machine.finished() == nil)
        #expect(machine.running == 1)
    }

    @Test("a full tenant queue refuses that tenant only")
    func queueFull() {
        var machine = TenantAdmissionStateMachine(concurrency: 1, maxQueuedPerTenant: 2)
        #expect(machine.arrive(1, tenant: "a") == .admitted)
        #expect(machine.arrive(2, tenant: "a") == .queued)
        #expect(machine.arrive(3, tenant: "a") == .queued)
        #expect(machine.arrive(4, tenant: "a") == .queueFull)
        #expect(machine.arrive(5, tenant: "b") == .queued)
    }

    @Test("fairness: tenant B's 5 requests behind tenant A's 200 are admitted within the first 10 slots")
    func fairness() {
        var machine = TenantAdmissionStateMachine(concurrency: 1, maxQueuedPerTenant: 256)
        #expect(machine.arrive(0, tenant: "a") == .admitted)
        for id in UInt64(1)...200 { #expect(machine.arrive(id, tenant: "a") == .queued) }
        for id in UInt64(1001)...1005 { #expect(machine.arrive(id, tenant: "b") == .queued) }
        var order: [UInt64] = []
        while let next = machine.finished() { order.append(next) }
        #expect(order.count == 205)
        let positionsOfB = order.indices.filter { order[$0] > 1000 }
        #expect(positionsOfB == [1, 3, 5, 7, 9])
        // Each tenant's own requests keep their order.
        #expect(order.filter { $0 <= 200 } == Array(1...200))
    }

    @Test("round-robin over three tenants")
    func roundRobin() {
        var machine = TenantAdmissionStateMachine(concurrency: 1, maxQueuedPerTenant: 10)
        _ = machine.arrive(0, tenant: "a")
        for (id, tenant) in [(1, "a"), (2, "a"), (3, "b"), (4, "c"), (5, "c")] as [(UInt64, String)] {
            _ = machine.arrive(id, tenant: tenant)
        }
        var order: [UInt64] = []
        while let next = machine.finished() { order.append(next) }
        #expect(order == [1, 3, 4, 2, 5])
    }

    @Test("a waiter that leaves frees its place; an empty tenant leaves the rotation")
    func leave() {
        var machine = TenantAdmissionStateMachine(concurrency: 1, maxQueuedPerTenant: 1)
        _ = machine.arrive(0, tenant: "a")
        #expect(machine.arrive(1, tenant: "b") == .queued)
        #expect(machine.arrive(2, tenant: "b") == .queueFull)
        machine.leave(1)
        #expect(machine.waiting("b") == 0)
        #expect(machine.arrive(3, tenant: "c") == .queued)
        #expect(machine.finished() == 3)
        #expect(machine.finished() == nil)
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
        let enqueued = NIOLockedValueBox(0)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await scheduler.run(tenant: "a") { await gate.enter("first") } }
            try await Self.waitUntil { gate.admitted == ["first"] }
            for index in 0..<200 {
                group.addTask {
                    enqueued.withLockedValue { $0 += 1 }
                    try await scheduler.run(tenant: "a") { await gate.enter("a\(index)") }
                }
            }
            // Let A's flood queue up before B arrives.
            try await Self.waitUntil { enqueued.withLockedValue { $0 } == 200 }
            try await Task.sleep(for: .milliseconds(100))
            for index in 0..<5 {
                group.addTask { try await scheduler.run(tenant: "b") { await gate.enter("b\(index)") } }
            }
            try await Task.sleep(for: .milliseconds(100))
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
            try await Task.sleep(for: .milliseconds(50))
            let error = await #expect(throws: TenantAdmissionError.self) {
                try await scheduler.run(tenant: "a") { 1 }
            }
            #expect(error?.code == .queueFull)
            #expect(error?.statusReason == "OVERLOADED")
            group.addTask { try await scheduler.run(tenant: "b") { await gate.enter("b") } }
            try await Task.sleep(for: .milliseconds(50))
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
            try await Task.sleep(for: .milliseconds(20))
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
            try await Task.sleep(for: .milliseconds(50))
            waiter.cancel()
            await #expect(throws: CancellationError.self) { try await waiter.value }
            // Its place in the one-deep queue is free again.
            group.addTask { try await scheduler.run(tenant: "a") { await gate.enter("second") } }
            try await Task.sleep(for: .milliseconds(20))
            gate.open()
            try await group.waitForAll()
        }
        #expect(gate.admitted == ["first", "second"])
    }
}
