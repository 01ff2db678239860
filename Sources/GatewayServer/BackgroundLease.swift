import Foundation
import Logging
import PostgresKeyStore
import Synchronization

/// Which instance runs the background work (rewrap jobs, scheduled destruction) when several
/// share one PostgreSQL database: the holder of the lease `background-work` in the `leases`
/// table. On SQLite (one node) this instance always holds it.
///
/// The holder renews every `renewInterval`; a lease not renewed for `duration` (its holder died,
/// froze or lost the database) is taken by the next instance that tries, so the work moves
/// within `duration + renewInterval`. The holder counts the lease as its own only until
/// `duration - safetyMargin` after it sent its last successful renewal: it stops its work before
/// the server would let anyone else take it. A rewrap batch still in flight then is fenced by the
/// store (migration 5: a running job's row is updated only by the live holder's connections,
/// whose `application_name` is `holder`).
/// Expiry is by the server's clock, so the instances' clocks need not agree; the holder's own
/// deadline is by its monotonic clock, measured from before the renewal was sent, so it can only
/// be early.
final class BackgroundLease: Sendable {
    /// The lease's name in the `leases` table.
    static let name = "background-work"
    /// How long a lease lasts after each renewal: the bound on how long work stalls when its
    /// holder dies (plus `renewInterval`).
    static let duration: Duration = .seconds(10)
    /// How often the holder renews, and how often the others try to take it: three renewals fit
    /// in one lease, so one slow or lost renewal does not give the work away.
    static let renewInterval: Duration = .seconds(3)
    /// How long before the server-side expiry the holder stops counting the lease as its own: room
    /// for a batch in flight to finish, and for the renewal's own round trip.
    static let safetyMargin: Duration = .seconds(3)

    private struct State {
        /// Until when this instance counts the lease as its own; nil when it does not hold it.
        var heldUntil: ContinuousClock.Instant?
        /// The fencing token of the current holding.
        var token: Int64?
    }

    /// Nil on SQLite: the lease is always held.
    let store: PostgresKeyStore?
    /// This process's holder id: the instance id and a random suffix, so a second process started
    /// with the same instance id never renews the first one's lease as its own. It is also the
    /// `application_name` of the store's connections, which the rewrap-job fence compares with
    /// the lease.
    let holder: String

    /// A random suffix drawn once per process.
    private static let processSuffix = UUID().uuidString.prefix(8).lowercased()

    /// The holder id of `instanceID` in this process: at most 63 bytes (PostgreSQL's limit for
    /// `application_name`), so the instance id is shortened to 54.
    static func holderID(instanceID: String) -> String {
        var prefix = Substring(instanceID)
        while prefix.utf8.count > 54 { prefix = prefix.dropLast() }
        return "\(prefix)/\(processSuffix)"
    }
    let logger: Logger
    private let state = Mutex(State())

    init(store: PostgresKeyStore?, instanceID: String, logger: Logger) {
        self.store = store
        self.holder = Self.holderID(instanceID: instanceID)
        self.logger = logger
    }

    /// Whether this instance may run background work now.
    var isHeld: Bool {
        guard store != nil else { return true }
        return state.withLock { state in state.heldUntil.map { ContinuousClock.now < $0 } ?? false }
    }

    /// The fencing token of the current holding (nil when not held or on SQLite).
    var token: Int64? { state.withLock { $0.token } }

    /// Takes and renews the lease until the task is cancelled, calling `acquired` each time this
    /// instance becomes the holder and `lost` each time it stops being one (including at the end).
    func run(acquired: @Sendable () async -> Void, lost: @Sendable () async -> Void) async {
        guard let store else {
            await acquired()
            while (try? await Task.sleep(for: .seconds(3600))) != nil {}
            await lost()
            return
        }
        var holding = false
        while !Task.isCancelled {
            let sentAt = ContinuousClock.now
            var renewed: Int64?
            do {
                renewed = try await store.acquireLease(Self.name, holder: holder, duration: Self.duration)
            } catch {
                logger.warning("background lease could not be renewed", metadata: ["error": "\(error)"])
            }
            if let token = renewed {
                state.withLock { $0 = State(heldUntil: sentAt + Self.duration - Self.safetyMargin, token: token) }
                if !holding {
                    holding = true
                    logger.notice(
                        "this instance holds the background lease: it runs rewrap jobs and scheduled destruction",
                        metadata: ["holder": "\(holder)", "token": "\(token)"])
                    await acquired()
                }
            }
            if holding, !isHeld {
                holding = false
                state.withLock { $0 = State() }
                logger.warning("background lease lost: background work stops here", metadata: ["holder": "\(holder)"])
                await lost()
            }
            // Wake at the next renewal, or when the lease would lapse if that comes first.
            var wait = Self.renewInterval
            if holding, let until = state.withLock({ $0.heldUntil }) {
                wait = min(wait, max(until - ContinuousClock.now, .milliseconds(10)))
            }
            if (try? await Task.sleep(for: wait)) == nil { break }
        }
        if holding {
            state.withLock { $0 = State() }
            await lost()
        }
    }

    /// Gives the lease up (graceful shutdown, after the work stopped).
    func release() async {
        guard let store else { return }
        state.withLock { $0 = State() }
        do {
            try await store.releaseLease(Self.name, holder: holder)
        } catch {
            logger.warning("background lease could not be released; it expires", metadata: ["error": "\(error)"])
        }
    }
}
