import KeyHierarchy
import Testing

@Suite("Key service configuration: validate()")
struct KeyServiceConfigurationTests {
    struct Bound: Sendable, CustomTestStringConvertible {
        var testDescription: String
        /// A word of the message that names the setting.
        var setting: String
        var valid: Bool
        var change: @Sendable (inout KeyServiceConfiguration) -> Void
    }

    static let bounds: [Bound] = [
        Bound(testDescription: "invocationLimit 1", setting: "invocation limit", valid: true) {
            $0.invocationLimit = 1
        },
        Bound(testDescription: "invocationLimit 0", setting: "invocation limit", valid: false) {
            $0.invocationLimit = 0
        },
        Bound(testDescription: "invocationLimit -1", setting: "invocation limit", valid: false) {
            $0.invocationLimit = -1
        },
        Bound(testDescription: "invocationLimit 2^32 - 1", setting: "invocation limit", valid: true) {
            $0.invocationLimit = (1 << 32) - 1
        },
        Bound(testDescription: "invocationLimit 2^32", setting: "invocation limit", valid: false) {
            $0.invocationLimit = 1 << 32
        },
        Bound(testDescription: "auditCheckpointInterval 1", setting: "audit checkpoint interval", valid: true) {
            $0.auditCheckpointInterval = 1
        },
        Bound(testDescription: "auditCheckpointInterval 0", setting: "audit checkpoint interval", valid: false) {
            $0.auditCheckpointInterval = 0
        },
        Bound(testDescription: "auditCheckpointInterval 10^6", setting: "audit checkpoint interval", valid: true) {
            $0.auditCheckpointInterval = 1_000_000
        },
        Bound(
            testDescription: "auditCheckpointInterval 10^6 + 1", setting: "audit checkpoint interval", valid: false
        ) {
            $0.auditCheckpointInterval = 1_000_001
        },
        Bound(testDescription: "dataKeyEncryptionLimit 1", setting: "encryption limit", valid: true) {
            $0.dataKeyEncryptionLimit = 1
        },
        Bound(testDescription: "dataKeyEncryptionLimit 0", setting: "encryption limit", valid: false) {
            $0.dataKeyEncryptionLimit = 0
        },
        Bound(testDescription: "dataKeyEncryptionLimit 2^32 - 1", setting: "encryption limit", valid: true) {
            $0.dataKeyEncryptionLimit = (1 << 32) - 1
        },
        Bound(testDescription: "dataKeyEncryptionLimit 2^32", setting: "encryption limit", valid: false) {
            $0.dataKeyEncryptionLimit = 1 << 32
        },
        Bound(testDescription: "destructionWaitingPeriodDays 7", setting: "waiting period", valid: true) {
            $0.destructionWaitingPeriodDays = 7
        },
        Bound(testDescription: "destructionWaitingPeriodDays 6", setting: "waiting period", valid: false) {
            $0.destructionWaitingPeriodDays = 6
        },
        Bound(testDescription: "destructionWaitingPeriodDays 365", setting: "waiting period", valid: true) {
            $0.destructionWaitingPeriodDays = 365
        },
        Bound(testDescription: "destructionWaitingPeriodDays 366", setting: "waiting period", valid: false) {
            $0.destructionWaitingPeriodDays = 366
        },
        Bound(testDescription: "idempotencyRetentionHours 1", setting: "idempotency retention", valid: true) {
            $0.idempotencyRetentionHours = 1
        },
        Bound(testDescription: "idempotencyRetentionHours 0", setting: "idempotency retention", valid: false) {
            $0.idempotencyRetentionHours = 0
        },
        Bound(testDescription: "idempotencyRetentionHours 720", setting: "idempotency retention", valid: true) {
            $0.idempotencyRetentionHours = 720
        },
        Bound(testDescription: "idempotencyRetentionHours 721", setting: "idempotency retention", valid: false) {
            $0.idempotencyRetentionHours = 721
        },
        Bound(testDescription: "groupCommitMaximumBatch 1", setting: "group commit", valid: true) {
            $0.groupCommitMaximumBatch = 1
        },
        Bound(testDescription: "groupCommitMaximumBatch 0", setting: "group commit", valid: false) {
            $0.groupCommitMaximumBatch = 0
        },
        Bound(testDescription: "groupCommitMaximumBatch 1024", setting: "group commit", valid: true) {
            $0.groupCommitMaximumBatch = 1024
        },
        Bound(testDescription: "groupCommitMaximumBatch 1025", setting: "group commit", valid: false) {
            $0.groupCommitMaximumBatch = 1025
        },
        Bound(testDescription: "rewrapBatchSize 1", setting: "rewrap batch", valid: true) { $0.rewrapBatchSize = 1 },
        Bound(testDescription: "rewrapBatchSize 0", setting: "rewrap batch", valid: false) { $0.rewrapBatchSize = 0 },
        Bound(testDescription: "rewrapBatchSize 1000", setting: "rewrap batch", valid: true) {
            $0.rewrapBatchSize = 1000
        },
        Bound(testDescription: "rewrapBatchSize 1001", setting: "rewrap batch", valid: false) {
            $0.rewrapBatchSize = 1001
        },
    ]

    @Test("the defaults are valid")
    func defaults() throws {
        let configuration = KeyServiceConfiguration()
        try configuration.validate()
        #expect(configuration.invocationLimit == 1 << 30)
        #expect(configuration.auditCheckpointInterval == 1000)
        #expect(configuration.dataKeyEncryptionLimit == 1 << 30)
        #expect(configuration.destructionWaitingPeriodDays == 30)
        #expect(configuration.idempotencyRetentionHours == 24)
        #expect(configuration.groupCommitMaximumBatch == GroupCommitter.defaultMaximumBatch)
        #expect(configuration.rewrapBatchSize == 100)
    }

    @Test("each bound, at and beyond", arguments: bounds)
    func bound(_ bound: Bound) {
        var configuration = KeyServiceConfiguration()
        bound.change(&configuration)
        if bound.valid {
            #expect(throws: Never.self) { try configuration.validate() }
        } else {
            let error = #expect(throws: KeyServiceError.self) { try configuration.validate() }
            #expect(error?.code == .invalidArgument)
            #expect(error?.message.contains(bound.setting) == true, "\(error?.message ?? "")")
        }
    }

    @Test("the first setting out of bounds is the one named")
    func firstNamed() {
        var configuration = KeyServiceConfiguration()
        configuration.rewrapBatchSize = 0
        configuration.invocationLimit = 0
        let error = #expect(throws: KeyServiceError.self) { try configuration.validate() }
        #expect(error?.message.contains("invocation limit") == true)
    }
}
