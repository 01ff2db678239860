#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#elseif canImport(Darwin)
    import Darwin
#endif

/// Bytes that must not outlive their use or be printed: a data key's plaintext, a decrypted
/// payload, a new API token.
///
/// The buffer is allocated once, never copied by the type itself, and overwritten with zeros
/// when the last reference goes away. `description` never shows the contents. Copies a caller
/// makes (`copyBytes()`) are the caller's to clear.
public final class SensitiveBytes: Sendable, CustomStringConvertible, CustomDebugStringConvertible,
    CustomReflectable
{
    private let storage: SensitiveStorage

    /// The number of bytes.
    public let count: Int

    /// Allocates `count` bytes and lets `initializer` fill them.
    public init(count: Int, initializingWith initializer: (UnsafeMutableRawBufferPointer) throws -> Void) rethrows {
        let storage = SensitiveStorage(capacity: count)
        try initializer(UnsafeMutableRawBufferPointer(rebasing: storage.mutableBuffer[0..<count]))
        self.storage = storage
        self.count = count
    }

    /// Copies `bytes`. The caller stays responsible for its own copy.
    public convenience init(copying bytes: some Collection<UInt8>) {
        self.init(count: bytes.count) { buffer in
            _ = buffer.initializeMemory(as: UInt8.self, from: bytes)
        }
    }

    /// Reads the bytes. Do not let the pointer escape.
    public func withUnsafeBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(UnsafeRawBufferPointer(rebasing: storage.mutableBuffer[0..<count]))
    }

    /// A copy as an array, for APIs that need one. Prefer `withUnsafeBytes`: an array cannot be
    /// zeroed reliably once it has been copied around.
    public func copyBytes() -> [UInt8] {
        withUnsafeBytes { Array($0) }
    }

    /// Constant-time comparison with `other`.
    public func constantTimeEquals(_ other: some Collection<UInt8>) -> Bool {
        guard other.count == count else { return false }
        return withUnsafeBytes { mine in
            var difference: UInt8 = 0
            for (a, b) in zip(mine, other) {
                difference |= a ^ b
            }
            return difference == 0
        }
    }

    public var description: String { "SensitiveBytes(\(count) bytes, redacted)" }
    public var debugDescription: String { description }
    /// No children: `dump` shows only the description.
    public var customMirror: Mirror { Mirror(self, children: [:]) }
}

/// Owns the memory of a `SensitiveBytes`.
private final class SensitiveStorage: @unchecked Sendable {
    // @unchecked Sendable: `mutableBuffer` is written only while `SensitiveBytes.init` runs,
    // before the storage is published; afterwards it is only read, and `deinit` runs alone.
    let mutableBuffer: UnsafeMutableRawBufferPointer

    init(capacity: Int) {
        precondition(capacity >= 0, "negative size")
        // At least one byte so the base address is never nil.
        self.mutableBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(capacity, 1), alignment: 16)
        self.mutableBuffer.initializeMemory(as: UInt8.self, repeating: 0)
    }

    deinit {
        zeroize(mutableBuffer)
        mutableBuffer.deallocate()
    }
}

/// Overwrites `buffer` with zeros in a way the optimiser does not remove.
func zeroize(_ buffer: UnsafeMutableRawBufferPointer) {
    guard let base = buffer.baseAddress, buffer.count > 0 else { return }
    #if canImport(Darwin)
        _ = memset_s(base, buffer.count, 0, buffer.count)
    #else
        explicit_bzero(base, buffer.count)
    #endif
}

/// Overwrites an array's bytes with zeros (in place when the array owns its storage alone).
func zeroize(_ bytes: inout [UInt8]) {
    bytes.withUnsafeMutableBytes { zeroize($0) }
}
