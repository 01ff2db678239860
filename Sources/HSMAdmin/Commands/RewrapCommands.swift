import ArgumentParser
import GatewayClient

/// `hsm-admin rewrap`.
struct RewrapCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rewrap",
        abstract: "Move a tenant's data keys to its primary master-key version (admin on the tenant).",
        subcommands: [RewrapStartCommand.self, RewrapStatusCommand.self]
    )
}

/// `hsm-admin rewrap start TENANT`.
struct RewrapStartCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "start",
        abstract: "Start rewrapping every data key of the tenant under its primary version, in the background.",
        discussion: "Follow it with `hsm-admin rewrap status TENANT --watch`."
    )

    @Argument(help: "Tenant id.", transform: argument(AdminArguments.tenantID))
    var tenant: String

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func execute(_ session: AdminSession) async throws {
        let view = RewrapJobView(try await session.client.startRewrapJob(tenant: tenant))
        session.print(view) { view.fields.render() }
    }
}

/// `hsm-admin rewrap status TENANT [--watch]`.
struct RewrapStatusCommand: RemoteCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Show the tenant's latest rewrap job; with --watch, follow it until it completes.",
        discussion: """
            --watch redraws one progress line on a terminal and prints one line per change \
            otherwise (one JSON object per change with --json). It exits 0 when the job \
            completes and 1 if it ends in another state. A tenant that never had a job prints \
            so and exits 0 (`"job": null` in JSON).
            """
    )

    /// The shortest and longest poll interval: fast enough to look live, slow enough not to
    /// load the gateway; at most a minute so a watch notices the end promptly.
    static let intervalRange: ClosedRange<Duration> = .milliseconds(100) ... .seconds(60)

    @Argument(help: "Tenant id.", transform: argument(AdminArguments.tenantID))
    var tenant: String

    @Flag(help: "Follow the job until it completes.")
    var watch = false

    @Option(
        help: ArgumentHelp("Poll interval of --watch, e.g. 500ms, 2s.", valueName: "duration"),
        transform: argument(DurationArgument.parse)
    )
    var interval: Duration = .seconds(1)

    @OptionGroup(title: "Connection") var connection: ConnectionOptions
    @OptionGroup(title: "Output") var outputOptions: OutputOptions

    init() {}

    func validate() throws {
        guard Self.intervalRange.contains(interval) else {
            throw ValidationError("--interval must be 100ms to 60s")
        }
    }

    /// `rewrap status --json` without --watch: the job, or null when the tenant never had one.
    struct Status: Encodable {
        var tenant: String
        var job: RewrapJobView?

        func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: CodingKeys.self)
            try container.encode(tenant, forKey: .tenant)
            try container.encode(job, forKey: .job)  // null, not absent
        }

        enum CodingKeys: String, CodingKey {
            case tenant, job
        }
    }

    func execute(_ session: AdminSession) async throws {
        let first = try await session.client.getRewrapJob(tenant: tenant)
        guard let first, watch else {
            let view = first.map(RewrapJobView.init)
            session.print(Status(tenant: tenant, job: view)) {
                view?.fields.render() ?? "tenant \(tenant) has no rewrap job\n"
            }
            return
        }
        var printer = RewrapProgressPrinter(json: session.json, terminal: session.output.isTerminal)
        var view = RewrapJobView(first)
        while true {
            session.output.write(printer.update(view))
            if view.isFinished { break }
            try await Task.sleep(for: interval)
            guard let next = try await session.client.getRewrapJob(tenant: tenant) else {
                throw AdminError(.internalError, "the rewrap job of \(tenant) disappeared while watched")
            }
            view = RewrapJobView(next)
        }
        if view.state != "completed" {
            throw AdminError(.failed, "the rewrap job ended \(view.state.sanitizedForTerminal)")
        }
    }
}

/// What `rewrap status --watch` prints for each poll: on a terminal one line redrawn in place
/// (ended by a newline when the job finishes); elsewhere a line, or a JSON line, per change.
struct RewrapProgressPrinter: Sendable {
    /// Carriage return and "erase to end of line": redraws the line in place.
    static let redraw = "\r\u{1B}[K"

    let json: Bool
    let terminal: Bool
    private var last: RewrapJobView?

    /// A printer for JSON lines or text, redrawing in place when `terminal` (and not `json`).
    init(json: Bool, terminal: Bool) {
        self.json = json
        self.terminal = terminal
    }

    /// The text to write for `view`; empty when nothing changed since the last update.
    mutating func update(_ view: RewrapJobView) -> String {
        defer { last = view }
        let changed = last.map { $0.state != view.state || $0.moved != view.moved || $0.total != view.total } ?? true
        if json { return changed ? AdminJSON.line(view) : "" }
        if terminal { return Self.redraw + view.line + (view.isFinished ? "\n" : "") }
        return changed ? view.line + "\n" : ""
    }
}
