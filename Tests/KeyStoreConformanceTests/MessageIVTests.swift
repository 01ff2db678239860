import Foundation
import KeyHierarchy
import PKCS11
import PKCS11KeyToken
import SoftHSMTestSupport
import Testing

/// `hsm.gcm_iv: message`: the token adapter seals with PKCS#11 3.0 message-based encryption and
/// the token's IV generator. On NSS's softoken (`HSMGW_TEST_PKCS11=nss`, which `make test` runs)
/// it generates, unwraps and rewraps with an IV per encryption from the token, and what it stores
/// opens in gateway mode (formats are unchanged); on SoftHSM2, which has no 3.0 interface, the
/// health check fails naming `C_MessageEncryptInit`, as the gateway's start-up does.
@Suite("Token adapter with the token's PKCS#11 3.0 IV generator")
struct MessageIVTests {
    @Test
    func messageGeneratedIVs() async throws {
        let fixture = try SoftHSMFixture.shared()
        let testToken = try fixture.makeToken("message-iv")
        let pool = try await SessionPool(module: fixture.module, tokenLabel: testToken.label, pin: testToken.pin)
        defer { Task { await pool.shutdown() } }
        let gatewayMode = PKCS11KeyToken(pool: pool)
        let token = PKCS11KeyToken(pool: pool, ivSource: .message)
        let tenant = tenantID("message")
        let first = TokenKeyReference(id: .random(), tenant: tenant, version: 1)
        let second = TokenKeyReference(id: .random(), tenant: tenant, version: 2)
        try await gatewayMode.generateMasterKey(id: first.id, label: first.label)
        try await gatewayMode.generateMasterKey(id: second.id, label: second.label)
        try await token.prepareProbeKey()

        guard SoftHSMFixture.implementation == .nss else {
            let error = await #expect(throws: TokenError.self) { try await token.checkHealth() }
            #expect(error?.detail.contains("C_MessageEncryptInit") == true, "\(String(describing: error))")
            return
        }
        try await token.checkHealth()
        let ivs = try await checkTokenIVRoundTrips(token: token, opener: gatewayMode, first: first, second: second)
        #expect(ivs.count == 16, "every encryption got its own IV from the token's generator")
    }
}
