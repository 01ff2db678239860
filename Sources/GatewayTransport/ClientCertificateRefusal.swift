/// Why a client certificate that verified against the client CA is refused all the same. The
/// gateway requires the `clientAuth` extended key usage of every client certificate: BoringSSL's
/// own check (purpose `ssl_client`) refuses a certificate whose extension lacks it, but accepts
/// one with no extension at all, so a CA's server or code-signing certificates without the
/// extension could otherwise log in.
struct ClientCertificateRefusal: Error, Equatable, CustomStringConvertible {
    enum Cause: String, Sendable {
        /// No extendedKeyUsage extension.
        case noExtendedKeyUsage = "no-extended-key-usage"
        /// The extension does not list `clientAuth`.
        case clientAuthMissing = "client-auth-missing"
        /// The certificate (or its extensions) could not be read.
        case unreadable
    }

    /// The `hsmgw_frames_refused_total` reason for these refusals (a metric label; no frame is
    /// sent, the TLS handshake fails).
    static let metricsReason = "CLIENT_CERTIFICATE_USAGE"

    var cause: Cause
    /// The key purposes listed, for the log.
    var purposes: [String] = []
    /// The subject CN, for the log (who holds the certificate); nil when it has none or several.
    var commonName: String?

    /// Nil when `der` lists `clientAuth` in its extendedKeyUsage; otherwise why it is refused.
    /// `anyExtendedKeyUsage` alone does not count: RFC 5280 lets an application require its own
    /// purpose, and BoringSSL's `ssl_client` check refuses it too.
    static func check(certificateDER der: [UInt8]) -> ClientCertificateRefusal? {
        let cause: Cause
        var purposes: [String] = []
        switch ExtendedKeyUsage(certificateDER: der) {
        case nil:
            cause = .unreadable
        case .absent:
            cause = .noExtendedKeyUsage
        case .purposes(let listed):
            guard !listed.contains(ExtendedKeyUsage.clientAuth) else { return nil }
            cause = .clientAuthMissing
            purposes = listed
        }
        return ClientCertificateRefusal(
            cause: cause, purposes: purposes, commonName: CertificateSubject.commonName(fromDER: der))
    }

    var description: String {
        switch cause {
        case .noExtendedKeyUsage:
            return "client certificate refused: it has no extendedKeyUsage extension (clientAuth is required)"
        case .clientAuthMissing:
            return "client certificate refused: its extendedKeyUsage (\(purposes.joined(separator: ", "))) "
                + "does not include clientAuth"
        case .unreadable:
            return "client certificate refused: its extensions cannot be read"
        }
    }
}
