internal import CPKCS11Shim
import Synchronization

/// An object on a token, valid in this process while the object exists.
///
/// Handles cannot be made from numbers, only obtained from the token (generate, find, create,
/// copy, unwrap), and are never persisted: after a restart keys are found again by `CKA_ID` or
/// `CKA_LABEL`.
public struct ObjectHandle: Hashable, Sendable, CustomStringConvertible {
    let rawValue: CK_OBJECT_HANDLE

    init(_ rawValue: CK_OBJECT_HANDLE) {
        self.rawValue = rawValue
    }

    public var description: String { "object#\(rawValue)" }
}

/// Who logs in.
public enum UserType: Sendable {
    /// The normal user (`CKU_USER`), who uses keys.
    case user
    /// The security officer (`CKU_SO`), who initialises the user PIN.
    case securityOfficer

    var rawValue: CK_USER_TYPE {
        switch self {
        case .user: CK_USER_TYPE(CKU_USER)
        case .securityOfficer: CK_USER_TYPE(CKU_SO)
        }
    }
}

/// The login state of a session (`CKS_…`).
public enum SessionState: Hashable, Sendable {
    case readOnlyPublic
    case readOnlyUser
    case readWritePublic
    case readWriteUser
    case readWriteSecurityOfficer
    case other(UInt)

    init(_ raw: CK_STATE) {
        switch raw {
        case CK_STATE(CKS_RO_PUBLIC_SESSION): self = .readOnlyPublic
        case CK_STATE(CKS_RO_USER_FUNCTIONS): self = .readOnlyUser
        case CK_STATE(CKS_RW_PUBLIC_SESSION): self = .readWritePublic
        case CK_STATE(CKS_RW_USER_FUNCTIONS): self = .readWriteUser
        case CK_STATE(CKS_RW_SO_FUNCTIONS): self = .readWriteSecurityOfficer
        default: self = .other(raw)
        }
    }

    /// The normal user is logged in.
    public var isUserLoggedIn: Bool { self == .readOnlyUser || self == .readWriteUser }
}

/// A PKCS#11 session: one handle, used by one thread at a time.
///
/// `Session` cannot be copied: the body of `SessionPool.withSession` or
/// `PKCS11Module.withSession` borrows it and cannot keep it, so a session is never used by two
/// tasks at once. Every method blocks in C; every failure is a `PKCS11Error` naming the function.
public struct Session: ~Copyable {
    let module: PKCS11Module
    let handle: CK_SESSION_HANDLE
    /// The slot the session is open on.
    public let slot: SlotID
    /// Set when a call left the session unusable; read by the pool when the lease ends.
    let condition: SessionCondition

    init(module: PKCS11Module, handle: CK_SESSION_HANDLE, slot: SlotID, epoch: Int = 0) {
        self.module = module
        self.handle = handle
        self.slot = slot
        self.epoch = epoch
        self.condition = SessionCondition()
    }

    /// The `SessionPool.epoch` the session was opened in (0 outside a pool). Object handles found
    /// on it are valid on sessions of the same epoch only: a reset between epochs may have
    /// re-initialised the module or reached a restarted HSM, where a handle can name another
    /// object.
    public let epoch: Int

    /// A number that identifies the session while it is open (for tests and logs).
    public var identifier: UInt { handle }

    /// True once a call on this session failed in a way that may leave an operation active on
    /// it, or the module misbehaved on it (`PKCS11Error.leavesSessionUnusable`). It stays set even
    /// when the caller catches the error: `SessionPool` then closes this session when the lease
    /// ends instead of handing it to the next task.
    public var isMarkedUnusable: Bool { condition.isUnusable }

    /// True once a call on this session answered that the token cannot be reached
    /// (`PKCS11Error.isTokenUnreachable`), even when the caller caught the error: `SessionPool`
    /// then resets (closes every session and finds the token again) when the lease ends.
    public var sawTokenUnreachable: Bool { condition.sawTokenUnreachable }

    /// True once a call on this session gave an answer that may mean the token is gone
    /// (`PKCS11Error.castsDoubtOnToken`), even when the caller caught the error: `SessionPool`
    /// then calls `confirmTokenReachable()` before the lease ends.
    public var sawAnswerInDoubt: Bool { condition.sawAnswerInDoubt }

    /// Asks the token whether it is still there (`C_GetTokenInfo` on this session's slot), to tell
    /// a token that is gone from an answer that only looks like it: an object not found, a key
    /// handle unknown, `CKR_GENERAL_ERROR`. A token that answers and reports itself initialised
    /// is reachable. Otherwise the session notes it (`sawTokenUnreachable`), so `SessionPool`
    /// resets when the lease ends, and this throws.
    ///
    /// - Throws: `tokenUnreachable`, with the function and return value that said so.
    public func confirmTokenReachable() throws {
        if let error = module.unreachableToken(in: slot) {
            condition.markTokenUnreachable()
            throw error
        }
    }

    // MARK: The funnel for calls on this session

    /// `PKCS11Module.callReturningCode`, noting an error that leaves the session unusable.
    @inline(__always)
    func callReturningCode<F>(
        _ function: PKCS11Function,
        _ keyPath: KeyPath<CK_FUNCTION_LIST, F?>,
        _ invoke: (F) throws -> CK_RV
    ) throws -> CK_RV {
        try noting(function) { try module.callReturningCode(function, keyPath, invoke) }
    }

    /// Runs a module call returning its code: an error that leaves the session unusable is
    /// noted, and so is what a code other than `CKR_OK` says about the token (callers accept
    /// some codes).
    @inline(__always)
    private func noting(_ function: PKCS11Function, _ body: () throws -> CK_RV) throws -> CK_RV {
        let rv: CK_RV
        do {
            rv = try body()
        } catch let error as PKCS11Error {
            throw noted(error)
        }
        if rv != CKR_OK {
            noteTokenState(PKCS11Error.failed(function, rv))
        }
        return rv
    }

    /// `PKCS11Module.call`, noting an error that leaves the session unusable.
    @inline(__always)
    func call<F>(
        _ function: PKCS11Function,
        _ keyPath: KeyPath<CK_FUNCTION_LIST, F?>,
        _ invoke: (F) throws -> CK_RV
    ) throws {
        do {
            try module.call(function, keyPath, invoke)
        } catch let error as PKCS11Error {
            throw noted(error)
        }
    }

    /// `callReturningCode` for an entry point of the PKCS#11 3.0 table.
    @inline(__always)
    func callReturningCode<F>(
        _ function: PKCS11Function,
        _ keyPath: KeyPath<hsmgw_ck_function_list_3_0, F?>,
        _ invoke: (F) throws -> CK_RV
    ) throws -> CK_RV {
        try noting(function) { try module.callReturningCode(function, keyPath, invoke) }
    }

    /// `call` for an entry point of the PKCS#11 3.0 table.
    @inline(__always)
    func call<F>(
        _ function: PKCS11Function,
        _ keyPath: KeyPath<hsmgw_ck_function_list_3_0, F?>,
        _ invoke: (F) throws -> CK_RV
    ) throws {
        let rv = try callReturningCode(function, keyPath, invoke)
        guard rv == CKR_OK else { throw noted(PKCS11Error.failed(function, rv)) }
    }

    /// Notes what `error` says about the session and the token, and returns it to throw.
    func noted(_ error: PKCS11Error) -> PKCS11Error {
        noteTokenState(error)
        return error.leavesSessionUnusable ? unusable(error) : error
    }

    /// Notes an answer that says the token is gone, or may mean it.
    func noteTokenState(_ error: PKCS11Error) {
        if error.isTokenUnreachable {
            condition.markTokenUnreachable()
        } else if error.castsDoubtOnToken {
            condition.markAnswerInDoubt()
        }
    }

    /// Marks the session unusable and returns `error`, marked the same way, to throw.
    func unusable(_ error: PKCS11Error) -> PKCS11Error {
        condition.markUnusable()
        return error.leavesSessionUnusable ? error : error.leavingSessionUnusable()
    }

    /// A `moduleMisbehaved` error for `function`, after marking the session unusable.
    func misbehaved(_ function: PKCS11Function, _ detail: String) -> PKCS11Error {
        unusable(PKCS11Error(code: .moduleMisbehaved, function: function, detail: detail))
    }

    /// Checks a length the module reported against the buffer it was given.
    func checkReported(_ function: PKCS11Function, _ reported: CK_ULONG, capacity: Int, unit: String = "bytes")
        throws -> Int
    {
        guard reported <= CK_ULONG(capacity) else {
            throw misbehaved(function, "reported \(reported) \(unit) for a buffer of \(capacity)")
        }
        return Int(reported)
    }

    /// Checks a length the module announced (a size query) against the most the caller accepts.
    func checkAnnounced(_ function: PKCS11Function, _ announced: CK_ULONG, limit: Int, what: String) throws -> Int {
        guard announced <= CK_ULONG(limit) else {
            throw misbehaved(function, "announced \(announced) bytes of \(what), over the limit of \(limit)")
        }
        return Int(announced)
    }

    // MARK: Login

    /// `C_GetSessionInfo`: the session's login state.
    public func state() throws -> SessionState {
        var info = CK_SESSION_INFO()
        try call(.getSessionInfo, \.C_GetSessionInfo) { $0(handle, &info) }
        return SessionState(info.state)
    }

    /// `C_Login`. A token that is already logged in (`CKR_USER_ALREADY_LOGGED_IN`) counts as
    /// success. The PIN is copied into a scratch buffer for the call and that copy is zeroed.
    public func login(_ userType: UserType, pin: SecretBytes) throws {
        let rv = try withMutableCopy(of: pin) { pointer, length in
            try callReturningCode(.login, \.C_Login) { $0(handle, userType.rawValue, pointer, length) }
        }
        guard rv == CKR_OK || rv == CK_RV(CKR_USER_ALREADY_LOGGED_IN) else {
            throw PKCS11Error.failed(.login, rv)
        }
    }

    /// `C_SetPIN`: changes the PIN of the user logged in on this session (or of the user when
    /// none is, for tokens that allow it). Both PINs are copied into scratch buffers for the call
    /// and those copies are zeroed.
    public func setPIN(old oldPIN: SecretBytes, new newPIN: SecretBytes) throws {
        try withMutableCopy(of: oldPIN) { oldPointer, oldLength in
            try withMutableCopy(of: newPIN) { newPointer, newLength in
                try call(.setPIN, \.C_SetPIN) { $0(handle, oldPointer, oldLength, newPointer, newLength) }
            }
        }
    }

    /// `C_Logout`.
    public func logout() throws {
        try call(.logout, \.C_Logout) { $0(handle) }
    }

    /// `C_InitPIN`: sets the user PIN (the session must be logged in as security officer).
    public func initPIN(_ pin: SecretBytes) throws {
        try withMutableCopy(of: pin) { pointer, length in
            try call(.initPIN, \.C_InitPIN) { $0(handle, pointer, length) }
        }
    }

    // MARK: Objects

    /// `C_CreateObject`.
    @discardableResult
    public func createObject(_ template: [Attribute]) throws -> ObjectHandle {
        var object = CK_OBJECT_HANDLE(0)
        try withAttributeTemplate(template) { attributes, count in
            try call(.createObject, \.C_CreateObject) { $0(handle, attributes, count, &object) }
        }
        return ObjectHandle(object)
    }

    /// `C_CopyObject`: a copy of `object` with `template` applied (e.g. `.token(false)` for a
    /// session copy of a token key; sensitivity and extractability cannot be weakened by a copy).
    ///
    /// A template that would make a copy extractable or non-sensitive is refused before
    /// `C_CopyObject` when the original is not, with the answer PKCS#11 requires of the token,
    /// `CKR_ATTRIBUTE_READ_ONLY` (the detail says the wrapper gave it): these attributes only ever
    /// change toward safety, and NSS's softoken 3.87 copies a non-extractable key into an
    /// extractable one.
    public func copyObject(_ object: ObjectHandle, template: [Attribute]) throws -> ObjectHandle {
        let makesExtractable = template.contains {
            if case .extractable(true) = $0 { true } else { false }
        }
        let makesNonSensitive = template.contains {
            if case .sensitive(false) = $0 { true } else { false }
        }
        if makesExtractable || makesNonSensitive {
            let original = try attributes([.extractable, .sensitive], of: object)
            let violations =
                (makesExtractable && original.bool(.extractable) == false ? ["CKA_EXTRACTABLE false to true"] : [])
                + (makesNonSensitive && original.bool(.sensitive) == true ? ["CKA_SENSITIVE true to false"] : [])
            if !violations.isEmpty {
                throw PKCS11Error(
                    code: .functionFailed,
                    function: .copyObject,
                    returnValue: .attributeReadOnly,
                    detail: "a copy may not change \(violations.joined(separator: " or ")): refused by the wrapper"
                )
            }
        }
        var copy = CK_OBJECT_HANDLE(0)
        try withAttributeTemplate(template) { attributes, count in
            try call(.copyObject, \.C_CopyObject) { $0(handle, object.rawValue, attributes, count, &copy) }
        }
        return ObjectHandle(copy)
    }

    /// `C_DestroyObject`.
    public func destroyObject(_ object: ObjectHandle) throws {
        try call(.destroyObject, \.C_DestroyObject) { $0(handle, object.rawValue) }
    }

    /// The most handles `findObjects` returns unless told otherwise: a search is a linear scan on
    /// most tokens and the gateway never needs more objects than it has master-key versions.
    public static let defaultFindLimit = 100_000

    /// `C_FindObjectsInit`, `C_FindObjects` (in batches), `C_FindObjectsFinal`: the objects
    /// matching every attribute of `template`, at most `limit` of them.
    public func findObjects(_ template: [Attribute], limit: Int = Session.defaultFindLimit) throws -> [ObjectHandle] {
        try withAttributeTemplate(template) { attributes, count in
            try call(.findObjectsInit, \.C_FindObjectsInit) { $0(handle, attributes, count) }
        }
        var found: [ObjectHandle] = []
        var failure: (any Error)?
        do {
            let batchSize = 64
            var batch = [CK_OBJECT_HANDLE](repeating: 0, count: batchSize)
            while found.count < limit {
                var returned = CK_ULONG(0)
                let wanted = CK_ULONG(min(batchSize, limit - found.count))
                try call(.findObjects, \.C_FindObjects) { $0(handle, &batch, wanted, &returned) }
                let count = try checkReported(.findObjects, returned, capacity: Int(wanted), unit: "handles")
                if count == 0 { break }
                found += batch.prefix(count).map(ObjectHandle.init)
            }
        } catch {
            failure = error
        }
        // Always end the search, or the session refuses the next one (CKR_OPERATION_ACTIVE).
        let rv = try callReturningCode(.findObjectsFinal, \.C_FindObjectsFinal) { $0(handle) }
        if let failure { throw failure }
        guard rv == CKR_OK else { throw PKCS11Error.failed(.findObjectsFinal, rv) }
        return found
    }

    /// `C_GetAttributeValue` for each of `types`, with the two-call size query. Sensitive and
    /// missing attributes come back as `.sensitive` and `.typeInvalid` instead of failing the read.
    /// Not for `CKA_VALUE`: key material is read only through `secretValue(of:)`, into memory that
    /// is zeroed on release.
    public func attributes(_ types: [AttributeType], of object: ObjectHandle) throws -> AttributeValues {
        guard !types.contains(.value) else {
            throw PKCS11Error(
                code: .invalidArgument,
                function: .getAttributeValue,
                detail: "CKA_VALUE is read with secretValue(of:)"
            )
        }
        var template = types.map { CK_ATTRIBUTE(type: $0.rawValue, pValue: nil, ulValueLen: 0) }
        let sizeRV = try callReturningCode(.getAttributeValue, \.C_GetAttributeValue) {
            $0(handle, object.rawValue, &template, CK_ULONG(template.count))
        }
        guard
            sizeRV == CKR_OK || sizeRV == CK_RV(CKR_ATTRIBUTE_SENSITIVE) || sizeRV == CK_RV(CKR_ATTRIBUTE_TYPE_INVALID)
        else {
            throw PKCS11Error.failed(.getAttributeValue, sizeRV)
        }

        var values: [AttributeType: AttributeValue] = [:]
        var available: [(type: AttributeType, length: Int)] = []
        for (index, type) in types.enumerated() {
            let length = template[index].ulValueLen
            if length == hsmgw_ck_unavailable_information {
                values[type] = try unavailableReason(type, of: object)
            } else {
                let checked = try checkAnnounced(
                    .getAttributeValue, length, limit: Session.maximumAttributeByteCount, what: "\(type)")
                available.append((type, checked))
            }
        }
        guard !available.isEmpty else { return AttributeValues(values: values) }

        // One buffer for all values; each attribute points at its own range of it.
        let offsets = available.reduce(into: [0]) { $0.append($0.last! + $1.length) }
        var storage = [UInt8](repeating: 0, count: max(offsets.last!, 1))
        let (rv, written) = try storage.withUnsafeMutableBytes { storage in
            var valueTemplate = available.enumerated().map { index, entry in
                CK_ATTRIBUTE(
                    type: entry.type.rawValue,
                    pValue: storage.baseAddress! + offsets[index],
                    ulValueLen: CK_ULONG(entry.length)
                )
            }
            let rv = try callReturningCode(.getAttributeValue, \.C_GetAttributeValue) {
                $0(handle, object.rawValue, &valueTemplate, CK_ULONG(valueTemplate.count))
            }
            return (rv, valueTemplate.map(\.ulValueLen))
        }
        guard rv == CKR_OK else { throw PKCS11Error.failed(.getAttributeValue, rv) }
        for (index, entry) in available.enumerated() {
            // The module writes each value's real length back; it can only be what fits.
            let length = try checkReported(.getAttributeValue, written[index], capacity: entry.length)
            values[entry.type] = .bytes(Array(storage[offsets[index]..<(offsets[index] + length)]))
        }
        return AttributeValues(values: values)
    }

    /// Asks for one unavailable attribute alone to learn why the token withheld it.
    private func unavailableReason(_ type: AttributeType, of object: ObjectHandle) throws -> AttributeValue {
        var single = CK_ATTRIBUTE(type: type.rawValue, pValue: nil, ulValueLen: 0)
        let rv = try callReturningCode(.getAttributeValue, \.C_GetAttributeValue) {
            $0(handle, object.rawValue, &single, 1)
        }
        switch rv {
        case CK_RV(CKR_ATTRIBUTE_SENSITIVE): return .sensitive
        case CK_RV(CKR_ATTRIBUTE_TYPE_INVALID), CK_RV(CKR_OK): return .typeInvalid
        default: throw PKCS11Error.failed(.getAttributeValue, rv)
        }
    }

    /// `CKA_VALUE` of a non-sensitive, extractable key, into zeroed-on-release memory. A
    /// sensitive key fails with `CKR_ATTRIBUTE_SENSITIVE` from `C_GetAttributeValue`.
    public func secretValue(of object: ObjectHandle) throws -> SecretBytes {
        var attribute = CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_VALUE), pValue: nil, ulValueLen: 0)
        try call(.getAttributeValue, \.C_GetAttributeValue) { $0(handle, object.rawValue, &attribute, 1) }
        let length = try checkAnnounced(
            .getAttributeValue, attribute.ulValueLen, limit: Session.maximumAttributeByteCount, what: "CKA_VALUE")
        return try SecretBytes(capacity: length) { buffer in
            attribute.pValue = buffer.baseAddress
            attribute.ulValueLen = CK_ULONG(length)
            try call(.getAttributeValue, \.C_GetAttributeValue) { $0(handle, object.rawValue, &attribute, 1) }
            return try checkReported(.getAttributeValue, attribute.ulValueLen, capacity: length)
        }
    }

    /// The largest attribute value `attributes(_:of:)` and `secretValue(of:)` read. Labels, ids,
    /// flags and symmetric keys are at most a few hundred bytes, a certificate a few KiB; a module
    /// announcing more is broken, and allocating whatever it says would let it exhaust memory.
    public static let maximumAttributeByteCount = 64 * 1024

    // MARK: Keys

    /// `C_GenerateKey` with `mechanism` (no parameters) and `template`.
    public func generateKey(_ mechanism: Mechanism, template: [Attribute]) throws -> ObjectHandle {
        var ckMechanism = CK_MECHANISM(mechanism: mechanism.rawValue, pParameter: nil, ulParameterLen: 0)
        var key = CK_OBJECT_HANDLE(0)
        try withAttributeTemplate(template) { attributes, count in
            try call(.generateKey, \.C_GenerateKey) { $0(handle, &ckMechanism, attributes, count, &key) }
        }
        return ObjectHandle(key)
    }

    /// `C_WrapKey` with the two-call size query: `key` wrapped under `wrappingKey`.
    ///
    /// A key whose `CKA_EXTRACTABLE` reads false is refused before `C_WrapKey` with the answer
    /// PKCS#11 requires of the token, `CKR_KEY_UNEXTRACTABLE` (the detail says the wrapper gave
    /// it): NSS's softoken 3.87 wraps such keys anyway, and a master key must never leave the
    /// token, whatever the module.
    public func wrapKey(_ key: ObjectHandle, with wrappingKey: ObjectHandle, mechanism: Mechanism) throws -> [UInt8] {
        if try attributes([.extractable], of: key).bool(.extractable) == false {
            throw PKCS11Error(
                code: .functionFailed,
                function: .wrapKey,
                returnValue: .keyUnextractable,
                detail: "CKA_EXTRACTABLE is false: refused by the wrapper before C_WrapKey"
            )
        }
        var ckMechanism = CK_MECHANISM(mechanism: mechanism.rawValue, pParameter: nil, ulParameterLen: 0)
        var length = CK_ULONG(0)
        try call(.wrapKey, \.C_WrapKey) {
            $0(handle, &ckMechanism, wrappingKey.rawValue, key.rawValue, nil, &length)
        }
        let announced = try checkAnnounced(
            .wrapKey, length, limit: Session.maximumWrappedKeyByteCount, what: "wrapped key")
        var capacity = announced
        var wrapped = [UInt8](repeating: 0, count: capacity)
        length = CK_ULONG(capacity)
        var rv = try callReturningCode(.wrapKey, \.C_WrapKey) {
            $0(handle, &ckMechanism, wrappingKey.rawValue, key.rawValue, &wrapped, &length)
        }
        if rv == CK_RV(CKR_BUFFER_TOO_SMALL) {
            // NSS 3.87 announces the key's own length for CKM_AES_KEY_WRAP_KWP, 8 bytes short of
            // what it writes, and then refuses the buffer it asked for. Key wrap adds at most one
            // 8-byte integrity block and 7 bytes of padding: one retry with this much room suffices.
            capacity = announced + Session.wrappedKeySizeQuerySlack
            wrapped = [UInt8](repeating: 0, count: capacity)
            length = CK_ULONG(capacity)
            rv = try callReturningCode(.wrapKey, \.C_WrapKey) {
                $0(handle, &ckMechanism, wrappingKey.rawValue, key.rawValue, &wrapped, &length)
            }
        }
        guard rv == CKR_OK else { throw noted(PKCS11Error.failed(.wrapKey, rv)) }
        return Array(wrapped.prefix(try checkReported(.wrapKey, length, capacity: capacity)))
    }

    /// Room `wrapKey` adds to the announced length when the module refused the buffer it asked
    /// for (see there): an AES block.
    static let wrappedKeySizeQuerySlack = 16

    /// The largest wrapped key `wrapKey` accepts: an AES-256 key wraps to 40 bytes, an RSA-8192
    /// private key to about 5 KiB; a module announcing more is broken.
    public static let maximumWrappedKeyByteCount = 64 * 1024

    /// `C_UnwrapKey`: a new key object from `wrapped`, with `template`.
    public func unwrapKey(
        _ wrapped: [UInt8],
        with unwrappingKey: ObjectHandle,
        mechanism: Mechanism,
        template: [Attribute]
    ) throws -> ObjectHandle {
        var ckMechanism = CK_MECHANISM(mechanism: mechanism.rawValue, pParameter: nil, ulParameterLen: 0)
        var wrappedCopy = wrapped
        var key = CK_OBJECT_HANDLE(0)
        try withAttributeTemplate(template) { attributes, count in
            try call(.unwrapKey, \.C_UnwrapKey) {
                $0(
                    handle, &ckMechanism, unwrappingKey.rawValue, &wrappedCopy, CK_ULONG(wrappedCopy.count), attributes,
                    count, &key)
            }
        }
        return ObjectHandle(key)
    }

    // MARK: Random

    /// The largest single `generateRandom` request: far above any key or IV, small enough that a
    /// caller's mistake cannot make the token block for long or the process allocate much.
    public static let maximumRandomByteCount = 1 << 20

    /// `C_GenerateRandom` into `buffer`.
    public func generateRandom(into buffer: UnsafeMutableRawBufferPointer) throws {
        guard buffer.count <= Session.maximumRandomByteCount else {
            throw PKCS11Error(
                code: .invalidArgument,
                function: .generateRandom,
                detail: "\(buffer.count) random bytes requested, at most \(Session.maximumRandomByteCount)"
            )
        }
        guard let base = buffer.baseAddress, buffer.count > 0 else { return }
        try call(.generateRandom, \.C_GenerateRandom) {
            $0(handle, base.assumingMemoryBound(to: CK_BYTE.self), CK_ULONG(buffer.count))
        }
    }

    /// `count` random bytes from the token's RNG.
    public func generateRandom(count: Int) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        try bytes.withUnsafeMutableBytes { try generateRandom(into: $0) }
        return bytes
    }

    /// `count` random bytes from the token's RNG, for key material.
    public func generateRandomSecret(count: Int) throws -> SecretBytes {
        try SecretBytes(count: count) { try generateRandom(into: $0) }
    }
}

/// Whether a session may be used again once its lease ends. A reference, so that methods of the
/// borrowed, non-copyable `Session` can record it and the pool can read it afterwards.
final class SessionCondition: Sendable {
    private let unusable = Atomic<Bool>(false)
    private let tokenUnreachable = Atomic<Bool>(false)
    private let answerInDoubt = Atomic<Bool>(false)

    func markUnusable() { unusable.store(true, ordering: .relaxed) }

    var isUnusable: Bool { unusable.load(ordering: .relaxed) }

    func markTokenUnreachable() { tokenUnreachable.store(true, ordering: .relaxed) }

    var sawTokenUnreachable: Bool { tokenUnreachable.load(ordering: .relaxed) }

    func markAnswerInDoubt() { answerInDoubt.store(true, ordering: .relaxed) }

    var sawAnswerInDoubt: Bool { answerInDoubt.load(ordering: .relaxed) }
}
