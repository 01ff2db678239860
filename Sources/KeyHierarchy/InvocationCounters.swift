import Synchronization

/// IV counters reserved from the database, per master-key version, handed out in memory.
///
/// A block is reserved (and its reservation committed) before any of its counters is used, so a
/// counter value is never used twice under one version, across crashes and across gateway
/// instances sharing one database; and the stored count is never below the real number of
/// encryptions. A crash wastes the rest of a block, which only brings rotation a little closer.
final class InvocationCounters: Sendable {
    private struct Block {
        var next: Int64
        var end: Int64
    }

    let blockSize: Int64
    private let blocks = Mutex<[KeyService.VersionRef: Block]>([:])

    init(blockSize: Int64) {
        self.blockSize = blockSize
    }

    /// `count` consecutive counters from the cached block, or nil when it has too few.
    func take(_ version: KeyService.VersionRef, count: Int64) -> Range<Int64>? {
        blocks.withLock { blocks in
            guard var block = blocks[version], block.end - block.next >= count else { return nil }
            let range = block.next..<block.next + count
            block.next += count
            blocks[version] = block
            return range
        }
    }

    /// Installs a newly reserved block `start..<end`, taking `count` counters from its start.
    /// The rest replaces the cached block when it is larger (the smaller rest is dropped: unused
    /// counters are harmless).
    func install(_ version: KeyService.VersionRef, start: Int64, end: Int64, taking count: Int64) -> Range<Int64> {
        blocks.withLock { blocks in
            let rest = Block(next: start + count, end: end)
            if let current = blocks[version], current.end - current.next >= rest.end - rest.next {
                // Keep the larger rest.
            } else {
                blocks[version] = rest
            }
            return start..<start + count
        }
    }

    func forget(tenant: TenantID) {
        blocks.withLock { blocks in blocks = blocks.filter { $0.key.tenant != tenant } }
    }

    func forget(_ version: KeyService.VersionRef) {
        blocks.withLock { _ = $0.removeValue(forKey: version) }
    }
}

extension KeyService {
    /// `count` fresh IV counters under a version, or nil when the version's invocation limit
    /// would be passed (the caller rotates).
    func reserveCounters(
        _ version: VersionRef,
        count: Int64,
        request: RequestContext
    ) async throws -> Range<Int64>? {
        if let range = counters.take(version, count: count) { return range }
        for size in [max(counters.blockSize, count), count] {
            let start = try await committer.commit(isolated: true) { transaction -> UnitOutcome<Int64?> in
                guard
                    let start = try await transaction.reserveInvocations(
                        version.tenant,
                        version.version,
                        count: size,
                        limit: self.configuration.invocationLimit
                    )
                else { return UnitOutcome(nil, audit: []) }
                return UnitOutcome(
                    start,
                    audit: [
                        AuditEvent(
                            principal: request.principal,
                            tenant: version.tenant,
                            operation: .reserveInvocations,
                            keyIDs: ["v\(version.version)"],
                            requestID: request.requestID,
                            detail: "invocations=\(start)..<\(start + size)"
                        )
                    ]
                )
            }.value
            if let start {
                return counters.install(version, start: start, end: start + size, taking: count)
            }
        }
        return nil
    }
}
