import Foundation
import PKCS11

/// A family of PKCS#11 modules with its own conventions (login, sessions, GCM IVs, FIPS mode),
/// each documented in docs/hsm/. `hsm-admin preflight` detects it from what the module and the
/// token say about themselves (`C_GetInfo`, `C_GetTokenInfo`), or takes it from `--family`, and
/// checks the rules its page gives.
public enum HSMFamily: String, Sendable, Hashable, CaseIterable, Codable {
    case softHSM2 = "softhsm2"
    case awsCloudHSM = "aws-cloudhsm"
    case thalesLuna = "thales-luna"
    case entrustNShield = "entrust-nshield"
    case yubiHSM2 = "yubihsm2"
    case googleKMSP11 = "google-kmsp11"
    case azure = "azure"
    case utimaco = "utimaco"
    case openCryptoki = "opencryptoki"
    case nssSoftoken = "nss-softoken"
    /// None of the above: only the generic rules apply.
    case generic = "generic"

    /// The page to read, relative to the repository root.
    public var docsPage: String {
        self == .generic ? "docs/hsm/README.md" : "docs/hsm/\(rawValue).md"
    }

    /// The family's name as its vendor writes it.
    public var displayName: String {
        switch self {
        case .softHSM2: "SoftHSM2"
        case .awsCloudHSM: "AWS CloudHSM"
        case .thalesLuna: "Thales Luna"
        case .entrustNShield: "Entrust nShield"
        case .yubiHSM2: "YubiHSM 2"
        case .googleKMSP11: "Google Cloud KMS (kmsp11)"
        case .azure: "Azure Managed HSM / Dedicated HSM"
        case .utimaco: "Utimaco"
        case .openCryptoki: "openCryptoki"
        case .nssSoftoken: "NSS softoken"
        case .generic: "an unrecognised module"
        }
    }

    /// Words in the module's or token's manufacturer, model or description that name the family
    /// (lower case). The identity strings are what the vendors' modules report as far as their
    /// documentation shows; a string not listed here gives `.generic`, and `--family` overrides.
    static let markers: [(HSMFamily, [String])] = [
        (.softHSM2, ["softhsm"]),
        (.awsCloudHSM, ["cloudhsm", "cavium", "marvell"]),
        (.thalesLuna, ["luna", "safenet"]),
        (.entrustNShield, ["nshield", "ncipher", "entrust"]),
        (.yubiHSM2, ["yubihsm", "yubico"]),
        (.googleKMSP11, ["google", "kmsp11", "cloud kms"]),
        (.azure, ["azure", "microsoft"]),
        (.utimaco, ["utimaco", "cryptoserver"]),
        (.openCryptoki, ["opencryptoki", "ibm softtok", "ibm corp", "ibm os pkcs"]),
        (.nssSoftoken, ["mozilla", "nss internal", "nss generic", "network security services"]),
    ]

    /// The family named by any of `identity` (manufacturer, model, description strings).
    public static func detect(_ identity: [String]) -> HSMFamily {
        let text = identity.joined(separator: " ").lowercased()
        return markers.first { $0.1.contains { text.contains($0) } }?.0 ?? .generic
    }

    /// The most sessions the family grants one application, when its documentation gives a
    /// number that the token may not report itself (YubiHSM 2: 16 sessions in all).
    var documentedSessionLimit: Int? {
        self == .yubiHSM2 ? 16 : nil
    }

    /// What the family requires of `hsm.gcm_iv` according to its documentation, when it requires
    /// something: `.token` for CloudHSM (always) and Luna (in FIPS mode).
    var documentedGCMIV: GCMIVSource? {
        switch self {
        case .awsCloudHSM: .token
        default: nil
        }
    }

    /// The documented shape of the PIN, checked without ever printing it: nil when the family
    /// takes any PIN. Returns a complaint when `pin` does not have the shape.
    func pinShapeProblem(_ pin: SecretBytes) -> String? {
        // Read in place: no copy of the PIN outlives the check.
        pin.withUnsafeBytes { bytes -> String? in
            switch self {
            case .awsCloudHSM, .azure:
                // Crypto-user name, a colon, the password (Azure Cloud HSM uses CloudHSM's form).
                guard let colon = bytes.firstIndex(of: UInt8(ascii: ":")), colon > 0, colon < bytes.count - 1
                else {
                    return "\(displayName) PINs have the form <crypto user name>:<password>; this one has no "
                        + "name and colon in front"
                }
                return nil
            case .yubiHSM2:
                // Four hex digits of the authentication key id, then its password.
                let isHex = { (byte: UInt8) in
                    (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte)
                        || (UInt8(ascii: "a")...UInt8(ascii: "f")).contains(byte | 0x20)
                }
                guard bytes.count > 4, bytes.prefix(4).allSatisfy(isHex) else {
                    return "YubiHSM 2 PINs are the authentication key id as 4 hex digits followed by its "
                        + "password (e.g. 0001 then the password); this one does not start that way"
                }
                return nil
            default:
                return nil
            }
        }
    }
}
