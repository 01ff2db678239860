#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Bytes that must not outlive their use: PINs and plaintext key material.
///
/// The buffer is allocated once, never copied by the type itself, and overwritten with
/// `explicit_bzero` when the last reference goes away. `description` never shows the contents.
/// Keeping pages out of swap is a process-wide decision (`mlockall`, as Vault does), not made
/// per buffer: an `mlock` call per key would cost more than the AES operation it protects.
public final class SecretBytes: Sendable, CustomStringConvertible {
    private let storage: SecretStorage

    /// The number of bytes.
    public let count: Int

    /// Allocates `count` bytes and lets `initializer` fill them (e.g. from a file or the RNG).
    public init(count: Int, initializingWith initializer: (UnsafeMutableRawBufferPointer) throws -> Void) rethrows {
        let storage = SecretStorage(capacity: count)
        try initializer(storage.mutableBuffer)
        self.storage = storage
        self.count = count
    }

    /// Allocates `capacity` bytes and lets `initializer` fill a prefix of them, returning its
    /// length (for outputs whose length is known only afterwards, such as a decryption).
    ///
    /// The length often comes from outside the process (a PKCS#11 module, a file read), so a
    /// length outside `0...capacity` is an error, not a crash: it throws `SecretBytesLengthError`
    /// (and the buffer is zeroed and freed). Callers that know better check first and throw their
    /// own, more precise error.
    public init(capacity: Int, initializingWith initializer: (UnsafeMutableRawBufferPointer) throws -> Int) throws {
        let storage = SecretStorage(capacity: capacity)
        let used = try initializer(storage.mutableBuffer)
        guard used >= 0 && used <= capacity else {
            throw SecretBytesLengthError(reported: used, capacity: capacity)
        }
        self.storage = storage
        self.count = used
    }

    /// Copies `bytes` into a new secret buffer. The caller is responsible for its own copy.
    public convenience init(copying bytes: some Sequence<UInt8>) {
        let array = Array(bytes)
        self.init(count: array.count) { buffer in
            buffer.copyBytes(from: array)
        }
    }

    /// Copies the UTF-8 bytes of `string` (for PINs typed in tests and tools).
    public convenience init(utf8 string: String) {
        self.init(copying: string.utf8)
    }

    /// Reads the secret. Do not let the pointer escape.
    public func withUnsafeBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(UnsafeRawBufferPointer(rebasing: storage.mutableBuffer[0..<count]))
    }

    /// A copy as an array, for callers that hand key material on (e.g. to a client). Prefer
    /// `withUnsafeBytes`: an array cannot be zeroed reliably once copied around.
    public func copyBytes() -> [UInt8] {
        withUnsafeBytes { Array($0) }
    }

    /// Constant-time comparison.
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

    public var description: String { "SecretBytes(\(count) bytes, redacted)" }
}

/// An initializer of `SecretBytes(capacity:initializingWith:)` reported a length outside its buffer.
public struct SecretBytesLengthError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The length the initializer returned.
    public let reported: Int
    /// The buffer's size.
    public let capacity: Int

    public var description: String {
        "secret buffer initializer reported \(reported) bytes for a buffer of \(capacity)"
    }
}

/// Owns the memory of a `SecretBytes`.
private final class SecretStorage: @unchecked Sendable {
    // @unchecked Sendable: `mutableBuffer` is written only while `SecretBytes.init` runs, before
    // the storage is published; afterwards it is only read, and `deinit` runs alone.
    let mutableBuffer: UnsafeMutableRawBufferPointer

    init(capacity: Int) {
        precondition(capacity >= 0, "negative secret size")
        // At least one byte so the pointer is never nil.
        self.mutableBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(capacity, 1), alignment: 16)
        self.mutableBuffer.initializeMemory(as: UInt8.self, repeating: 0)
    }

    deinit {
        explicit_bzero(mutableBuffer.baseAddress!, mutableBuffer.count)
        mutableBuffer.deallocate()
    }
}
