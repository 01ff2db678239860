import Foundation
import GatewayClient
import GatewayWire
import Logging
import NIOCore
import PKCS11
import ProcessTestSupport
import Sealing
import SoftHSMTestSupport
import Testing

@testable import GatewayServer

/// A gateway that starts sealed (`hsm.unseal: shamir`) on a real SoftHSM2 token and SQLite: it
/// serves ServerInfo and the seal methods only until K shares are in, then everything; Seal
/// drops the login.
@Suite("Sealed gateway: unseal with K of N shares, seal", .serialized)
struct SealTests {
    /// The sealed gateway, run in this process on the store an auto-mode start prepared.
    struct Sealed {
        let app: GatewayServerApp
        let port: Int
        let metricsPort: Int
        let runTask: Task<Void, any Error>

        static func start(_ configuration: GatewayConfiguration) async throws -> Sealed {
            var logger = Logger(label: "test.gateway.sealed")
            logger.logLevel = ProcessInfo.processInfo.environment["HSMGW_TEST_LOG"] == nil ? .critical : .debug
            let app = try await GatewayServerApp.open(
                GatewayLaunch(configuration: configuration, serverVersion: "test"),
                module: try SoftHSMFixture.shared().module, handleSignals: false, logger: logger)
            let runTask = Task { try await app.run() }
            let port = try await app.listeningAddresses().first?.port ?? 0
            let metricsPort = try await app.metricsAddress()?.port ?? 0
            return Sealed(app: app, port: port, metricsPort: metricsPort, runTask: runTask)
        }

        func client(token: String) throws -> GatewayClient {
            var configuration = GatewayClientConfiguration(
                target: .host("127.0.0.1", port: port), transportSecurity: .plaintext,
                apiToken: APIToken(token), clientName: "seal-tests", poolSize: 1, defaultDeadline: .seconds(60))
            configuration.retryPolicy = .none
            return try GatewayClient(configuration: configuration)
        }

        func stop() async {
            await app.shutdown()
            _ = try? await runTask.value
        }
    }

    static func submit(_ client: GatewayClient, _ share: SecretShare) async throws -> Hsmgw_V1_SealProgress {
        var request = Hsmgw_V1_UnsealSubmitShareRequest()
        request.share = Data(share.text.copyBytes())
        let response: Hsmgw_V1_UnsealSubmitShareResponse = try await client.call(
            method: .unsealSubmitShare, request: request)
        return response.progress
    }

    static func seal(_ client: GatewayClient) async throws -> Hsmgw_V1_SealProgress {
        let response: Hsmgw_V1_SealResponse = try await client.call(method: .seal, request: Hsmgw_V1_SealRequest())
        return response.progress
    }

    /// Whether this process holds a user login on the token.
    static func tokenHoldsLogin(_ label: String) throws -> Bool {
        let fixture = try SoftHSMFixture.shared()
        let slot = try fixture.module.slot(tokenLabel: label)
        return try fixture.module.withSession(slot: slot) { try $0.state().isUserLoggedIn }
    }

    @Test("sealed start, refusals, reset, unseal with 3 of 5, seal drops the login, unseal again")
    func sealAndUnseal() async throws {
        // 1. An auto-mode start makes the admin, a tenant and a data key; unseal calls are refused.
        var configuration: GatewayConfiguration!
        var adminToken = ""
        var userToken = ""
        var keyID = ""
        try await withGateway(.sqlite, "seal", security: .plaintext) { gateway in
            configuration = gateway.app.configuration
            adminToken = gateway.adminToken
            let admin = try gateway.client(token: gateway.adminToken)
            defer { Task { await admin.shutdown() } }
            _ = try await admin.createTenant("acme")
            keyID = try await admin.generateDataKey(tenant: "acme").id
            _ = try await admin.createPrincipal(name: "app", roles: [RoleBinding(tenant: "acme", role: "key-user")])
            userToken = try await admin.createAPIToken(principal: "app").token.value
            let info = try await admin.serverInfo()
            #expect(!info.sealed && info.seal.mode == "auto")
            let share = try SecretSharing.split(SecretBytes(utf8: "x0123456789"), shareCount: 2, threshold: 2)[0]
            await expectStatus(.failedPrecondition) { try await Self.submit(admin, share) }
            await expectStatus(.failedPrecondition) { try await Self.seal(admin) }
        }

        // 2. The token's PIN as 5 shares, threshold 3, and the configuration switched to shamir.
        let pin = try configuration.hsm.pin.read()
        let shares = try SecretSharing.split(pin, shareCount: 5, threshold: 3)
        let checkFile = try makeTemporaryDirectory("seal-check") + "/seal-check.json"
        FileManager.default.createFile(
            atPath: checkFile, contents: Data(SealCheck(secret: pin, shares: shares).encoded()))
        configuration.hsm.unseal = .shamir(checkFile: checkFile)
        configuration.hsm.pin = .environment("")
        configuration.auth.bootstrapTokenFile = nil

        let sealed = try await Sealed.start(configuration)
        let admin = try sealed.client(token: adminToken)
        do {
            // 3. Sealed: ServerInfo says so; key operations are UNAVAILABLE/SEALED; /readyz 503.
            var info = try await admin.serverInfo()
            #expect(info.sealed && !info.ready)
            #expect(info.seal.mode == "shamir" && info.seal.threshold == 3 && info.seal.shareCount == 5)
            #expect(info.seal.submitted == 0)
            await expectStatus(.unavailable, reason: StatusReason.sealed) {
                try await admin.decryptDataKey(tenant: "acme", id: keyID)
            }
            await expectStatus(.unavailable, reason: StatusReason.sealed) { try await admin.listTenants() }
            var ready = try await HTTPProbe.get("127.0.0.1", sealed.metricsPort, "/readyz")
            #expect(ready.status == 503 && ready.body.contains("sealed: 0 of 3 shares given"), "\(ready.body)")
            #expect(try !Self.tokenHoldsLogin(configuration.hsm.tokenLabel))
            #expect(try await metric(sealed.metricsPort, "hsmgw_hsm_sealed", expecting: 1) == 1)
            #expect(try await metric(sealed.metricsPort, "hsmgw_hsm_login_refused", expecting: 0) == 0)

            // Only the gateway admin gives shares; a key user may still read ServerInfo.
            let user = try sealed.client(token: userToken)
            await expectStatus(.permissionDenied) { try await Self.submit(user, shares[0]) }
            await expectStatus(.permissionDenied) { try await Self.seal(user) }
            #expect(try await user.serverInfo().sealed)

            // 4. Progress, a duplicate, a foreign share, a malformed one, and a reset.
            #expect(try await Self.submit(admin, shares[0]).submitted == 1)
            await expectStatus(.invalidArgument, reason: StatusReason.shareRefused) {
                try await Self.submit(admin, shares[0])
            }
            let foreign = try SecretSharing.split(pin, shareCount: 5, threshold: 3)
            await expectStatus(.invalidArgument, reason: StatusReason.shareRefused) {
                try await Self.submit(admin, foreign[1])
            }
            var garbage = Hsmgw_V1_UnsealSubmitShareRequest()
            garbage.share = Data("not a share".utf8)
            await expectStatus(.invalidArgument, reason: StatusReason.shareRefused) {
                let _: Hsmgw_V1_UnsealSubmitShareResponse = try await admin.call(
                    method: .unsealSubmitShare, request: garbage)
            }
            #expect(try await admin.serverInfo().seal.submitted == 1)
            let reset: Hsmgw_V1_UnsealResetResponse = try await admin.call(
                method: .unsealReset, request: Hsmgw_V1_UnsealResetRequest())
            #expect(reset.discarded && reset.progress.submitted == 0 && reset.progress.sealed)

            // 5. Three shares unseal: the key made before decrypts.
            #expect(try await Self.submit(admin, shares[4]).submitted == 1)
            #expect(try await Self.submit(admin, shares[1]).submitted == 2)
            let unsealed = try await Self.submit(admin, shares[2])
            #expect(!unsealed.sealed)
            #expect(try await admin.decryptDataKey(tenant: "acme", id: keyID).id == keyID)
            info = try await admin.serverInfo()
            #expect(!info.sealed && info.ready)
            ready = try await HTTPProbe.get("127.0.0.1", sealed.metricsPort, "/readyz")
            #expect(ready.status == 200, "\(ready.body)")
            await expectStatus(.failedPrecondition) { try await Self.submit(admin, shares[3]) }
            #expect(try await metric(sealed.metricsPort, "hsmgw_hsm_sealed", expecting: 0) == 0)

            // 6. Seal while 32 decrypts run: each one succeeds or fails UNAVAILABLE (never
            // INTERNAL or DATA_LOSS); then key calls are refused at once, and the token holds no
            // login of the gateway.
            let id = keyID
            let outcomes = try await withThrowingTaskGroup(of: StatusCode.self) { group in
                for _ in 0..<32 {
                    group.addTask {
                        do {
                            _ = try await user.decryptDataKey(tenant: "acme", id: id)
                            return .ok
                        } catch let error as GatewayError {
                            return error.code
                        } catch {
                            return .unknown
                        }
                    }
                }
                group.addTask {
                    _ = try await Self.seal(admin)
                    return .ok
                }
                var codes: [StatusCode] = []
                for try await code in group { codes.append(code) }
                return codes
            }
            #expect(outcomes.allSatisfy { $0 == .ok || $0 == .unavailable }, "\(outcomes)")
            await user.shutdown()
            #expect(try await Self.seal(admin).sealed)
            await expectStatus(.unavailable, reason: StatusReason.sealed) {
                try await admin.decryptDataKey(tenant: "acme", id: keyID)
            }
            #expect(try !Self.tokenHoldsLogin(configuration.hsm.tokenLabel))
            #expect(try await admin.serverInfo().sealed)

            // 7. A rekey (new split, new check file) while sealed takes effect at the next unseal
            // without a restart: the old shares are refused, three new ones unseal.
            let rekeyed = try SecretSharing.split(pin, shareCount: 4, threshold: 3)
            try Data(SealCheck(secret: pin, shares: rekeyed).encoded()).write(to: URL(fileURLWithPath: checkFile))
            await expectStatus(.invalidArgument, reason: StatusReason.shareRefused) {
                try await Self.submit(admin, shares[3])
            }
            #expect(try await admin.serverInfo().seal.shareCount == 4)
            for share in [rekeyed[3], rekeyed[0], rekeyed[1]] { _ = try await Self.submit(admin, share) }
            #expect(try await admin.decryptDataKey(tenant: "acme", id: keyID).id == keyID)
        } catch {
            await admin.shutdown()
            await sealed.stop()
            throw error
        }
        await admin.shutdown()
        await sealed.stop()
    }

    @Test("a sealed start on a database with no principal is refused: nobody could unseal it")
    func sealedStartNeedsAPrincipal() async throws {
        var (configuration, _) = try await GatewayHarness.makeConfiguration(.sqlite, "seal-empty", security: .plaintext)
        let pin = try configuration.hsm.pin.read()
        let shares = try SecretSharing.split(pin, shareCount: 3, threshold: 2)
        let checkFile = try makeTemporaryDirectory("seal-empty-check") + "/check.json"
        FileManager.default.createFile(
            atPath: checkFile, contents: Data(SealCheck(secret: pin, shares: shares).encoded()))
        configuration.hsm.unseal = .shamir(checkFile: checkFile)
        let error = await #expect(throws: GatewayStartupError.self) { _ = try await Sealed.start(configuration) }
        #expect(error?.description.contains("no principal exists") == true)
    }

    /// The value of metric `name` once it reads `expected` (polled: the maintenance loop updates
    /// it), or the last value read.
    func metric(_ port: Int, _ name: String, expecting expected: Double) async throws -> Double? {
        var value: Double?
        for _ in 0..<40 {
            let body = try await HTTPProbe.get("127.0.0.1", port, "/metrics").body
            value = body.split(separator: "\n").first { $0.hasPrefix(name + " ") }
                .flatMap { Double($0.split(separator: " ").last ?? "") }
            if value == expected { return value }
            try await Task.sleep(for: .milliseconds(250))
        }
        return value
    }
}
