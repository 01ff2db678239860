import Dispatch
import Foundation
import HSMAdmin
import Synchronization

/// The message of the last failed system call, for errors (never holds data).
func systemError() -> String { String(cString: strerror(errno)) }

/// The input of `encrypt` and `decrypt`: a file or standard input, read in chunks of bounded size.
final class InputSource: Sendable {
    /// Bytes asked of `read(2)` at a time: with one envelope frame, what the process holds.
    static let chunkByteCount = 64 * 1024

    /// The descriptor read.
    let descriptor: Int32
    /// Whether the descriptor is this process's own (closed by `close()`).
    private let owned: Bool
    /// The file's size when it is a regular file (progress shows a percentage then).
    let knownSize: Int?
    /// The path, or `-`.
    let name: String
    /// Bytes read so far.
    private let consumed = Atomic<Int>(0)

    private init(descriptor: Int32, owned: Bool, name: String) {
        self.descriptor = descriptor
        self.owned = owned
        self.name = name
        var status = stat()
        if fstat(descriptor, &status) == 0, status.st_mode & S_IFMT == S_IFREG {
            knownSize = Int(status.st_size)
        } else {
            knownSize = nil
        }
    }

    /// Opens `path`, or takes `standardInput` for `-`.
    static func open(_ path: String, standardInput: Int32) throws(AdminError) -> InputSource {
        if path == "-" { return InputSource(descriptor: standardInput, owned: false, name: "-") }
        let descriptor = Foundation.open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY)
        guard descriptor >= 0 else {
            throw AdminError(.noInput, "cannot open \(path.sanitizedForTerminal): \(systemError())")
        }
        var status = stat()
        if fstat(descriptor, &status) == 0, status.st_mode & S_IFMT == S_IFDIR {
            Foundation.close(descriptor)
            throw AdminError(.noInput, "\(path.sanitizedForTerminal) is a directory")
        }
        return InputSource(descriptor: descriptor, owned: true, name: path)
    }

    /// Bytes read so far.
    var byteCount: Int { consumed.load(ordering: .relaxed) }

    /// The next chunk, or nil at the end of the input.
    func read() throws(AdminError) -> [UInt8]? {
        var chunk = [UInt8](repeating: 0, count: Self.chunkByteCount)
        while true {
            let count = chunk.withUnsafeMutableBytes { Foundation.read(descriptor, $0.baseAddress, $0.count) }
            if count > 0 {
                chunk.removeLast(chunk.count - count)
                consumed.add(count, ordering: .relaxed)
                return chunk
            }
            if count == 0 { return nil }
            if errno != EINTR {
                throw AdminError(.ioError, "cannot read \(name.sanitizedForTerminal): \(systemError())")
            }
        }
    }

    /// The input as an asynchronous sequence of chunks, for the envelope streams.
    var chunks: Chunks { Chunks(source: self) }

    /// Closes a file this source opened.
    func close() {
        if owned { Foundation.close(descriptor) }
    }

    /// `InputSource.read()` as an `AsyncSequence`: one chunk in memory at a time.
    struct Chunks: AsyncSequence, Sendable {
        typealias Element = [UInt8]
        let source: InputSource

        func makeAsyncIterator() -> Iterator { Iterator(source: source) }

        struct Iterator: AsyncIteratorProtocol {
            let source: InputSource
            mutating func next() async throws -> [UInt8]? { try source.read() }
        }
    }
}

/// Where `encrypt`, `decrypt` and the plaintext of a data key go: standard output, streamed, or
/// a new file that appears under its name only when complete.
///
/// A file is written to a temporary file of mode 0600 in the target's directory (so the rename
/// stays on one file system) and linked to its name by `commit()` only after everything was
/// written and flushed; `discard()` removes it. Without `force` an existing path is refused,
/// both before starting and at the end (`link(2)` does not replace), so a file that appeared
/// meanwhile is not overwritten either.
final class OutputSink {
    /// The longest output path accepted (Linux's `PATH_MAX`).
    static let maximumPathByteCount = 4096

    private enum Target {
        case standardOutput(Int32)
        case file(path: String, temporary: String, descriptor: Int32, force: Bool)
    }

    private var target: Target
    private var finished = false
    /// Bytes written so far.
    private(set) var byteCount = 0

    /// The path, or `-`.
    let name: String

    private init(target: Target, name: String) {
        self.target = target
        self.name = name
    }

    /// Standard output (`descriptor`) for `-`, else a temporary file next to `path`.
    static func open(_ path: String, force: Bool, standardOutput: Int32) throws(AdminError) -> OutputSink {
        if path == "-" { return OutputSink(target: .standardOutput(standardOutput), name: "-") }
        let shown = path.sanitizedForTerminal
        guard !path.isEmpty, path.utf8.count <= maximumPathByteCount else {
            throw AdminError(.usage, "an output path must be 1 to \(maximumPathByteCount) bytes")
        }
        var status = stat()
        if lstat(path, &status) == 0 {
            if status.st_mode & S_IFMT == S_IFDIR {
                throw AdminError(.cannotCreate, "\(shown) is a directory")
            }
            if !force {
                throw AdminError(.cannotCreate, "\(shown) exists: give --force to replace it")
            }
        }
        let directory = (path as NSString).deletingLastPathComponent
        let base = (path as NSString).lastPathComponent
        let template = (directory.isEmpty ? "" : directory + "/") + ".\(base).hsmgw-XXXXXX"
        var bytes = Array(template.utf8CString)
        // mkstemp creates the file with mode 0600 and O_EXCL.
        let descriptor = bytes.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard descriptor >= 0 else {
            throw AdminError(.cannotCreate, "cannot create a file next to \(shown): \(systemError())")
        }
        _ = fcntl(descriptor, F_SETFD, FD_CLOEXEC)
        let temporary = String(cString: bytes)
        PendingFiles.add(temporary)
        return OutputSink(
            target: .file(path: path, temporary: temporary, descriptor: descriptor, force: force), name: path)
    }

    /// Writes all of `bytes`.
    func write(_ bytes: [UInt8]) throws(AdminError) {
        let result = bytes.withUnsafeBytes { buffer in Result { () throws(AdminError) in try write(buffer) } }
        try result.get()
    }

    /// Writes all of `buffer` (no copy is made: it may hold a key).
    func write(_ buffer: UnsafeRawBufferPointer) throws(AdminError) {
        let descriptor: Int32
        switch target {
        case .standardOutput(let output): descriptor = output
        case .file(_, _, let file, _): descriptor = file
        }
        var offset = 0
        while offset < buffer.count {
            let count = Foundation.write(descriptor, buffer.baseAddress! + offset, buffer.count - offset)
            if count < 0 {
                if errno == EINTR { continue }
                throw AdminError(.ioError, "cannot write \(name.sanitizedForTerminal): \(systemError())")
            }
            offset += count
        }
        byteCount += buffer.count
    }

    /// Flushes a file to disk and gives it its name; nothing for standard output.
    func commit() throws(AdminError) {
        guard case .file(let path, let temporary, let descriptor, let force) = target else {
            finished = true
            return
        }
        let shown = path.sanitizedForTerminal
        guard fsync(descriptor) == 0 else {
            throw AdminError(.ioError, "cannot write \(shown): \(systemError())")
        }
        if force {
            guard rename(temporary, path) == 0 else {
                throw AdminError(.cannotCreate, "cannot create \(shown): \(systemError())")
            }
        } else {
            // link(2) refuses an existing name, where rename(2) would replace it.
            guard link(temporary, path) == 0 else {
                let reason = errno == EEXIST ? "it exists now: give --force to replace it" : systemError()
                throw AdminError(.cannotCreate, "cannot create \(shown): \(reason)")
            }
            unlink(temporary)
        }
        PendingFiles.remove(temporary)
        close(descriptor)
        finished = true
        // The new directory entry is durable too.
        let directory = (path as NSString).deletingLastPathComponent
        let directoryDescriptor = Foundation.open(
            directory.isEmpty ? "." : directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if directoryDescriptor >= 0 {
            _ = fsync(directoryDescriptor)
            close(directoryDescriptor)
        }
    }

    /// Removes the temporary file of an output that did not complete.
    func discard() {
        guard !finished else { return }
        finished = true
        if case .file(_, let temporary, let descriptor, _) = target {
            close(descriptor)
            unlink(temporary)
            PendingFiles.remove(temporary)
        }
    }
}

/// The temporary files of outputs not yet complete, removed if the process is interrupted, so
/// that Ctrl-C during a decrypt leaves no partial plaintext behind either.
public enum PendingFiles {
    private static let paths = Mutex<Set<String>>([])
    /// The signals that remove the pending files and then end the process: Ctrl-C, `kill`, a
    /// closed terminal.
    static let signals: [Int32] = [SIGINT, SIGTERM, SIGHUP]
    /// The dispatch sources that watch them, kept for the process's life. Written only by
    /// `removeOnSignals()`, which `main` calls once before anything else runs.
    nonisolated(unsafe) private static var sources: [any DispatchSourceSignal] = []

    static func add(_ path: String) { _ = paths.withLock { $0.insert(path) } }
    static func remove(_ path: String) { _ = paths.withLock { $0.remove(path) } }

    /// From now on, `signals` remove the pending files and exit with 128 + the signal, as the
    /// default action would have ended the process. Handled on a dispatch queue, not in a signal
    /// handler, so the removal may lock and allocate.
    public static func removeOnSignals() {
        for number in signals {
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler {
                for path in paths.withLock({ $0 }) { unlink(path) }
                exit(128 + number)
            }
            source.resume()
            sources.append(source)
        }
    }
}

/// A progress line on standard error, redrawn in place: only when standard error is a terminal
/// and the input is large, at most a few times a second.
struct ProgressLine {
    /// The input size from which progress shows (or, for input of unknown size, the count read
    /// after which it starts): smaller inputs finish before a line would help.
    static let thresholdByteCount = 16 << 20
    /// The shortest time between two redraws.
    static let interval: Duration = .milliseconds(250)

    private let output: AdminOutput
    private let enabled: Bool
    private let total: Int?
    private let verb: String
    private var last: ContinuousClock.Instant?
    private var drawn = false

    init(output: AdminOutput, isTerminal: Bool, total: Int?, verb: String) {
        self.output = output
        self.total = total
        self.verb = verb
        enabled = isTerminal && (total.map { $0 >= Self.thresholdByteCount } ?? true)
    }

    /// Redraws the line for `count` bytes read, when due.
    mutating func update(_ count: Int) {
        guard enabled, total != nil || count >= Self.thresholdByteCount else { return }
        let now = ContinuousClock.now
        if let last, now - last < Self.interval { return }
        last = now
        var text = "\r\(verb) \(Self.mebibytes(count))"
        if let total, total > 0 {
            text += " of \(Self.mebibytes(total)) (\(count * 100 / total)%)"
        }
        output.noteWithoutNewline(text + "\u{1B}[K")
        drawn = true
    }

    /// Clears the line, if one was drawn.
    func finish() {
        if drawn { output.noteWithoutNewline("\r\u{1B}[K") }
    }

    private static func mebibytes(_ count: Int) -> String {
        let tenths = count * 10 / (1 << 20)
        return "\(tenths / 10).\(tenths % 10) MiB"
    }
}
