import Foundation
import Testing

/// Known-answer vectors, kept as a resource file (`Resources/known-answers.json`).
struct KnownAnswers {
    struct GCM {
        let key: [UInt8]
        let iv: [UInt8]
        let aad: [UInt8]
        let plaintext: [UInt8]
        let ciphertext: [UInt8]
        let tag: [UInt8]
    }

    struct Wrap {
        let kek: [UInt8]
        let key: [UInt8]
        let wrapped: [UInt8]
    }

    let gcm: GCM
    let rfc5649: [Wrap]

    private struct HexFile: Decodable {
        let gcm: [String: String]
        let rfc5649: [[String: String]]
    }

    static func load() throws -> KnownAnswers {
        let url = try #require(Bundle.module.url(forResource: "known-answers", withExtension: "json"))
        let file = try JSONDecoder().decode(HexFile.self, from: Data(contentsOf: url))
        let gcm = GCM(
            key: try bytes(file.gcm, "key"),
            iv: try bytes(file.gcm, "iv"),
            aad: try bytes(file.gcm, "aad"),
            plaintext: try bytes(file.gcm, "plaintext"),
            ciphertext: try bytes(file.gcm, "ciphertext"),
            tag: try bytes(file.gcm, "tag")
        )
        var wraps: [Wrap] = []
        for entry in file.rfc5649 {
            wraps.append(
                Wrap(kek: try bytes(entry, "kek"), key: try bytes(entry, "key"), wrapped: try bytes(entry, "wrapped"))
            )
        }
        return KnownAnswers(gcm: gcm, rfc5649: wraps)
    }

    private static func bytes(_ fields: [String: String], _ name: String) throws -> [UInt8] {
        guard let text = fields[name], text.utf8.count % 2 == 0 else {
            throw KnownAnswerError(description: "missing or odd-length hex field \(name)")
        }
        let digits = Array(text.utf8)
        var result: [UInt8] = []
        result.reserveCapacity(digits.count / 2)
        var index = 0
        while index < digits.count {
            guard let byte = UInt8(String(decoding: digits[index..<index + 2], as: UTF8.self), radix: 16) else {
                throw KnownAnswerError(description: "bad hex in \(name)")
            }
            result.append(byte)
            index += 2
        }
        return result
    }
}

struct KnownAnswerError: Error, CustomStringConvertible {
    let description: String
}
