import Foundation
import GatewayConfig
import GatewayServer
import Logging
import SoftHSMTestSupport
import Testing

/// Opening the server: the production bootstrap of the first admin, and start-up failures that
/// name what is wrong.
@Suite("Gateway start-up", .serialized)
struct StartupTests {
    static var logger: Logger {
        var logger = Logger(label: "test.startup")
        logger.logLevel = .critical
        return logger
    }

    static func open(_ configuration: GatewayConfiguration) async throws -> GatewayServerApp {
        try await GatewayServerApp.open(
            GatewayLaunch(configuration: configuration, serverVersion: "test"),
            module: try SoftHSMFixture.shared().module,
            handleSignals: false,
            logger: logger
        )
    }

    static func startupError(_ configuration: GatewayConfiguration) async -> GatewayStartupError? {
        do {
            let app = try await open(configuration)
            await app.close()
            Issue.record("the gateway opened")
            return nil
        } catch let error as GatewayStartupError {
            return error
        } catch {
            Issue.record("unexpected \(error)")
            return nil
        }
    }

    @Test(arguments: StoreKind.allCases)
    func bootstrapWritesTheFirstAdminTokenOnce(_ kind: StoreKind) async throws {
        var (configuration, directory) = try await GatewayHarness.makeConfiguration(kind, "bootstrap-\(kind)")
        let file = try #require(configuration.auth.bootstrapTokenFile)
        let first = try await Self.open(configuration)
        let token = try #require(first.bootstrapAdminToken)
        await first.close()
        #expect(try String(contentsOfFile: file, encoding: .utf8) == token)
        var status = stat()
        #expect(stat(file, &status) == 0 && status.st_mode & 0o777 == 0o600)

        // A restart on the same database makes no second admin and leaves the file alone.
        let second = try await Self.open(configuration)
        #expect(second.bootstrapAdminToken == nil)
        await second.close()
        #expect(try String(contentsOfFile: file, encoding: .utf8) == token)

        // Without the setting, an empty database gets no principal (and the start still works).
        var (empty, _) = try await GatewayHarness.makeConfiguration(kind, "nobootstrap-\(kind)")
        empty.auth.bootstrapTokenFile = nil
        let third = try await Self.open(empty)
        #expect(third.bootstrapAdminToken == nil)
        await third.close()

        // A token file that exists while the database is empty belongs to another database.
        var (stale, staleDirectory) = try await GatewayHarness.makeConfiguration(kind, "stale-\(kind)")
        let staleFile = staleDirectory + "/bootstrap.token"
        try "old".write(toFile: staleFile, atomically: true, encoding: .utf8)
        stale.auth.bootstrapTokenFile = staleFile
        let error = await Self.startupError(stale)
        #expect(error?.code == .bootstrap)
        #expect(error?.exitCode == 70)
        #expect(try String(contentsOfFile: staleFile, encoding: .utf8) == "old")
        configuration.auth.bootstrapTokenFile = nil
        try? FileManager.default.removeItem(atPath: directory)
    }

    @Test func startupFailuresNameTheCause() async throws {
        var (wrongPIN, directory) = try await GatewayHarness.makeConfiguration(.sqlite, "wrongpin")
        let pinFile = directory + "/wrong.pin"
        _ = FileManager.default.createFile(
            atPath: pinFile, contents: Data("00000000".utf8), attributes: [.posixPermissions: 0o600])
        wrongPIN.hsm.pin = .file(pinFile)
        let pinError = await Self.startupError(wrongPIN)
        #expect(pinError?.code == .login)
        #expect(pinError?.exitCode == 77)
        #expect(pinError?.message.contains("refused the user PIN") == true)
        #expect(pinError?.description.contains("00000000") == false)

        var (noToken, _) = try await GatewayHarness.makeConfiguration(.sqlite, "notoken")
        noToken.hsm.tokenLabel = "no-such-token"
        #expect(await Self.startupError(noToken)?.message.contains("hsm.token_label no-such-token") == true)

        var (badStore, _) = try await GatewayHarness.makeConfiguration(.sqlite, "badstore")
        badStore.store = .sqlite(path: "/nonexistent-dir/gateway.sqlite")
        #expect(await Self.startupError(badStore)?.code == .store)
    }
}
