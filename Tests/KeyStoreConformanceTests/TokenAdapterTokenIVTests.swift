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
        let generated = try await token.perform((0..<8).map { .generateAndWrap(key: setup.key, aad: [UInt8($0)]) })
        var ivs: Set<[UInt8]> = []
        for (index, result) in generated.enumerated() {
            guard case .generated(let plaintext, let iv, let sealed) = result else {
                Issue.record("generate \(index) failed: \(result)")
                continue
            }
            ivs.insert(iv)
            #expect(iv.count == WrappedDataKey.ivByteCount)
            // Unwrapped by the token-IV adapter and by a gateway-mode one: decryption is the same.
            for adapter in [token, setup.token] {
                let opened = try await adapter.perform([
                    .unwrap(key: setup.key, iv: iv, aad: [UInt8(index)], ciphertextAndTag: sealed)
                ])
                guard case .unwrapped(let back) = opened[0] else {
                    Issue.record("unwrap \(index) failed: \(opened[0])")
                    continue
                }
                #expect(back.copyBytes() == plaintext.copyBytes())
            }
            let rewrapped = try await token.perform([
                .rewrap(
                    from: setup.key, iv: iv, aad: [UInt8(index)], ciphertextAndTag: sealed, to: second,
                    newAAD: [UInt8(index), 2])
            ])
            guard case .rewrapped(let newIV, let newSealed) = rewrapped[0] else {
                Issue.record("rewrap \(index) failed: \(rewrapped[0])")
                continue
            }
            ivs.insert(newIV)
            let reopened = try await setup.token.perform([
                .unwrap(key: second, iv: newIV, aad: [UInt8(index), 2], ciphertextAndTag: newSealed)
            ])
            guard case .unwrapped(let back) = reopened[0] else {
                Issue.record("the rewrapped key does not unwrap: \(reopened[0])")
                continue
            }
            #expect(back.copyBytes() == plaintext.copyBytes())
        }
        #expect(ivs.count == 16, "every encryption got its own IV from the module")
        try await token.prepareProbeKey()
        try await token.checkHealth()
    }
}
