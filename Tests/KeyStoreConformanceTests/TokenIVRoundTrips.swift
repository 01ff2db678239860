import KeyHierarchy
import PKCS11KeyToken
import Testing

/// What every IV source must give (`hsm.gcm_iv`): 8 data keys generated under `first` by
/// `token`, each opened by `opener` (an adapter in gateway mode: decryption never depends on who
/// made the IV), rewrapped by `token` under `second` and opened again. Returns the IVs seen (16
/// when every encryption got its own).
func checkTokenIVRoundTrips(
    token: PKCS11KeyToken,
    opener: PKCS11KeyToken,
    first: TokenKeyReference,
    second: TokenKeyReference
) async throws -> Set<[UInt8]> {
    let generated = try await token.perform((0..<8).map { .generateAndWrap(key: first, aad: [UInt8($0)]) })
    var ivs: Set<[UInt8]> = []
    for (index, result) in generated.enumerated() {
        guard case .generated(let plaintext, let iv, let sealed) = result else {
            Issue.record("generate \(index) failed: \(result)")
            continue
        }
        ivs.insert(iv)
        #expect(iv.count == WrappedDataKey.ivByteCount)
        let opened = try await opener.perform([
            .unwrap(key: first, iv: iv, aad: [UInt8(index)], ciphertextAndTag: sealed)
        ])
        guard case .unwrapped(let back) = opened[0] else {
            Issue.record("unwrap \(index) failed: \(opened[0])")
            continue
        }
        #expect(back.copyBytes() == plaintext.copyBytes())
        let rewrapped = try await token.perform([
            .rewrap(
                from: first, iv: iv, aad: [UInt8(index)], ciphertextAndTag: sealed, to: second,
                newAAD: [UInt8(index), 2])
        ])
        guard case .rewrapped(let newIV, let newSealed) = rewrapped[0] else {
            Issue.record("rewrap \(index) failed: \(rewrapped[0])")
            continue
        }
        ivs.insert(newIV)
        let reopened = try await opener.perform([
            .unwrap(key: second, iv: newIV, aad: [UInt8(index), 2], ciphertextAndTag: newSealed)
        ])
        guard case .unwrapped(let again) = reopened[0] else {
            Issue.record("the rewrapped key does not unwrap: \(reopened[0])")
            continue
        }
        #expect(again.copyBytes() == plaintext.copyBytes())
    }
    return ivs
}
