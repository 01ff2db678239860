import Foundation
import KeyHierarchy
import PKCS11
import PKCS11KeyToken
import SoftHSMTestSupport
import Testing

extension TokenAdapterFaultTests {
    /// The token adapter with `hsm.gcm_iv: token` on the fault module emulating an HSM in FIPS
    /// mode (`model gcm_iv=writeback`, AWS CloudHSM's behaviour): the adapter in gateway mode is
    /// refused, in token mode it generates, unwraps and rewraps, with fresh IVs from the module,
    /// and what it stores opens on the same token in gateway mode (formats are unchanged).
    @Test(arguments: ["writeback", "append"])
    func tokenGeneratedIVs(model: String) async throws {
        let setup = try await Setup.make("token-iv-\(model)")
        defer { Task { await setup.pool.shutdown() } }
        let second = TokenKeyReference(id: .random(), tenant: tenantID("fault"), version: 2)
        try await setup.token.generateMasterKey(id: second.id, label: second.label)
        try setup.fault.setRules("model gcm_iv=\(model)")
        defer { try? setup.fault.clearRules() }

        // Gateway mode: the module refuses the IV the gateway chose.
        let refused = try await setup.token.perform([.generateAndWrap(key: setup.key, aad: [1])])
        guard case .failed(let error) = refused[0] else {
            Issue.record("a caller-chosen IV was accepted by the FIPS emulation: \(refused[0])")
            return
        }
        #expect(error.detail.contains("CKR_MECHANISM_PARAM_INVALID"), "\(error)")

        let token = PKCS11KeyToken(pool: setup.pool, ivSource: .token)
        let ivs = try await checkTokenIVRoundTrips(token: token, opener: setup.token, first: setup.key, second: second)
        // What the token-IV adapter stores it also opens itself (decryption is the same).
        let own = try await token.perform([.generateAndWrap(key: setup.key, aad: [9])])
        guard case .generated(let plaintext, let iv, let sealed) = own[0],
            case .unwrapped(let back) = try await token.perform([
                .unwrap(key: setup.key, iv: iv, aad: [9], ciphertextAndTag: sealed)
            ])[0]
        else { throw StoreKindError("the token-IV adapter does not open its own data key") }
        #expect(back.copyBytes() == plaintext.copyBytes())
        #expect(ivs.count == 16, "every encryption got its own IV from the module")
        try await token.prepareProbeKey()
        try await token.checkHealth()
    }
}
