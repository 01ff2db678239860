import Foundation
import KeyHierarchy
import PKCS11
import PKCS11KeyToken
import SoftHSMTestSupport
import Testing

/// A key service on a fresh SoftHSM2 token and a fresh store of one kind: what every
/// service-level conformance test starts from.
struct ServiceHarness: Sendable {
    let kind: StoreKind
    let store: any KeyRepository
    let token: PKCS11KeyToken
    let pool: SessionPool
    let testToken: TestToken
    let service: KeyService

    static func make(
        _ kind: StoreKind,
        _ name: String,
        configuration: KeyServiceConfiguration = KeyServiceConfiguration()
    ) async throws -> ServiceHarness {
        let fixture = try SoftHSMFixture.shared()
        let testToken = try fixture.makeToken(name)
        var poolConfiguration = SessionPoolConfiguration()
        poolConfiguration.maximumSessions = 4
        let pool = try await SessionPool(
            module: fixture.module,
            tokenLabel: testToken.label,
            pin: testToken.pin,
            configuration: poolConfiguration
        )
        let token = PKCS11KeyToken(pool: pool)
        let store = try await kind.makeStore(name)
        let service = try KeyService(token: token, repository: store, configuration: configuration)
        return ServiceHarness(
            kind: kind, store: store, token: token, pool: pool, testToken: testToken, service: service)
    }

    /// A second service on the same token and store: another gateway instance, or the same one
    /// after a restart (no cached primary, counters or handles).
    func restarted(configuration: KeyServiceConfiguration? = nil) throws -> KeyService {
        try KeyService(token: token, repository: store, configuration: configuration ?? service.configuration)
    }

    func close() async {
        await store.close()
        await pool.shutdown()
    }

    func sql(_ statement: String) async throws {
        try await kind.executeUnsafeSQL(store, statement)
    }

    /// Every object on the token (any class, token or session), counted in a fresh session.
    func tokenObjectCount() async throws -> Int {
        try await pool.withSession { session in try session.findObjects([]).count }
    }

    /// Labels of master keys on the token with `prefix`.
    func masterKeyLabels(_ prefix: String = MasterKeyLabel.prefix) async throws -> [String] {
        try await token.masterKeyLabels(labelPrefix: prefix)
    }

    /// Every audit record, in order.
    func auditRecords() async throws -> [AuditRecord] {
        var all: [AuditRecord] = []
        while true {
            let page = try await service.auditRecords(after: all.last?.sequence ?? 0, limit: 1000)
            all += page
            if page.count < 1000 { return all }
        }
    }
}

let admin = RequestContext(principal: Principal("admin@test"))
let app = RequestContext(principal: Principal("app@test"))

func tenantID(_ name: String) -> TenantID {
    try! TenantID(name)
}

/// Runs `body` and returns the `KeyServiceError` it throws (nil when it does not throw; any
/// other error is recorded as a test failure: the service throws nothing else).
func serviceError<T>(
    _ body: () async throws -> T,
    sourceLocation: SourceLocation = #_sourceLocation
) async -> KeyServiceError? {
    do {
        _ = try await body()
        return nil
    } catch let error as KeyServiceError {
        return error
    } catch {
        Issue.record("expected a KeyServiceError, got \(error)", sourceLocation: sourceLocation)
        return nil
    }
}
