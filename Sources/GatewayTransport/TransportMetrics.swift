import GatewayWire
import Metrics

/// The transport's metrics, made through the factory the owner passes in (never the global
/// `MetricsSystem`, so several servers can share one process). Label values are bounded: method
/// names from the table (`unknown` for any other number), status names, and the fixed refusal
/// reasons.
final class TransportMetrics: Sendable {
    /// Metric names, documented once.
    enum Name {
        /// Counter: responses sent, by `method` and `status`.
        static let requests = "hsmgw_requests_total"
        /// Timer (histogram): time from a request's arrival to its response, by `method`.
        static let requestDuration = "hsmgw_request_duration_seconds"
        /// Meter (gauge): connections open now.
        static let openConnections = "hsmgw_connections_open"
        /// Meter (gauge): handler tasks running now.
        static let requestsInFlight = "hsmgw_requests_in_flight"
        /// Counter: frames or connections the transport refused, by `reason`: a status reason,
        /// or `CLIENT_CERTIFICATE_USAGE` for a client certificate without `clientAuth` (the TLS
        /// handshake fails, no frame is sent).
        static let framesRefused = "hsmgw_frames_refused_total"
        /// Counter: times a connection was not read for a moment because its requests kept being
        /// refused RESOURCE_EXHAUSTED (a caller re-sending into an overloaded gateway).
        static let readPauses = "hsmgw_connection_read_pauses_total"
    }

    private let factory: any MetricsFactory
    private let openConnectionsMeter: Meter
    private let requestsInFlightMeter: Meter

    init(factory: any MetricsFactory) {
        self.factory = factory
        self.openConnectionsMeter = Meter(label: Name.openConnections, factory: factory)
        self.requestsInFlightMeter = Meter(label: Name.requestsInFlight, factory: factory)
    }

    func connectionOpened() { openConnectionsMeter.increment() }
    func connectionClosed() { openConnectionsMeter.decrement() }
    func taskStarted() { requestsInFlightMeter.increment() }
    func taskFinished() { requestsInFlightMeter.decrement() }

    /// A response went out; `duration` is nil for a request refused before it was in flight.
    func requestAnswered(method: Method, status: StatusCode, duration: Duration?) {
        let methodName = method.name ?? "unknown"
        Counter(
            label: Name.requests,
            dimensions: [("method", methodName), ("status", status.name)],
            factory: factory
        ).increment()
        if let duration {
            let (seconds, attoseconds) = duration.components
            let nanoseconds = seconds * 1_000_000_000 + attoseconds / 1_000_000_000
            Timer(label: Name.requestDuration, dimensions: [("method", methodName)], factory: factory)
                .recordNanoseconds(nanoseconds)
        }
    }

    func readPausedForRefusals() {
        Counter(label: Name.readPauses, factory: factory).increment()
    }

    func frameRefused(reason: String) {
        Counter(label: Name.framesRefused, dimensions: [("reason", reason)], factory: factory).increment()
    }
}
