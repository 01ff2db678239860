import Foundation
import PKCS11

// The rules that differ between HSM families (docs/hsm/): which family this is, session limits,
// the token's flags, CKA_SENSITIVE/CKA_EXTRACTABLE enforcement, and who must make GCM IVs.
extension Preflight {
    /// The family from `--family`, else detected from the module's and token's identity.
    func checkFamily(_ token: TokenInfo, into report: inout PreflightReport) -> HSMFamily {
        let identity = [
            report.module?.manufacturer ?? "", report.module?.description ?? "", token.manufacturer, token.model,
        ]
        let family = options.family ?? HSMFamily.detect(identity)
        let forced = options.family != nil
        report.family = .init(name: family, forced: forced, docs: family.docsPage)
        let seen = "manufacturer \"\(token.manufacturer)\", model \"\(token.model)\""
        if family == .generic {
            report.warn(
                "HSM family",
                "not recognised from \(seen): only the generic rules apply (give --family to check a family's)",
                docs: family.docsPage
            )
        } else {
            report.pass(
                "HSM family", "\(family.displayName), \(forced ? "from --family" : "detected from \(seen)")",
                docs: family.docsPage)
        }
        return family
    }

    /// The token's RNG flag and its session limit against `hsm.sessions.max`.
    func checkTokenFlags(_ token: TokenInfo, family: HSMFamily, into report: inout PreflightReport) {
        if !token.hasRNG {
            report.warn(
                "token RNG",
                "the token does not set CKF_RNG; the gateway draws data keys (and, with hsm.gcm_iv: gateway, IVs) "
                    + "from C_GenerateRandom",
                docs: family.docsPage)
        } else {
            report.pass("token RNG", "CKF_RNG set")
        }
        let configured = options.settings.maximumSessions
        var limit = token.maximumSessionCount.count.flatMap { $0 > 0 ? $0 : nil }
        var source = "the token's ulMaxSessionCount"
        if let documented = family.documentedSessionLimit, documented < (limit ?? .max) {
            limit = documented
            source = "\(family.displayName)'s documented limit, shared by every application on the device"
        }
        if let limit, configured > limit {
            report.warn(
                "session limit",
                "hsm.sessions.max \(configured) is above \(source) (\(limit)): sessions past it fail with "
                    + "CKR_SESSION_COUNT; lower hsm.sessions.max",
                docs: family.docsPage)
        } else {
            report.pass(
                "session limit",
                "hsm.sessions.max \(configured), the token allows \(limit.map { "\($0)" } ?? "\(token.maximumSessionCount)")"
            )
        }
    }

    /// A sensitive, non-extractable session key must stay inside: its value unreadable, its
    /// attributes as asked for, and a wrap of it refused.
    func checkSensitiveEnforcement(
        _ session: borrowing Session,
        family: HSMFamily,
        into report: inout PreflightReport
    ) {
        let name = "CKA_SENSITIVE/CKA_EXTRACTABLE"
        do {
            let key = try Self.sessionAESKey(session, usage: [.encrypt(true), .decrypt(true)])
            defer { try? session.destroyObject(key) }
            let read = try session.attributes([.sensitive, .extractable], of: key)
            guard read.bool(.sensitive) == true, read.bool(.extractable) == false else {
                report.fail(
                    name, "a key generated sensitive and non-extractable reads back otherwise", docs: family.docsPage)
                return
            }
            do {
                _ = try session.secretValue(of: key)
                report.fail(name, "the token revealed CKA_VALUE of a sensitive key", docs: family.docsPage)
                return
            } catch let error as PKCS11Error where error.function == .getAttributeValue {
                // Refused, as it must be (CKR_ATTRIBUTE_SENSITIVE on conforming tokens).
            }
            let wrapper = try Self.sessionAESKey(session, usage: [.wrap(true), .unwrap(true)])
            defer { try? session.destroyObject(wrapper) }
            for mechanism in [Mechanism.aesKeyWrapPad, .aesKeyWrap] {
                do {
                    _ = try session.wrapKey(key, with: wrapper, mechanism: mechanism)
                    report.fail(
                        name, "the token wrapped a non-extractable key with \(mechanism)", docs: family.docsPage)
                    return
                } catch let error as PKCS11Error where error.function == .wrapKey {
                    continue
                }
            }
            report.pass(name, "a sensitive, non-extractable key's value cannot be read or wrapped out")
        } catch {
            report.fail(name, "\(error)", docs: family.docsPage)
        }
    }

    /// Who can make GCM IVs on this token, against `hsm.gcm_iv`: an encryption with an IV chosen
    /// by the caller is tried under a session key. An HSM in FIPS mode refuses it
    /// (`CKR_MECHANISM_PARAM_INVALID`), and then only `token` works; a module that takes it does
    /// not generate one, and then `token` fails. Returns the source the round trip should use, nil when
    /// the configured one does not work.
    func checkGCMIVSource(
        _ session: borrowing Session,
        family: HSMFamily,
        into report: inout PreflightReport
    ) -> GCMIVSource? {
        let name = "GCM IV source (hsm.gcm_iv)"
        let configured = options.settings.gcmIV
        let docs = family == .generic ? "docs/hsm/README.md" : family.docsPage
        if let documented = family.documentedGCMIV, documented != configured {
            report.warn(
                "GCM IV convention",
                "\(family.displayName) generates GCM IVs itself: its page says hsm.gcm_iv: \(documented)",
                docs: docs)
        }
        let callerIVAccepted: Bool
        do {
            let key = try Self.sessionAESKey(session, usage: [.encrypt(true), .decrypt(true)])
            defer { try? session.destroyObject(key) }
            let iv = try session.generateRandom(count: Session.gcmIVByteCount)
            do {
                _ = try session.encryptAESGCM(key: key, iv: iv, aad: [], plaintext: [UInt8](repeating: 0, count: 16))
                callerIVAccepted = true
            } catch let error as PKCS11Error
                where error.function == .encryptInit && error.returnValue == .mechanismParamInvalid
            {
                callerIVAccepted = false
            }
            switch (configured, callerIVAccepted) {
            case (.gateway, true):
                report.pass(name, "gateway: the token accepts IVs drawn by the gateway from its RNG")
                return .gateway
            case (.gateway, false):
                report.fail(
                    name,
                    "the token refuses an AES-GCM IV chosen by the caller (CKR_MECHANISM_PARAM_INVALID from "
                        + "C_EncryptInit: an HSM in FIPS mode that generates IVs itself): set hsm.gcm_iv: token",
                    docs: docs)
                return nil
            case (.token, _):
                let first = try session.sealAESGCMWithTokenIV(
                    key: key, aad: [], plaintext: [UInt8](repeating: 0, count: 16))
                let second = try session.sealAESGCMWithTokenIV(
                    key: key, aad: [], plaintext: [UInt8](repeating: 0, count: 16))
                guard first.iv != second.iv else {
                    report.fail(name, "token: the module returned the same IV twice", docs: docs)
                    return .token
                }
                report.pass(
                    name,
                    "token: the module generates the IV"
                        + (callerIVAccepted ? " (it also accepts caller IVs: gateway would work too)" : " (FIPS mode)"))
                return .token
            case (.message, _):
                let first = try session.sealAESGCMWithMessageGenerator(
                    key: key, aad: [], plaintext: [UInt8](repeating: 0, count: 16))
                let second = try session.sealAESGCMWithMessageGenerator(
                    key: key, aad: [], plaintext: [UInt8](repeating: 0, count: 16))
                guard first.iv != second.iv else {
                    report.fail(name, "message: the module's IV generator returned the same IV twice", docs: docs)
                    return .message
                }
                report.pass(name, "message: the module's PKCS#11 3.0 IV generator makes the IV")
                return .message
            }
        } catch let error as PKCS11Error where error.code == .ivNotGenerated {
            report.fail(
                name, "token: \(error.detail ?? "the module did not generate the IV"): set hsm.gcm_iv: gateway",
                docs: docs)
            return nil
        } catch {
            report.fail(name, "\(error)", docs: docs)
            return nil
        }
    }
}
