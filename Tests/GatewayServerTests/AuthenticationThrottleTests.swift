import Foundation
import GatewayClient
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

    @Test("an address may fail `burst` times, then waits one refill period per further try")
    func bucket() {
        let clock = ManualClock()
        let throttle = throttle(burst: 3, perMinute: 60, clock: clock)
        #expect(throttle.waitBeforeNextTry("10.0.0.1") == nil)
        #expect(!throttle.recordFailure("10.0.0.1"))
        #expect(!throttle.recordFailure("10.0.0.1"))
        #expect(throttle.waitBeforeNextTry("10.0.0.1") == nil)
        #expect(throttle.recordFailure("10.0.0.1"), "the third failure uses the last try")
        #expect(close(throttle.waitBeforeNextTry("10.0.0.1"), .seconds(1)))
        // Another address is not affected.
        #expect(throttle.waitBeforeNextTry("10.0.0.2") == nil)

        clock.advance(.milliseconds(400))
        #expect(close(throttle.waitBeforeNextTry("10.0.0.1"), .milliseconds(600)))
        clock.advance(.milliseconds(601))
        #expect(throttle.waitBeforeNextTry("10.0.0.1") == nil)
        // One try earned, one used: throttled again at once, and that is a new start.
        #expect(throttle.recordFailure("10.0.0.1"))
        #expect(throttle.waitBeforeNextTry("10.0.0.1") != nil)

        // The bucket refills to `burst`, never beyond.
        clock.advance(.seconds(3600))
        for _ in 0..<2 { #expect(!throttle.recordFailure("10.0.0.1")) }
        #expect(throttle.recordFailure("10.0.0.1"))
    }

    @Test("memory stays bounded whatever the number of addresses")
    func bounded() {
        let clock = ManualClock()
        let throttle = throttle(burst: 5, perMinute: 1, clock: clock)
        for index in 0..<(AuthenticationThrottle.maximumTrackedAddresses + 2_500) {
            _ = throttle.recordFailure("10.\(index >> 16).\((index >> 8) & 255).\(index & 255)")
        }
        #expect(throttle.trackedAddresses <= AuthenticationThrottle.maximumTrackedAddresses)
        // The newest address is still tracked.
        let last = AuthenticationThrottle.maximumTrackedAddresses + 2_499
        for _ in 0..<4 { _ = throttle.recordFailure("10.\(last >> 16).\((last >> 8) & 255).\(last & 255)") }
        #expect(throttle.waitBeforeNextTry("10.\(last >> 16).\((last >> 8) & 255).\(last & 255)") != nil)
    }

    @Test("the source address drops the port: IPv4, IPv6, Unix socket")
    func sourceAddress() {
        #expect(AuthenticationThrottle.sourceAddress("192.0.2.7:51234") == "192.0.2.7")
        #expect(AuthenticationThrottle.sourceAddress("[2001:db8::1]:443") == "2001:db8::1")
        #expect(AuthenticationThrottle.sourceAddress("unix") == "unix")
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
