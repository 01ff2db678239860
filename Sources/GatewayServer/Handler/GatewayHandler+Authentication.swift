import GatewayTransport
import GatewayWire
import KeyHierarchy
import Logging

extension GatewayHandler {
    /// What a refused Hello says, whatever the reason: a caller cannot tell an unknown token from
    /// a revoked one, or a token from a certificate problem.
    static let authenticationFailed = RequestFailure(.unauthenticated, AuthenticationFailure.clientMessage)

    /// Authenticates a connection: the API token, the client certificate's CN, or both (then
    /// they must name the same principal). Refusals are audited (through the bounded
    /// `RefusedHelloAudit` path) and answered UNAUTHENTICATED with one message whatever the
    /// reason. Every Hello takes a try from its source address's throttle before its credentials
    /// are looked at; an address without tries left is answered RESOURCE_EXHAUSTED
    /// (`AUTH_THROTTLED`) for a while, without a check or an audit record each.
    public func hello(_ request: IncomingRequest) async -> HelloOutcome {
        let requestID = Self.requestID(request)
        var logger = self.logger
        logger[metadataKey: "request-id"] = "\(requestID)"
        logger[metadataKey: "remote"] = "\(request.connection.remoteAddress)"
        let address = SourceAddressGroup(remoteAddress: request.connection.remoteAddress)
        var ticket: AuthenticationThrottle.Ticket?
        if let throttle {
            switch await throttle.admit(address) {
            case .admitted(let admitted):
                ticket = admitted
            case .throttled(let wait, let startsThrottling):
                let seconds = max(1, Int(wait.components.seconds) + (wait.components.attoseconds > 0 ? 1 : 0))
                logger.info("handshake throttled", metadata: ["retry-after-s": "\(seconds)"])
                if startsThrottling {
                    logger.warning(
                        "throttling an address after repeated failed authentications",
                        metadata: ["source": "\(address)"])
                    auditRefusedHello(
                        principal: .unauthenticated,
                        reason: "throttled source=\(address) burst=\(throttle.limit.burst) "
                            + "per-minute=\(throttle.limit.perMinute)",
                        method: request.method,
                        requestID: requestID
                    )
                }
                return .refused(
                    RequestFailure(
                        .resourceExhausted,
                        "too many failed authentications from this address; retry in \(seconds) s",
                        reason: StatusReason.authThrottled
                    ).response)
            case .cancelled:
                // The transport has answered the caller already (cancel, deadline).
                return .refused(RequestFailure(.cancelled, "the Hello was cancelled").response)
            }
        }
        do {
            let accepted = try await authenticateHello(request, requestID: requestID, logger: logger)
            ticket?.settle(refund: true)
            logger.info(
                "connection authenticated",
                metadata: [
                    "principal": "\(accepted.peer.principal)",
                    "token-id": "\(accepted.peer.apiTokenID ?? "-")",
                    "client": "\(accepted.peer.clientName)",
                ]
            )
            return .accepted(accepted.peer, response: WireMapping.ok(accepted.response))
        } catch let failure as RequestFailure {
            // A Hello refused before any credential was looked at (malformed, a bad client name)
            // cost nothing and gives its try back; every other refusal keeps it spent.
            ticket?.settle(refund: failure.status == .invalidArgument)
            logger.info("handshake refused", metadata: ["status": "\(failure.status)"])
            return .refused(failure.response)
        } catch let error as KeyServiceError {
            // Not checked (the store failed): still spent, or an outage would let a flood through.
            ticket?.settle(refund: false)
            return .refused(failureResponse(error, logger: logger))
        } catch {
            ticket?.settle(refund: false)
            logger.error("unexpected error in handshake", metadata: ["error-type": "\(type(of: error))"])
            return .refused(RequestFailure(.internalError, "internal error").response)
        }
    }

    private func authenticateHello(
        _ request: IncomingRequest,
        requestID: String,
        logger: Logger
    ) async throws -> (peer: AuthenticatedPeer, response: Hsmgw_V1_HelloResponse) {
        let hello: Hsmgw_V1_HelloRequest
        do {
            hello = try Hsmgw_V1_HelloRequest(wirePayload: request.payload)
        } catch {
            throw RequestFailure.malformedPayload
        }
        // The name is logged as it is: nothing that could break or forge a log line.
        guard ClientNameRule.isValid(hello.clientName) else {
            throw RequestFailure(
                .invalidArgument, "client_name must be \(ClientNameRule.summary)",
                reason: StatusReason.invalidClientName)
        }
        let commonName = request.connection.clientCertificateCommonName
        var byToken: AuthenticatedCaller?
        var byCertificate: AuthenticatedCaller?
        // Refusals are audited off the key operations' path (`RefusedHelloAudit`).
        let refusalAudit = RefusalAudit.handedOff { [refusedHelloAudit] in refusedHelloAudit.enqueue($0) }
        if !hello.apiToken.isEmpty {
            switch try await service.authenticate(
                apiToken: hello.apiToken, requestID: requestID, refusalAudit: refusalAudit)
            {
            case .authenticated(let caller): byToken = caller
            case .refused: throw Self.authenticationFailed  // audited by the service
            }
        }
        if let commonName {
            switch try await service.authenticate(
                certificateCommonName: commonName, requestID: requestID, refusalAudit: refusalAudit)
            {
            case .authenticated(let caller): byCertificate = caller
            case .refused: throw Self.authenticationFailed  // audited by the service
            }
        }
        let caller: AuthenticatedCaller
        switch (byToken, byCertificate) {
        case (nil, nil):
            auditRefusedHello(
                principal: .unauthenticated, reason: "no-credentials", method: request.method, requestID: requestID)
            throw Self.authenticationFailed
        case (let token?, let certificate?):
            guard token.principal.name == certificate.principal.name else {
                auditRefusedHello(
                    principal: token.principal.name.principal,
                    reason: "token-and-certificate-differ",
                    method: request.method,
                    requestID: requestID
                )
                throw Self.authenticationFailed
            }
            caller = token
        case (let token?, nil):
            caller = token
        case (nil, let certificate?):
            caller = certificate
        }
        let peer = AuthenticatedPeer(
            principal: caller.principal.name.rawValue,
            apiTokenID: caller.token?.id.rawValue,
            clientName: hello.clientName
        )
        accessCache.store(
            AccessCache.Snapshot(principal: caller.principal, token: caller.token),
            for: AccessCache.Key(principal: peer.principal, tokenID: peer.apiTokenID)
        )
        var response = Hsmgw_V1_HelloResponse()
        response.serverVersion = options.serverVersion
        response.instanceID = options.instanceID
        response.principal = peer.principal
        response.maxFrameBytes = UInt32(clamping: options.limits.maxFrameBytes)
        response.maxRequestsInFlight = UInt32(clamping: options.limits.maxRequestsInFlightPerConnection)
        response.keepaliveSeconds = UInt32(clamping: options.limits.keepaliveInterval.components.seconds)
        response.roles = caller.principal.roles.map(WireMapping.roleBinding)
        return (peer, response)
    }

    /// The caller's current principal and token, re-checked at most `accessCacheTTL` ago: a
    /// revoked or expired token, or a disabled principal, is refused (UNAUTHENTICATED, audited).
    func currentCaller(
        _ peer: AuthenticatedPeer,
        request: IncomingRequest,
        requestID: String
    ) async throws -> AccessCache.Snapshot {
        let service = self.service
        let snapshot = try await accessCache.snapshot(
            for: AccessCache.Key(principal: peer.principal, tokenID: peer.apiTokenID)
        ) { () async throws -> AccessCache.Snapshot in
            let name = PrincipalName(trusted: peer.principal)
            var token: APITokenRecord?
            if let tokenID = peer.apiTokenID {
                token = try await service.apiToken(APITokenID(trusted: tokenID))
            }
            return AccessCache.Snapshot(principal: try await service.principal(name), token: token)
        }
        var failure: AuthenticationFailure?
        var reason = ""
        if let token = snapshot.token, let tokenFailure = token.failure(at: .now()) {
            failure = tokenFailure
            reason = tokenFailure == .revokedToken ? StatusReason.tokenRevoked : StatusReason.tokenExpired
        } else if snapshot.principal.disabled {
            failure = .principalDisabled
        }
        guard let failure else { return snapshot }
        await auditAuthenticationFailure(
            principal: Principal(peer.principal),
            reason: failure.name,
            method: request.method,
            requestID: requestID,
            tokenID: peer.apiTokenID
        )
        throw RequestFailure(.unauthenticated, AuthenticationFailure.clientMessage, reason: reason)
    }

    /// Queues the audit record of a refused Hello on the bounded path (`RefusedHelloAudit`);
    /// never waits.
    func auditRefusedHello(principal: Principal, reason: String, method: GatewayWire.Method, requestID: String) {
        refusedHelloAudit.enqueue(
            KeyService.accessFailureEvent(
                .authentication,
                principal: principal,
                tenant: nil,
                operation: method.description,
                reason: reason,
                request: RequestContext(principal: principal, requestID: requestID)
            ))
    }

    func auditAuthenticationFailure(
        principal: Principal,
        reason: String,
        method: GatewayWire.Method,
        requestID: String,
        tokenID: String? = nil
    ) async {
        do {
            try await service.recordAccessFailure(
                .authentication,
                principal: principal,
                tenant: nil,
                operation: method.description,
                reason: reason + (tokenID.map { " token-id=\($0)" } ?? ""),
                request: RequestContext(principal: principal, requestID: requestID)
            )
        } catch {
            logger.error(
                "could not audit a refused authentication",
                metadata: ["request-id": "\(requestID)", "error": "\(error.logDescription)"]
            )
        }
    }
}
