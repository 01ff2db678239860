import GatewayTransport
import GatewayWire
import NIOCore
import Prometheus
import Testing

/// A connection whose answers are mostly RESOURCE_EXHAUSTED is not read for a moment (its
/// requests wait in its socket instead of costing the gateway work); every request is still
/// answered. A connection refused now and then is never paused.
@Suite("Transport: reading pauses for a connection that keeps being refused")
struct RefusalPauseTests {
    private static func pauses(_ registry: PrometheusCollectorRegistry) -> Int {
        var buffer: [UInt8] = []
        registry.emit(into: &buffer)
        let text = String(decoding: buffer, as: UTF8.self)
        guard
            let line = text.split(separator: "\n").first(where: { $0.hasPrefix("hsmgw_connection_read_pauses_total ") })
        else { return 0 }
        return Int(line.split(separator: " ").last ?? "") ?? 0
    }

    @Test("40 refusals in a row: reading pauses, and all 40 are answered")
    func floodPauses() async throws {
        let registry = PrometheusCollectorRegistry()
        try await withTestServer(allowPlaintext: true, metrics: registry) { address, _ in
            let client = try await TestFrameClient.connect(to: address)
            try await client.hello()
            let clock = ContinuousClock()
            let started = clock.now
            for id in UInt32(2)..<42 {
                try await client.request(id, .listTenants, payload: ByteBuffer(string: "refuse"))
            }
            let frames = try await client.nextFrames(40)
            #expect(frames.count == 40)
            #expect(frames.allSatisfy { $0.status == StatusCode.resourceExhausted.rawValue })
            #expect(Set(frames.map(\.requestID)) == Set(2..<42))
            #expect(Self.pauses(registry) >= 1)
            // At least one pause of 50 ms passed before the last answer.
            #expect(clock.now - started >= .milliseconds(50))
            await client.close()
        }
    }

    @Test("one refusal in five: never paused")
    func occasionalRefusalsDoNotPause() async throws {
        let registry = PrometheusCollectorRegistry()
        try await withTestServer(allowPlaintext: true, metrics: registry) { address, _ in
            let client = try await TestFrameClient.connect(to: address)
            try await client.hello()
            for id in UInt32(2)..<102 {
                try await client.request(id, .listTenants, payload: ByteBuffer(string: id % 5 == 0 ? "refuse" : "ok"))
                _ = try await client.nextFrame()
            }
            #expect(Self.pauses(registry) == 0)
            await client.close()
        }
    }
}
