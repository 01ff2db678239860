import SecretMemory
import Testing

@testable import Sealing

@Suite("Seal check: what is kept to verify a reconstruction")
struct SealCheckTests {
    @Test("Verifies the secret it was made for and nothing else")
    func verifies() throws {
        let pin = secret(Array("0123456789abcdef0123456789abcdef".utf8))
        let shares = try SecretSharing.split(pin, shareCount: 5, threshold: 3)
        let check = SealCheck(secret: pin, shares: shares)
        #expect(check.verifies(pin))
        #expect(check.verifies(try SecretSharing.combine([shares[4], shares[0], shares[2]])))
        #expect(!check.verifies(secret(Array("0123456789abcdef0123456789abcdeF".utf8))))
        #expect(!check.verifies(secret(Array("0123456789abcdef".utf8))))
        #expect(check.shareCount == 5 && check.threshold == 3 && check.secretLength == 32)
    }

    @Test("Admits shares of its split only")
    func admits() throws {
        let pin = randomSecret()
        let shares = try SecretSharing.split(pin, shareCount: 3, threshold: 2)
        let check = SealCheck(secret: pin, shares: shares)
        #expect(shares.allSatisfy(check.admits))
        let other = try SecretSharing.split(pin, shareCount: 3, threshold: 2)
        #expect(!other.contains(where: check.admits))
        // Share 4 of a split of 3 (a share file edited with a recomputed checksum is the only
        // way to get one) is refused.
        let wider = try SecretSharing.split(pin, shareCount: 4, threshold: 2)
        let narrowCheck = SealCheck(secret: pin, shares: Array(wider.prefix(3)))
        #expect(!narrowCheck.admits(wider[3]))
    }

    @Test("Neither the PIN nor a share appears in the file")
    func fileHoldsNoSecret() throws {
        let pin = secret(Array("PIN-that-must-not-appear-0000000".utf8))
        let shares = try SecretSharing.split(pin, shareCount: 3, threshold: 2)
        let file = String(decoding: SealCheck(secret: pin, shares: shares).encoded(), as: UTF8.self)
        #expect(!file.contains("PIN-that-must-not-appear"))
        #expect(!file.contains(SealCheck.hex(Array("PIN-that".utf8))))
        for share in shares {
            #expect(!file.contains(SealCheck.hex(yBytes(share))))
        }
    }

    @Test("JSON round trip")
    func roundTrip() throws {
        let pin = randomSecret()
        let check = SealCheck(secret: pin, shares: try SecretSharing.split(pin, shareCount: 5, threshold: 3))
        let parsed = try SealCheck(encoded: check.encoded())
        #expect(parsed == check)
        #expect(parsed.verifies(pin))
    }

    @Test(
        "Malformed check files are refused",
        arguments: [
            "", "{}", "not json",
            #"{"format":2,"split_id":"0102030405060708","share_count":5,"threshold":3,"secret_length":32,"salt":"00","verifier":"00"}"#,
            #"{"format":1,"split_id":"01","share_count":5,"threshold":3,"secret_length":32,"salt":"00","verifier":"00"}"#,
        ]
    )
    func malformed(text: String) {
        #expect(throws: SecretSharingError.self) { try SealCheck(encoded: Array(text.utf8)) }
    }

    @Test("Out-of-range fields are refused")
    func outOfRange() throws {
        let pin = randomSecret()
        let check = SealCheck(secret: pin, shares: try SecretSharing.split(pin, shareCount: 5, threshold: 3))
        let text = String(decoding: check.encoded(), as: UTF8.self)
        for (field, bad) in [
            ("\"threshold\" : 3", "\"threshold\" : 6"), ("\"share_count\" : 5", "\"share_count\" : 1"),
        ] {
            #expect(text.contains(field))
            let edited = text.replacingOccurrences(of: field, with: bad)
            #expect(throws: SecretSharingError.self) { try SealCheck(encoded: Array(edited.utf8)) }
        }
    }
}
