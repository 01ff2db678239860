import ArgumentParser
import Foundation
import GatewayClient

/// `hsm-admin audit`.
struct AuditCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "audit",
        abstract: "Read, verify and export the hash-chained audit log (gateway admin).",
        subcommands: [AuditTailCommand.self, AuditVerifyCommand.self, AuditExportCommand.self]
    )
}

/// Reading the audit log by sequence.
enum AuditLog {
    /// The most probes `head` makes: an exponential then a binary search over 63-bit sequences
    /// needs at most about 2 × 63.
    static let maximumProbes = 130

    /// The newest record's sequence (0 for an empty log), found with one-record listings: about
    /// 2·log2(head) calls, never a scan of the whole log.
    static func head(_ client: GatewayClient) async throws -> Int64 {
        var probes = 0
        /// The first sequence after `after`, or nil.
        func first(after: Int64) async throws -> Int64? {
            probes += 1
            guard probes <= maximumProbes else {
                throw AdminError(.internalError, "cannot find the audit log's newest record")
            }
            let found = try await client.listAuditRecords(after: after, limit: 1).first?.sequence
            if let found, found <= after {
                throw AdminError(.internalError, "the audit log's sequence numbers are not increasing")
            }
            return found
        }
        guard var low = try await first(after: 0) else { return 0 }
        var high = low
        while let next = try await first(after: high) {
            low = next
            high = next > Int64.max / 2 ? Int64.max : next * 2
        }
        // A record exists at `low` and none after `high`: narrow down to the newest.
        while low < high {
            let middle = low + (high - low + 1) / 2
            if let found = try await first(after: middle - 1) {
                low = found
            } else {
                high = middle - 1
            }
        }
        return low
    }

    /// Every record after `after`, oldest first, page by page, handed to `body`; returns how
    /// many and the last sequence.
    static func forEachPage(
        _ client: GatewayClient,
        after: Int64,
        body: ([AuditRecordView]) throws -> Void
    ) async throws -> (count: Int, last: Int64) {
        var cursor = after
        var count = 0
        // Ends: every page moves the cursor forward, and sequences are bounded.
        while true {
            let page = try await client.listAuditRecords(after: cursor, limit: Paging.maximumPageSize)
            guard let last = page.last?.sequence else { break }
            guard last > cursor else {
                throw AdminError(.internalError, "the audit log's sequence numbers are not increasing")
            }
            try body(page.map(AuditRecordView.init))
            count += page.count
            cursor = last
            if page.count < Paging.maximumPageSize { break }
        }
        return (count, cursor)
    }
}

/// `hsm-admin audit tail`.
struct AuditTailCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "tail",
        abstract: "Show the newest audit records, or those after --after; --follow prints new ones as they come.",
        discussion: "--json prints one JSON object per line (JSON lines), with or without --follow."
    )

    /// The protocol's page: the most records one listing returns.
    static let maximumLimit = 1000
    /// The shortest and longest --follow poll interval.
    static let intervalRange: ClosedRange<Duration> = .milliseconds(100) ... .seconds(60)
    /// The least width of each column under --follow, so later rows usually line up with the
    /// first ones.
    static let followWidths = [6, 20, 10, 10, 22, 8, 4, 0]

    @Option(help: "Records with a sequence after this one (default: the newest --limit records).")
    var after: Int64?

    @Option(help: "How many records (1 to \(maximumLimit)).")
    var limit = 20

    @Flag(help: "Keep polling and print new records until interrupted.")
    var follow = false

    @Option(
        help: ArgumentHelp("Poll interval of --follow, e.g. 2s.", valueName: "duration"),
        transform: argument(DurationArgument.parse)
    )
    var interval: Duration = .seconds(2)

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func validate() throws {
        guard (1...Self.maximumLimit).contains(limit) else {
            throw ValidationError("--limit must be 1 to \(Self.maximumLimit), is \(limit)")
        }
        if let after, after < 0 { throw ValidationError("--after must be 0 or more") }
        guard Self.intervalRange.contains(interval) else { throw ValidationError("--interval must be 100ms to 60s") }
    }

    func execute(_ session: AdminSession) async throws {
        let client = session.client
        let start: Int64
        if let after {
            start = after
        } else {
            start = max(try await AuditLog.head(client) - Int64(limit), 0)
        }
        let records = try await client.listAuditRecords(after: start, limit: limit).map(AuditRecordView.init)
        var table = AuditRecordView.table(records)
        var widths = table.widths
        if follow { widths = zip(widths, Self.followWidths).map { max($0, $1) } }
        if session.json {
            for record in records { session.output.write(AdminJSON.line(record)) }
        } else {
            session.output.line(table.header(widths: widths))
            for row in table.rows { session.output.line(table.line(row, widths: widths)) }
        }
        guard follow else { return }
        var cursor = records.last?.sequence ?? start
        while true {
            try await Task.sleep(for: interval)
            (_, cursor) = try await AuditLog.forEachPage(client, after: cursor) { page in
                for record in page {
                    if session.json {
                        session.output.write(AdminJSON.line(record))
                    } else {
                        table = TextTable(AuditRecordView.columns)
                        table.append(record.cells)
                        session.output.line(table.line(table.rows[0], widths: widths))
                    }
                }
            }
        }
    }
}

/// `hsm-admin audit verify`.
struct AuditVerifyCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Replay the audit log's hash chain; exits 1 when it is broken.",
        discussion: "A broken chain names the first record that fails and how: the log was altered or lost records."
    )

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func execute(_ session: AdminSession) async throws {
        // Replaying a long chain takes time: allow the longest deadline the settings allow.
        let view = AuditVerificationView(try await session.client.verifyAuditLog(deadline: session.settings.timeout))
        session.print(view) { view.fields.render() }
        if !view.intact { throw AdminError.silent(.failed) }
    }
}

/// `hsm-admin audit export`.
struct AuditExportCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "Write every audit record (after --after) as JSON lines, to stdout or --output.",
        discussion: """
            Pages through the whole log, oldest first, one JSON object per line, whatever --json \
            says. With --output the file is written under a temporary name (mode 0600) and \
            renamed when complete, so a failed export never leaves a truncated file.
            """
    )

    @Option(help: "Records with a sequence after this one (default 0: all).")
    var after: Int64 = 0

    @Option(help: ArgumentHelp("Write to this file instead of stdout.", valueName: "path"))
    var output: String?

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func validate() throws {
        if after < 0 { throw ValidationError("--after must be 0 or more") }
    }

    func execute(_ session: AdminSession) async throws {
        let client = session.client
        guard let output else {
            let (count, last) = try await AuditLog.forEachPage(client, after: after) { page in
                session.output.write(page.map(AdminJSON.line).joined())
            }
            session.output.note("hsm-admin: exported \(count) audit records" + (count > 0 ? " (to #\(last))" : ""))
            return
        }
        let file = try ExportFile(path: output)
        do {
            let (count, last) = try await AuditLog.forEachPage(client, after: after) { page in
                try file.write(page.map(AdminJSON.line).joined())
            }
            try file.commit()
            session.output.note(
                "hsm-admin: exported \(count) audit records" + (count > 0 ? " (to #\(last))" : "") + " to \(output)")
        } catch {
            file.abandon()
            throw error
        }
    }
}

/// A file written under a temporary name next to its final path, then renamed into place.
final class ExportFile {
    let path: String
    let temporaryPath: String
    private let descriptor: Int32
    private var isOpen = true

    init(path: String) throws(AdminError) {
        self.path = path
        self.temporaryPath = path + ".partial-\(getpid())"
        descriptor = open(temporaryPath, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard descriptor >= 0 else {
            throw AdminError(.cannotCreate, "cannot create \(temporaryPath): \(String(cString: strerror(errno)))")
        }
    }

    func write(_ text: String) throws(AdminError) {
        var bytes = Array(text.utf8)[...]
        while !bytes.isEmpty {
            let written = bytes.withUnsafeBytes { Foundation.write(descriptor, $0.baseAddress, $0.count) }
            if written < 0 {
                if errno == EINTR { continue }
                throw AdminError(.cannotCreate, "cannot write \(temporaryPath): \(String(cString: strerror(errno)))")
            }
            bytes = bytes.dropFirst(written)
        }
    }

    func commit() throws(AdminError) {
        guard fsync(descriptor) == 0 else {
            throw AdminError(.cannotCreate, "cannot write \(temporaryPath): \(String(cString: strerror(errno)))")
        }
        close(descriptor)
        isOpen = false
        guard rename(temporaryPath, path) == 0 else {
            let reason = String(cString: strerror(errno))
            unlink(temporaryPath)
            throw AdminError(.cannotCreate, "cannot rename \(temporaryPath) to \(path): \(reason)")
        }
    }

    func abandon() {
        if isOpen { close(descriptor) }
        isOpen = false
        unlink(temporaryPath)
    }
}
