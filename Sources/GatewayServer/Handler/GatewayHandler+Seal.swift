import GatewayTransport
import GatewayWire
import Sealing
import SecretMemory

extension RequestFailure {
    /// Every method but Hello, ServerInfo and the seal's own while the gateway is sealed.
    static let sealed = RequestFailure(
        .unavailable,
        "the gateway is sealed: key operations resume once enough operators have given their shares",
        reason: StatusReason.sealed)

    /// An unseal or seal call the seal refused; the message names no other share.
    init(_ refusal: UnsealRefusal) {
        switch refusal.code {
        case .malformedShare, .foreignShare, .duplicateShare, .verificationFailed:
            self.init(.invalidArgument, refusal.message, reason: StatusReason.shareRefused)
        case .notSealed:
            self.init(.failedPrecondition, refusal.message)
        case .busy:
            self.init(.aborted, refusal.message)
        default:
            self.init(.internalError, "internal error")
        }
    }
}

extension GatewayHandler {
    /// The seal's state as sent in ServerInfo and the seal methods' answers.
    func sealProgress() -> Hsmgw_V1_SealProgress {
        var message = Hsmgw_V1_SealProgress()
        guard let seal else {
            message.mode = "auto"
            return message
        }
        let progress = seal.progress
        message.mode = seal.mode.name
        message.sealed = seal.isSealed
        message.submitted = UInt32(clamping: progress.submitted)
        message.threshold = UInt32(clamping: progress.threshold)
        message.shareCount = UInt32(clamping: progress.shareCount)
        return message
    }

    private func requireSeal() throws -> SealController {
        guard let seal else {
            throw RequestFailure(.failedPrecondition, "this gateway has no seal (hsm.unseal: auto)")
        }
        return seal
    }

    func unsealSubmitShare(_ request: Request<Hsmgw_V1_UnsealSubmitShareRequest>) async throws -> OutgoingResponse {
        let seal = try requireSeal()
        guard request.message.share.count <= SecretShare.maximumTextLength else {
            throw RequestFailure(
                .invalidArgument, "the share is longer than \(SecretShare.maximumTextLength) characters",
                reason: StatusReason.shareRefused)
        }
        // Into zeroed memory at once; the wire buffers it came in are the transport's.
        let text = SecretBytes(copying: request.message.share)
        logger.notice(
            "unseal share submitted", metadata: ["principal": "\(request.call.peer.principal)"])
        var response = Hsmgw_V1_UnsealSubmitShareResponse()
        do {
            _ = try await seal.submit(shareText: text)
        } catch {
            logger.notice(
                "unseal share refused",
                metadata: ["principal": "\(request.call.peer.principal)", "reason": "\(error.code)"])
            throw RequestFailure(error)
        }
        response.progress = sealProgress()
        return WireMapping.ok(response)
    }

    func unsealReset(_ request: Request<Hsmgw_V1_UnsealResetRequest>) async throws -> OutgoingResponse {
        let seal = try requireSeal()
        let discarded: Bool
        do {
            discarded = try seal.reset().discarded
        } catch {
            throw RequestFailure(error)
        }
        logger.notice(
            "unseal reset", metadata: ["principal": "\(request.call.peer.principal)", "discarded": "\(discarded)"])
        var response = Hsmgw_V1_UnsealResetResponse()
        response.discarded = discarded
        response.progress = sealProgress()
        return WireMapping.ok(response)
    }

    func seal(_ request: Request<Hsmgw_V1_SealRequest>) async throws -> OutgoingResponse {
        let seal = try requireSeal()
        logger.notice("seal requested", metadata: ["principal": "\(request.call.peer.principal)"])
        do {
            _ = try await seal.seal()
        } catch {
            throw RequestFailure(error)
        }
        var response = Hsmgw_V1_SealResponse()
        response.progress = sealProgress()
        return WireMapping.ok(response)
    }
}
