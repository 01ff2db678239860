import KeyHierarchy
import Logging

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#elseif canImport(Darwin)
    import Darwin
#endif

/// Keeps the database file private: it holds wrapped keys and the audit log.
enum PrivateFile {
    /// The mode of the database file and its `-wal` and `-shm` companions: owner only.
    static let mode: mode_t = 0o600

    /// Creates the database file with mode 0600 before SQLite opens it (SQLite would create it 0644
    /// less the umask), or tightens an existing file that others can read or write. SQLite then
    /// creates `-wal` and `-shm` with the database file's mode. Changing the process umask instead
    /// would race with every other thread that creates files.
    static func create(_ path: String, logger: Logger) throws {
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, mode)
        guard fd >= 0 else {
            throw StorageError(.unavailable, "cannot create the SQLite database file: \(errnoDescription())")
        }
        defer { _ = close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            throw StorageError(.unavailable, "cannot stat the SQLite database file: \(errnoDescription())")
        }
        guard info.st_mode & S_IFMT == S_IFREG else {
            throw StorageError(.unavailable, "the SQLite database path is not a regular file")
        }
        let current = info.st_mode & 0o777
        if current != mode {
            guard fchmod(fd, mode) == 0 else {
                throw StorageError(
                    .unavailable,
                    "cannot set the SQLite database file's mode to 0600: \(errnoDescription())"
                )
            }
            logger.warning(
                "SQLite database file had a mode other than 0600; set it to 0600",
                metadata: ["path": "\(path)", "mode": "\(String(current, radix: 8))"]
            )
        }
    }

    /// Sets an existing file to 0600 when its mode differs; a missing file is fine.
    static func tighten(_ path: String, logger: Logger) {
        var info = stat()
        guard stat(path, &info) == 0 else { return }
        let current = info.st_mode & 0o777
        guard current != mode else { return }
        if chmod(path, mode) == 0 {
            logger.warning(
                "SQLite file had a mode other than 0600; set it to 0600",
                metadata: ["path": "\(path)", "mode": "\(String(current, radix: 8))"]
            )
        } else {
            logger.error(
                "cannot set an SQLite file's mode to 0600",
                metadata: ["path": "\(path)", "error": "\(errnoDescription())"]
            )
        }
    }

    /// The current `errno` as text (never holds values from the database).
    static func errnoDescription() -> String {
        String(cString: strerror(errno))
    }

    /// The permission bits of `path`, or nil when it does not exist.
    static func permissions(of path: String) -> mode_t? {
        var info = stat()
        guard stat(path, &info) == 0 else { return nil }
        return info.st_mode & 0o777
    }
}
