import KeyHierarchy
import PKCS11
import Synchronization

/// The `MasterKeyToken` port on a PKCS#11 token, through a `SessionPool`.
///
/// Key objects are found by `CKA_ID` (handles are never stored outside this process). Before a
/// handle is used, and cached, the object's label is checked against the reference the key
/// service passed (the tenant and version it must belong to) and its attributes against the
/// policy (security invariants 1 and 3: a weaker key or another tenant's key is refused). Every
/// operation of one `perform` call runs in one session lease.
public final class PKCS11KeyToken: MasterKeyToken {
    /// The pool the adapter leases sessions from (read-write: it creates and destroys objects).
    public let pool: SessionPool
    private let handles = Mutex<[TokenKeyID: CachedKey]>([:])
    private let probeKey = Mutex<TokenKeyReference?>(nil)

    /// A handle found and checked, with the label it was checked against and the session epoch
    /// it was found in: it is used on sessions of that epoch only (after a reset of the pool a
    /// handle may name another object).
    fileprivate struct CachedKey: Sendable {
        let handle: ObjectHandle
        let label: String
        let epoch: Int
    }

    /// Who makes the IV of each AES-GCM encryption under a master key (`hsm.gcm_iv`).
    public let ivSource: GCMIVSource

    /// An adapter on `pool`; `ivSource` says who makes GCM IVs (`.token` for HSMs in FIPS mode
    /// that refuse an IV chosen by the caller). Decryption is the same whatever it is.
    public init(pool: SessionPool, ivSource: GCMIVSource = .gateway) {
        self.pool = pool
        self.ivSource = ivSource
    }

    public func generateMasterKey(id: TokenKeyID, label: String) async throws(TokenError) {
        let (handle, epoch) = try await lease { session in
            let handle = try session.generateMasterKey(label: label, id: id.bytes)
            do {
                try session.verifyMasterKey(handle)
            } catch {
                try? session.destroyObject(handle)
                throw error
            }
            return (handle, session.epoch)
        }
        handles.withLock { $0[id] = CachedKey(handle: handle, label: label, epoch: epoch) }
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

    public func prepareAuditKey(label: String) async throws(TokenError) -> (id: TokenKeyID, created: Bool) {
        let (id, handle, created, epoch) = try await lease { session -> (TokenKeyID, ObjectHandle, Bool, Int) in
            let found = try session.findSecretKeys(label: label)
            guard found.count <= 1 else {
                throw TokenError(.other, "\(found.count) objects are labelled \(label); expected one audit key")
            }
            if let existing = found.first {
                guard let id = TokenKeyID(bytes: existing.id) else {
                    throw TokenError(.other, "the audit key's CKA_ID is not \(TokenKeyID.byteCount) bytes")
                }
                try session.verifyAuditKey(existing.handle)
                return (id, existing.handle, false, session.epoch)
            }
            let id = TokenKeyID.random()
            let handle = try session.generateAuditKey(label: label, id: id.bytes)
            do {
                try session.verifyAuditKey(handle)
            } catch {
                try? session.destroyObject(handle)
                throw error
            }
            return (id, handle, true, session.epoch)
        }
        handles.withLock { $0[id] = CachedKey(handle: handle, label: label, epoch: epoch) }
        return (id, created)
    }

    // MARK: - The probe key: what the token must be able to do, checked for readiness

    /// The label of the probe key: an AES-256 key made like a master key (the master-key policy),
    /// used only to check that the token does what the gateway needs, and as the canary that says
    /// whether the token's objects can be reached at all.
    public static let probeKeyLabel = "hsmgw:probe:v1"

    /// Finds the probe key, or generates it when the token has none (first start), checked against
    /// the master-key policy. Call at start-up, before `checkHealth`.
    public func prepareProbeKey() async throws(TokenError) {
        let (id, handle, epoch) = try await lease { session -> (TokenKeyID, ObjectHandle, Int) in
            if let existing = try session.findSecretKeys(label: Self.probeKeyLabel).first,
                let id = TokenKeyID(bytes: existing.id)
            {
                try session.verifyMasterKey(existing.handle)
                return (id, existing.handle, session.epoch)
            }
            let id = TokenKeyID.random()
            let handle = try session.generateMasterKey(label: Self.probeKeyLabel, id: id.bytes)
            do {
                try session.verifyMasterKey(handle)
            } catch {
                try? session.destroyObject(handle)
                throw error
            }
            return (id, handle, session.epoch)
        }
        handles.withLock { $0[id] = CachedKey(handle: handle, label: Self.probeKeyLabel, epoch: epoch) }
        probeKey.withLock { $0 = TokenKeyReference(id: id, label: Self.probeKeyLabel) }
    }

    /// Checks that the token does what the gateway needs, the way real calls do it: an AES-GCM
    /// encryption and decryption of a random key under the probe key, in one lease. Throws
    /// `.unavailable` when the token or its objects cannot be reached, and `.other` naming the
    /// failing call when the token cannot do AES-GCM (p11-kit 0.24's remote protocol cannot carry
    /// GCM parameters, for one).
    public func checkHealth() async throws(TokenError) {
        guard let key = probeKey.withLock({ $0 }) else {
            throw TokenError(.unavailable, "the probe key is not prepared")
        }
        let aad = Array("hsmgw-probe".utf8)
        let sealed = try await perform([.generateAndWrap(key: key, aad: aad)])
        guard case .generated(let plaintext, let iv, let ciphertextAndTag) = sealed[0] else {
            if case .failed(let error) = sealed[0] { throw Self.describeForHealth(error) }
            throw TokenError(.other, "the probe did not wrap")
        }
        let opened = try await perform([.unwrap(key: key, iv: iv, aad: aad, ciphertextAndTag: ciphertextAndTag)])
        guard case .unwrapped(let back) = opened[0], back.constantTimeEquals(plaintext.copyBytes()) else {
            if case .failed(let error) = opened[0] { throw Self.describeForHealth(error) }
            throw TokenError(.other, "the probe's AES-GCM round trip returned other bytes")
        }
    }

    /// A missing probe key means the token's objects cannot be reached (a token directory moved
    /// away, another token in the slot): unavailable, not a policy or binding matter.
    private static func describeForHealth(_ error: TokenError) -> TokenError {
        error.kind == .keyNotFound ? TokenError(.unavailable, error.detail) : error
    }

    public func perform(_ operations: [TokenOperation]) async throws(TokenError) -> [TokenResult] {
        let progress = PerformProgress(operations)
        // Each lease runs the operations that have no result yet. The pool runs the body again
        // on a new session when the session turns out unusable: the body resumes where the last
        // attempt stopped, with the data keys it already drew, so nothing is done twice.
        // An operation that leaves its session unusable (an operation may still be active on it)
        // ends the lease: the pool closes that session, and the rest run in a new lease.
        let cached = handles.withLock { $0 }
        let ivSource = ivSource
        var leases = 0
        while true {
            leases += 1
            do {
                try await pool.withSession { session in
                    try Self.run(progress, on: session, cached: cached, ivSource: ivSource)
                }
                break
            } catch is SessionLeftUnusable where leases <= operations.count {
                continue
            } catch is SessionLeftUnusable {
                break
            } catch {
                throw Self.map(error, decrypting: false)
            }
        }
        let (found, stale) = progress.handleChanges()
        handles.withLock { cache in
            for id in stale { cache.removeValue(forKey: id) }
            for (id, key) in found { cache[id] = key }
        }
        return progress.finishedResults()
    }

    // MARK: - Running operations in one lease

    /// What one `perform` has done so far: shared by the attempts of one lease, which the pool
    /// runs one after another on its threads, and read by the caller afterwards.
    private final class PerformProgress: Sendable {
        let operations: [TokenOperation]
        private let state: Mutex<State>

        struct State {
            var results: [TokenResult?]
            /// Data keys drawn for `generateAndWrap`, by position: drawn once, reused by a retry.
            var dataKeys: [Int: SecretBytes] = [:]
            var known: [TokenKeyID: CachedKey] = [:]
            var found: [TokenKeyID: CachedKey] = [:]
            var stale: Set<TokenKeyID> = []
        }

        init(_ operations: [TokenOperation]) {
            self.operations = operations
            self.state = Mutex(State(results: Array(repeating: nil, count: operations.count)))
        }

        func withState<T>(_ body: (inout State) throws -> T) rethrows -> T {
            try state.withLock { try body(&$0) }
        }

        func handleChanges() -> ([TokenKeyID: CachedKey], Set<TokenKeyID>) {
            state.withLock { ($0.found, $0.stale) }
        }

        func finishedResults() -> [TokenResult] {
            state.withLock { state in
                state.results.map { $0 ?? .failed(TokenError(.other, "the operation did not run")) }
            }
        }
    }

    /// Ends a lease whose session an operation left unusable (its result is recorded).
    private struct SessionLeftUnusable: Error {}

    /// Runs every operation without a result yet; a failure of one operation is its result. A
    /// session-invalidating failure, or a session found with an operation still active, ends the
    /// lease before the operation's result is recorded (the pool replaces the session and calls
    /// again); one that leaves the session unusable ends it after (the pool closes the session and
    /// `perform` leases another for the rest).
    private static func run(
        _ progress: PerformProgress,
        on session: borrowing Session,
        cached: [TokenKeyID: CachedKey],
        ivSource: GCMIVSource
    ) throws {
        // Handles found in another epoch than this session's may name other objects now.
        let epoch = session.epoch
        var known = progress.withState { state in
            (state.known.isEmpty ? cached.filter { !state.stale.contains($0.key) } : state.known)
                .filter { $0.value.epoch == epoch }
        }
        for index in progress.operations.indices {
            if progress.withState({ $0.results[index] != nil }) { continue }
            let operation = progress.operations[index]
            var lookup = KeyLookup(known: known)
            let result: TokenResult
            do {
                result = try runOne(
                    operation, at: index, progress: progress, on: session, lookup: &lookup, ivSource: ivSource)
            } catch let error as PKCS11Error where error.invalidatesSession || error.foundSessionDirty {
                progress.withState { state in state.known = lookup.known }
                throw error
            } catch {
                result = .failed(map(error, decrypting: operation.decrypts))
            }
            known = lookup.known
            progress.withState { state in
                state.results[index] = result
                state.known = lookup.known
                state.found.merge(lookup.found) { _, new in new }
                state.stale.formUnion(lookup.stale)
                if case .generated = result { state.dataKeys.removeValue(forKey: index) }
            }
            if session.isMarkedUnusable { throw SessionLeftUnusable() }
        }
    }

    /// Handles known in this lease, and what changed about them.
    private struct KeyLookup {
        var known: [TokenKeyID: CachedKey]
        var found: [TokenKeyID: CachedKey] = [:]
        var stale: Set<TokenKeyID> = []
    }

    private enum KeyKind {
        case master
        case audit
    }

    private static func runOne(
        _ operation: TokenOperation,
        at index: Int,
        progress: PerformProgress,
        on session: borrowing Session,
        lookup: inout KeyLookup,
        ivSource: GCMIVSource
    ) throws -> TokenResult {
        switch operation {
        case .generateAndWrap(let key, let aad):
            // The data key is drawn once; if the session fails after this, the next attempt wraps
            // the same key under a fresh IV.
            let plaintext: SecretBytes
            if let drawn = progress.withState({ $0.dataKeys[index] }) {
                plaintext = drawn
            } else {
                plaintext = try session.generateRandomSecret(count: WrappedDataKey.keyByteCount)
                progress.withState { $0.dataKeys[index] = plaintext }
            }
            let (iv, sealed) = try withKey(key, .master, on: session, &lookup) { session, handle in
                try sealWithTokenIV(session, handle, aad: aad, plaintext: plaintext, ivSource: ivSource)
            }
            return .generated(plaintext: plaintext, iv: iv, ciphertextAndTag: sealed)
        case .wrap(let key, let aad, let plaintext):
            let (iv, sealed) = try withKey(key, .master, on: session, &lookup) { session, handle in
                try sealWithTokenIV(session, handle, aad: aad, plaintext: plaintext, ivSource: ivSource)
            }
            return .wrapped(iv: iv, ciphertextAndTag: sealed)
        case .unwrap(let key, let iv, let aad, let ciphertextAndTag):
            let plaintext = try withKey(key, .master, on: session, &lookup) { session, handle in
                try session.decryptAESGCM(key: handle, iv: iv, aad: aad, ciphertextAndTag: ciphertextAndTag)
            }
            return .unwrapped(plaintext: plaintext)
        case .rewrap(let from, let iv, let aad, let ciphertextAndTag, let to, let newAAD):
            let plaintext = try withKey(from, .master, on: session, &lookup) { session, handle in
                try session.decryptAESGCM(key: handle, iv: iv, aad: aad, ciphertextAndTag: ciphertextAndTag)
            }
            // `plaintext` is zeroed when it goes out of scope at the end of this case.
            do {
                let (newIV, sealed) = try withKey(to, .master, on: session, &lookup) { session, handle in
                    try sealWithTokenIV(session, handle, aad: newAAD, plaintext: plaintext, ivSource: ivSource)
                }
                return .rewrapped(iv: newIV, ciphertextAndTag: sealed)
            } catch let error as PKCS11Error where error.invalidatesSession || error.foundSessionDirty {
                throw error
            } catch let error as TokenError {
                throw error
            } catch {
                // A failure of the wrap half is not an authentication failure of the input.
                throw TokenError(.other, "\(error)")
            }
        case .mac(let key, let message):
            let mac = try withKey(key, .audit, on: session, &lookup) { session, handle in
                try session.signHMACSHA256(key: handle, message: message)
            }
            return .mac(mac)
        }
    }

    /// AES-GCM encryption under a 96-bit IV the token makes for this very call (NIST SP 800-38D
    /// §8.2.2): IV uniqueness rests on the HSM, never on the database. With `.gateway` the IV is
    /// drawn from the token's RNG and passed in; with `.token` the module generates it inside
    /// `C_Encrypt` (HSMs in FIPS mode); with `.message` the token's PKCS#11 3.0 IV generator makes
    /// it (`C_EncryptMessage`). Whichever, the result has the same shape.
    private static func sealWithTokenIV(
        _ session: borrowing Session,
        _ handle: ObjectHandle,
        aad: [UInt8],
        plaintext: SecretBytes,
        ivSource: GCMIVSource
    ) throws -> ([UInt8], [UInt8]) {
        switch ivSource {
        case .gateway:
            let iv = try session.generateRandom(count: WrappedDataKey.ivByteCount)
            let sealed = try session.encryptAESGCM(key: handle, iv: iv, aad: aad, plaintext: plaintext)
            return (iv, sealed)
        case .token:
            let box = try session.sealAESGCMWithTokenIV(key: handle, aad: aad, plaintext: plaintext)
            return (box.iv, box.ciphertextAndTag)
        case .message:
            let box = try session.sealAESGCMWithMessageGenerator(key: handle, aad: aad, plaintext: plaintext)
            return (box.iv, box.ciphertextAndTag)
        }
    }

    /// Runs `body` with the checked handle of `key`; when the token says a cached handle is no
    /// longer valid (the key was destroyed and maybe recreated, or the token re-initialised),
    /// finds and checks the key again once.
    private static func withKey<T>(
        _ key: TokenKeyReference,
        _ kind: KeyKind,
        on session: borrowing Session,
        _ lookup: inout KeyLookup,
        _ body: (borrowing Session, ObjectHandle) throws -> T
    ) throws -> T {
        let handle = try resolve(key, kind, on: session, &lookup)
        do {
            return try body(session, handle)
        } catch let error as PKCS11Error
            where error.returnValue == .keyHandleInvalid || error.returnValue == .objectHandleInvalid
        {
            lookup.known.removeValue(forKey: key.id)
            lookup.found.removeValue(forKey: key.id)
            lookup.stale.insert(key.id)
            let fresh = try resolve(key, kind, on: session, &lookup)
            return try body(session, fresh)
        }
    }

    /// The handle of `key`: cached when it was checked against the same label, or found by
    /// `CKA_ID` and checked: its label must be `key.label` (else `bindingViolation`) and its
    /// attributes must meet the policy of its kind (else `policyViolation`). A key failing either
    /// check is never cached, and a cached handle of it is dropped.
    private static func resolve(
        _ key: TokenKeyReference,
        _ kind: KeyKind,
        on session: borrowing Session,
        _ lookup: inout KeyLookup
    ) throws -> ObjectHandle {
        if let cached = lookup.known[key.id] {
            if cached.label == key.label { return cached.handle }
            lookup.known.removeValue(forKey: key.id)
            lookup.found.removeValue(forKey: key.id)
            lookup.stale.insert(key.id)
        }
        guard let handle = try session.findMasterKey(id: key.id.bytes) else {
            // A search that finds nothing may come from a token that is gone (SoftHSM2 with its
            // directory moved away finds nothing): asked first, the token says whether it is
            // there; when it is not, the pool resets at the end of this lease, and the caller
            // gets unavailable.
            try session.confirmTokenReachable()
            // A key is missing only when a token that holds the gateway's other objects says so;
            // when the probe key and the audit key are gone too, the token's objects cannot be
            // reached at all (a token directory moved away, another token in the slot):
            // unavailable, not data loss.
            if key.label != probeKeyLabel,
                try session.findSecretKeys(label: probeKeyLabel).isEmpty,
                try session.findSecretKeys(label: AuditKeyPolicy.label).isEmpty
            {
                throw TokenError(
                    .unavailable,
                    "no key with CKA_ID \(key.id) and no probe key either: the token's objects cannot be reached",
                    key: key.id
                )
            }
            throw TokenError(.keyNotFound, "no key with CKA_ID \(key.id) (expected \(key.label))", key: key.id)
        }
        let label = try session.attributes([.label], of: handle).string(.label)
        guard label == key.label else {
            throw TokenError(
                .bindingViolation,
                "the object with CKA_ID \(key.id) is labelled \(label.map { "'\($0)'" } ?? "nothing"), "
                    + "expected '\(key.label)'",
                key: key.id
            )
        }
        switch kind {
        case .master: try session.verifyMasterKey(handle)
        case .audit: try session.verifyAuditKey(handle)
        }
        let checked = CachedKey(handle: handle, label: key.label, epoch: session.epoch)
        lookup.known[key.id] = checked
        lookup.found[key.id] = checked
        return handle
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
        case is CancellationError:
            // The caller gave up waiting (a deadline, usually while queued for a session): not a
            // token failure, and not one to log as one.
            return TokenError(.cancelled, "cancelled")
        case let error as PKCS11Error:
            if error.code == .masterKeyPolicyViolation {
                return TokenError(.policyViolation, error.description)
            }
            if error.code == .sessionAcquireTimeout || error.code == .sessionPoolQueueFull
                || error.code == .sessionPoolShutDown || error.code == .loginRefused || error.invalidatesSession
                || error.returnValue == .deviceError || error.returnValue == .deviceMemory
                || error.isTokenUnreachable
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
        case .generateAndWrap, .wrap, .mac: return false
        }
    }
}
