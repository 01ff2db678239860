import Foundation
import GatewayClient
import GatewayTransport
import GatewayWire
import Synchronization
import Testing

@testable import GatewayServer

/// Refused authentications per source address: the token bucket's rules on a manual clock, and
/// a real gateway that stops checking (and auditing) the Hellos of an address over its limit.
@Suite("Failed-authentication throttle")
struct AuthenticationThrottleTests {
    /// A clock the test moves by hand.
    final class ManualClock: Sendable {
        private let instant = Mutex(ContinuousClock.now)
        var now: ContinuousClock.Instant { instant.withLock { $0 } }
        func advance(_ duration: Duration) { instant.withLock { $0 += duration } }
    }

    func throttle(burst: Int, perMinute: Int, clock: ManualClock) -> AuthenticationThrottle {
        var limit = AuthSettings.FailureLimit()
        limit.burst = burst
        limit.perMinute = perMinute
        return AuthenticationThrottle(limit: limit, now: { clock.now })
    }

    /// Within a microsecond: the bucket counts in floating point.
    func close(_ wait: Duration?, _ expected: Duration) -> Bool {
        guard let wait else { return false }
        return abs((wait - expected) / .microseconds(1)) < 1
    }

    /// Takes a try for `address` and expects it granted.
    func admitted(
        _ throttle: AuthenticationThrottle,
        _ address: String,
        sourceLocation: SourceLocation = #_sourceLocation
    ) async -> AuthenticationThrottle.Ticket? {
        if case .admitted(let ticket) = await throttle.admit(SourceAddressGroup(remoteAddress: address)) {
            return ticket
        }
        Issue.record("expected a try for \(address)", sourceLocation: sourceLocation)
        return nil
    }

    /// Takes a try for `address` and expects a refusal; returns its retry-after and whether it starts
    /// throttling.
    func throttled(
        _ throttle: AuthenticationThrottle,
        _ address: String,
        sourceLocation: SourceLocation = #_sourceLocation
    ) async -> (Duration, Bool)? {
        switch await throttle.admit(SourceAddressGroup(remoteAddress: address)) {
        case .throttled(let wait, let starts): return (wait, starts)
        case .admitted(let ticket):
            ticket.settle(refund: true)
            Issue.record("expected \(address) to be throttled", sourceLocation: sourceLocation)
        case .cancelled:
            Issue.record("expected \(address) to be throttled, not cancelled", sourceLocation: sourceLocation)
        }
        return nil
    }

    /// Waits (by yielding, not sleeping) until `count` Hellos of `address` wait for a try.
    func waitForWaiters(_ throttle: AuthenticationThrottle, _ address: String, _ count: Int) async {
        let group = SourceAddressGroup(remoteAddress: address)
        while throttle.waiting(group) < count { await Task.yield() }
    }

    @Test("an address has `burst` tries; a failure spends one, and each comes back one refill period later")
    func bucket() async {
        let clock = ManualClock()
        let throttle = throttle(burst: 3, perMinute: 60, clock: clock)
        let address = "10.0.0.1:1000"
        for _ in 0..<3 { await admitted(throttle, address)?.settle(refund: false) }
        let first = await throttled(throttle, address)
        #expect(close(first?.0, .seconds(1)))
        #expect(first?.1 == true, "the first refusal starts the throttling (audited)")
        #expect(await throttled(throttle, address)?.1 == false, "later ones are not audited")
        // Another address is not affected.
        await admitted(throttle, "10.0.0.2:1000")?.settle(refund: false)

        clock.advance(.milliseconds(400))
        #expect(close(await throttled(throttle, address)?.0, .milliseconds(600)))
        clock.advance(.milliseconds(601))
        await admitted(throttle, address)?.settle(refund: false)
        // Still the same episode: not audited again until the bucket was full.
        #expect(await throttled(throttle, address)?.1 == false)

        // The bucket refills to `burst`, never beyond, and a new episode is audited again.
        clock.advance(.seconds(3600))
        for _ in 0..<3 { await admitted(throttle, address)?.settle(refund: false) }
        #expect(await throttled(throttle, address)?.1 == true)
    }

    @Test("the try is taken when the Hello starts: parallel Hellos beyond `burst` wait, then are refused")
    func takenAtStart() async {
        let clock = ManualClock()
        let throttle = throttle(burst: 3, perMinute: 1, clock: clock)
        let address = "10.0.0.1:1000"
        var tickets: [AuthenticationThrottle.Ticket] = []
        for _ in 0..<3 { if let ticket = await admitted(throttle, address) { tickets.append(ticket) } }
        #expect(throttle.triesLeft(SourceAddressGroup(remoteAddress: address)) < 1)
        // Five more arrive while the three are being checked: they wait.
        let late = (0..<5).map { _ in
            Task { await throttle.admit(SourceAddressGroup(remoteAddress: address)) }
        }
        await waitForWaiters(throttle, address, 5)
        for ticket in tickets { ticket.settle(refund: false) }
        var refused = 0
        var startsThrottling = 0
        for task in late {
            if case .throttled(_, let starts) = await task.value {
                refused += 1
                if starts { startsThrottling += 1 }
            }
        }
        #expect(refused == 5)
        #expect(startsThrottling == 1)
    }

    @Test("a success gives its try back: a waiting Hello then goes ahead; good Hellos beyond `burst` all pass")
    func successRefunds() async {
        let clock = ManualClock()
        let throttle = throttle(burst: 2, perMinute: 1, clock: clock)
        let address = "10.0.0.1:1000"
        let group = SourceAddressGroup(remoteAddress: address)
        // Twenty good Hellos at once, two checked at a time, each succeeding.
        let hellos = (0..<20).map { _ in
            Task { () -> Bool in
                guard case .admitted(let ticket) = await throttle.admit(group) else { return false }
                await Task.yield()
                ticket.settle(refund: true)
                return true
            }
        }
        var passed = 0
        for hello in hellos where await hello.value { passed += 1 }
        #expect(passed == 20)
        #expect(throttle.triesLeft(group) == 2)
        #expect(throttle.trackedAddresses == 0, "a full bucket is forgotten")

        // One failure, then a success: one try left, not zero.
        await admitted(throttle, address)?.settle(refund: false)
        await admitted(throttle, address)?.settle(refund: true)
        #expect(throttle.triesLeft(group) == 1)
    }

    @Test("a Hello whose ticket is dropped unsettled, or that is cancelled while checked, counts as failed")
    func abandonedCounts() async {
        let clock = ManualClock()
        let throttle = throttle(burst: 2, perMinute: 1, clock: clock)
        let address = "10.0.0.1:1000"
        let group = SourceAddressGroup(remoteAddress: address)
        do {
            let ticket = await admitted(throttle, address)
            #expect(ticket != nil)
        }  // dropped without settling
        #expect(throttle.triesLeft(group) == 1)

        // A Hello waiting for a try is cancelled (its caller's deadline passed): it gets .cancelled,
        // and leaves the queue.
        let held = await admitted(throttle, address)
        let waiter = Task { await throttle.admit(group) }
        await waitForWaiters(throttle, address, 1)
        waiter.cancel()
        if case .cancelled = await waiter.value {} else { Issue.record("expected .cancelled") }
        #expect(throttle.waiting(group) == 0)
        held?.settle(refund: false)
        #expect(await throttled(throttle, address) != nil)
    }

    @Test("IPv6 addresses in one /64 share a bucket; another /64 has its own; IPv4-mapped is IPv4")
    func ipv6Prefix() async {
        let clock = ManualClock()
        let throttle = throttle(burst: 2, perMinute: 1, clock: clock)
        await admitted(throttle, "[2001:db8:1:2::1]:5000")?.settle(refund: false)
        await admitted(throttle, "[2001:db8:1:2:aaaa::7]:5001")?.settle(refund: false)
        let refused = await throttled(throttle, "[2001:db8:1:2:ffff:ffff:ffff:ffff]:5002")
        #expect(refused?.1 == true)
        await admitted(throttle, "[2001:db8:1:3::1]:5000")?.settle(refund: false)

        await admitted(throttle, "[::ffff:192.0.2.7]:1")?.settle(refund: false)
        await admitted(throttle, "192.0.2.7:2")?.settle(refund: false)
        #expect(await throttled(throttle, "192.0.2.7:3") != nil)
        #expect(await throttled(throttle, "[::ffff:192.0.2.7]:4") != nil)
    }

    @Test("memory stays bounded whatever the number of addresses")
    func bounded() async {
        let clock = ManualClock()
        let throttle = throttle(burst: 5, perMinute: 1, clock: clock)
        for index in 0..<(AuthenticationThrottle.maximumTrackedAddresses + 2_500) {
            await admitted(throttle, "10.\(index >> 16).\((index >> 8) & 255).\(index & 255):1")?
                .settle(refund: false)
        }
        #expect(throttle.trackedAddresses <= AuthenticationThrottle.maximumTrackedAddresses)
        // The newest address is still tracked.
        let last = AuthenticationThrottle.maximumTrackedAddresses + 2_499
        let address = "10.\(last >> 16).\((last >> 8) & 255).\(last & 255):1"
        for _ in 0..<4 { await admitted(throttle, address)?.settle(refund: false) }
        #expect(await throttled(throttle, address) != nil)
    }

    @Test("a gateway over its limit answers AUTH_THROTTLED, even to a good token; one audit record, not one per try")
    func endToEnd() async throws {
        let strict: (inout GatewayConfiguration) -> Void = {
            var limit = AuthSettings.FailureLimit()
            limit.burst = 3
            limit.perMinute = 1
            $0.auth.failedAuthentications = limit
        }
        try await withGateway(.sqlite, "throttle", configure: strict) { gateway in
            // Authenticated before the flood: an established connection is not affected.
            let admin = try gateway.client(token: gateway.adminToken)
            defer { Task { await admin.shutdown() } }
            _ = try await admin.serverInfo()

            let forged = "hsmgw_" + String(repeating: "A", count: 43)
            for _ in 0..<3 {
                let stranger = try gateway.client(token: forged)
                await expectStatus(.unauthenticated) { try await stranger.serverInfo() }
                await stranger.shutdown()
            }
            for token in [gateway.adminToken] + Array(repeating: forged, count: 20) {
                let client = try gateway.client(token: token)
                let error = await gatewayError { try await client.serverInfo() }
                #expect(error?.code == .resourceExhausted, "\(String(describing: error))")
                #expect(error?.reason == StatusReason.authThrottled)
                #expect(error?.message.contains("retry in") == true)
                await client.shutdown()
            }

            await gateway.app.handler.flushRefusedHelloAudit()
            let refusals = try await admin.listAuditRecords(limit: 1000).filter {
                $0.operation == "access.authenticate"
            }
            #expect(refusals.filter { $0.detail.contains("reason=unknown-token") }.count == 3)
            let started = refusals.filter { $0.detail.contains("reason=throttled") }
            #expect(started.count == 1, "\(refusals.map(\.detail))")
            #expect(started.first?.detail.contains("source=127.0.0.1 burst=3 per-minute=1") == true)
            #expect(refusals.count == 4)
            // The established connection still works.
            #expect(try await admin.serverInfo().principal == "admin")
        }
    }
}
