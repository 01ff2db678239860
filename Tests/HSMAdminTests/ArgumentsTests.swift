import GatewayClient
import Testing

@testable import HSMAdmin

/// The argument forms hsm-admin parses itself.
@Suite("hsm-admin arguments")
struct ArgumentsTests {
    @Test("tenant ids follow the protocol's rule")
    func tenantIDs() throws {
        for valid in ["acme", "a", "tenant-1", "t_2", "0abc", String(repeating: "a", count: 63)] {
            #expect(try AdminArguments.tenantID(valid) == valid)
        }
        for invalid in ["", "Acme", "-acme", "_a", "a b", "a:b", "ä", String(repeating: "a", count: 64), "*"] {
            #expect(throws: AdminError.self) { try AdminArguments.tenantID(invalid) }
        }
        let error = #expect(throws: AdminError.self) { try AdminArguments.tenantID("Bad\u{1B}[31m") }
        #expect(error?.exitCode == 64)
        #expect(error?.message.contains("\u{1B}") == false, "control characters are not echoed")
    }

    @Test("role bindings are TENANT:ROLE with * for every tenant")
    func roleBindings() throws {
        let binding = try AdminArguments.roleBinding("acme:key-user")
        #expect(binding == RoleBinding(tenant: "acme", role: "key-user"))
        #expect(try AdminArguments.roleBinding("*:admin") == RoleBinding(tenant: "*", role: "admin"))
        #expect(AdminArguments.format(binding) == "acme:key-user")
        for invalid in [
            "acme", "acme:", ":admin", "acme:key-user:x", "Acme:admin", "acme:Admin", "acme:1admin", "**:admin",
        ] {
            let error = #expect(throws: AdminError.self) { try AdminArguments.roleBinding(invalid) }
            #expect(error?.code == .usage)
        }
        let missing = #expect(throws: AdminError.self) { try AdminArguments.roleBinding("acme") }
        #expect(missing?.message.contains("TENANT:ROLE") == true)
        #expect(missing?.message.contains("decrypt-only") == true)
    }

    @Test("principal names and master-key versions")
    func principalsAndVersions() throws {
        #expect(try AdminArguments.principalName("ci.deploy@acme_1-x") == "ci.deploy@acme_1-x")
        for invalid in ["", "CI", "a b", "a/b", String(repeating: "a", count: 129)] {
            #expect(throws: AdminError.self) { try AdminArguments.principalName(invalid) }
        }
        #expect(try AdminArguments.masterKeyVersion("3") == 3)
        #expect(try AdminArguments.masterKeyVersion("v12") == 12)
        for invalid in ["0", "v0", "-1", "x", "", "4294967296", "3.0"] {
            #expect(throws: AdminError.self) { try AdminArguments.masterKeyVersion(invalid) }
        }
    }

    @Test("durations: units, sums, limits")
    func durations() throws {
        #expect(try DurationArgument.parse("30d") == .seconds(30 * 86_400))
        #expect(try DurationArgument.parse("12h") == .seconds(12 * 3600))
        #expect(try DurationArgument.parse("90m") == .seconds(90 * 60))
        #expect(try DurationArgument.parse("45s") == .seconds(45))
        #expect(try DurationArgument.parse("500ms") == .milliseconds(500))
        #expect(try DurationArgument.parse("2w") == .seconds(14 * 86_400))
        #expect(try DurationArgument.parse("1d12h") == .seconds(36 * 3600))
        #expect(try DurationArgument.parse("1m30s") == .seconds(90))
        #expect(try DurationArgument.parse("3650d") == .seconds(3650 * 86_400))
        for invalid in [
            "", "30", "d", "30x", "0s", "0d0h", "-1d", "1.5h", "3651d", "3650d1s", "1 d", "99999999999999999999d",
        ] {
            let error = #expect(throws: AdminError.self) { try DurationArgument.parse(invalid) }
            #expect(error?.exitCode == 64)
        }
        let unitless = #expect(throws: AdminError.self) { try DurationArgument.parse("30") }
        #expect(unitless?.message.contains("without a unit") == true)
    }

    @Test("durations print largest units first")
    func durationFormat() {
        #expect(DurationArgument.format(.seconds(36 * 3600)) == "1d12h")
        #expect(DurationArgument.format(.seconds(30 * 86_400)) == "4w2d")
        #expect(DurationArgument.format(.seconds(45)) == "45s")
        #expect(DurationArgument.format(.milliseconds(1500)) == "1s500ms")
        #expect(DurationArgument.format(.zero) == "0s")
        #expect(DurationArgument.format(.seconds(3661)) == "1h1m1s")
    }
}
