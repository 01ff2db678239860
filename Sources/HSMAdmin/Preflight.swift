import Foundation
import GatewayConfig
import PKCS11

/// `hsm-admin preflight`: everything the gateway needs from a token, checked directly through
/// the PKCS#11 module before the gateway is pointed at it.
public struct Preflight: Sendable {
    /// What to check.
    public struct Options: Sendable {
        public var settings: HSMSettings
        /// Labels that mark gateway master keys; every secret key with it is verified.
        public var labelPrefix: String
        /// AES-GCM encrypt+decrypt round trips to time.
        public var rounds: Int
        /// The HSM family whose rules apply; nil detects it from the module and token identity.
        public var family: HSMFamily?

        /// The most round trips one preflight runs: enough for a stable figure, short enough
        /// that preflight never holds a production token for long.
        public static let maximumRounds = 100_000

        public init(settings: HSMSettings, labelPrefix: String = MasterKeyPolicy.labelPrefix, rounds: Int = 1000) {
            self.settings = settings
            self.labelPrefix = labelPrefix
            self.rounds = rounds
        }
    }

    public let options: Options

    public init(options: Options) {
        self.options = options
    }

    /// Runs every check it can; a failed step stops only the checks that depend on it.
    public func run() -> PreflightReport {
        var report = PreflightReport()
        let settings = options.settings

        if let conf = settings.softHSM2ConfigPath {
            // SoftHSM2 reads the variable in C_Initialize, so it must be set before loading.
            setenv("SOFTHSM2_CONF", conf, 1)
        }
        let module: PKCS11Module
        do {
            module = try PKCS11Module.load(
                path: settings.modulePath, initializeArguments: settings.initializeArguments)
            let info = try module.info()
            report.module = .init(
                path: settings.modulePath,
                manufacturer: info.manufacturer,
                description: info.libraryDescription,
                cryptokiVersion: "\(info.cryptokiVersion)",
                libraryVersion: "\(info.libraryVersion)",
                entryPoint: module.loadedViaGetInterface ? "C_GetInterface" : "C_GetFunctionList"
            )
            report.pass(
                "load module", "\(info.libraryDescription) \(info.libraryVersion), Cryptoki \(info.cryptokiVersion)")
        } catch {
            report.fail("load module", "\(error)")
            return report
        }

        let slot: SlotID
        let token: TokenInfo
        do {
            slot = try module.slot(tokenLabel: settings.tokenLabel)
            token = try module.tokenInfo(slot)
            report.token = .init(token)
            report.pass("find token", "\"\(token.label)\" serial \(token.serialNumber) in \(slot)")
        } catch {
            report.fail("find token", "\(error)")
            return report
        }
        let family = checkFamily(token, into: &report)
        checkTokenFlags(token, family: family, into: &report)
        if token.userPINLocked {
            report.fail("token state", "the user PIN is locked")
            return report
        }
        if !token.userPINInitialized {
            report.fail("token state", "the user PIN is not initialised")
            return report
        }
        if token.userPINCountLow {
            report.warn("token state", "a wrong user PIN was entered recently (CKF_USER_PIN_COUNT_LOW)")
        }

        do {
            let mechanisms = try module.mechanisms(slot)
            checkMechanisms(mechanisms, family: family, into: &report)
            let hasGCM = mechanisms.contains { $0.mechanism == .aesGCM }
            let pin: SecretBytes
            do {
                pin = try settings.pin.read()
            } catch {
                report.fail("read PIN", "\(error)")
                return report
            }
            if let problem = family.pinShapeProblem(pin) {
                report.warn("login convention", problem, docs: family.docsPage)
            } else if [.awsCloudHSM, .azure, .yubiHSM2].contains(family) {
                report.pass("login convention", "the PIN has the \(family.displayName) form", docs: family.docsPage)
            }
            try module.withSession(slot: slot) { session in
                do {
                    try session.login(.user, pin: pin)
                    report.pass("log in", "as user")
                } catch {
                    report.fail("log in", "\(error)", docs: family.docsPage)
                    return
                }
                checkRandom(session, into: &report)
                checkKeyWrap(session, mechanisms: mechanisms, into: &report)
                checkMasterKeys(session, into: &report)
                checkAuditKey(session, into: &report)
                checkSensitiveEnforcement(session, family: family, into: &report)
                if hasGCM, let ivSource = checkGCMIVSource(session, family: family, into: &report) {
                    measureRoundTrip(session, ivSource: ivSource, into: &report)
                }
                try? session.logout()
            }
        } catch {
            report.fail("open session", "\(error)")
        }
        return report
    }

    // MARK: Checks

    private func checkMechanisms(
        _ mechanisms: [MechanismInfo],
        family: HSMFamily,
        into report: inout PreflightReport
    ) {
        // AES for master keys and wrapping; HMAC-SHA-256 and a generic secret for the audit anchor.
        let required: [(Mechanism, MechanismFlags)] = [
            (.aesKeyGen, [.generate]), (.aesGCM, [.encrypt, .decrypt]), (.genericSecretKeyGen, [.generate]),
            (.sha256HMAC, [.sign]),
        ]
        for (mechanism, flags) in required {
            guard let info = mechanisms.first(where: { $0.mechanism == mechanism }) else {
                if mechanism == .aesGCM {
                    // No fallback is built in: every master-key wrap is AES-GCM.
                    report.fail(
                        "mechanism \(mechanism)",
                        "not listed by the token: the gateway wraps every data key with CKM_AES_GCM and has no "
                            + "fallback; this token cannot hold its master keys (see docs/hsm/README.md)",
                        docs: family == .generic ? "docs/hsm/README.md" : family.docsPage
                    )
                } else {
                    report.fail("mechanism \(mechanism)", "not listed by the token", docs: family.docsPage)
                }
                continue
            }
            guard info.flags.isSuperset(of: flags) else {
                report.fail(
                    "mechanism \(mechanism)", "lacks \(flags.subtracting(info.flags).names.joined(separator: ", "))")
                continue
            }
            // Key sizes are in bytes for AES and generic secrets (PKCS#11 2.40 section 2.8); some
            // modules report bits, which only makes the number larger.
            let supports256 = info.maximumKeySize >= MasterKeyPolicy.keyByteCount
            // openCryptoki 3.8.1 reports ulMaxKeySize 0 for CKM_SHA256_HMAC: for a mechanism keyed
            // by a generic secret of any length, 0 says nothing about 256 bits.
            let unreported =
                info.maximumKeySize == 0 && (mechanism == .sha256HMAC || mechanism == .genericSecretKeyGen)
            if unreported {
                report.pass(
                    "mechanism \(mechanism)",
                    flags.names.joined(separator: ", ") + " (the token reports no maximum key size)")
                continue
            }
            guard supports256 else {
                report.fail("mechanism \(mechanism)", "maximum key size \(info.maximumKeySize) is below AES-256")
                continue
            }
            report.pass("mechanism \(mechanism)", flags.names.joined(separator: ", "))
        }
    }

    private func checkRandom(_ session: borrowing Session, into report: inout PreflightReport) {
        do {
            let first = try session.generateRandom(count: 32)
            let second = try session.generateRandom(count: 32)
            guard first != second, Set(first).count > 1 else {
                report.fail("random", "the token's RNG returned repeated or constant bytes")
                return
            }
            report.pass("random", "C_GenerateRandom")
        } catch {
            report.fail("random", "\(error)")
        }
    }

    private func checkKeyWrap(
        _ session: borrowing Session,
        mechanisms: [MechanismInfo],
        into report: inout PreflightReport
    ) {
        guard let mechanism = Session.keyWrapWithPadding(among: mechanisms) else {
            report.warn("key wrap with padding", "not listed (optional: data keys are wrapped with AES-GCM)")
            return
        }
        do {
            switch try session.checkKeyWrapWithPadding(mechanism) {
            case .rfc5649:
                report.pass("key wrap with padding", "\(mechanism) matches the RFC 5649 known answers")
            case .rfc5649ForWholeBlocks:
                report.pass(
                    "key wrap with padding",
                    "\(mechanism) is RFC 5649 for 256-bit keys (not for lengths that are not a multiple of 8 bytes)"
                )
            case .nonconforming:
                report.warn("key wrap with padding", "\(mechanism) is not RFC 5649 on this token: it will not be used")
            }
        } catch {
            report.warn("key wrap with padding", "\(mechanism) known-answer test failed: \(error)")
        }
    }

    private func checkMasterKeys(_ session: borrowing Session, into report: inout PreflightReport) {
        let keys: [MasterKeyObject]
        do {
            keys = try session.findMasterKeys(labelPrefix: options.labelPrefix)
        } catch {
            report.fail("master keys", "\(error)")
            return
        }
        var weak = 0
        for key in keys {
            var entry = PreflightReport.MasterKey(
                label: key.label, id: key.id.map { String(format: "%02x", $0) }.joined())
            do {
                try session.verifyMasterKey(key.handle)
                entry.compliant = true
            } catch let error as PKCS11Error where error.code == .masterKeyPolicyViolation {
                entry.violations = error.violations.map(\.rawValue)
                weak += 1
                report.fail(
                    "master key \"\(key.label)\"",
                    error.violations.map(\.description).joined(separator: "; ")
                )
            } catch {
                entry.violations = ["unreadable"]
                weak += 1
                report.fail("master key \"\(key.label)\"", "\(error)")
            }
            report.masterKeys.append(entry)
        }
        if weak == 0 {
            report.pass(
                "master keys", "\(keys.count) with label prefix \"\(options.labelPrefix)\", all meet the policy")
        }
    }

    /// The audit-anchor key, when the gateway has made it: exactly one, meeting its policy.
    private func checkAuditKey(_ session: borrowing Session, into report: inout PreflightReport) {
        do {
            let keys = try session.findSecretKeys(label: AuditKeyPolicy.label)
            switch keys.count {
            case 0:
                report.pass("audit key", "none yet; the gateway makes \"\(AuditKeyPolicy.label)\" on its first start")
            case 1:
                try session.verifyAuditKey(keys[0].handle)
                report.pass("audit key", "\"\(AuditKeyPolicy.label)\" meets the policy (HMAC-SHA-256 only)")
            default:
                report.fail("audit key", "\(keys.count) objects are labelled \"\(AuditKeyPolicy.label)\"; expected one")
            }
        } catch {
            report.fail("audit key", "\(error)")
        }
    }

    /// A session AES key of the master keys' length, sensitive and non-extractable, for `usage`:
    /// what preflight's checks run on, so preflight leaves nothing on the token.
    static func sessionAESKey(_ session: borrowing Session, usage: [Attribute]) throws -> ObjectHandle {
        try session.generateKey(
            .aesKeyGen,
            template: [
                .objectClass(.secretKey), .keyType(.aes), .valueLength(MasterKeyPolicy.keyByteCount),
                .token(false), .sensitive(true), .extractable(false),
            ] + usage
        )
    }

    private func measureRoundTrip(
        _ session: borrowing Session,
        ivSource: GCMIVSource,
        into report: inout PreflightReport
    ) {
        let rounds = options.rounds
        guard rounds > 0 else { return }
        do {
            // A session key: preflight leaves nothing on the token.
            let key = try Self.sessionAESKey(session, usage: [.encrypt(true), .decrypt(true)])
            defer { try? session.destroyObject(key) }
            let plaintext = try session.generateRandom(count: 32)
            let aad = Array("hsm-admin preflight".utf8)
            var iv = try session.generateRandom(count: Session.gcmIVByteCount)
            var sealed: [[UInt8]] = []
            sealed.reserveCapacity(rounds)
            var ivs: [[UInt8]] = []
            ivs.reserveCapacity(rounds)
            let clock = ContinuousClock()
            let encryptStart = clock.now
            for _ in 0..<rounds {
                if ivSource == .token {
                    // The way the gateway will seal on this token: the module makes the IV.
                    let box = try session.sealAESGCMWithTokenIV(key: key, aad: aad, plaintext: plaintext)
                    ivs.append(box.iv)
                    sealed.append(box.ciphertextAndTag)
                    continue
                }
                // A counter IV under a fresh session key: unique without an RNG call per round.
                increment(&iv)
                ivs.append(iv)
                sealed.append(try session.encryptAESGCM(key: key, iv: iv, aad: aad, plaintext: plaintext))
            }
            let encryptTime = clock.now - encryptStart
            let decryptStart = clock.now
            for index in 0..<rounds {
                let opened = try session.decryptAESGCM(
                    key: key, iv: ivs[index], aad: aad, ciphertextAndTag: sealed[index])
                guard opened.constantTimeEquals(plaintext) else {
                    report.fail("AES-GCM round trip", "decryption returned different bytes")
                    return
                }
            }
            let decryptTime = clock.now - decryptStart
            if ivSource == .token, Set(ivs).count != ivs.count {
                report.fail("AES-GCM round trip", "the token generated the same IV twice in \(rounds) encryptions")
                return
            }
            let timing = PreflightReport.Timing(
                rounds: rounds,
                bytes: plaintext.count,
                encryptOperationsPerSecond: Self.rate(rounds, encryptTime),
                decryptOperationsPerSecond: Self.rate(rounds, decryptTime)
            )
            report.roundTrip = timing
            report.pass(
                "AES-GCM round trip",
                "\(rounds) x \(plaintext.count) bytes: encrypt \(timing.encryptOperationsPerSecond)/s, "
                    + "decrypt \(timing.decryptOperationsPerSecond)/s (session key, IVs from the \(ivSource))"
            )
        } catch {
            report.fail("AES-GCM round trip", "\(error)")
        }
    }

    private func increment(_ counter: inout [UInt8]) {
        for index in counter.indices.reversed() {
            counter[index] &+= 1
            if counter[index] != 0 { return }
        }
    }

    private static func rate(_ count: Int, _ duration: Duration) -> Int {
        let seconds = Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
        return seconds > 0 ? Int((Double(count) / seconds).rounded()) : 0
    }
}

/// What preflight found; printed as text or JSON.
public struct PreflightReport: Codable, Sendable {
    public enum Status: String, Codable, Sendable {
        case pass, warn, fail
    }

    public struct Check: Codable, Sendable {
        public let name: String
        public let status: Status
        public let detail: String
        /// The page that explains the rule, when one does (relative to the repository root).
        public var docs: String?
    }

    /// The HSM family whose rules were checked.
    public struct Family: Codable, Sendable {
        public let name: HSMFamily
        /// True when it came from `--family`, false when detected from the module and token.
        public let forced: Bool
        public let docs: String
    }

    public struct Module: Codable, Sendable {
        public let path: String
        public let manufacturer: String
        public let description: String
        public let cryptokiVersion: String
        public let libraryVersion: String
        public let entryPoint: String
    }

    public struct Token: Codable, Sendable {
        public let label: String
        public let serialNumber: String
        public let manufacturer: String
        public let model: String
        public let slot: UInt
        public let maximumSessions: String
        public let maximumReadWriteSessions: String
        public let hardwareRNG: Bool

        init(_ info: TokenInfo) {
            label = info.label
            serialNumber = info.serialNumber
            manufacturer = info.manufacturer
            model = info.model
            slot = info.slot.rawValue
            maximumSessions = "\(info.maximumSessionCount)"
            maximumReadWriteSessions = "\(info.maximumReadWriteSessionCount)"
            hardwareRNG = info.hasRNG
        }
    }

    public struct MasterKey: Codable, Sendable {
        public let label: String
        public let id: String
        public var compliant = false
        public var violations: [String] = []
    }

    public struct Timing: Codable, Sendable {
        public let rounds: Int
        public let bytes: Int
        public let encryptOperationsPerSecond: Int
        public let decryptOperationsPerSecond: Int
    }

    public var module: Module?
    public var token: Token?
    public var family: Family?
    public var checks: [Check] = []
    public var masterKeys: [MasterKey] = []
    public var roundTrip: Timing?

    /// True when no check failed (warnings allowed).
    public var passed: Bool { !checks.isEmpty && !checks.contains { $0.status == .fail } }

    mutating func pass(_ name: String, _ detail: String, docs: String? = nil) {
        checks.append(Check(name: name, status: .pass, detail: detail, docs: docs))
    }
    mutating func warn(_ name: String, _ detail: String, docs: String? = nil) {
        checks.append(Check(name: name, status: .warn, detail: detail, docs: docs))
    }
    mutating func fail(_ name: String, _ detail: String, docs: String? = nil) {
        checks.append(Check(name: name, status: .fail, detail: detail, docs: docs))
    }

    enum CodingKeys: String, CodingKey {
        case passed, module, token, family, checks, masterKeys, roundTrip
    }

    public init() {}

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        module = try container.decodeIfPresent(Module.self, forKey: .module)
        token = try container.decodeIfPresent(Token.self, forKey: .token)
        family = try container.decodeIfPresent(Family.self, forKey: .family)
        checks = try container.decode([Check].self, forKey: .checks)
        masterKeys = try container.decode([MasterKey].self, forKey: .masterKeys)
        roundTrip = try container.decodeIfPresent(Timing.self, forKey: .roundTrip)
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(passed, forKey: .passed)
        try container.encodeIfPresent(module, forKey: .module)
        try container.encodeIfPresent(token, forKey: .token)
        try container.encodeIfPresent(family, forKey: .family)
        try container.encode(checks, forKey: .checks)
        try container.encode(masterKeys, forKey: .masterKeys)
        try container.encodeIfPresent(roundTrip, forKey: .roundTrip)
    }

    /// The human-readable form.
    public var text: String {
        var lines: [String] = []
        if let module {
            lines.append("module  \(module.path)")
            lines.append("        \(module.manufacturer), \(module.description) \(module.libraryVersion)")
            lines.append("        Cryptoki \(module.cryptokiVersion), opened through \(module.entryPoint)")
        }
        if let token {
            lines.append(
                "token   \"\(token.label)\" serial \(token.serialNumber) (\(token.manufacturer) \(token.model))")
            lines.append(
                "        slot \(token.slot), sessions max \(token.maximumSessions) (read-write \(token.maximumReadWriteSessions))"
            )
        }
        if let family {
            lines.append(
                "family  \(family.name.displayName) (\(family.forced ? "--family" : "detected")), rules: \(family.docs)"
            )
        }
        lines.append("")
        for check in checks {
            let tag =
                switch check.status {
                case .pass: "PASS"
                case .warn: "WARN"
                case .fail: "FAIL"
                }
            lines.append("  \(tag)  \(check.name): \(check.detail)")
            if let docs = check.docs, check.status != .pass {
                lines.append("        read \(docs)")
            }
        }
        lines.append("")
        let failures = checks.count { $0.status == .fail }
        let warnings = checks.count { $0.status == .warn }
        lines.append(
            passed
                ? "preflight passed (\(warnings) warning\(warnings == 1 ? "" : "s"))"
                : "preflight FAILED: \(failures) check\(failures == 1 ? "" : "s") failed"
        )
        return lines.joined(separator: "\n")
    }
}
