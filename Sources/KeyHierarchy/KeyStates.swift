/// A master-key version's state, after NIST SP 800-57 Part 1 Rev. 5, §7.
///
/// Stored as its `rawValue`. What each state allows:
///
/// | state        | wrap new keys        | decrypt (unwrap) | rewrap from |
/// |--------------|----------------------|------------------|-------------|
/// | pre-active   | no                   | no               | no          |
/// | active       | only if primary      | yes              | yes         |
/// | suspended    | no                   | yes              | yes         |
/// | deactivated  | no                   | yes              | yes         |
/// | compromised  | no                   | only for rewrap  | yes         |
/// | destroying   | no                   | no               | no          |
/// | destroyed    | no                   | no               | no          |
public enum MasterKeyState: String, Sendable, Hashable, CaseIterable, Codable {
    case preActive = "pre-active"
    case active
    case suspended
    case deactivated
    case compromised
    /// Due destruction has begun: checked (not the primary, no data key wrapped under it) and
    /// recorded in one locked transaction, the token object not destroyed yet. Nothing may use the
    /// version any more; the next destruction run finishes it if this one was interrupted.
    case destroying
    case destroyed

    /// The transitions NIST allows, plus suspend/resume. Destruction happens only through
    /// scheduled deletion, from pre-active, deactivated or compromised, by way of destroying.
    public func canTransition(to next: MasterKeyState) -> Bool {
        switch (self, next) {
        case (.preActive, .active), (.preActive, .compromised):
            return true
        case (.active, .suspended), (.active, .deactivated), (.active, .compromised):
            return true
        case (.suspended, .active), (.suspended, .deactivated), (.suspended, .compromised):
            return true
        case (.deactivated, .compromised):
            return true
        case (.preActive, .destroying), (.deactivated, .destroying), (.compromised, .destroying):
            return true
        case (.destroying, .destroyed):
            return true
        default:
            return false
        }
    }

    /// Whether a version in this state may be scheduled for destruction.
    public var canScheduleDestruction: Bool {
        self == .preActive || self == .deactivated || self == .compromised
    }

    /// Whether data keys wrapped under this version can be decrypted for the caller.
    public var allowsDecrypt: Bool {
        self == .active || self == .suspended || self == .deactivated
    }

    /// Whether data keys wrapped under this version can be unwrapped to move them to the primary.
    public var allowsRewrapFrom: Bool {
        self == .active || self == .suspended || self == .deactivated || self == .compromised
    }
}

/// A tenant's state.
public enum TenantState: String, Sendable, Hashable, CaseIterable, Codable {
    /// Keys can be used.
    case enabled
    /// Every key use is refused; administration still works; reversible.
    case disabled
    /// Crypto-shredded: data keys deleted, master keys destroyed in the token (versions still
    /// `destroying` are finished by the next destruction run or a repeated shred). Final.
    case shredded
}

/// A data key's state.
public enum DataKeyState: String, Sendable, Hashable, CaseIterable, Codable {
    case enabled
    /// Decrypt and encrypt are refused until enabled again; rewrap still moves it.
    case disabled
    /// The wrapped copy was deleted: the key can never be recovered. Final.
    case destroyed
}

/// What kind of change or use an audit record records. Stored as `rawValue`; values are stable.
public enum AuditOperation: String, Sendable, Hashable, CaseIterable, Codable {
    case createTenant = "tenant.create"
    case disableTenant = "tenant.disable"
    case enableTenant = "tenant.enable"
    case shredTenant = "tenant.shred"
    case rotateMasterKey = "master-key.rotate"
    case activateMasterKey = "master-key.activate"
    case changeMasterKeyState = "master-key.state"
    case scheduleMasterKeyDestruction = "master-key.schedule-destruction"
    case cancelMasterKeyDestruction = "master-key.cancel-destruction"
    case destroyMasterKey = "master-key.destroy"
    /// Records written before invocations were counted with the keys they wrap (IV counters
    /// reserved in blocks); kept so old logs still decode. Not written any more.
    case reserveInvocations = "master-key.reserve-invocations"
    /// The token object a version's row names is not that version's key (its label names another
    /// tenant or version): the call was refused and the cached reference dropped.
    case keyBindingViolation = "master-key.binding-violation"
    /// A log that predates audit anchoring was anchored in the HSM at its head (first start
    /// after an upgrade).
    case anchorAuditLog = "audit.anchor"
    case generateDataKey = "data-key.generate"
    case decryptDataKey = "data-key.decrypt"
    case rewrapDataKey = "data-key.rewrap"
    case disableDataKey = "data-key.disable"
    case enableDataKey = "data-key.enable"
    case destroyDataKey = "data-key.destroy"
    case encrypt = "encrypt"
    case decrypt = "decrypt"
    case rewrapJob = "rewrap-job.batch"
    case startRewrapJob = "rewrap-job.start"
    /// Credentials refused (unknown, malformed, revoked or expired token; disabled principal;
    /// unknown certificate). The detail names the reason and the token id, never the token.
    case authenticate = "access.authenticate"
    /// An authenticated caller asked for an action its roles do not allow.
    case authorize = "access.authorize"
    case createPrincipal = "principal.create"
    case disablePrincipal = "principal.disable"
    case enablePrincipal = "principal.enable"
    case grantRole = "principal.role-grant"
    case revokeRole = "principal.role-revoke"
    case createAPIToken = "api-token.create"
    case revokeAPIToken = "api-token.revoke"
}
