import GatewayClient
import GatewayWire
import Testing

@testable import HSMAdmin

/// The exit-code table and its mapping from gateway statuses.
@Suite("hsm-admin exit codes")
struct ExitCodeTests {
    @Test("every status code maps to its documented exit code")
    func statusMapping() {
        let expected: [(StatusCode, Int32)] = [
            (.ok, 0), (.cancelled, 1), (.unknown, 1), (.invalidArgument, 65), (.deadlineExceeded, 69),
            (.notFound, 2), (.alreadyExists, 3), (.permissionDenied, 77), (.resourceExhausted, 75),
            (.failedPrecondition, 3), (.aborted, 75), (.outOfRange, 65), (.unimplemented, 69),
            (.internalError, 70), (.unavailable, 69), (.dataLoss, 70), (.unauthenticated, 77),
            (StatusCode(rawValue: 99), 1),
        ]
        for (status, code) in expected {
            #expect(AdminExitCode.forStatus(status) == code, "\(status)")
        }
    }

    @Test("gateway errors map by their status code")
    func gatewayErrors() {
        let server = GatewayError(serverCode: .unavailable, reason: "", message: "sealed")
        #expect(AdminExitCode.forError(server) == 69)
        let revoked = GatewayError(serverCode: .unauthenticated, reason: StatusReason.tokenRevoked, message: "")
        #expect(AdminExitCode.forError(revoked) == 77)
    }

    @Test("the table lists each code once, and every code the mapping uses")
    func table() {
        let codes = AdminExitCode.table.map(\.code)
        #expect(Set(codes).count == codes.count)
        for raw in UInt16(0)...20 {
            #expect(codes.contains(AdminExitCode.forStatus(StatusCode(rawValue: raw))))
        }
        for code in [AdminError.Code.usage, .configuration, .credentials, .failed, .cannotCreate, .internalError] {
            #expect(codes.contains(code.exitCode))
        }
        #expect(AdminExitCode.helpText.split(separator: "\n").count == codes.count)
        #expect(AdminExitCode.helpText.contains("77  unauthenticated or permission denied\n"))
    }

    @Test("a failed call reads well and says where the settings came from")
    func describe() throws {
        let settings = try ConnectionSettings.resolve(
            flags: SettingsLayer(kind: .flags, values: [.tokenFile: SettingValue("/t", origin: "--token-file")]),
            environment: [:],
            file: nil,
            fileExists: { _ in false }
        )
        let refused = GatewayError(serverCode: .unauthenticated, reason: StatusReason.tokenRevoked, message: "revoked")
        let text = AdminRunner.describe(refused, settings: settings)
        #expect(text.contains("refused the credentials (token file /t (--token-file))"))
        #expect(text.contains("[UNAUTHENTICATED, TOKEN_REVOKED]"))
        let hostile = GatewayError(serverCode: .notFound, reason: "", message: "no \u{1B}[2Jtenant")
        #expect(!AdminRunner.describe(hostile, settings: settings).contains("\u{1B}"))
    }
}
