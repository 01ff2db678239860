import KeyHierarchy
import Testing

@Suite("Key states: transitions and what each state allows")
struct KeyStatesTests {
    /// NIST SP 800-57 Part 1 Rev. 5 §7, plus suspend/resume: every allowed (from, to) pair, written
    /// out by hand. Anything not listed, including every self-transition, is refused.
    static let allowedTransitions: [MasterKeyState: Set<MasterKeyState>] = [
        .preActive: [.active, .compromised, .destroying],
        .active: [.suspended, .deactivated, .compromised],
        .suspended: [.active, .deactivated, .compromised],
        .deactivated: [.compromised, .destroying],
        .compromised: [.destroying],
        .destroying: [.destroyed],
        .destroyed: [],
    ]

    static let schedulableForDestruction: Set<MasterKeyState> = [.preActive, .deactivated, .compromised]
    static let decryptable: Set<MasterKeyState> = [.active, .suspended, .deactivated]
    static let rewrappableFrom: Set<MasterKeyState> = [.active, .suspended, .deactivated, .compromised]

    @Test(
        "canTransition(to:) matches the table for every (from, to) pair",
        arguments: MasterKeyState.allCases, MasterKeyState.allCases
    )
    func transition(from: MasterKeyState, to: MasterKeyState) throws {
        let allowed = try #require(Self.allowedTransitions[from])
        #expect(from.canTransition(to: to) == allowed.contains(to))
    }

    @Test("the table covers every state and allows exactly 13 transitions, none to itself")
    func tableShape() {
        #expect(Set(Self.allowedTransitions.keys) == Set(MasterKeyState.allCases))
        var allowedCount = 0
        for from in MasterKeyState.allCases {
            #expect(!from.canTransition(to: from), "\(from) → \(from)")
            for to in MasterKeyState.allCases where from.canTransition(to: to) { allowedCount += 1 }
        }
        #expect(allowedCount == 13)
    }

    @Test("destroyed is final, destroying leads only to destroyed, compromised only to destroying")
    func terminalStates() {
        for next in MasterKeyState.allCases {
            #expect(!MasterKeyState.destroyed.canTransition(to: next))
            #expect(MasterKeyState.destroying.canTransition(to: next) == (next == .destroyed))
            #expect(MasterKeyState.compromised.canTransition(to: next) == (next == .destroying))
            // Only destroying reaches destroyed: destruction is always checked and recorded first.
            #expect(next.canTransition(to: .destroyed) == (next == .destroying))
        }
    }

    @Test("canScheduleDestruction", arguments: MasterKeyState.allCases)
    func scheduleDestruction(state: MasterKeyState) {
        #expect(state.canScheduleDestruction == Self.schedulableForDestruction.contains(state))
        // Scheduling is only worth it when the transition it ends in is allowed.
        #expect(state.canScheduleDestruction == state.canTransition(to: .destroying))
    }

    @Test("allowsDecrypt", arguments: MasterKeyState.allCases)
    func decrypt(state: MasterKeyState) {
        #expect(state.allowsDecrypt == Self.decryptable.contains(state))
    }

    @Test("allowsRewrapFrom", arguments: MasterKeyState.allCases)
    func rewrapFrom(state: MasterKeyState) {
        #expect(state.allowsRewrapFrom == Self.rewrappableFrom.contains(state))
        // Whatever can be decrypted can be moved to the primary.
        if state.allowsDecrypt { #expect(state.allowsRewrapFrom) }
    }

    @Test("stored raw values of master-key states are stable")
    func masterKeyStateRawValues() {
        let expected: [MasterKeyState: String] = [
            .preActive: "pre-active",
            .active: "active",
            .suspended: "suspended",
            .deactivated: "deactivated",
            .compromised: "compromised",
            .destroying: "destroying",
            .destroyed: "destroyed",
        ]
        for state in MasterKeyState.allCases {
            #expect(state.rawValue == expected[state])
            #expect(MasterKeyState(rawValue: state.rawValue) == state)
        }
    }

    @Test("AuditOperation raw values are unique and round-trip")
    func auditOperationRawValuesAreUnique() {
        let rawValues = AuditOperation.allCases.map(\.rawValue)
        #expect(Set(rawValues).count == rawValues.count)
        for operation in AuditOperation.allCases {
            #expect(!operation.rawValue.isEmpty)
            #expect(AuditOperation(rawValue: operation.rawValue) == operation)
        }
    }

    @Test("tenant and data-key state raw values are unique")
    func otherStateRawValues() {
        #expect(Set(TenantState.allCases.map(\.rawValue)).count == TenantState.allCases.count)
        #expect(Set(DataKeyState.allCases.map(\.rawValue)).count == DataKeyState.allCases.count)
    }
}
