import Foundation
import GatewayClient
import GatewayWire
import Testing

/// docs/protocol.md §9.3 and §14: Decrypt answers every tampered, truncated or foreign ciphertext
/// with one and the same status, reason and message, on the wire, whatever byte was changed.
@Suite("Decrypt gives one answer for every ciphertext that does not decrypt", .serialized)
struct DecryptOracleTests {
    @Test
    func everyByteFlippedGetsTheSameAnswer() async throws {
        try await withGateway(.sqlite, "oracle-wire", security: .plaintext) { gateway in
            let admin = try gateway.client(token: gateway.adminToken)
            defer { Task { await admin.shutdown() } }
            _ = try await admin.createTenant("acme")
            _ = try await admin.createTenant("globex")
            let context = ["record": "42"]
            let key = try await admin.generateDataKey(tenant: "acme", context: context, includePlaintext: false)
            let foreignKey = try await admin.generateDataKey(tenant: "globex", includePlaintext: false)

            var answers: [String: Int] = [:]
            func note(_ body: () async throws -> DecryptedPayload) async {
                do {
                    _ = try await body()
                    answers["decrypted", default: 0] += 1
                } catch let error as GatewayError {
                    answers["\(error.code.rawValue) \(error.reason) \(error.message)", default: 0] += 1
                } catch {
                    answers["\(error)", default: 0] += 1
                }
            }
            var sent = 0
            for index in 0..<50 {
                let ciphertext = try await admin.encrypt(
                    tenant: "acme", dataKeyID: key.id, plaintext: Array("payload \(index)".utf8), context: context)
                for position in ciphertext.indices {
                    var tampered = ciphertext
                    tampered[position] ^= 1 << UInt8(position % 8)
                    sent += 1
                    await note { try await admin.decrypt(tenant: "acme", ciphertext: tampered, context: context) }
                }
                if index == 0 {
                    for length in [0, 1, 3, 19, 31, ciphertext.count - 1] {
                        sent += 1
                        await note {
                            try await admin.decrypt(
                                tenant: "acme", ciphertext: Array(ciphertext.prefix(length)), context: context)
                        }
                    }
                }
            }
            // Another tenant's ciphertext names a key id this tenant does not have.
            let foreign = try await admin.encrypt(tenant: "globex", dataKeyID: foreignKey.id, plaintext: [7])
            sent += 1
            await note { try await admin.decrypt(tenant: "acme", ciphertext: foreign) }
            let expected = "\(StatusCode.invalidArgument.rawValue) \(StatusReason.decryptionFailed) decryption failed"
            #expect(answers == [expected: sent], "\(answers)")
            #expect(sent > 2000)

            // The gateway keeps serving, and the untampered ciphertext still decrypts.
            let ciphertext = try await admin.encrypt(
                tenant: "acme", dataKeyID: key.id, plaintext: [1, 2, 3], context: context)
            #expect(
                try await admin.decrypt(tenant: "acme", ciphertext: ciphertext, context: context).plaintext.copyBytes()
                    == [1, 2, 3])
        }
    }
}
