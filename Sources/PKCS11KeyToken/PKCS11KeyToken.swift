import KeyHierarchy
import PKCS11
import Synchronization

/// The `MasterKeyToken` port on a PKCS#11 token, through a `SessionPool`.
///
/// Key objects are found by `CKA_ID` (handles are never stored outside this process); the
/// handle of each master key is cached after its attributes have been read back and checked
/// against `MasterKeyPolicy` (security invariant 1: a weaker key is refused, at first use in
/// each process). Every operation of one `perform` call runs in one session lease.
public final class PKCS11KeyToken: MasterKeyToken {
    /// The pool the adapter leases sessions from (read-write: it creates and destroys objects).
    public let pool: SessionPool
    private let handles = Mutex<[TokenKeyID: ObjectHandle]>([:])

    public init(pool: SessionPool) {
        self.pool = pool
    }

    public func generateMasterKey(id: TokenKeyID, label: String) async throws(TokenError) {
        let handle = try await lease { session in
            let handle = try session.generateMasterKey(label: label, id: id.bytes)
            do {
                try session.verifyMasterKey(handle)
            } catch {
                try? session.destroyObject(handle)
                throw error
            }
            return handle
        }
        handles.withLock { $0[id] = handle }
    }

    public func destroyMasterKey(id: TokenKeyID) async throws(TokenError) -> Bool {
        handles.withLock { _ = $0.removeValue(forKey: id) }
        return try await lease { session in
            guard let handle = try session.findMasterKey(id: id.bytes) else { return false }
            try session.destroyObject(handle)
            return true
        }
    }

    public func destroyMasterKeys(labelPrefix: String) async throws(TokenError) -> Int {
        let destroyed = try await lease { session in
            let keys = try session.findMasterKeys(labelPrefix: labelPrefix)
            for key in keys { try session.destroyObject(key.handle) }
            return keys.map(\.id)
        }
        handles.withLock { cache in
            for id in destroyed.compactMap({ TokenKeyID(bytes: $0) }) { cache.removeValue(forKey: id) }
        }
        return destroyed.count
    }

    public func masterKeyLabels(labelPrefix: String) async throws(TokenError) -> [String] {
        try await lease { session in try session.findMasterKeys(labelPrefix: labelPrefix).map(\.label) }
    }

    public func perform(_ operations: [TokenOperation]) async throws(TokenError) -> [TokenResult] {
        let cached = handles.withLock { $0 }
        let (results, found, stale) = try await lease { session in
            try Self.run(operations, on: session, cached: cached)
        }
        handles.withLock { cache in
            for (id, handle) in found { cache[id] = handle }
            for id in stale { cache.removeValue(forKey: id) }
        }
        return results
    }

    // MARK: - Running operations in one lease

    /// Runs every operation; returns results, handles found (and verified) on the way, and ids
    /// whose cached handle turned out to be stale.
    private static func run(
        _ operations: [TokenOperation],
        on session: borrowing Session,
        cached: [TokenKeyID: ObjectHandle]
    ) throws -> ([TokenResult], [TokenKeyID: ObjectHandle], Set<TokenKeyID>) {
        var known = cached
        var found: [TokenKeyID: ObjectHandle] = [:]
        var stale: Set<TokenKeyID> = []
        var results: [TokenResult] = []
        results.reserveCapacity(operations.count)
        for operation in operations {
            do {
                results.append(try runOne(operation, on: session, known: &known, found: &found, stale: &stale))
            } catch let error as PKCS11Error where error.invalidatesSession {
                // The whole lease is gone: let the pool replace the session and retry.
                throw error
            } catch {
                results.append(.failed(map(error, decrypting: operation.decrypts)))
            }
        }
        return (results, found, stale)
    }

    private static func runOne(
        _ operation: TokenOperation,
        on session: borrowing Session,
        known: inout [TokenKeyID: ObjectHandle],
        found: inout [TokenKeyID: ObjectHandle],
        stale: inout Set<TokenKeyID>
    ) throws -> TokenResult {
        switch operation {
        case .generateAndWrap(let key, let iv, let aad):
            let handle = try resolve(key, on: session, known: &known, found: &found, stale: &stale)
            let plaintext = try session.generateRandomSecret(count: 32)
            let sealed = try withStaleRetry(key, on: session, handle, &known, &found, &stale) { session, handle in
                try session.encryptAESGCM(key: handle, iv: iv, aad: aad, plaintext: plaintext)
            }
            return .generated(plaintext: plaintext, ciphertextAndTag: sealed)
        case .wrap(let key, let iv, let aad, let plaintext):
            let handle = try resolve(key, on: session, known: &known, found: &found, stale: &stale)
            let sealed = try withStaleRetry(key, on: session, handle, &known, &found, &stale) { session, handle in
                try session.encryptAESGCM(key: handle, iv: iv, aad: aad, plaintext: plaintext)
            }
            return .wrapped(ciphertextAndTag: sealed)
        case .unwrap(let key, let iv, let aad, let ciphertextAndTag):
            let handle = try resolve(key, on: session, known: &known, found: &found, stale: &stale)
            let plaintext = try withStaleRetry(key, on: session, handle, &known, &found, &stale) { session, handle in
                try session.decryptAESGCM(key: handle, iv: iv, aad: aad, ciphertextAndTag: ciphertextAndTag)
            }
            return .unwrapped(plaintext: plaintext)
        case .rewrap(let from, let iv, let aad, let ciphertextAndTag, let to, let newIV, let newAAD):
            let source = try resolve(from, on: session, known: &known, found: &found, stale: &stale)
            let plaintext = try withStaleRetry(from, on: session, source, &known, &found, &stale) { session, handle in
                try session.decryptAESGCM(key: handle, iv: iv, aad: aad, ciphertextAndTag: ciphertextAndTag)
            }
            // `plaintext` is zeroed when it goes out of scope at the end of this case.
            let target = try resolve(to, on: session, known: &known, found: &found, stale: &stale)
            do {
                let sealed = try withStaleRetry(to, on: session, target, &known, &found, &stale) { session, handle in
                    try session.encryptAESGCM(key: handle, iv: newIV, aad: newAAD, plaintext: plaintext)
                }
                return .rewrapped(ciphertextAndTag: sealed)
            } catch let error as PKCS11Error where error.function == .decrypt || error.function == .decryptInit {
                throw error
            } catch {
                // A failure of the wrap half is not an authentication failure of the input.
                throw TokenError(.other, "\(error)")
            }
        }
    }

    /// The handle of master key `id`: cached, or found by `CKA_ID` and checked against the
    /// policy (a weaker key is refused and never cached).
    private static func resolve(
        _ id: TokenKeyID,
        on session: borrowing Session,
        known: inout [TokenKeyID: ObjectHandle],
        found: inout [TokenKeyID: ObjectHandle],
        stale: inout Set<TokenKeyID>
    ) throws -> ObjectHandle {
        if let handle = known[id] { return handle }
        guard let handle = try session.findMasterKey(id: id.bytes) else {
            throw TokenError(.keyNotFound, "no master key with CKA_ID \(id)")
        }
        try session.verifyMasterKey(handle)
        known[id] = handle
        found[id] = handle
        return handle
    }

    /// Runs `body` with a cached handle; when the token says the handle is no longer valid
    /// (the key was destroyed and maybe recreated, or the token re-initialised), finds the key
    /// again once.
    private static func withStaleRetry<T>(
        _ id: TokenKeyID,
        on session: borrowing Session,
        _ handle: ObjectHandle,
        _ known: inout [TokenKeyID: ObjectHandle],
        _ found: inout [TokenKeyID: ObjectHandle],
        _ stale: inout Set<TokenKeyID>,
        _ body: (borrowing Session, ObjectHandle) throws -> T
    ) throws -> T {
        do {
            return try body(session, handle)
        } catch let error as PKCS11Error
            where error.returnValue == .keyHandleInvalid || error.returnValue == .objectHandleInvalid
        {
            known.removeValue(forKey: id)
            found.removeValue(forKey: id)
            stale.insert(id)
            let fresh = try resolve(id, on: session, known: &known, found: &found, stale: &stale)
            return try body(session, fresh)
        }
    }

    // MARK: - Errors

    private func lease<T: Sendable>(_ body: @escaping @Sendable (borrowing Session) throws -> T)
        async throws(TokenError)
        -> T
    {
        do {
            return try await pool.withSession(body)
        } catch {
            throw Self.map(error, decrypting: false)
        }
    }

    /// PKCS#11 failures as token errors. A failed decrypt is an authentication failure: tokens
    /// report a bad GCM tag as `CKR_ENCRYPTED_DATA_INVALID`, `CKR_AEAD_DECRYPT_FAILED` or
    /// (SoftHSM2) `CKR_GENERAL_ERROR`.
    static func map(_ error: any Error, decrypting: Bool) -> TokenError {
        switch error {
        case let error as TokenError:
            return error
        case let error as PKCS11Error:
            if error.code == .masterKeyPolicyViolation {
                return TokenError(.policyViolation, error.description)
            }
            if error.code == .sessionAcquireTimeout || error.code == .sessionPoolQueueFull
                || error.code == .sessionPoolShutDown || error.code == .loginRefused || error.invalidatesSession
                || error.returnValue == .deviceError || error.returnValue == .deviceMemory
            {
                return TokenError(.unavailable, error.description)
            }
            if decrypting, error.function == .decrypt || error.function == .decryptInit,
                error.returnValue == .generalError || error.returnValue == .encryptedDataInvalid
                    || error.returnValue == .aeadDecryptFailed || error.returnValue == .encryptedDataLenRange
            {
                return TokenError(.authenticationFailed, error.description)
            }
            if decrypting, error.code == .invalidArgument {
                // A blob of the wrong size never authenticates.
                return TokenError(.authenticationFailed, error.description)
            }
            return TokenError(.other, error.description)
        default:
            return TokenError(.other, String(describing: error))
        }
    }
}

extension TokenOperation {
    /// Whether the operation decrypts caller-influenced input (so a failure means "does not
    /// authenticate").
    fileprivate var decrypts: Bool {
        switch self {
        case .unwrap, .rewrap: return true
        case .generateAndWrap, .wrap: return false
        }
    }
}
