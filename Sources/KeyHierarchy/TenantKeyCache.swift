import Synchronization

/// What the key service remembers between calls about a tenant's keys, behind one seam: each
/// tenant's primary version (GenerateDataKey wraps under it without a read) and the token object
/// of each version (its `CKA_ID` and the label it must carry).
///
/// Neither is trusted for safety. A write re-checks the primary under the tenant lock in its own
/// transaction, so a stale primary costs one retry, never a key under a non-primary version; a
/// token object is checked against its label at every use (a mismatch drops the entry). Nothing a
/// decrypt checks (tenant, key and version states) is cached: it reads them fresh with the keys.
///
/// `invalidate(_:)` and `invalidateAll()` are the entry points for a change made elsewhere: on
/// PostgreSQL the gateway calls them when another instance's change is notified (or when
/// notifications may have been missed); this instance updates or forgets the entries its own
/// changes touch (a rotation, a failed binding check, a shred).
public final class TenantKeyCache: Sendable {
    struct VersionRef: Hashable, Sendable {
        let tenant: TenantID
        let version: MasterKeyVersionNumber
    }

    private struct State: Sendable {
        var primaries: [TenantID: MasterKeyVersionNumber] = [:]
        var tokenKeys: [VersionRef: TokenKeyReference] = [:]
    }

    private let state = Mutex(State())

    public init() {}

    func primary(_ tenant: TenantID) -> MasterKeyVersionNumber? {
        state.withLock { $0.primaries[tenant] }
    }

    func setPrimary(_ tenant: TenantID, _ version: MasterKeyVersionNumber) {
        state.withLock { $0.primaries[tenant] = version }
    }

    /// Forgets the primary only (it moved; the token objects stay valid).
    func forgetPrimary(_ tenant: TenantID) {
        state.withLock { _ = $0.primaries.removeValue(forKey: tenant) }
    }

    func tokenKey(_ version: VersionRef) -> TokenKeyReference? {
        state.withLock { $0.tokenKeys[version] }
    }

    func setTokenKey(_ version: VersionRef, _ reference: TokenKeyReference) {
        state.withLock { $0.tokenKeys[version] = reference }
    }

    /// Forgets one version's token object (its binding check failed).
    func forgetTokenKey(_ version: VersionRef) {
        state.withLock { _ = $0.tokenKeys.removeValue(forKey: version) }
    }

    /// Forgets everything about `tenant`: the next call reads it again.
    public func invalidate(_ tenant: TenantID) {
        state.withLock { state in
            state.primaries.removeValue(forKey: tenant)
            state.tokenKeys = state.tokenKeys.filter { $0.key.tenant != tenant }
        }
    }

    /// Forgets everything: every tenant is read again on its next call.
    public func invalidateAll() {
        state.withLock { $0 = State() }
    }
}
