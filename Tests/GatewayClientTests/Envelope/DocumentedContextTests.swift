import Crypto
import DocumentTestSupport
import Testing

@testable import GatewayClient

/// The client library's copy of the encryption context encoding (the envelope header's) against
/// docs/protocol.md §16.1, which the gateway's own encoding is also checked against
/// (`KeyHierarchyTests`): client and server agree byte for byte.
@Suite("Documented context encoding: protocol.md §16.1 against the client library")
struct DocumentedContextTests {
    static let context = ["purpose": "known-answer", "app": "billing"]

    @Test("encode, hash and decode the documented example")
    func documentedExample() throws {
        let document = try DocumentedBytes.document("docs/protocol.md")
        let encoded = try EnvelopeFormat.encodeContext(Self.context)
        #expect(encoded == (try document.bytes("vector", "context")))
        #expect(Array(SHA256.hash(data: encoded)) == (try document.bytes("vector", "context-hash")))
        #expect(try EnvelopeFormat.decodeContext(try document.bytes("vector", "context")[...]) == Self.context)
        #expect(try EnvelopeFormat.encodeContext([:]) == [0, 0, 0, 0])
    }
}
