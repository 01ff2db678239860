import GatewayWire
import Logging
import NIOCore
import NIOSSL

/// A small set of connections to one gateway, opened lazily and replaced when they go.
///
/// A call gets the least busy connection that takes calls. A new connection is opened only when
/// there is none, or when every open one is at its in-flight limit and the pool has room (so one
/// connection serves light traffic, as gRPC channels do). Connections that received a goaway or
/// closed are dropped from the pool at once; they finish their calls in flight on their own.
actor ConnectionPool {
    private let configuration: GatewayClientConfiguration
    private let sslContext: NIOSSLContext?
    private let eventLoopGroup: any EventLoopGroup
    private let logger: Logger

    private var connections: [GatewayConnection] = []
    private var opening: [Int: Task<GatewayConnection, any Error>] = [:]
    private var nextOpeningID = 0
    private var isShutDown = false

    init(
        configuration: GatewayClientConfiguration,
        sslContext: NIOSSLContext?,
        eventLoopGroup: any EventLoopGroup,
        logger: Logger
    ) {
        self.configuration = configuration
        self.sslContext = sslContext
        self.eventLoopGroup = eventLoopGroup
        self.logger = logger
    }

    /// Open connections that take calls (for tests and diagnostics).
    var openConnections: [GatewayConnection] {
        connections.filter(\.isAcceptingCalls)
    }

    /// A connection for the next call.
    func connection() async throws(GatewayError) -> GatewayConnection {
        while true {
            guard !isShutDown else { throw Self.shutDownError }
            connections.removeAll { !$0.isAcceptingCalls }
            let size = connections.count + opening.count
            if let best = connections.min(by: { $0.load < $1.load }), best.hasFreeSlot || size >= configuration.poolSize
            {
                return best
            }
            let task: Task<GatewayConnection, any Error>
            if size < configuration.poolSize {
                task = startOpening()
            } else if let pending = opening.values.first {
                task = pending
            } else {
                // Unreachable: size ≥ poolSize ≥ 1 with no connection means one is opening.
                throw Self.shutDownError
            }
            let connection: GatewayConnection
            do {
                connection = try await task.value
            } catch let error as GatewayError {
                throw error
            } catch {
                throw .notSent(.unavailable, reason: GatewayError.LocalReason.connectFailed, "\(error)")
            }
            if connection.isAcceptingCalls { return connection }
            // It went away between opening and now: choose again.
        }
    }

    /// Stops handing out connections, lets each finish its calls in flight for at most
    /// `drainLimit`, then closes what is left (those calls fail with `UNAVAILABLE`).
    func shutdown(drainLimit: Duration) async {
        isShutDown = true
        var all = connections
        connections.removeAll()
        for task in opening.values {
            if let connection = try? await task.value {
                all.append(connection)
            }
        }
        for connection in all {
            connection.drain()
        }
        await withTaskGroup(of: Void.self) { group in
            for connection in all {
                group.addTask {
                    await withTaskGroup(of: Void.self) { race in
                        race.addTask { await connection.waitUntilClosed() }
                        race.addTask { try? await Task.sleep(for: drainLimit) }
                        await race.next()
                        race.cancelAll()
                    }
                    await connection.close()
                }
            }
        }
    }

    private func startOpening() -> Task<GatewayConnection, any Error> {
        let id = nextOpeningID
        nextOpeningID += 1
        let configuration = self.configuration
        let sslContext = self.sslContext
        let eventLoopGroup = self.eventLoopGroup
        let logger = self.logger
        let task = Task<GatewayConnection, any Error> {
            let result: Result<GatewayConnection, GatewayError>
            do throws(GatewayError) {
                result = .success(
                    try await GatewayConnection.connect(
                        configuration: configuration,
                        sslContext: sslContext,
                        eventLoopGroup: eventLoopGroup,
                        logger: logger
                    )
                )
            } catch {
                result = .failure(error)
            }
            // Book-keeping happens here (the task runs on the pool actor), once, before any
            // waiter resumes.
            self.openingFinished(id, result)
            return try result.get()
        }
        opening[id] = task
        return task
    }

    private func openingFinished(_ id: Int, _ result: Result<GatewayConnection, GatewayError>) {
        opening[id] = nil
        switch result {
        case .success(let connection):
            // After a shutdown, `shutdown` collects it from the task and drains it.
            if !isShutDown {
                connections.append(connection)
            }
        case .failure(let error):
            logger.debug("could not open a gateway connection", metadata: ["error": "\(error)"])
        }
    }

    private static let shutDownError = GatewayError.notSent(
        .unavailable,
        reason: GatewayError.LocalReason.clientShutDown,
        "the client has been shut down"
    )
}
