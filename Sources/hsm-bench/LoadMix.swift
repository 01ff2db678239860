import Foundation
import GatewayClient
import GatewayWire

/// One kind of call `load` sends: a data-key or payload method of the client.
enum LoadOperation: String, CaseIterable, Sendable, Codable {
    /// GenerateDataKey with the plaintext.
    case generate
    /// GenerateDataKey without the plaintext (id and wrapped copy only).
    case generateWrapped = "generate-wrapped"
    /// GenerateDataKeys of `--batch-size` keys with their plaintexts, one call.
    case generateBatch = "generate-batch"
    /// DecryptDataKey of a preloaded key.
    case decrypt
    /// DecryptDataKeys of `--batch-size` preloaded keys, one call.
    case decryptBatch = "decrypt-batch"
    /// Encrypt of `--payload-bytes` under a preloaded key.
    case encrypt
    /// Decrypt of a ciphertext made at preload.
    case decryptPayload = "decrypt-payload"
    /// RewrapDataKey of a preloaded key.
    case rewrap

    /// Whether the operation works on keys made by the preload.
    var needsPreloadedKeys: Bool {
        switch self {
        case .generate, .generateWrapped, .generateBatch: return false
        case .decrypt, .decryptBatch, .encrypt, .decryptPayload, .rewrap: return true
        }
    }

    /// Every name, for messages.
    static var names: String { allCases.map(\.rawValue).joined(separator: ", ") }
}

/// The weighted choice of operations: `generate=50,decrypt=50`.
struct LoadMix: Sendable {
    /// The largest weight: enough for percentages with a decimal; it also keeps the sum far
    /// from overflow.
    static let maximumWeight = 1000
    /// The most entries, one per operation.
    static var maximumEntries: Int { LoadOperation.allCases.count }

    /// The operations with a weight above zero, in the order given.
    let entries: [(operation: LoadOperation, weight: Int)]
    private let cumulative: [Int]
    private let totalWeight: Int

    /// Why a mix is not valid, as `validate()` shows it.
    struct ParseError: Error, CustomStringConvertible {
        let description: String
    }

    /// Parses `text`: comma-separated `operation=weight` (a bare `operation` weighs 1), each
    /// operation once, weights 0 to `maximumWeight`, at least one above zero.
    init(parsing text: String) throws(ParseError) {
        var entries: [(operation: LoadOperation, weight: Int)] = []
        var seen: Set<LoadOperation> = []
        let items = text.split(separator: ",", omittingEmptySubsequences: false)
        guard items.count <= Self.maximumEntries else {
            throw ParseError(description: "--mix names at most \(Self.maximumEntries) operations")
        }
        for item in items {
            let parts = item.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let name = parts[0].trimmingCharacters(in: .whitespaces)
            guard let operation = LoadOperation(rawValue: name) else {
                throw ParseError(
                    description: "--mix: unknown operation '\(name.prefix(40))'; known: \(LoadOperation.names)")
            }
            guard seen.insert(operation).inserted else {
                throw ParseError(description: "--mix: \(name) appears twice")
            }
            var weight = 1
            if parts.count == 2 {
                guard let parsed = Int(parts[1].trimmingCharacters(in: .whitespaces)),
                    (0...Self.maximumWeight).contains(parsed)
                else {
                    throw ParseError(
                        description: "--mix: the weight of \(name) must be an integer from 0 to \(Self.maximumWeight)")
                }
                weight = parsed
            }
            if weight > 0 { entries.append((operation, weight)) }
        }
        guard !entries.isEmpty else {
            throw ParseError(description: "--mix needs at least one operation with a weight above 0")
        }
        self.entries = entries
        var running = 0
        self.cumulative = entries.map { entry in
            running += entry.weight
            return running
        }
        self.totalWeight = running
    }

    /// The operations in the mix.
    var operations: [LoadOperation] { entries.map(\.operation) }

    /// An index into `entries`, drawn by weight.
    func pick() -> Int {
        guard entries.count > 1 else { return 0 }
        let draw = Int.random(in: 0..<totalWeight)
        return cumulative.firstIndex { draw < $0 } ?? entries.count - 1
    }
}

/// What the operations work on, made before the measurement: keys, ciphertexts, a payload. The
/// key plaintexts are never kept (the preload asks for wrapped keys only).
struct LoadFixtures: Sendable {
    let tenant: String
    let context: [String: String]
    let deadline: Duration
    let batchSize: Int
    let keyIDs: [String]
    let ciphertexts: [[UInt8]]
    /// Constant filler bytes: nothing secret.
    let payload: [UInt8]

    /// How many ciphertexts the preload makes for `decrypt-payload`: enough that the calls do
    /// not all name one data key, few enough to be made in a moment.
    static let ciphertextCount = 16

    /// Runs one call of `operation`; a batch call with a failed entry fails with that entry's
    /// error. Results are dropped at once (key plaintexts are zeroed by the client types).
    func perform(_ operation: LoadOperation, on client: GatewayClient) async throws(GatewayError) {
        switch operation {
        case .generate, .generateWrapped:
            _ = try await client.generateDataKey(
                tenant: tenant, context: context, includePlaintext: operation == .generate, deadline: deadline)
        case .generateBatch:
            _ = try await client.generateDataKeys(
                tenant: tenant, count: batchSize, context: context, includePlaintext: true, deadline: deadline)
        case .decrypt:
            _ = try await client.decryptDataKey(tenant: tenant, id: randomKeyID(), context: context, deadline: deadline)
        case .decryptBatch:
            let references = (0..<batchSize).map { _ in DataKeyReference(id: randomKeyID(), context: context) }
            let results = try await client.decryptDataKeys(tenant: tenant, keys: references, deadline: deadline)
            for result in results {
                if case .failure(let error) = result { throw error }
            }
        case .encrypt:
            _ = try await client.encrypt(
                tenant: tenant, dataKeyID: randomKeyID(), plaintext: payload, context: context, deadline: deadline)
        case .decryptPayload:
            let ciphertext = ciphertexts[Int.random(in: 0..<ciphertexts.count)]
            _ = try await client.decrypt(tenant: tenant, ciphertext: ciphertext, context: context, deadline: deadline)
        case .rewrap:
            _ = try await client.rewrapDataKey(tenant: tenant, id: randomKeyID(), context: context, deadline: deadline)
        }
    }

    private func randomKeyID() -> String { keyIDs[Int.random(in: 0..<keyIDs.count)] }
}

extension GatewayError {
    /// The key `load` counts this error under: the status name, and the reason when there is one
    /// (`RESOURCE_EXHAUSTED/OVERLOADED`, `DEADLINE_EXCEEDED/LOCAL_DEADLINE`). Never the message.
    var loadErrorKey: String { reason.isEmpty ? code.name : "\(code.name)/\(reason)" }
}
