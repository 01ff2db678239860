/// Chooses request ids for one connection: counting up from 1, wrapping past `UInt32.max` back to
/// 1, never 0 (the protocol reserves it) and never an id still in flight (the server would close
/// the connection with `REQUEST_ID_IN_USE`). Counting rather than reusing the lowest free id
/// keeps a late answer to an old request from ever meeting a new request with its id.
struct RequestIDAllocator: Sendable, Hashable {
    /// The next candidate.
    private(set) var next: UInt32

    /// Starts at `first` (1 unless a test wants to see the wrap).
    init(startingAt first: UInt32 = 1) {
        self.next = first == 0 ? 1 : first
    }

    /// An id that `isInFlight` does not hold, or nil when all 2³²−1 ids are in flight (which the
    /// in-flight limit makes impossible). At most `inFlightCount + 1` candidates are tried.
    mutating func allocate(inFlightCount: Int, isInFlight: (UInt32) -> Bool) -> UInt32? {
        guard inFlightCount < Int(UInt32.max) else { return nil }
        for _ in 0...inFlightCount {
            let candidate = next
            next = next == UInt32.max ? 1 : next + 1
            if !isInFlight(candidate) { return candidate }
        }
        return nil
    }
}
