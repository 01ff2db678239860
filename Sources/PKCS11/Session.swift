internal import CPKCS11Shim

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

    init(module: PKCS11Module, handle: CK_SESSION_HANDLE, slot: SlotID) {
        self.module = module
        self.handle = handle
        self.slot = slot
    }

    /// A number that identifies the session while it is open (for tests and logs).
    public var identifier: UInt { handle }

    // MARK: Login

    /// `C_GetSessionInfo`: the session's login state.
    public func state() throws -> SessionState {
        var info = CK_SESSION_INFO()
        try module.call(.getSessionInfo, \.C_GetSessionInfo) { $0(handle, &info) }
        return SessionState(info.state)
    }

    /// `C_Login`. A token that is already logged in (`CKR_USER_ALREADY_LOGGED_IN`) counts as
    /// success. The PIN is copied into a scratch buffer for the call and that copy is zeroed.
    public func login(_ userType: UserType, pin: SecretBytes) throws {
        let rv = try withMutableCopy(of: pin) { pointer, length in
            try module.callReturningCode(.login, \.C_Login) { $0(handle, userType.rawValue, pointer, length) }
        }
        guard rv == CKR_OK || rv == CK_RV(CKR_USER_ALREADY_LOGGED_IN) else {
            throw PKCS11Error.failed(.login, rv)
        }
    }

    /// `C_Logout`.
    public func logout() throws {
        try module.call(.logout, \.C_Logout) { $0(handle) }
    }

    /// `C_InitPIN`: sets the user PIN (the session must be logged in as security officer).
    public func initPIN(_ pin: SecretBytes) throws {
        try withMutableCopy(of: pin) { pointer, length in
            try module.call(.initPIN, \.C_InitPIN) { $0(handle, pointer, length) }
        }
    }

    // MARK: Objects

    /// `C_CreateObject`.
    @discardableResult
    public func createObject(_ template: [Attribute]) throws -> ObjectHandle {
        var object = CK_OBJECT_HANDLE(0)
        try withAttributeTemplate(template) { attributes, count in
            try module.call(.createObject, \.C_CreateObject) { $0(handle, attributes, count, &object) }
        }
        return ObjectHandle(object)
    }

    /// `C_CopyObject`: a copy of `object` with `template` applied (e.g. `.token(false)` for a
    /// session copy of a token key; sensitivity and extractability cannot be weakened by a copy).
    public func copyObject(_ object: ObjectHandle, template: [Attribute]) throws -> ObjectHandle {
        var copy = CK_OBJECT_HANDLE(0)
        try withAttributeTemplate(template) { attributes, count in
            try module.call(.copyObject, \.C_CopyObject) { $0(handle, object.rawValue, attributes, count, &copy) }
        }
        return ObjectHandle(copy)
    }

    /// `C_DestroyObject`.
    public func destroyObject(_ object: ObjectHandle) throws {
        try module.call(.destroyObject, \.C_DestroyObject) { $0(handle, object.rawValue) }
    }

    /// The most handles `findObjects` returns unless told otherwise: a search is a linear scan on
    /// most tokens and the gateway never needs more objects than it has master-key versions.
    public static let defaultFindLimit = 100_000

    /// `C_FindObjectsInit`, `C_FindObjects` (in batches), `C_FindObjectsFinal`: the objects
    /// matching every attribute of `template`, at most `limit` of them.
    public func findObjects(_ template: [Attribute], limit: Int = Session.defaultFindLimit) throws -> [ObjectHandle] {
        try withAttributeTemplate(template) { attributes, count in
            try module.call(.findObjectsInit, \.C_FindObjectsInit) { $0(handle, attributes, count) }
        }
        var found: [ObjectHandle] = []
        var failure: (any Error)?
        do {
            let batchSize = 64
            var batch = [CK_OBJECT_HANDLE](repeating: 0, count: batchSize)
            while found.count < limit {
                var returned = CK_ULONG(0)
                let wanted = CK_ULONG(min(batchSize, limit - found.count))
                try module.call(.findObjects, \.C_FindObjects) { $0(handle, &batch, wanted, &returned) }
                if returned == 0 { break }
                found += batch.prefix(Int(returned)).map(ObjectHandle.init)
            }
        } catch {
            failure = error
        }
        // Always end the search, or the session refuses the next one (CKR_OPERATION_ACTIVE).
        let rv = try module.callReturningCode(.findObjectsFinal, \.C_FindObjectsFinal) { $0(handle) }
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
        let sizeRV = try module.callReturningCode(.getAttributeValue, \.C_GetAttributeValue) {
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
                available.append((type, Int(length)))
            }
        }
        guard !available.isEmpty else { return AttributeValues(values: values) }

        // One buffer for all values; each attribute points at its own range of it.
        let offsets = available.reduce(into: [0]) { $0.append($0.last! + $1.length) }
        var storage = [UInt8](repeating: 0, count: max(offsets.last!, 1))
        let rv = try storage.withUnsafeMutableBytes { storage in
            var valueTemplate = available.enumerated().map { index, entry in
                CK_ATTRIBUTE(
                    type: entry.type.rawValue,
                    pValue: storage.baseAddress! + offsets[index],
                    ulValueLen: CK_ULONG(entry.length)
                )
            }
            return try module.callReturningCode(.getAttributeValue, \.C_GetAttributeValue) {
                $0(handle, object.rawValue, &valueTemplate, CK_ULONG(valueTemplate.count))
            }
        }
        guard rv == CKR_OK else { throw PKCS11Error.failed(.getAttributeValue, rv) }
        for (index, entry) in available.enumerated() {
            values[entry.type] = .bytes(Array(storage[offsets[index]..<offsets[index + 1]]))
        }
        return AttributeValues(values: values)
    }

    /// Asks for one unavailable attribute alone to learn why the token withheld it.
    private func unavailableReason(_ type: AttributeType, of object: ObjectHandle) throws -> AttributeValue {
        var single = CK_ATTRIBUTE(type: type.rawValue, pValue: nil, ulValueLen: 0)
        let rv = try module.callReturningCode(.getAttributeValue, \.C_GetAttributeValue) {
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
        try module.call(.getAttributeValue, \.C_GetAttributeValue) { $0(handle, object.rawValue, &attribute, 1) }
        let length = Int(attribute.ulValueLen)
        return try SecretBytes(count: length) { buffer in
            attribute.pValue = buffer.baseAddress
            try module.call(.getAttributeValue, \.C_GetAttributeValue) { $0(handle, object.rawValue, &attribute, 1) }
        }
    }

    // MARK: Keys

    /// `C_GenerateKey` with `mechanism` (no parameters) and `template`.
    public func generateKey(_ mechanism: Mechanism, template: [Attribute]) throws -> ObjectHandle {
        var ckMechanism = CK_MECHANISM(mechanism: mechanism.rawValue, pParameter: nil, ulParameterLen: 0)
        var key = CK_OBJECT_HANDLE(0)
        try withAttributeTemplate(template) { attributes, count in
            try module.call(.generateKey, \.C_GenerateKey) { $0(handle, &ckMechanism, attributes, count, &key) }
        }
        return ObjectHandle(key)
    }

    /// `C_WrapKey` with the two-call size query: `key` wrapped under `wrappingKey`.
    public func wrapKey(_ key: ObjectHandle, with wrappingKey: ObjectHandle, mechanism: Mechanism) throws -> [UInt8] {
        var ckMechanism = CK_MECHANISM(mechanism: mechanism.rawValue, pParameter: nil, ulParameterLen: 0)
        var length = CK_ULONG(0)
        try module.call(.wrapKey, \.C_WrapKey) {
            $0(handle, &ckMechanism, wrappingKey.rawValue, key.rawValue, nil, &length)
        }
        var wrapped = [UInt8](repeating: 0, count: Int(length))
        try module.call(.wrapKey, \.C_WrapKey) {
            $0(handle, &ckMechanism, wrappingKey.rawValue, key.rawValue, &wrapped, &length)
        }
        return Array(wrapped.prefix(Int(length)))
    }

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
            try module.call(.unwrapKey, \.C_UnwrapKey) {
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
        try module.call(.generateRandom, \.C_GenerateRandom) {
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
