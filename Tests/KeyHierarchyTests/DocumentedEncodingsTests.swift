import Crypto
import DocumentTestSupport
import Foundation
import KeyHierarchy
import Testing

/// Golden bytes: the encodings of docs/protocol.md §16, computed by the code and compared with the
/// hex the document shows, so a client written from the document and the gateway agree on every
/// byte, and neither can change without the other.
@Suite("Documented encodings: protocol.md §16 against the code")
struct DocumentedEncodingsTests {
    static let tenant = TenantID(trusted: "acme")
    static let dataKeyID = try! DataKeyID("5f0c1a9e-3b7d-4c2a-9e8f-0123456789ab")
    static let context: EncryptionContext = ["purpose": "known-answer", "app": "billing"]

    static func documented(_ name: String) throws -> [UInt8] {
        try DocumentedBytes.document("docs/protocol.md").bytes("vector", name)
    }

    static func expectEqual(_ computed: [UInt8], _ name: String) throws {
        let documented = try documented(name)
        #expect(
            computed == documented,
            "\(name): the code gives \(DocumentedBytes.hex(computed)), the document \(DocumentedBytes.hex(documented))"
        )
    }

    @Test("16.1: the context's canonical encoding and its SHA-256")
    func context() throws {
        try Self.expectEqual(Self.context.canonicalEncoding, "context")
        try Self.expectEqual(Self.context.hash, "context-hash")
        // The empty context, given in the text.
        #expect(EncryptionContext.empty.canonicalEncoding == [0, 0, 0, 0])
        #expect(
            DocumentedBytes.hex(EncryptionContext.empty.hash)
                == "df3f619804a92fdb4057192dc43dd748ea778adc52bc498ce80524c014b81119"
        )
        let text = try DocumentedBytes.document("docs/protocol.md").text
        #expect(text.contains("df3f619804a92fdb4057192dc43dd748ea778adc52bc498ce80524c014b81119"))
    }

    @Test("16.2: the Encrypt AAD")
    func payloadAAD() throws {
        try Self.expectEqual(
            PayloadCiphertext.aad(tenant: Self.tenant, dataKeyID: Self.dataKeyID, contextHash: Self.context.hash),
            "payload-aad"
        )
    }

    /// The documented ciphertext is what Encrypt's construction gives for a fixed nonce, parses as
    /// a `PayloadCiphertext`, and opens with the data key and the documented AAD.
    @Test("16.2: the Encrypt ciphertext, sealed and opened")
    func payloadCiphertext() throws {
        let key = SymmetricKey(data: (0..<32).map { UInt8($0) })
        let nonce = try AES.GCM.Nonce(data: (0xC0..<0xCC).map { UInt8($0) })
        let aad = PayloadCiphertext.aad(tenant: Self.tenant, dataKeyID: Self.dataKeyID, contextHash: Self.context.hash)
        let sealed = try AES.GCM.seal(Array("hello, gateway".utf8), using: key, nonce: nonce, authenticating: aad)
        let ciphertext = PayloadCiphertext(
            dataKeyID: Self.dataKeyID,
            nonce: Array(sealed.nonce),
            ciphertextAndTag: Array(sealed.ciphertext) + Array(sealed.tag)
        )
        try Self.expectEqual(ciphertext.encoded, "payload-ciphertext")

        let parsed = try PayloadCiphertext(encoded: try Self.documented("payload-ciphertext"))
        #expect(parsed.dataKeyID == Self.dataKeyID)
        let box = try AES.GCM.SealedBox(
            nonce: AES.GCM.Nonce(data: parsed.nonce),
            ciphertext: parsed.ciphertextAndTag.dropLast(PayloadCiphertext.tagByteCount),
            tag: parsed.ciphertextAndTag.suffix(PayloadCiphertext.tagByteCount)
        )
        let opened = try AES.GCM.open(box, using: key, authenticating: aad)
        #expect(String(decoding: opened, as: UTF8.self) == "hello, gateway")
    }

    @Test("16.3: the wrapped data key's AAD")
    func wrappedAAD() throws {
        try Self.expectEqual(
            WrappedDataKey.aad(
                tenant: Self.tenant, dataKeyID: Self.dataKeyID, version: 1, contextHash: Self.context.hash),
            "wrapped-aad"
        )
    }

    static let auditEvent = AuditEvent(
        time: Timestamp(millisecondsSinceEpoch: 1_767_225_600_000),
        principal: Principal("admin"),
        tenant: TenantID(trusted: "acme"),
        operation: .generateDataKey,
        keyIDs: ["5f0c1a9e-3b7d-4c2a-9e8f-0123456789ab"],
        outcome: .success,
        requestID: "1-2",
        detail: "version=1 count=1 plaintext=true context-sha256=\(DocumentedBytes.hex(context.hash))"
    )

    @Test("16.4: the audit record's canonical encoding and its chained hash")
    func auditRecord() throws {
        try Self.expectEqual(AuditChain.canonicalEncoding(sequence: 1, event: Self.auditEvent), "audit-record")
        let linked = AuditChain.link([Self.auditEvent], after: .genesis)
        try Self.expectEqual(linked.records[0].hash, "audit-hash")
        #expect(linked.records[0].previousHash == [UInt8](repeating: 0, count: 32))
    }

    @Test("16.4: outcomes are written `ok` and `error:<code>`, the text the wire carries")
    func outcomes() {
        #expect(AuditOutcome.success.description == "ok")
        #expect(AuditOutcome.failure("unauthenticated").description == "error:unauthenticated")
        #expect(AuditOutcome(stored: "error:decryption failed") == .failure("decryption failed"))
    }

    @Test("16.5: the audit checkpoint's MAC input")
    func checkpoint() throws {
        let hash = try Self.documented("audit-hash")
        try Self.expectEqual(AuditCheckpoint.message(sequence: 1, hash: hash), "audit-checkpoint")
    }

    @Test("every vector of protocol.md §16 is checked here")
    func everyVectorIsChecked() throws {
        let names = try DocumentedBytes.document("docs/protocol.md").names("vector")
        #expect(
            Set(names) == [
                "context", "context-hash", "payload-aad", "payload-ciphertext", "wrapped-aad", "audit-record",
                "audit-hash", "audit-checkpoint",
            ]
        )
        #expect(names.count == Set(names).count)
    }
}
