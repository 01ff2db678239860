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

    init(
        code: Code,
        function: PKCS11Function? = nil,
        returnValue: PKCS11ReturnValue? = nil,
        detail: String? = nil,
        violations: [MasterKeyPolicy.Violation] = []
    ) {
        self.code = code
        self.function = function
        self.returnValue = returnValue
        self.detail = detail
        self.violations = violations
    }

    static func failed(_ function: PKCS11Function, _ rv: UInt) -> PKCS11Error {
        PKCS11Error(code: .functionFailed, function: function, returnValue: PKCS11ReturnValue(rawValue: rv))
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
