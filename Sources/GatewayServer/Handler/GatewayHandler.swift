import Foundation
import GatewayTransport
import GatewayWire
import KeyHierarchy
import Logging
import NIOCore
import SwiftProtobuf

/// What `ServerInfo` reports about the server's health; supplied by the server assembly.
public struct ServerStatus: Sendable, Hashable {
    /// Ready to serve: the token and the store answer.
    public var ready: Bool
    /// The token answers a session call.
    public var tokenReachable: Bool
    /// The store answers a read.
    public var storeReachable: Bool
    /// Connections open on this instance.
    public var openConnections: Int

    /// A status report.
    public init(ready: Bool, tokenReachable: Bool, storeReachable: Bool, openConnections: Int) {
        self.ready = ready
        self.tokenReachable = tokenReachable
        self.storeReachable = storeReachable
        self.openConnections = openConnections
    }
}

/// Runs tenant-scoped work under per-tenant fair admission; throws a `RequestFailure`
/// (RESOURCE_EXHAUSTED, reason OVERLOADED) when the tenant's queue is full or the wait too long.
typealias TenantAdmission =
    @Sendable (
        _ tenant: TenantID,
        _ work: @escaping @Sendable () async -> OutgoingResponse
    ) async -> OutgoingResponse

/// The gateway's logic behind the transport: authenticates the handshake, re-checks credentials
/// on every request, decodes and validates each method's message, authorises it against the
/// caller's roles, runs it on the key service (tenant-scoped work under fair admission), and maps
/// the result or the error to the wire.
///
/// Never in a response: key-service `underlying` details, `CK_RV` values, SQL, labels. Refused
/// authentications and authorisations are audited.
public final class GatewayHandler: GatewayRequestHandler {
    /// Fixed facts and settings of the server that the handler reports or applies.
    public struct Options: Sendable {
        /// Reported in `Hello` and `ServerInfo`.
        public var serverVersion: String
        /// Reported in `Hello` and `ServerInfo`.
        public var instanceID: String
        /// `sqlite` or `postgres`, reported in `ServerInfo`.
        public var storeKind: String
        /// The limits the transport enforces, reported in `Hello`.
        public var limits: ServerLimits
        /// How long a credential check is trusted (at most 2 s).
        public var accessCacheTTL: Duration
        /// How fast started rewrap jobs run.
        public var rewrap: RewrapSettings
        /// Refused authentications allowed per source address (`AuthenticationThrottle`); nil:
        /// no limit.
        public var failedAuthentications: AuthSettings.FailureLimit?
        /// The time token expiry is checked against (`GatewayLaunch.wallClock`).
        public var wallClock: @Sendable () -> Timestamp

        /// Options; the access-cache lifetime is capped at 2 s.
        public init(
            serverVersion: String,
            instanceID: String,
            storeKind: String,
            limits: ServerLimits = ServerLimits(),
            accessCacheTTL: Duration = AuthSettings.maximumAccessCacheTTL,
            rewrap: RewrapSettings = RewrapSettings(),
            failedAuthentications: AuthSettings.FailureLimit? = AuthSettings.FailureLimit(),
            wallClock: @escaping @Sendable () -> Timestamp = { .now() }
        ) {
            self.wallClock = wallClock
            self.serverVersion = serverVersion
            self.instanceID = instanceID
            self.storeKind = storeKind
            self.limits = limits
            self.accessCacheTTL = min(accessCacheTTL, AuthSettings.maximumAccessCacheTTL)
            self.rewrap = rewrap
            self.failedAuthentications = failedAuthentications
        }
    }

    let service: KeyService
    let options: Options
    let accessCache: AccessCache
    let throttle: AuthenticationThrottle?
    /// Where the audit records of refused Hellos wait to be written, off the key operations' path.
    let refusedHelloAudit: RefusedHelloAudit
    let rewrapJobs: RewrapJobRunner
    /// The seal; nil for handlers built without one (tests), which are never sealed.
    let seal: SealController?
    let admission: TenantAdmission
    let status: @Sendable () async -> ServerStatus
    let logger: Logger
    let startedAt = ContinuousClock.now

    /// A handler over `service`. `admission` runs tenant-scoped work (nil: run it at once);
    /// `status` answers `ServerInfo`; `rewrapJobs` runs the jobs `StartRewrapJob` starts;
    /// `refusedHelloAudit` writes the records of refused Hellos (nil: one without metrics).
    init(
        service: KeyService,
        options: Options,
        rewrapJobs: RewrapJobRunner,
        admission: TenantAdmission? = nil,
        refusedHelloAudit: RefusedHelloAudit? = nil,
        seal: SealController? = nil,
        status: @escaping @Sendable () async -> ServerStatus,
        logger: Logger
    ) {
        self.seal = seal
        self.service = service
        self.options = options
        self.accessCache = AccessCache(ttl: options.accessCacheTTL)
        self.throttle = options.failedAuthentications.map { AuthenticationThrottle(limit: $0) }
        self.refusedHelloAudit =
            refusedHelloAudit ?? RefusedHelloAudit(service: service, registry: nil, logger: logger)
        self.rewrapJobs = rewrapJobs
        self.admission = admission ?? { _, work in await work() }
        self.status = status
        self.logger = logger
    }

    /// Waits until the audit records of the Hellos refused so far are written (or counted as
    /// dropped): they are written after the refusal is answered (`RefusedHelloAudit`). The server
    /// calls it before it closes the store.
    public func flushRefusedHelloAudit() async {
        await refusedHelloAudit.flush()
    }

    /// One authenticated request on its way through: who asks and under which request id.
    struct Call: Sendable {
        let request: IncomingRequest
        let peer: AuthenticatedPeer
        let caller: AccessCache.Snapshot
        let requestID: String

        var context: RequestContext { RequestContext(principal: Principal(peer.principal), requestID: requestID) }
        var roles: [KeyHierarchy.RoleBinding] { caller.principal.roles }
    }

    /// `<connection id>-<request id>`: unique within this process, and it ties an audit record
    /// to the server log's connection lines.
    static func requestID(_ request: IncomingRequest) -> String {
        "\(request.connection.id)-\(request.requestID)"
    }

    // MARK: - Requests

    /// Answers one request of an authenticated connection (see `GatewayRequestHandler`).
    public func handle(_ request: IncomingRequest, peer: AuthenticatedPeer) async -> OutgoingResponse {
        let requestID = Self.requestID(request)
        var logger = self.logger
        logger[metadataKey: "request-id"] = "\(requestID)"
        logger[metadataKey: "method"] = "\(request.method)"
        logger[metadataKey: "principal"] = "\(peer.principal)"
        guard let scope = request.method.scope else {
            logger.debug("unknown method")
            return RequestFailure(.unimplemented, "method \(request.method.rawValue) is not implemented").response
        }
        guard scope != .handshake else {
            return RequestFailure(.failedPrecondition, "the connection is already authenticated").response
        }
        do {
            let caller = try await currentCaller(peer, request: request, requestID: requestID)
            let call = Call(request: request, peer: peer, caller: caller, requestID: requestID)
            let response = try await dispatch(call)
            logger.debug("answered", metadata: ["status": "\(response.status)"])
            return response
        } catch let failure as RequestFailure {
            logger.debug("refused", metadata: ["status": "\(failure.status)", "reason": "\(failure.reason)"])
            return failure.response
        } catch let error as KeyServiceError {
            return failureResponse(error, logger: logger)
        } catch {
            logger.error("unexpected error", metadata: ["error-type": "\(type(of: error))"])
            return RequestFailure(.internalError, "internal error").response
        }
    }

    func failureResponse(_ error: KeyServiceError, logger: Logger) -> OutgoingResponse {
        let failure = RequestFailure(error)
        switch failure.status {
        case .internalError, .dataLoss, .unavailable:
            logger.warning(
                "key service failed", metadata: ["status": "\(failure.status)", "error": "\(error.logDescription)"])
        default:
            logger.debug("key service refused", metadata: ["status": "\(failure.status)"])
        }
        return failure.response
    }

    /// Decodes the method's request message; a payload that does not decode is MALFORMED_PAYLOAD.
    /// Repeated fields over their limits are refused before decoding (`RequestEntryLimits`).
    func decode<M: SwiftProtobuf.Message>(_ type: M.Type, _ call: Call) throws -> M {
        try RequestEntryLimits.check(type, call.request.payload)
        do {
            return try M(wirePayload: call.request.payload)
        } catch {
            throw RequestFailure.malformedPayload
        }
    }

    /// Parses a tenant id from a request field.
    func tenantID(_ text: String) throws -> TenantID {
        try TenantID(text)
    }

    /// Checks that the caller's roles allow `action` (on `tenant` for tenant-scoped actions); a
    /// refusal is audited and answered PERMISSION_DENIED, whether or not the tenant exists.
    func authorize(_ action: AccessAction, tenant: TenantID?, _ call: Call) async throws {
        guard !AccessPolicy.allows(call.roles, action, tenant: tenant) else { return }
        do {
            try await service.recordAccessFailure(
                .authorization,
                principal: Principal(call.peer.principal),
                tenant: tenant,
                operation: call.request.method.description,
                reason: "action=\(action.rawValue)",
                request: call.context
            )
        } catch {
            // Refused either way; the missing record is an operator's problem, not the caller's.
            logger.error(
                "could not audit a refused authorisation",
                metadata: ["request-id": "\(call.requestID)", "error": "\(error.logDescription)"]
            )
        }
        throw RequestFailure.permissionDenied
    }

    /// Runs tenant-scoped work under the fair scheduler.
    func admitted(
        _ tenant: TenantID,
        _ work: @escaping @Sendable () async throws -> OutgoingResponse
    ) async -> OutgoingResponse {
        let logger = self.logger
        return await admission(tenant) { [self] in
            do {
                return try await work()
            } catch let failure as RequestFailure {
                return failure.response
            } catch let error as KeyServiceError {
                return self.failureResponse(error, logger: logger)
            } catch {
                logger.error("unexpected error", metadata: ["error-type": "\(type(of: error))"])
                return RequestFailure(.internalError, "internal error").response
            }
        }
    }

    /// Runs `work` through the fair scheduler; a refused admission is RESOURCE_EXHAUSTED, reason
    /// OVERLOADED, and a caller cancelled while waiting gets CANCELLED (the transport has already
    /// answered it).
    static func admit(
        _ tenant: TenantID,
        _ work: @escaping @Sendable () async -> OutgoingResponse,
        scheduler: TenantFairScheduler
    ) async -> OutgoingResponse {
        do {
            return try await scheduler.run(tenant: tenant.rawValue) { await work() }
        } catch let error as TenantAdmissionError {
            return RequestFailure(.resourceExhausted, error.message, reason: error.statusReason).response
        } catch {
            return RequestFailure(.cancelled, "cancelled while waiting for admission").response
        }
    }

    // MARK: - Methods (registered in Routes.swift)

    func serverInfo(_ request: Request<Hsmgw_V1_ServerInfoRequest>) async throws -> OutgoingResponse {
        let call = request.call
        let current = await status()
        var response = Hsmgw_V1_ServerInfoResponse()
        response.serverVersion = options.serverVersion
        response.instanceID = options.instanceID
        response.store = options.storeKind
        response.ready = current.ready
        response.sealed = seal?.isSealed ?? false
        response.seal = sealProgress()
        response.tokenReachable = current.tokenReachable
        response.storeReachable = current.storeReachable
        response.uptimeSeconds = UInt64((ContinuousClock.now - startedAt).components.seconds)
        response.openConnections = UInt32(clamping: current.openConnections)
        response.principal = call.peer.principal
        return WireMapping.ok(response)
    }
}
