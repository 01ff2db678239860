import Crypto
import Foundation
import KeyHierarchy

/// Writes a backup file a line at a time: buffered, hashed as it goes, created owner-only and
/// never over an existing file.
final class BackupFileWriter {
    /// Bytes gathered before one write(2): large enough that a backup of millions of rows is not
    /// millions of system calls, small enough to be nothing next to the rows being read.
    static let bufferByteCount = 256 * 1024

    private let handle: FileHandle
    private let encoder: JSONEncoder
    private var buffer: [UInt8] = []
    private var hasher = SHA256()
    private(set) var lines: Int64 = 0
    private(set) var bytes: Int64 = 0

    /// Creates `path` with mode 0600; fails if it exists.
    init(creating path: String) throws(BackupError) {
        let descriptor = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard descriptor >= 0 else {
            throw BackupError(.io, "cannot create \(path): \(String(cString: strerror(errno)))")
        }
        handle = FileHandle(fileDescriptor: descriptor, closeOnDealloc: true)
        encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        buffer.reserveCapacity(Self.bufferByteCount)
    }

    /// Appends one JSON line, counted in the checksum.
    func append(_ line: some Encodable) throws {
        var data = [UInt8](try encoder.encode(line))
        data.append(UInt8(ascii: "\n"))
        hasher.update(data: data)
        lines += 1
        try emit(data)
    }

    /// The SHA-256 of everything appended so far.
    var digest: [UInt8] { Array(hasher.finalize()) }

    /// Appends the trailer (lines so far, the checksum and the token's MAC of it, which neither
    /// covers), flushes and syncs the file.
    func finish(macKeyID: TokenKeyID, mac: [UInt8]) throws {
        let end = EndLine(
            lines: lines, sha256: Hex.encode(digest), macKeyID: Hex.encode(macKeyID.bytes), mac: Hex.encode(mac))
        var data = [UInt8](try encoder.encode(end))
        data.append(UInt8(ascii: "\n"))
        try emit(data)
        try flush()
        try handle.synchronize()
        try handle.close()
    }

    private func emit(_ data: [UInt8]) throws {
        buffer += data
        bytes += Int64(data.count)
        if buffer.count >= Self.bufferByteCount { try flush() }
    }

    private func flush() throws {
        guard !buffer.isEmpty else { return }
        try handle.write(contentsOf: buffer)
        buffer.removeAll(keepingCapacity: true)
    }
}

/// Reads a backup file a line at a time, never holding more than one chunk and one line, and
/// refusing a line longer than `BackupLimits.maximumLineByteCount`.
final class BackupFileReader {
    /// Bytes read per read(2).
    static let chunkByteCount = 256 * 1024

    private let handle: FileHandle
    private var pending: [UInt8] = []
    private var start = 0
    private var atEnd = false
    private(set) var lineNumber: Int64 = 0

    init(path: String) throws(BackupError) {
        do {
            handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
        } catch {
            throw BackupError(.io, "cannot open \(path): \((error as NSError).localizedDescription)")
        }
    }

    deinit { try? handle.close() }

    /// The next line without its newline, or nil at the end of the file. A last line without a
    /// newline is malformed (a truncated file).
    func nextLine() throws -> [UInt8]? {
        while true {
            if let newline = pending[start...].firstIndex(of: UInt8(ascii: "\n")) {
                guard newline - start <= BackupLimits.maximumLineByteCount else {
                    throw BackupError(
                        .malformed,
                        "line \(lineNumber + 1) is longer than \(BackupLimits.maximumLineByteCount) bytes")
                }
                let line = Array(pending[start..<newline])
                start = newline + 1
                lineNumber += 1
                return line
            }
            guard pending.count - start <= BackupLimits.maximumLineByteCount else {
                throw BackupError(
                    .malformed,
                    "line \(lineNumber + 1) is longer than \(BackupLimits.maximumLineByteCount) bytes")
            }
            if atEnd {
                guard start == pending.count else {
                    throw BackupError(.malformed, "the file ends inside line \(lineNumber + 1): it is truncated")
                }
                return nil
            }
            let chunk = try handle.read(upToCount: Self.chunkByteCount) ?? Data()
            if chunk.isEmpty { atEnd = true }
            pending.removeFirst(start)
            start = 0
            pending += chunk
        }
    }
}
