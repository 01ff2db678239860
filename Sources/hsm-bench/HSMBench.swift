import ArgumentParser
import Foundation
import PKCS11
import Synchronization

/// The benchmark harness. Results go to docs/benchmarks.md by hand, with the command.
@main
struct HSMBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hsm-bench",
        abstract: "Benchmarks on a throwaway SoftHSM2 token.",
        subcommands: [
            GCMBenchmark.self, KeysBenchmark.self, WireBenchmark.self, FloodBenchmark.self, FloodLoad.self,
            LoadBenchmark.self, CompareBenchmark.self,
        ],
        defaultSubcommand: GCMBenchmark.self
    )
}

/// Measures AES-GCM through the Swift PKCS#11 wrapper on a throwaway SoftHSM2 token.
struct GCMBenchmark: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "gcm",
        abstract: "AES-GCM encrypt/decrypt ops/s through the PKCS#11 wrapper and the session pool."
    )

    @Option(help: "PKCS#11 module.")
    var module = "/usr/lib/softhsm/libsofthsm2.so"

    @Option(help: "Seconds per measurement (1 to 600).")
    var seconds: Double = 3

    @Option(help: "Plaintext bytes per operation (1 to 65536).")
    var bytes = 32

    @Option(help: "Concurrent tasks for the pooled measurement (1 to 1024).")
    var tasks = 16

    @Option(help: "Sessions in the pool (1 to 64).")
    var sessions = 4

    func validate() throws {
        guard (1...600).contains(seconds) else { throw ValidationError("--seconds must be from 1 to 600") }
        guard (1...65_536).contains(bytes) else { throw ValidationError("--bytes must be from 1 to 65536") }
        guard (1...1024).contains(tasks) else { throw ValidationError("--tasks must be from 1 to 1024") }
        guard (1...64).contains(sessions) else { throw ValidationError("--sessions must be from 1 to 64") }
    }

    func run() async throws {
        let throwaway = try ThrowawayToken(module: module, label: "hsm-bench")
        defer { throwaway.remove() }
        let (pkcs11, pin, tokenSlot) = (throwaway.module, throwaway.pin, throwaway.slot)
        let info = try pkcs11.info()
        print("module: \(info.libraryDescription) \(info.libraryVersion) (\(module))")
        print("AES-256-GCM, \(bytes)-byte plaintext, 12-byte IV, 16-byte tag, \(seconds) s per figure")
        print("")

        let plaintext = [UInt8](repeating: 0x42, count: bytes)
        let aad = Array("bench".utf8)
        let duration = Duration.milliseconds(Int(seconds * 1000))
        let masterKeyID: [UInt8] = [0xBE, 0x01]

        // One thread, one session, the calling thread: the wrapper's own cost plus the token's.
        try pkcs11.withSession(slot: tokenSlot) { session in
            try session.login(.user, pin: pin)
            let master = try session.generateMasterKey(label: MasterKeyPolicy.labelPrefix + "bench", id: masterKeyID)
            try session.verifyMasterKey(master)
            let sessionKey = try session.generateKey(
                .aesKeyGen,
                template: [
                    .objectClass(.secretKey), .keyType(.aes), .valueLength(32), .token(false), .sensitive(true),
                    .extractable(false), .encrypt(true), .decrypt(true),
                ]
            )
            for (name, key) in [("token-object master key", master), ("session-object key", sessionKey)] {
                let (encrypt, decrypt) = try Self.measure(
                    session, key: key, plaintext: plaintext, aad: aad, for: duration)
                print("single thread, \(name):".padding(toLength: 44, withPad: " ", startingAt: 0), terminator: "")
                print("encrypt \(Self.format(encrypt)) ops/s   decrypt \(Self.format(decrypt)) ops/s")
            }
            try session.destroyObject(sessionKey)
        }

        // Through the session pool: blocking calls on the pool's threads, tasks await results.
        var configuration = SessionPoolConfiguration()
        configuration.maximumSessions = sessions
        let pool = try await SessionPool(
            module: pkcs11, tokenLabel: "hsm-bench", pin: pin, configuration: configuration)
        // Token-object handles are valid in every session of the process; found once here, as
        // the key service will cache them in memory (never persisted).
        let key = try await pool.withSession { (session: borrowing Session) -> ObjectHandle? in
            try session.findMasterKey(id: masterKeyID)
        }
        guard let key else { throw ValidationError("the benchmark's master key disappeared") }
        for concurrency in [1, tasks] {
            let counter = OperationCounter()
            let deadline = ContinuousClock.now.advanced(by: duration)
            let started = ContinuousClock.now
            try await withThrowingTaskGroup(of: Void.self) { group in
                for task in 0..<concurrency {
                    group.addTask {
                        var iv = [UInt8](repeating: 0, count: 12)
                        iv[0] = UInt8(truncatingIfNeeded: task)
                        iv[1] = UInt8(truncatingIfNeeded: task >> 8)
                        while ContinuousClock.now < deadline {
                            Self.increment(&iv)
                            let round = iv
                            try await pool.withSession { (session: borrowing Session) -> Void in
                                let sealed = try session.encryptAESGCM(
                                    key: key, iv: round, aad: aad, plaintext: plaintext)
                                _ = try session.decryptAESGCM(key: key, iv: round, aad: aad, ciphertextAndTag: sealed)
                            }
                            counter.add()
                        }
                    }
                }
                try await group.waitForAll()
            }
            let elapsed = ContinuousClock.now - started
            let rate = Double(counter.value) / Self.seconds(elapsed)
            let label = "pool of \(pool.maximumSessions), \(concurrency) task\(concurrency == 1 ? "" : "s"):"
            print(label.padding(toLength: 44, withPad: " ", startingAt: 0), terminator: "")
            print("encrypt+decrypt \(Self.format(rate)) round trips/s")
        }
        await pool.shutdown()
        try pkcs11.withSession(slot: tokenSlot) { session in
            try session.login(.user, pin: pin)
            for key in try session.findMasterKeys() { try session.destroyObject(key.handle) }
        }
    }

    /// Encrypt-only then decrypt-only loops on one key for `duration` each.
    static func measure(
        _ session: borrowing Session,
        key: ObjectHandle,
        plaintext: [UInt8],
        aad: [UInt8],
        for duration: Duration
    ) throws -> (encrypt: Double, decrypt: Double) {
        let clock = ContinuousClock()
        var iv = [UInt8](repeating: 0, count: 12)
        var sealed: [[UInt8]] = []
        var ivs: [[UInt8]] = []
        let encryptStart = clock.now
        while clock.now - encryptStart < duration {
            increment(&iv)
            ivs.append(iv)
            sealed.append(try session.encryptAESGCM(key: key, iv: iv, aad: aad, plaintext: plaintext))
        }
        let encryptRate = Double(sealed.count) / seconds(clock.now - encryptStart)
        let decryptStart = clock.now
        var decrypted = 0
        while clock.now - decryptStart < duration {
            let index = decrypted % sealed.count
            let opened = try session.decryptAESGCM(key: key, iv: ivs[index], aad: aad, ciphertextAndTag: sealed[index])
            precondition(opened.count == plaintext.count)
            decrypted += 1
        }
        return (encryptRate, Double(decrypted) / seconds(clock.now - decryptStart))
    }

    static func increment(_ counter: inout [UInt8]) {
        for index in counter.indices.reversed() {
            counter[index] &+= 1
            if counter[index] != 0 { return }
        }
    }

    static func seconds(_ duration: Duration) -> Double {
        Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
    }

    static func format(_ rate: Double) -> String {
        let rounded = Int((rate / 100).rounded()) * 100
        var text = String(rounded)
        var index = text.count - 3
        while index > 0 {
            text.insert(",", at: text.index(text.startIndex, offsetBy: index))
            index -= 3
        }
        return text.padding(toLength: 8, withPad: " ", startingAt: 0)
    }
}

/// Counts completed operations across tasks.
final class OperationCounter: Sendable {
    private let count = Mutex(0)
    func add() { count.withLock { $0 += 1 } }
    var value: Int { count.withLock { $0 } }
}
