import Foundation
import PKCS11
import SoftHSMTestSupport
import Synchronization
import Testing

/// The session pool against the real SoftHSM2 token: exclusivity under load, recovery from
/// sessions closed underneath it, and the bounded wait.
@Suite("Session pool", .serialized)
struct SessionPoolTests {
    let fixture: SoftHSMFixture
    let token: TestToken

    init() throws {
        fixture = try SoftHSMFixture.shared()
        token = try fixture.makeToken("pool")
    }

    func configuration(sessions: Int, timeout: Duration = .seconds(10), waiters: Int = 4096) -> SessionPoolConfiguration
    {
        var configuration = SessionPoolConfiguration()
        configuration.maximumSessions = sessions
        configuration.acquireTimeout = timeout
        configuration.maximumWaiters = waiters
        return configuration
    }

    /// A pool on this suite's token, logged in with its PIN.
    func makePool(sessions: Int, timeout: Duration = .seconds(10), waiters: Int = 4096) async throws -> SessionPool {
        try await SessionPool(
            module: fixture.module,
            tokenLabel: token.label,
            pin: token.pin,
            configuration: configuration(sessions: sessions, timeout: timeout, waiters: waiters)
        )
    }

    /// Leases one of `pool`'s sessions in a task until `release` is set; returns once it is held.
    func holdSession(_ pool: SessionPool) async throws -> (release: Flag, holder: Task<Void, any Error>) {
        let holding = Flag()
        let release = Flag()
        let holder = Task {
            try await pool.withSession { _ in
                holding.set()
                release.wait(upTo: .seconds(60))
            }
        }
        while !holding.isSet { try await Task.sleep(for: .milliseconds(5)) }
        return (release, holder)
    }

    /// A token master key for the pool tests, found again by its CKA_ID.
    func masterKey(id: [UInt8]) throws -> ObjectHandle {
        try fixture.module.withSession(slot: token.slot) { session in
            try session.login(.user, pin: token.pin)
            if let existing = try session.findMasterKey(id: id) { return existing }
            return try session.generateMasterKey(label: MasterKeyPolicy.labelPrefix + "pool", id: id)
        }
    }

    @Test("256 concurrent tasks over 4 sessions: right answers, no session used twice at once")
    func concurrentExclusiveUse() async throws {
        let pool = try await makePool(sessions: 4)
        let keyID: [UInt8] = [0x50, 0x01]
        _ = try masterKey(id: keyID)
        let tracker = SessionUseTracker()

        try await withThrowingTaskGroup(of: Void.self) { group in
            for task in 0..<256 {
                group.addTask {
                    let plaintext = Array("task \(task)".utf8)
                    let aad = withUnsafeBytes(of: UInt32(task).bigEndian) { Array($0) }
                    let opened: [UInt8] = try await pool.withSession { (session: borrowing Session) -> [UInt8] in
                        let identifier = session.identifier
                        tracker.enter(identifier)
                        defer { tracker.leave(identifier) }
                        guard let key = try session.findMasterKey(id: keyID) else { return [] }
                        let box = try plaintext.withUnsafeBytes {
                            try session.sealAESGCM(key: key, aad: aad, plaintext: $0)
                        }
                        return try session.openAESGCM(key: key, aad: aad, box: box).copyBytes()
                    }
                    #expect(opened == plaintext)
                }
            }
            try await group.waitForAll()
        }
        let usage = tracker.summary
        #expect(usage.overlaps == 0)
        #expect(usage.peak <= 4)
        #expect(usage.peak >= 2, "256 tasks should have kept more than one session busy")
        #expect(usage.distinct <= 4)
        let statistics = pool.statistics
        #expect(statistics.maximumSessions == 4)
        #expect(statistics.leased == 0)
        #expect(statistics.waiting == 0)
        #expect(statistics.opening + statistics.idle <= 4)
        await pool.shutdown()
        #expect(pool.statistics.idle == 0)
    }

    @Test("sessions closed underneath the pool are replaced, with a new login, and the call succeeds")
    func closedUnderneath() async throws {
        let pool = try await makePool(sessions: 4)
        let keyID: [UInt8] = [0x50, 0x02]
        _ = try masterKey(id: keyID)
        // Warm the pool up to four sessions.
        try await withThrowingTaskGroup(of: Void.self) { group in
            for _ in 0..<4 {
                group.addTask {
                    try await pool.withSession { (_: borrowing Session) -> Void in usleep(50_000) }
                }
            }
            try await group.waitForAll()
        }
        let before = pool.statistics
        #expect(before.idle == 4)

        // Every session of this process on the token goes away, and with them the login.
        try fixture.module.closeAllSessions(slot: token.slot)

        let opened = try await pool.withSession { session in
            #expect(try session.state().isUserLoggedIn)
            let key = try #require(try session.findMasterKey(id: keyID))
            let box = try [UInt8]([1, 2, 3]).withUnsafeBytes {
                try session.sealAESGCM(key: key, aad: [], plaintext: $0)
            }
            return try session.openAESGCM(key: key, aad: [], box: box).copyBytes()
        }
        #expect(opened == [1, 2, 3])
        let after = pool.statistics
        #expect(after.discarded >= 1)
        // Later calls keep working too.
        let random = try await pool.withSession { try $0.generateRandom(count: 8) }
        #expect(random.count == 8)
        await pool.shutdown()
    }

    @Test("a full pool makes the next caller wait, then fail with sessionAcquireTimeout")
    func acquireTimeout() async throws {
        let pool = try await makePool(sessions: 1, timeout: .milliseconds(200))
        let (release, holder) = try await holdSession(pool)
        let started = ContinuousClock.now
        let error = await #expect(throws: PKCS11Error.self) {
            try await pool.withSession { _ in }
        }
        let waited = ContinuousClock.now - started
        #expect(error?.code == .sessionAcquireTimeout)
        #expect(waited >= .milliseconds(150))
        #expect(error?.description.contains("sessionAcquireTimeout") == true)
        release.set()
        try await holder.value
        // Once the session is back, callers are served again.
        try await pool.withSession { _ in }
        await pool.shutdown()
    }

    @Test("over the waiter limit a caller fails at once with sessionPoolQueueFull")
    func queueFull() async throws {
        let pool = try await makePool(sessions: 1, timeout: .seconds(10), waiters: 1)
        let (release, holder) = try await holdSession(pool)
        let waiter = Task { try await pool.withSession { _ in 1 } }
        while pool.statistics.waiting < 1 { try await Task.sleep(for: .milliseconds(5)) }
        let error = await #expect(throws: PKCS11Error.self) { try await pool.withSession { _ in 2 } }
        #expect(error?.code == .sessionPoolQueueFull)
        release.set()
        try await holder.value
        #expect(try await waiter.value == 1)
        await pool.shutdown()
    }

    @Test("a cancelled waiter leaves the queue with CancellationError")
    func cancelledWaiter() async throws {
        let pool = try await makePool(sessions: 1)
        let (release, holder) = try await holdSession(pool)
        let waiter = Task { try await pool.withSession { _ in } }
        while pool.statistics.waiting < 1 { try await Task.sleep(for: .milliseconds(5)) }
        waiter.cancel()
        await #expect(throws: CancellationError.self) { try await waiter.value }
        #expect(pool.statistics.waiting == 0)
        release.set()
        try await holder.value
        await pool.shutdown()
    }

    @Test("after shutdown, calls fail with sessionPoolShutDown and no session is left open")
    func shutdown() async throws {
        let before = fixture.module.openSessionCount(slot: token.slot)
        let pool = try await makePool(sessions: 2)
        try await pool.withSession { _ in }
        await pool.shutdown()
        let error = await #expect(throws: PKCS11Error.self) { try await pool.withSession { _ in } }
        #expect(error?.code == .sessionPoolShutDown)
        await pool.shutdown()  // a second shutdown returns at once
        #expect(fixture.module.openSessionCount(slot: token.slot) == before)
    }

    @Test("a wrong PIN or a missing token fails when the pool is created, not on first use")
    func failsAtCreation() async throws {
        let wrongPIN = await #expect(throws: PKCS11Error.self) {
            _ = try await SessionPool(
                module: fixture.module,
                tokenLabel: token.label,
                pin: SecretBytes(utf8: "not-the-pin"),
                configuration: configuration(sessions: 2)
            )
        }
        #expect(wrongPIN?.returnValue == .pinIncorrect)
        let missing = await #expect(throws: PKCS11Error.self) {
            _ = try await SessionPool(
                module: fixture.module,
                tokenLabel: "no-such-token",
                pin: token.pin,
                configuration: configuration(sessions: 2)
            )
        }
        #expect(missing?.code == .tokenNotFound)
    }

    @Test("the pool is no bigger than the configuration asks, nor than the token allows")
    func sizeBounds() async throws {
        let pool = try await makePool(sessions: 3)
        #expect(pool.maximumSessions == 3)
        let limit = try fixture.module.tokenInfo(token.slot).maximumReadWriteSessionCount
        if let count = limit.count { #expect(pool.maximumSessions <= count) }
        await pool.shutdown()
        var bad = SessionPoolConfiguration()
        bad.maximumSessions = 0
        let error = await #expect(throws: PKCS11Error.self) {
            _ = try await SessionPool(
                module: fixture.module, tokenLabel: token.label, pin: token.pin, configuration: bad)
        }
        #expect(error?.code == .invalidArgument)
    }
}

/// Records which sessions are in use, to prove none is used by two tasks at once.
final class SessionUseTracker: Sendable {
    private struct State {
        var inUse: Set<UInt> = []
        var everUsed: Set<UInt> = []
        var overlaps = 0
        var peak = 0
    }

    private let state = Mutex(State())

    func enter(_ session: UInt) {
        state.withLock { state in
            if !state.inUse.insert(session).inserted {
                state.overlaps += 1
            }
            state.everUsed.insert(session)
            state.peak = max(state.peak, state.inUse.count)
        }
    }

    func leave(_ session: UInt) {
        state.withLock { _ = $0.inUse.remove(session) }
    }

    var summary: (overlaps: Int, peak: Int, distinct: Int) {
        state.withLock { ($0.overlaps, $0.peak, $0.everUsed.count) }
    }
}

/// A flag one task raises and another polls.
final class Flag: Sendable {
    private let value = Atomic<Bool>(false)
    func set() { value.store(true, ordering: .releasing) }
    var isSet: Bool { value.load(ordering: .acquiring) }

    /// Blocks the calling thread (a pool thread in these tests) until the flag is set.
    func wait(upTo limit: Duration) {
        let deadline = ContinuousClock.now.advanced(by: limit)
        while !isSet, ContinuousClock.now < deadline { usleep(1000) }
    }
}
