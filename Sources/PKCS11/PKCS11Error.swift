/// A PKCS#11 return value (`CK_RV`). The standard codes have names; vendor codes
/// (`CKR_VENDOR_DEFINED` and above) and codes from later spec versions survive as numbers.
public struct PKCS11ReturnValue: Hashable, Sendable, CustomStringConvertible {
    /// The numeric `CK_RV`.
    public let rawValue: UInt

    /// Wraps a numeric `CK_RV`.
    public init(rawValue: UInt) {
        self.rawValue = rawValue
    }

    /// The first vendor-defined code (`CKR_VENDOR_DEFINED`).
    public static let vendorDefinedBase: UInt = 0x8000_0000

    /// `CKR_…` name for standard codes, `CKR_VENDOR_DEFINED+0x…` or `CKR 0x…` otherwise.
    public var name: String {
        if let name = Self.standardNames[rawValue] {
            return name
        }
        if rawValue >= Self.vendorDefinedBase {
            return "CKR_VENDOR_DEFINED+0x" + String(rawValue - Self.vendorDefinedBase, radix: 16)
        }
        return "CKR_0x" + String(rawValue, radix: 16)
    }

    public var description: String {
        "\(name) (0x\(String(rawValue, radix: 16)))"
    }
}

/// The PKCS#11 function a failure came from, so an error always says which call failed.
public enum PKCS11Function: String, Sendable, Hashable {
    case initialize = "C_Initialize"
    case finalize = "C_Finalize"
    case getInfo = "C_GetInfo"
    case getSlotList = "C_GetSlotList"
    case getSlotInfo = "C_GetSlotInfo"
    case getTokenInfo = "C_GetTokenInfo"
    case getMechanismList = "C_GetMechanismList"
    case getMechanismInfo = "C_GetMechanismInfo"
    case initToken = "C_InitToken"
    case initPIN = "C_InitPIN"
    case openSession = "C_OpenSession"
    case closeSession = "C_CloseSession"
    case closeAllSessions = "C_CloseAllSessions"
    case getSessionInfo = "C_GetSessionInfo"
    case login = "C_Login"
    case logout = "C_Logout"
    case setPIN = "C_SetPIN"
    case createObject = "C_CreateObject"
    case copyObject = "C_CopyObject"
    case destroyObject = "C_DestroyObject"
    case getAttributeValue = "C_GetAttributeValue"
    case findObjectsInit = "C_FindObjectsInit"
    case findObjects = "C_FindObjects"
    case findObjectsFinal = "C_FindObjectsFinal"
    case encryptInit = "C_EncryptInit"
    case encrypt = "C_Encrypt"
    case decryptInit = "C_DecryptInit"
    case decrypt = "C_Decrypt"
    case generateKey = "C_GenerateKey"
    case wrapKey = "C_WrapKey"
    case unwrapKey = "C_UnwrapKey"
    case generateRandom = "C_GenerateRandom"
    case signInit = "C_SignInit"
    case sign = "C_Sign"
    case messageEncryptInit = "C_MessageEncryptInit"
    case encryptMessage = "C_EncryptMessage"
    case messageEncryptFinal = "C_MessageEncryptFinal"
}

/// Every failure of the PKCS#11 layer.
///
/// An open set of codes (new ones can be added without breaking callers), the function that
/// failed and its `CK_RV` when there is one. `description` is meant for the server's log: it
/// names the function and return value and may name a module path or token label, never a PIN
/// or key material. Errors that reach a network client are mapped to generic statuses elsewhere.
public struct PKCS11Error: Error, Sendable, Hashable, CustomStringConvertible {
    /// What kind of failure this is.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Base: String, Hashable, Sendable {
            case moduleNotFound
            case moduleNotLoadable
            case missingEntryPoint
            case entryPointFailed
            case functionFailed
            case functionNotSupported
            case moduleFinalized
            case processForked
            case sessionsStillOpen
            case tokenNotFound
            case mechanismNotSupported
            case invalidArgument
            case sessionAcquireTimeout
            case sessionPoolQueueFull
            case sessionPoolShutDown
            case masterKeyPolicyViolation
            case pinSource
            case loginRefused
            case moduleMisbehaved
            case tokenUnreachable
            case initializationNotOwned
            case callsInFlight
            case ivNotGenerated
        }
        private let base: Base
        private init(_ base: Base) { self.base = base }

        /// The module file does not exist.
        public static let moduleNotFound = Code(.moduleNotFound)
        /// `dlopen` refused the file: it is not a shared library for this platform.
        public static let moduleNotLoadable = Code(.moduleNotLoadable)
        /// The library exports neither `C_GetInterface` nor `C_GetFunctionList`: not PKCS#11.
        public static let missingEntryPoint = Code(.missingEntryPoint)
        /// `C_GetInterface`/`C_GetFunctionList` failed or returned no function table.
        public static let entryPointFailed = Code(.entryPointFailed)
        /// A PKCS#11 function returned an error; see `function` and `returnValue`.
        public static let functionFailed = Code(.functionFailed)
        /// The module's function table has no entry for `function`.
        public static let functionNotSupported = Code(.functionNotSupported)
        /// The module was finalized; load it again.
        public static let moduleFinalized = Code(.moduleFinalized)
        /// The process forked after `C_Initialize`; PKCS#11 state does not survive `fork()`.
        public static let processForked = Code(.processForked)
        /// `finalize()` was called while sessions opened through this module are still open.
        public static let sessionsStillOpen = Code(.sessionsStillOpen)
        /// No slot holds a token with the requested label or serial number.
        public static let tokenNotFound = Code(.tokenNotFound)
        /// The token does not list a mechanism the caller needs.
        public static let mechanismNotSupported = Code(.mechanismNotSupported)
        /// An argument is outside what the call accepts (detail says which).
        public static let invalidArgument = Code(.invalidArgument)
        /// No session became free within the pool's acquire timeout.
        public static let sessionAcquireTimeout = Code(.sessionAcquireTimeout)
        /// The pool's wait queue is at its limit; the request was refused at once.
        public static let sessionPoolQueueFull = Code(.sessionPoolQueueFull)
        /// The session pool is shutting down or shut down.
        public static let sessionPoolShutDown = Code(.sessionPoolShutDown)
        /// A master key's attributes are weaker than the master-key policy allows.
        public static let masterKeyPolicyViolation = Code(.masterKeyPolicyViolation)
        /// A PIN could not be read from its source (missing file, loose permissions, empty).
        public static let pinSource = Code(.pinSource)
        /// The token refused the user PIN (`CKR_PIN_INCORRECT`, `CKR_PIN_LOCKED`, `CKR_PIN_EXPIRED`,
        /// `CKR_PIN_INVALID`, `CKR_PIN_LEN_RANGE` from `C_Login`), so the session pool makes no
        /// further login attempt until an operator supplies the right PIN (a restart, or
        /// `SessionPool.resumeLogin(pin:)`); `returnValue` holds the token's answer. Retrying
        /// would burn the token's failed-login counter and could lock the user PIN.
        public static let loginRefused = Code(.loginRefused)
        /// The module broke the PKCS#11 contract, e.g. reported more output than the buffer it was
        /// given holds, or a length no call could produce; `function` names the call and `detail`
        /// the numbers. Nothing it returned is used.
        public static let moduleMisbehaved = Code(.moduleMisbehaved)
        /// The token cannot be reached: a call answered that the device failed or is gone
        /// (`tokenUnreachableReturnValues`), an answer in doubt (`castsDoubtOnToken`) was followed
        /// by a failed `C_GetTokenInfo`, its label is no longer in the slot list, or the module is
        /// being re-initialised. `SessionPool` then closes its sessions and tries to find the
        /// token again (re-initialising the module when it is its own); meanwhile requests fail
        /// at once with this code. `function` and `returnValue` say what failed, when a call did.
        public static let tokenUnreachable = Code(.tokenUnreachable)
        /// `PKCS11Module.reinitialize()` was asked of an instance whose module another component
        /// of the process initialised: only the initialiser may finalise it.
        public static let initializationNotOwned = Code(.initializationNotOwned)
        /// `PKCS11Module.reinitialize()` found calls still running in the module (or another
        /// re-initialisation); PKCS#11 forbids `C_Finalize` meanwhile.
        public static let callsInFlight = Code(.callsInFlight)
        /// `Session.sealAESGCMWithTokenIV` found that the module did not generate the AES-GCM IV in
        /// a form the gateway can store: it left the zeroed IV buffer as given (a module that takes
        /// caller IVs, which would have encrypted under an all-zero IV: that ciphertext is
        /// discarded), or appended an IV of another length than 96 bits. `hsm.gcm_iv: gateway`
        /// fits the first kind of module; `detail` says which case it was.
        public static let ivNotGenerated = Code(.ivNotGenerated)

        public var description: String { base.rawValue }
    }

    /// What kind of failure this is.
    public let code: Code
    /// The PKCS#11 function that failed, when a function failed.
    public let function: PKCS11Function?
    /// The `CK_RV` the function returned, when a function failed.
    public let returnValue: PKCS11ReturnValue?
    /// Non-secret context: a path, a token label, a `dlerror()` text, policy violations.
    public let detail: String?
    /// The policy violations, for `masterKeyPolicyViolation`.
    public let violations: [MasterKeyPolicy.Violation]
    /// True when the session the call ran on may still hold an active operation (or the module
    /// misbehaved on it), so it must not be used again as is: `SessionPool` closes that session
    /// (only that one) and opens a replacement on demand. Set when, after a successful
    /// `C_EncryptInit`/`C_DecryptInit`, the `C_Encrypt`/`C_Decrypt` failed with
    /// `CKR_BUFFER_TOO_SMALL` or any code other than the ones that say a ciphertext does not
    /// authenticate (which end the operation), or reported more output than the buffer holds;
    /// for every `moduleMisbehaved`; and for `CKR_OPERATION_ACTIVE` from an `*Init` call.
    public let leavesSessionUnusable: Bool

    init(
        code: Code,
        function: PKCS11Function? = nil,
        returnValue: PKCS11ReturnValue? = nil,
        detail: String? = nil,
        violations: [MasterKeyPolicy.Violation] = [],
        leavesSessionUnusable: Bool = false
    ) {
        self.code = code
        self.function = function
        self.returnValue = returnValue
        self.detail = detail
        self.violations = violations
        self.leavesSessionUnusable = leavesSessionUnusable || code == .moduleMisbehaved
    }

    static func failed(_ function: PKCS11Function, _ rv: UInt) -> PKCS11Error {
        let returnValue = PKCS11ReturnValue(rawValue: rv)
        return PKCS11Error(
            code: .functionFailed,
            function: function,
            returnValue: returnValue,
            // The session was not clean when the call began: an earlier operation is still active.
            leavesSessionUnusable: returnValue == .operationActive && function.startsOperation
        )
    }

    /// A module that reported `reported` bytes (or items) of output for a buffer of `capacity`.
    static func overreported(_ function: PKCS11Function, reported: UInt, capacity: Int) -> PKCS11Error {
        PKCS11Error(
            code: .moduleMisbehaved,
            function: function,
            detail: "reported \(reported) bytes for a buffer of \(capacity)"
        )
    }

    /// The same error, marked as leaving its session unusable.
    func leavingSessionUnusable() -> PKCS11Error {
        PKCS11Error(
            code: code,
            function: function,
            returnValue: returnValue,
            detail: detail,
            violations: violations,
            leavesSessionUnusable: true
        )
    }

    /// The `C_Login` answers that no retry with the same PIN can change: the PIN is wrong, locked,
    /// expired or malformed. Each retry of `CKR_PIN_INCORRECT` may count against the token's
    /// failed-login limit.
    static let finalLoginReturnValues: Set<PKCS11ReturnValue> = [
        .pinIncorrect, .pinLocked, .pinExpired, .pinInvalid, .pinLenRange,
    ]

    /// True for a `C_Login` failure that must stop every further login attempt with this PIN.
    public var isFinalLoginFailure: Bool {
        guard function == .login, let returnValue else { return false }
        return code == .loginRefused || Self.finalLoginReturnValues.contains(returnValue)
    }

    /// `C_Decrypt` answers that mean "this ciphertext does not authenticate" (a bad tag, wrong
    /// AAD, a truncated input). The specification says they end the operation, so the session
    /// stays usable. SoftHSM2 reports a bad GCM tag as `CKR_GENERAL_ERROR`.
    static let decryptAuthenticationFailureReturnValues: Set<PKCS11ReturnValue> = [
        .encryptedDataInvalid, .encryptedDataLenRange, .aeadDecryptFailed, .generalError,
    ]

    /// True when `C_Decrypt` said the ciphertext does not authenticate.
    public var isDecryptAuthenticationFailure: Bool {
        guard code == .functionFailed, function == .decrypt, let returnValue else { return false }
        return Self.decryptAuthenticationFailureReturnValues.contains(returnValue)
    }

    /// True for `CKR_OPERATION_ACTIVE` from an `*Init` call: a session left dirty by an earlier
    /// operation (a module that did not end it when the specification says it must, or a caller
    /// that ignored an error). Nothing ran, so `SessionPool` retries the body once on another
    /// session.
    public var foundSessionDirty: Bool {
        code == .functionFailed && returnValue == .operationActive && function?.startsOperation == true
    }

    /// True when the session the call ran on can no longer be used and must be replaced:
    /// it was closed, its handle is stale, the token went away, or the login state was lost.
    public var invalidatesSession: Bool {
        guard code == .functionFailed, let returnValue else { return false }
        return Self.sessionInvalidatingReturnValues.contains(returnValue)
    }

    static let sessionInvalidatingReturnValues: Set<PKCS11ReturnValue> = [
        .sessionHandleInvalid, .sessionClosed, .deviceRemoved, .tokenNotPresent, .userNotLoggedIn,
    ]

    /// The answers that say the token as a whole cannot be reached, rather than one session or
    /// one operation failing: the device failed or was removed, the token or its slot is gone,
    /// or the module lost its initialisation (or was never given it).
    public static let tokenUnreachableReturnValues: Set<PKCS11ReturnValue> = [
        .deviceError, .deviceRemoved, .tokenNotPresent, .slotIdInvalid, .cryptokiNotInitialized, .tokenNotRecognized,
    ]

    /// True when the token as a whole cannot be reached (`tokenUnreachable`, or a call that
    /// answered one of `tokenUnreachableReturnValues`): `SessionPool` resets on it.
    public var isTokenUnreachable: Bool {
        if code == .tokenUnreachable { return true }
        guard code == .functionFailed, let returnValue else { return false }
        return Self.tokenUnreachableReturnValues.contains(returnValue)
    }

    /// Answers that may mean the token is gone although they do not say so. SoftHSM2 2.6.1, once
    /// it found its token directory gone, answers `C_GetTokenInfo` and `C_Login` with
    /// `CKR_GENERAL_ERROR` and a key handle found earlier with `CKR_OBJECT_HANDLE_INVALID` (while
    /// `C_GenerateRandom` still works, and a search finds nothing), and it keeps doing so after
    /// the directory comes back, until `C_Initialize` runs again. On such an answer `SessionPool` asks the token
    /// itself (`Session.confirmTokenReachable()`) before it decides.
    public static let tokenInDoubtReturnValues: Set<PKCS11ReturnValue> = [
        .generalError, .functionFailed, .objectHandleInvalid, .keyHandleInvalid,
    ]

    /// True for an answer that may mean the token is gone (`tokenInDoubtReturnValues`), other
    /// than a ciphertext that does not authenticate (SoftHSM2's `CKR_GENERAL_ERROR` from
    /// `C_Decrypt`), which says nothing about the token.
    public var castsDoubtOnToken: Bool {
        guard code == .functionFailed, let returnValue, !isDecryptAuthenticationFailure else { return false }
        return Self.tokenInDoubtReturnValues.contains(returnValue)
    }

    /// The same failure as a `tokenUnreachable` error: same function, return value and detail.
    func asTokenUnreachable(detail extra: String? = nil) -> PKCS11Error {
        if code == .tokenUnreachable, extra == nil { return self }
        let joined = [detail, extra].compactMap { $0 }.joined(separator: "; ")
        return PKCS11Error(
            code: .tokenUnreachable,
            function: function,
            returnValue: returnValue,
            detail: joined.isEmpty ? nil : joined,
            leavesSessionUnusable: leavesSessionUnusable
        )
    }

    public var description: String {
        var text = "PKCS#11 \(code)"
        if let function {
            text += ": \(function.rawValue) failed"
        }
        if let returnValue {
            text += " with \(returnValue)"
        }
        if let detail {
            text += " (\(detail))"
        }
        return text
    }
}

extension PKCS11Function {
    /// The `*Init` calls that start a multi-call operation on a session.
    var startsOperation: Bool {
        switch self {
        case .encryptInit, .decryptInit, .signInit, .findObjectsInit, .messageEncryptInit: true
        default: false
        }
    }
}
