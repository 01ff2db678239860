internal import CPKCS11Shim

/// A slot number as the module reports it. Slot numbers may change when tokens are created or
/// re-inserted (SoftHSM2 derives them from the token serial): find slots by token label or
/// serial number instead of storing them.
public struct SlotID: Hashable, Sendable, CustomStringConvertible {
    /// The module's `CK_SLOT_ID`.
    public let rawValue: UInt

    /// Wraps a slot number reported by the module (or given by an operator).
    public init(rawValue: UInt) {
        self.rawValue = rawValue
    }

    public var description: String { "slot \(rawValue)" }
}

/// A `major.minor` version as PKCS#11 reports it.
public struct PKCS11Version: Hashable, Sendable, CustomStringConvertible {
    public let major: UInt8
    public let minor: UInt8
    public var description: String { "\(major).\(minor)" }

    init(_ version: CK_VERSION) {
        self.major = version.major
        self.minor = version.minor
    }
}

/// A count the token may leave unspecified (`CK_UNAVAILABLE_INFORMATION`) or unbounded
/// (`CK_EFFECTIVELY_INFINITE`).
public enum TokenLimit: Hashable, Sendable, CustomStringConvertible {
    case value(Int)
    case effectivelyInfinite
    case unavailable

    init(_ raw: CK_ULONG, zeroMeansInfinite: Bool) {
        if raw == hsmgw_ck_unavailable_information {
            self = .unavailable
        } else if raw == hsmgw_ck_effectively_infinite && zeroMeansInfinite {
            self = .effectivelyInfinite
        } else {
            self = .value(Int(clamping: raw))
        }
    }

    /// The number, when the token gave one.
    public var count: Int? {
        if case .value(let count) = self { return count }
        return nil
    }

    public var description: String {
        switch self {
        case .value(let count): "\(count)"
        case .effectivelyInfinite: "unlimited"
        case .unavailable: "unknown"
        }
    }
}

/// What `C_GetInfo` says about the module.
public struct ModuleInfo: Sendable {
    public let cryptokiVersion: PKCS11Version
    public let manufacturer: String
    public let libraryDescription: String
    public let libraryVersion: PKCS11Version
}

/// What `C_GetSlotInfo` says about a slot.
public struct SlotInfo: Sendable {
    public let id: SlotID
    public let description: String
    public let manufacturer: String
    public let tokenPresent: Bool
    public let removableDevice: Bool
    public let hardwareSlot: Bool
}

/// What `C_GetTokenInfo` says about a token.
public struct TokenInfo: Sendable {
    public let slot: SlotID
    public let label: String
    public let manufacturer: String
    public let model: String
    public let serialNumber: String
    /// The token has been initialised (`C_InitToken`).
    public let initialized: Bool
    /// A user PIN has been set (`C_InitPIN`).
    public let userPINInitialized: Bool
    public let loginRequired: Bool
    public let hasRNG: Bool
    public let writeProtected: Bool
    public let userPINLocked: Bool
    public let userPINCountLow: Bool
    public let maximumSessionCount: TokenLimit
    public let sessionCount: TokenLimit
    public let maximumReadWriteSessionCount: TokenLimit
    public let readWriteSessionCount: TokenLimit
    public let minimumPINLength: Int
    public let maximumPINLength: Int
    public let hardwareVersion: PKCS11Version
    public let firmwareVersion: PKCS11Version
}

/// A mechanism type (`CK_MECHANISM_TYPE`); the ones the gateway uses have names.
public struct Mechanism: Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt

    public init(rawValue: UInt) {
        self.rawValue = rawValue
    }

    /// `CKM_AES_KEY_GEN`.
    public static let aesKeyGen = Mechanism(rawValue: 0x1080)
    /// `CKM_AES_ECB`.
    public static let aesECB = Mechanism(rawValue: 0x1081)
    /// `CKM_AES_CBC`.
    public static let aesCBC = Mechanism(rawValue: 0x1082)
    /// `CKM_AES_GCM`.
    public static let aesGCM = Mechanism(rawValue: 0x1087)
    /// `CKM_AES_KEY_WRAP` (RFC 3394, no padding).
    public static let aesKeyWrap = Mechanism(rawValue: 0x2109)
    /// `CKM_AES_KEY_WRAP_PAD` (0x210A). PKCS#11 3.0 defines it as RFC 3394 over PKCS#7 padding,
    /// but several 2.40-era modules, SoftHSM2 among them, implement RFC 5649 under this number.
    /// Use `Session.checkKeyWrapWithPadding` to find out which a token does.
    public static let aesKeyWrapPad = Mechanism(rawValue: 0x210A)
    /// `CKM_AES_KEY_WRAP_KWP` (0x210B): RFC 5649, AES key wrap with padding (PKCS#11 3.0).
    public static let aesKeyWrapKWP = Mechanism(rawValue: 0x210B)
    /// `CKM_SHA256_HMAC` (0x0251): HMAC-SHA-256 with a 32-byte output.
    public static let sha256HMAC = Mechanism(rawValue: 0x0251)
    /// `CKM_GENERIC_SECRET_KEY_GEN` (0x0350): a generic secret of `CKA_VALUE_LEN` bytes.
    public static let genericSecretKeyGen = Mechanism(rawValue: 0x0350)

    static let names: [UInt: String] = [
        0x1080: "CKM_AES_KEY_GEN", 0x1081: "CKM_AES_ECB", 0x1082: "CKM_AES_CBC", 0x1085: "CKM_AES_CBC_PAD",
        0x1086: "CKM_AES_CTR", 0x1087: "CKM_AES_GCM", 0x1088: "CKM_AES_CCM", 0x108A: "CKM_AES_CMAC",
        0x2109: "CKM_AES_KEY_WRAP", 0x210A: "CKM_AES_KEY_WRAP_PAD", 0x210B: "CKM_AES_KEY_WRAP_KWP",
        0x0250: "CKM_SHA256", 0x0251: "CKM_SHA256_HMAC", 0x0350: "CKM_GENERIC_SECRET_KEY_GEN",
    ]

    /// `CKM_…` name where known, the number otherwise.
    public var name: String { Self.names[rawValue] ?? "CKM_0x" + String(rawValue, radix: 16) }

    public var description: String { name }
}

/// What a mechanism may be used for (`CKF_…` mechanism flags).
public struct MechanismFlags: OptionSet, Hashable, Sendable {
    public let rawValue: UInt
    public init(rawValue: UInt) { self.rawValue = rawValue }

    public static let hardware = MechanismFlags(rawValue: UInt(CKF_HW))
    public static let encrypt = MechanismFlags(rawValue: UInt(CKF_ENCRYPT))
    public static let decrypt = MechanismFlags(rawValue: UInt(CKF_DECRYPT))
    public static let digest = MechanismFlags(rawValue: UInt(CKF_DIGEST))
    public static let sign = MechanismFlags(rawValue: UInt(CKF_SIGN))
    public static let verify = MechanismFlags(rawValue: UInt(CKF_VERIFY))
    public static let generate = MechanismFlags(rawValue: UInt(CKF_GENERATE))
    public static let generateKeyPair = MechanismFlags(rawValue: UInt(CKF_GENERATE_KEY_PAIR))
    public static let wrap = MechanismFlags(rawValue: UInt(CKF_WRAP))
    public static let unwrap = MechanismFlags(rawValue: UInt(CKF_UNWRAP))
    public static let derive = MechanismFlags(rawValue: UInt(CKF_DERIVE))

    /// Names of the set flags, for reports.
    public var names: [String] {
        let all: [(MechanismFlags, String)] = [
            (.hardware, "hw"), (.encrypt, "encrypt"), (.decrypt, "decrypt"), (.digest, "digest"),
            (.sign, "sign"), (.verify, "verify"), (.generate, "generate"),
            (.generateKeyPair, "generate-key-pair"), (.wrap, "wrap"), (.unwrap, "unwrap"), (.derive, "derive"),
        ]
        return all.filter { contains($0.0) }.map(\.1)
    }
}

/// What `C_GetMechanismInfo` says about one mechanism.
public struct MechanismInfo: Hashable, Sendable {
    public let mechanism: Mechanism
    public let minimumKeySize: Int
    public let maximumKeySize: Int
    public let flags: MechanismFlags
}

/// Reads a fixed-width, blank-padded PKCS#11 text field.
func paddedString<T>(_ field: T) -> String {
    withUnsafeBytes(of: field) { raw in
        var bytes = Array(raw)
        while let last = bytes.last, last == 0x20 || last == 0 {
            bytes.removeLast()
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// Pads `text` with blanks to a 32-byte label field; nil when it does not fit.
func paddedLabel(_ text: String) -> [UInt8]? {
    var bytes = Array(text.utf8)
    guard bytes.count <= 32 else { return nil }
    bytes += [UInt8](repeating: 0x20, count: 32 - bytes.count)
    return bytes
}

extension PKCS11Module {
    /// `C_GetInfo`.
    public func info() throws -> ModuleInfo {
        var info = CK_INFO()
        try call(.getInfo, \.C_GetInfo) { $0(&info) }
        return ModuleInfo(
            cryptokiVersion: PKCS11Version(info.cryptokiVersion),
            manufacturer: paddedString(info.manufacturerID),
            libraryDescription: paddedString(info.libraryDescription),
            libraryVersion: PKCS11Version(info.libraryVersion)
        )
    }

    /// The most slots `slotIDs` accepts from a module: HSMs offer a few dozen partitions at most;
    /// a count beyond it is a broken module, not a reason to allocate.
    public static let maximumSlotCount = 65_536
    /// The most mechanisms `mechanisms` accepts from a module: tokens list a few hundred.
    public static let maximumMechanismCount = 65_536

    /// A count the module reported, checked against what the call can hold.
    private func checkCount(_ function: PKCS11Function, _ count: CK_ULONG, limit: Int, of what: String) throws -> Int {
        guard count <= CK_ULONG(limit) else {
            throw PKCS11Error(
                code: .moduleMisbehaved, function: function, detail: "reported \(count) \(what), room for \(limit)")
        }
        return Int(count)
    }

    /// `C_GetSlotList`: the slots, optionally only those with a token present.
    public func slotIDs(tokenPresent: Bool = true) throws -> [SlotID] {
        // The list can grow between the two calls (a token inserted): retry a few times.
        for _ in 0..<4 {
            var count = CK_ULONG(0)
            let present = CK_BBOOL(tokenPresent ? CK_TRUE : CK_FALSE)
            try call(.getSlotList, \.C_GetSlotList) { $0(present, nil, &count) }
            let capacity = try checkCount(.getSlotList, count, limit: Self.maximumSlotCount, of: "slots")
            var slots = [CK_SLOT_ID](repeating: 0, count: capacity)
            count = CK_ULONG(capacity)
            let rv = try callReturningCode(.getSlotList, \.C_GetSlotList) { $0(present, &slots, &count) }
            if rv == CK_RV(CKR_BUFFER_TOO_SMALL) { continue }
            guard rv == CKR_OK else { throw PKCS11Error.failed(.getSlotList, rv) }
            return slots.prefix(try checkCount(.getSlotList, count, limit: capacity, of: "slots")).map {
                SlotID(rawValue: $0)
            }
        }
        throw PKCS11Error.failed(.getSlotList, CK_RV(CKR_BUFFER_TOO_SMALL))
    }

    /// `C_GetSlotInfo`.
    public func slotInfo(_ slot: SlotID) throws -> SlotInfo {
        var info = CK_SLOT_INFO()
        try call(.getSlotInfo, \.C_GetSlotInfo) { $0(slot.rawValue, &info) }
        return SlotInfo(
            id: slot,
            description: paddedString(info.slotDescription),
            manufacturer: paddedString(info.manufacturerID),
            tokenPresent: info.flags & CK_FLAGS(CKF_TOKEN_PRESENT) != 0,
            removableDevice: info.flags & CK_FLAGS(CKF_REMOVABLE_DEVICE) != 0,
            hardwareSlot: info.flags & CK_FLAGS(CKF_HW_SLOT) != 0
        )
    }

    /// `C_GetTokenInfo`.
    public func tokenInfo(_ slot: SlotID) throws -> TokenInfo {
        var info = CK_TOKEN_INFO()
        try call(.getTokenInfo, \.C_GetTokenInfo) { $0(slot.rawValue, &info) }
        let flags = info.flags
        return TokenInfo(
            slot: slot,
            label: paddedString(info.label),
            manufacturer: paddedString(info.manufacturerID),
            model: paddedString(info.model),
            serialNumber: paddedString(info.serialNumber),
            initialized: flags & CK_FLAGS(CKF_TOKEN_INITIALIZED) != 0,
            userPINInitialized: flags & CK_FLAGS(CKF_USER_PIN_INITIALIZED) != 0,
            loginRequired: flags & CK_FLAGS(CKF_LOGIN_REQUIRED) != 0,
            hasRNG: flags & CK_FLAGS(CKF_RNG) != 0,
            writeProtected: flags & CK_FLAGS(CKF_WRITE_PROTECTED) != 0,
            userPINLocked: flags & CK_FLAGS(CKF_USER_PIN_LOCKED) != 0,
            userPINCountLow: flags & CK_FLAGS(CKF_USER_PIN_COUNT_LOW) != 0,
            maximumSessionCount: TokenLimit(info.ulMaxSessionCount, zeroMeansInfinite: true),
            sessionCount: TokenLimit(info.ulSessionCount, zeroMeansInfinite: false),
            maximumReadWriteSessionCount: TokenLimit(info.ulMaxRwSessionCount, zeroMeansInfinite: true),
            readWriteSessionCount: TokenLimit(info.ulRwSessionCount, zeroMeansInfinite: false),
            minimumPINLength: Int(clamping: info.ulMinPinLen),
            maximumPINLength: Int(clamping: info.ulMaxPinLen),
            hardwareVersion: PKCS11Version(info.hardwareVersion),
            firmwareVersion: PKCS11Version(info.firmwareVersion)
        )
    }

    /// The tokens present, with their slots.
    public func tokens() throws -> [TokenInfo] {
        try slotIDs(tokenPresent: true).map { try tokenInfo($0) }
    }

    /// Nil when the token in `slot` answers `C_GetTokenInfo` and reports itself initialised;
    /// otherwise the `tokenUnreachable` error that says why not.
    func unreachableToken(in slot: SlotID) -> PKCS11Error? {
        do {
            guard try tokenInfo(slot).initialized else {
                return PKCS11Error(
                    code: .tokenUnreachable, function: .getTokenInfo, detail: "the token in \(slot) is not initialised")
            }
            return nil
        } catch let error as PKCS11Error {
            return error.asTokenUnreachable(detail: "the token in \(slot) did not answer C_GetTokenInfo")
        } catch {
            return PKCS11Error(code: .tokenUnreachable, function: .getTokenInfo, detail: "\(error)")
        }
    }

    /// The tokens present that answer `C_GetTokenInfo`, and how many slots listed as holding a
    /// token did not answer (one going away, or one the module can no longer read: SoftHSM2 answers
    /// `CKR_GENERAL_ERROR` for a token whose directory went away). One broken token must not hide
    /// the others.
    func readableTokens() throws -> (tokens: [TokenInfo], unreadable: Int) {
        var tokens: [TokenInfo] = []
        var unreadable = 0
        for slot in try slotIDs(tokenPresent: true) {
            do {
                tokens.append(try tokenInfo(slot))
            } catch let error as PKCS11Error where error.code == .functionFailed {
                unreadable += 1
            }
        }
        return (tokens, unreadable)
    }

    /// The slot whose token has `label`. Slots whose token does not answer `C_GetTokenInfo` are
    /// passed over (see `tokenNotFound`), so one broken token does not hide the others.
    ///
    /// - Throws: `tokenNotFound` when no present token that answers has the label (uninitialised
    ///   tokens never match; the detail says how many did not answer); `invalidArgument` when two
    ///   tokens share it.
    public func slot(tokenLabel label: String) throws -> SlotID {
        let (tokens, unreadable) = try readableTokens()
        let matches = tokens.filter { $0.initialized && $0.label == label }
        guard let first = matches.first else {
            throw PKCS11Error(
                code: .tokenNotFound,
                detail: "no token labelled '\(label)' in \(path)"
                    + (unreadable > 0 ? " (\(unreadable) present token(s) did not answer C_GetTokenInfo)" : ""))
        }
        guard matches.count == 1 else {
            throw PKCS11Error(
                code: .invalidArgument, detail: "\(matches.count) tokens are labelled '\(label)'; use the serial")
        }
        return first.slot
    }

    /// The slot whose token has `serialNumber`.
    ///
    /// - Throws: `tokenNotFound`; `invalidArgument` when several tokens share the serial (NSS's
    ///   softoken gives every token the serial `0000000000000000`: find those by label).
    public func slot(tokenSerial serialNumber: String) throws -> SlotID {
        let matches = try readableTokens().tokens.filter { $0.serialNumber == serialNumber }
        guard let match = matches.first else {
            throw PKCS11Error(code: .tokenNotFound, detail: "no token with serial '\(serialNumber)' in \(path)")
        }
        guard matches.count == 1 else {
            throw PKCS11Error(
                code: .invalidArgument,
                detail: "\(matches.count) tokens have the serial '\(serialNumber)'; use the label")
        }
        return match.slot
    }

    /// `C_GetMechanismList` and `C_GetMechanismInfo` for every mechanism of the token in `slot`.
    public func mechanisms(_ slot: SlotID) throws -> [MechanismInfo] {
        var count = CK_ULONG(0)
        try call(.getMechanismList, \.C_GetMechanismList) { $0(slot.rawValue, nil, &count) }
        let capacity = try checkCount(.getMechanismList, count, limit: Self.maximumMechanismCount, of: "mechanisms")
        var types = [CK_MECHANISM_TYPE](repeating: 0, count: capacity)
        count = CK_ULONG(capacity)
        try call(.getMechanismList, \.C_GetMechanismList) { $0(slot.rawValue, &types, &count) }
        let listed = try checkCount(.getMechanismList, count, limit: capacity, of: "mechanisms")
        return try types.prefix(listed).map { type in
            var info = CK_MECHANISM_INFO()
            try call(.getMechanismInfo, \.C_GetMechanismInfo) { $0(slot.rawValue, type, &info) }
            return MechanismInfo(
                mechanism: Mechanism(rawValue: type),
                minimumKeySize: Int(clamping: info.ulMinKeySize),
                maximumKeySize: Int(clamping: info.ulMaxKeySize),
                flags: MechanismFlags(rawValue: info.flags)
            )
        }
    }

    /// `C_InitToken`: (re)initialises the token in `slot` with a security-officer PIN and a
    /// label of at most 32 bytes. Destroys every object on the token. For dev and test tokens.
    public func initToken(slot: SlotID, securityOfficerPIN: SecretBytes, label: String) throws {
        guard var padded = paddedLabel(label) else {
            throw PKCS11Error(code: .invalidArgument, function: .initToken, detail: "token label longer than 32 bytes")
        }
        try withMutableCopy(of: securityOfficerPIN) { pin, pinLength in
            try call(.initToken, \.C_InitToken) { $0(slot.rawValue, pin, pinLength, &padded) }
        }
    }

    /// The slot of a present token that has not been initialised yet (SoftHSM2 always offers one).
    public func uninitializedTokenSlot() throws -> SlotID {
        guard let free = try tokens().first(where: { !$0.initialized }) else {
            throw PKCS11Error(code: .tokenNotFound, detail: "no uninitialised token in \(path)")
        }
        return free.slot
    }
}

/// Copies a secret into a temporary mutable buffer (PKCS#11 takes PINs as non-const pointers),
/// runs `body` and zeroes the copy.
func withMutableCopy<R>(
    of secret: SecretBytes,
    _ body: (UnsafeMutablePointer<CK_UTF8CHAR>, CK_ULONG) throws -> R
) throws -> R {
    // NSS's softoken logs its security officer in with an empty PIN: pass a valid pointer and
    // a length of zero, never a null pointer.
    guard secret.count > 0 else {
        var empty: CK_UTF8CHAR = 0
        return try body(&empty, 0)
    }
    let copy = SecretBytes(count: secret.count) { buffer in
        secret.withUnsafeBytes { buffer.copyMemory(from: $0) }
    }
    return try copy.withUnsafeBytes { raw in
        let pointer = UnsafeMutableRawPointer(mutating: raw.baseAddress!).assumingMemoryBound(to: CK_UTF8CHAR.self)
        return try body(pointer, CK_ULONG(raw.count))
    }
}
