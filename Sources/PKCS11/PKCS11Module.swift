internal import CPKCS11Shim
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// A PKCS#11 module (a vendor's `.so`), loaded by path and initialised for use from many threads.
///
/// `load(path:)` opens the library with `dlopen(RTLD_NOW | RTLD_LOCAL)`, takes its function table
/// from `C_GetInterface` when exported (PKCS#11 3.0) and from `C_GetFunctionList` otherwise, and
/// calls `C_Initialize` with `CKF_OS_LOCKING_OK`, so the module does its own locking and may be
/// called from any thread. A module that another component of this process initialised already
/// (`CKR_CRYPTOKI_ALREADY_INITIALIZED`) is accepted and is not finalised by this instance.
///
/// Every call below blocks in C. Servers call them through `SessionPool`, which runs them on its
/// own threads, never on an event loop or Swift's cooperative pool.
///
/// PKCS#11 state does not survive `fork()`: every call checks the process id and throws
/// `processForked` in a child. Object handles are only valid in this process and are never
/// persisted; callers find keys again by `CKA_ID` or `CKA_LABEL`.
///
/// Some modules never recover from losing their device without a new `C_Initialize` (p11-kit's
/// client module answers `CKR_DEVICE_ERROR` to every call, `C_GetSlotList` included, once its
/// server went away): `reinitialize()` calls `C_Finalize` and `C_Initialize` again, and `epoch`
/// counts how often, since object handles do not survive it.
public final class PKCS11Module: Sendable {
    /// The path the module was loaded from.
    public let path: String
    /// True when the table came from `C_GetInterface` (PKCS#11 3.0), false for `C_GetFunctionList`.
    public let loadedViaGetInterface: Bool
    /// False when another component of this process had initialised the module already.
    public let ownsInitialization: Bool
    /// The version of the function table the module handed out: 3.0 or later only through
    /// `C_GetInterface`; the message-based functions (`sealAESGCMWithMessageGenerator`) need it.
    public var interfaceVersion: PKCS11Version {
        PKCS11Version(functions.version)
    }
    /// True when the module's table has the PKCS#11 3.0 functions (message-based encryption).
    public var hasVersion3Interface: Bool { functions.list3 != nil }
    /// True when `load` was given initialisation arguments (`CK_C_INITIALIZE_ARGS.pReserved`).
    /// The string itself is kept private and never appears in a description or an error.
    public var hasInitializeArguments: Bool { initializeArguments != nil }

    /// The longest initialisation-argument string accepted (8 KiB): NSS's parameters name a
    /// database directory (up to PATH_MAX, 4096 bytes) plus a few short settings, and vendor
    /// modules take a configuration path or a short list of options.
    public static let maximumInitializeArgumentsByteCount = 8192

    let functions: FunctionTable
    private let processID: pid_t
    private let finalized = Atomic<Bool>(false)
    /// Sessions opened through this instance and not yet closed, per slot.
    private let openSessions = Mutex<[UInt: Set<CK_SESSION_HANDLE>]>([:])
    /// C calls running now (through the funnel), so `reinitialize()` never calls `C_Finalize` while
    /// another thread is inside the module, which PKCS#11 leaves undefined.
    private let callsInFlight = Atomic<Int>(0)
    /// Set while `reinitialize()` runs: calls that start meanwhile fail with `tokenUnreachable`
    /// instead of entering a module that is being finalised.
    private let reinitializing = Atomic<Bool>(false)
    private let initializations = Atomic<Int>(0)
    /// Which documented form of a module-generated GCM IV this module accepted last
    /// (`Session.sealAESGCMWithTokenIV`): true for the IV appended after the tag (Thales Luna),
    /// false for the zeroed `pIv` written back (AWS CloudHSM). Tried first next time, so a module
    /// that refuses the other form costs one refused `C_EncryptInit` per process, not per seal.
    let prefersAppendedGCMIV = Atomic<Bool>(false)
    /// The NUL-terminated initialisation arguments, kept for `reinitialize()`.
    private let initializeArguments: InitializeArguments?

    private init(
        path: String,
        functions: FunctionTable,
        viaGetInterface: Bool,
        ownsInitialization: Bool,
        initializeArguments: InitializeArguments?
    ) {
        self.path = path
        self.functions = functions
        self.loadedViaGetInterface = viaGetInterface
        self.ownsInitialization = ownsInitialization
        self.initializeArguments = initializeArguments
        self.processID = getpid()
    }

    /// Loads and initialises the module at `path`.
    ///
    /// `initializeArguments`, when given, is passed to `C_Initialize` in
    /// `CK_C_INITIALIZE_ARGS.pReserved` as a NUL-terminated string: NSS's softoken reads its
    /// library parameters there (`configdir='sql:DIR' certPrefix='' keyPrefix=''
    /// secmod='secmod.db' flags= dbTokenDescription='LABEL'`), and some vendor modules take their
    /// own. It is configuration, not a secret, yet it never appears in an error or a description.
    ///
    /// - Throws: `PKCS11Error` with code `invalidArgument` (initialisation arguments that are
    ///   empty, longer than `maximumInitializeArgumentsByteCount` or hold a NUL byte),
    ///   `moduleNotFound` (no such file), `moduleNotLoadable` (not a shared library),
    ///   `missingEntryPoint` (a library, but not PKCS#11), `entryPointFailed`, or `functionFailed`
    ///   from `C_Initialize`.
    public static func load(path: String, initializeArguments: String? = nil) throws -> PKCS11Module {
        let arguments = try initializeArguments.map { try InitializeArguments($0) }
        var status = stat()
        guard stat(path, &status) == 0 else {
            throw PKCS11Error(code: .moduleNotFound, detail: "no file at \(path)")
        }
        guard (status.st_mode & S_IFMT) == S_IFREG else {
            throw PKCS11Error(code: .moduleNotLoadable, detail: "\(path) is not a regular file")
        }

        var module = hsmgw_p11_module()
        var message = [CChar](repeating: 0, count: 512)
        let opened = message.withUnsafeMutableBufferPointer { buffer in
            hsmgw_p11_open(path, &module, buffer.baseAddress, buffer.count)
        }
        let reason = message.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        switch opened {
        case HSMGW_P11_OPENED:
            break
        case HSMGW_P11_DLOPEN_FAILED:
            throw PKCS11Error(code: .moduleNotLoadable, detail: reason)
        case HSMGW_P11_NO_ENTRY_POINT:
            throw PKCS11Error(code: .missingEntryPoint, detail: "\(path) \(reason)")
        case HSMGW_P11_ENTRY_POINT_FAILED:
            throw PKCS11Error(
                code: .entryPointFailed,
                returnValue: PKCS11ReturnValue(rawValue: module.entry_point_rv),
                detail: "\(path): \(reason)"
            )
        default:
            throw PKCS11Error(code: .entryPointFailed, detail: "\(path): \(reason)")
        }

        let table = FunctionTable(module: module)
        if module.nss_softoken != 0, let arguments, !arguments.namesNSSConfigDirectory {
            // NSS 3.87's softoken dereferences a null pointer when its parameters name no
            // database directory (`flags=` alone, `x=y`): refuse rather than crash the process.
            hsmgw_p11_close(&module)
            throw PKCS11Error(
                code: .invalidArgument,
                function: .initialize,
                detail: "\(path) is NSS's softoken: its initialisation arguments must name configdir='sql:DIR'"
            )
        }
        if module.via_get_interface != 0 {
            let name = module.interface_name.map { String(cString: $0) } ?? ""
            let major = table.list.pointee.version.major
            guard name == "PKCS 11", major >= 2 else {
                throw PKCS11Error(
                    code: .entryPointFailed,
                    detail: "\(path): C_GetInterface returned interface '\(name)' version \(major)"
                )
            }
        }

        let rv = try initialize(table, arguments)
        let owns: Bool
        switch rv {
        case CK_RV(CKR_OK): owns = true
        case CK_RV(CKR_CRYPTOKI_ALREADY_INITIALIZED): owns = false
        default: throw initializeFailure(rv, hadArguments: arguments != nil)
        }
        return PKCS11Module(
            path: path,
            functions: table,
            viaGetInterface: module.via_get_interface != 0,
            ownsInitialization: owns,
            initializeArguments: arguments
        )
    }

    /// The error for a failed `C_Initialize`. NSS's softoken answers `CKR_ARGUMENTS_BAD` when it
    /// gets no parameters (or unusable ones), which says nothing to an operator on its own.
    private static func initializeFailure(_ rv: CK_RV, hadArguments: Bool) -> PKCS11Error {
        guard rv == CK_RV(CKR_ARGUMENTS_BAD) else { return PKCS11Error.failed(.initialize, rv) }
        return PKCS11Error(
            code: .functionFailed,
            function: .initialize,
            returnValue: PKCS11ReturnValue(rawValue: rv),
            detail: hadArguments
                ? "the module refused its initialisation arguments (hsm.initialize_args)"
                : "the module wants initialisation arguments (hsm.initialize_args), as NSS's softoken does"
        )
    }

    /// `C_Initialize` with `CKF_OS_LOCKING_OK` (the module does its own locking and may be called
    /// from any thread), no mutex callbacks and `arguments` in `pReserved`; its answer unexamined.
    private static func initialize(_ table: FunctionTable, _ arguments: InitializeArguments?) throws -> CK_RV {
        guard let initialize = table.list.pointee.C_Initialize else {
            throw PKCS11Error(code: .functionNotSupported, function: .initialize)
        }
        return try InitializeArguments.withOptionalPointer(arguments) { reserved in
            var initializeArguments = CK_C_INITIALIZE_ARGS()
            initializeArguments.flags = CK_FLAGS(CKF_OS_LOCKING_OK)
            initializeArguments.pReserved = reserved
            return withUnsafeMutablePointer(to: &initializeArguments) { initialize(UnsafeMutableRawPointer($0)) }
        }
    }

    /// How many times `reinitialize()` has finalised the module. Object handles obtained in an
    /// earlier epoch must never be used again: after `C_Initialize` the same numbers may name
    /// other objects (or none). Sessions do not survive either; the bookkeeping starts empty.
    public var epoch: Int { initializations.load(ordering: .acquiring) }

    /// `C_Finalize` then `C_Initialize` with the same arguments as `load(path:)`, for a module
    /// that stopped answering (a network HSM's client whose server went away and came back) and
    /// recovers only through a new initialisation. Bumps `epoch` once `C_Finalize` was called,
    /// whether or not `C_Initialize` then succeeds (a later call tries again).
    ///
    /// Only the instance that initialised the module may do this, and only while no session is
    /// open through it and no call is running in it: PKCS#11 forbids `C_Finalize` while other
    /// threads call in. Calls that start meanwhile fail with `tokenUnreachable`.
    ///
    /// - Throws: `initializationNotOwned` when another component initialised the module;
    ///   `sessionsStillOpen`; `callsInFlight` (another call, or another `reinitialize()`, is
    ///   running); `moduleFinalized`; `functionFailed` from `C_Finalize` or `C_Initialize`.
    public func reinitialize() throws {
        try checkProcess()
        guard ownsInitialization else {
            throw PKCS11Error(
                code: .initializationNotOwned,
                detail: "\(path) was initialised by another component of this process; it alone may re-initialise it")
        }
        guard !reinitializing.exchange(true, ordering: .sequentiallyConsistent) else {
            throw PKCS11Error(code: .callsInFlight, detail: "\(path) is being re-initialised already")
        }
        defer { reinitializing.store(false, ordering: .sequentiallyConsistent) }
        // Calls entering the funnel from now on see the flag and turn back; those already in
        // count here (the funnel counts before it looks at the flag).
        let running = callsInFlight.load(ordering: .sequentiallyConsistent)
        guard running == 0 else {
            throw PKCS11Error(code: .callsInFlight, detail: "\(running) PKCS#11 call(s) still running in \(path)")
        }
        try openSessions.withLock { openSessions in
            guard !finalized.load(ordering: .acquiring) else {
                throw PKCS11Error(code: .moduleFinalized, detail: path)
            }
            let open = openSessions.values.reduce(0) { $0 + $1.count }
            guard open == 0 else {
                throw PKCS11Error(code: .sessionsStillOpen, detail: "\(open) session(s) still open")
            }
            openSessions.removeAll()
        }
        if let finalize = functions.list.pointee.C_Finalize {
            let rv = finalize(nil)
            initializations.add(1, ordering: .releasing)
            // Not initialised (a C_Initialize that failed last time): there is nothing to finalise.
            guard rv == CKR_OK || rv == CK_RV(CKR_CRYPTOKI_NOT_INITIALIZED) else {
                throw PKCS11Error.failed(.finalize, rv)
            }
        }
        let rv = try Self.initialize(functions, initializeArguments)
        guard rv == CKR_OK else { throw Self.initializeFailure(rv, hadArguments: initializeArguments != nil) }
    }

    /// Calls `C_Finalize` (when this instance initialised the module) after every session opened
    /// through it has been closed. Later calls throw `moduleFinalized`. The library stays mapped:
    /// unloading a module that started threads of its own is not safe.
    ///
    /// - Throws: `sessionsStillOpen` while sessions are open; `functionFailed` from `C_Finalize`.
    public func finalize() throws {
        try checkProcess()
        try openSessions.withLock { openSessions in
            guard !finalized.load(ordering: .acquiring) else {
                throw PKCS11Error(code: .moduleFinalized, detail: path)
            }
            let open = openSessions.values.reduce(0) { $0 + $1.count }
            guard open == 0 else {
                throw PKCS11Error(code: .sessionsStillOpen, detail: "\(open) session(s) still open")
            }
            finalized.store(true, ordering: .releasing)
        }
        guard ownsInitialization else { return }
        guard let finalize = functions.list.pointee.C_Finalize else { return }
        let rv = finalize(nil)
        guard rv == CKR_OK else { throw PKCS11Error.failed(.finalize, rv) }
    }

    /// True once `finalize()` has succeeded.
    public var isFinalized: Bool { finalized.load(ordering: .acquiring) }

    /// The number of sessions opened through this instance and not yet closed.
    public var openSessionCount: Int { openSessions.withLock { $0.values.reduce(0) { $0 + $1.count } } }

    /// Sessions opened through this instance on `slot` and not closed yet.
    public func openSessionCount(slot: SlotID) -> Int { openSessions.withLock { $0[slot.rawValue]?.count ?? 0 } }

    // MARK: - The funnel every C call goes through

    private func checkProcess() throws {
        guard getpid() == processID else {
            throw PKCS11Error(code: .processForked, detail: "module loaded in pid \(processID)")
        }
    }

    /// Checks the module is usable and returns the entry point at `keyPath`.
    @inline(__always)
    func entry<F>(_ function: PKCS11Function, _ keyPath: KeyPath<CK_FUNCTION_LIST, F?>) throws -> F {
        try checkProcess()
        if finalized.load(ordering: .acquiring) {
            throw PKCS11Error(code: .moduleFinalized, function: function, detail: path)
        }
        // `pointer(to:)` reads the one member instead of copying the whole table.
        guard let entry = functions.list.pointer(to: keyPath)?.pointee else {
            throw PKCS11Error(code: .functionNotSupported, function: function)
        }
        return entry
    }

    /// Calls the entry point and returns its `CK_RV` unexamined (for callers that accept some
    /// non-OK codes). Throws only when the module was not called.
    @inline(__always)
    func callReturningCode<F>(
        _ function: PKCS11Function,
        _ keyPath: KeyPath<CK_FUNCTION_LIST, F?>,
        _ invoke: (F) throws -> CK_RV
    ) throws -> CK_RV {
        let entry = try entry(function, keyPath)
        return try running(function) { try invoke(entry) }
    }

    /// Checks the module is usable and has a PKCS#11 3.0 table, and returns its entry point at
    /// `keyPath`.
    @inline(__always)
    func entry<F>(_ function: PKCS11Function, _ keyPath: KeyPath<hsmgw_ck_function_list_3_0, F?>) throws -> F {
        try checkProcess()
        if finalized.load(ordering: .acquiring) {
            throw PKCS11Error(code: .moduleFinalized, function: function, detail: path)
        }
        guard let list = functions.list3 else {
            throw PKCS11Error(
                code: .functionNotSupported,
                function: function,
                detail: "\(path) offers no PKCS#11 3.0 interface (function table version \(interfaceVersion))"
            )
        }
        guard let entry = list.pointer(to: keyPath)?.pointee else {
            throw PKCS11Error(code: .functionNotSupported, function: function)
        }
        return entry
    }

    /// `callReturningCode` for an entry point of the PKCS#11 3.0 table.
    @inline(__always)
    func callReturningCode<F>(
        _ function: PKCS11Function,
        _ keyPath: KeyPath<hsmgw_ck_function_list_3_0, F?>,
        _ invoke: (F) throws -> CK_RV
    ) throws -> CK_RV {
        let entry = try entry(function, keyPath)
        return try running(function) { try invoke(entry) }
    }

    /// Runs a call into the module, counted so `reinitialize()` never finalises under it.
    @inline(__always)
    private func running(_ function: PKCS11Function, _ body: () throws -> CK_RV) throws -> CK_RV {
        // Counted before the flag is read, and `reinitialize()` sets the flag before it reads the
        // count: one of the two always sees the other.
        callsInFlight.add(1, ordering: .sequentiallyConsistent)
        defer { callsInFlight.subtract(1, ordering: .sequentiallyConsistent) }
        if reinitializing.load(ordering: .sequentiallyConsistent) {
            throw PKCS11Error(code: .tokenUnreachable, function: function, detail: "\(path) is being re-initialised")
        }
        return try body()
    }

    /// Calls the entry point and throws the mapped error unless it returns `CKR_OK`.
    @inline(__always)
    func call<F>(
        _ function: PKCS11Function,
        _ keyPath: KeyPath<CK_FUNCTION_LIST, F?>,
        _ invoke: (F) throws -> CK_RV
    ) throws {
        let rv = try callReturningCode(function, keyPath, invoke)
        guard rv == CKR_OK else { throw PKCS11Error.failed(function, rv) }
    }

    // MARK: - Session bookkeeping

    func openSessionHandle(slot: SlotID, readWrite: Bool) throws -> CK_SESSION_HANDLE {
        var flags = CK_FLAGS(CKF_SERIAL_SESSION)
        if readWrite {
            flags |= CK_FLAGS(CKF_RW_SESSION)
        }
        var handle = CK_SESSION_HANDLE(0)
        try call(.openSession, \.C_OpenSession) { $0(slot.rawValue, flags, nil, nil, &handle) }
        openSessions.withLock { _ = $0[slot.rawValue, default: []].insert(handle) }
        return handle
    }

    /// Closes a session, and returns whether the module confirmed it is gone: `CKR_OK`, or a
    /// handle it no longer knows (closed underneath us, e.g. by `closeAllSessions` or a token
    /// removal). Any other answer returns false (the answers of a token that cannot be reached,
    /// `PKCS11Error.tokenUnreachableReturnValues`) or throws (the rest, for the log): the session
    /// may still exist in the token, so the caller may try again later (`SessionPool` does, at
    /// its next reset). Either way this instance forgets the handle: it no longer counts in
    /// `openSessionCount`, and `C_Finalize` closes whatever remains.
    @discardableResult
    func closeSessionHandle(_ handle: CK_SESSION_HANDLE, slot: SlotID) throws -> Bool {
        let rv = try callReturningCode(.closeSession, \.C_CloseSession) { $0(handle) }
        openSessions.withLock { _ = $0[slot.rawValue]?.remove(handle) }
        switch rv {
        case CK_RV(CKR_OK), CK_RV(CKR_SESSION_HANDLE_INVALID), CK_RV(CKR_SESSION_CLOSED):
            return true
        case let rv where PKCS11Error.tokenUnreachableReturnValues.contains(PKCS11ReturnValue(rawValue: rv)):
            return false
        default:
            throw PKCS11Error.failed(.closeSession, rv)
        }
    }

    /// True while `handle` is open on `slot` through this instance.
    func isSessionOpen(_ handle: CK_SESSION_HANDLE, slot: SlotID) -> Bool {
        openSessions.withLock { $0[slot.rawValue]?.contains(handle) ?? false }
    }

    /// `C_CloseAllSessions`: closes every session this process has on `slot` (the token also
    /// forgets the login state). Session pools notice on next use and open new sessions.
    public func closeAllSessions(slot: SlotID) throws {
        try call(.closeAllSessions, \.C_CloseAllSessions) { $0(slot.rawValue) }
        openSessions.withLock { $0[slot.rawValue] = nil }
    }

    /// Opens a session on `slot`, runs `body` with it and closes it again, all on the calling
    /// thread. For tools and tests; servers use `SessionPool`.
    public func withSession<T>(
        slot: SlotID,
        readWrite: Bool = true,
        _ body: (borrowing Session) throws -> T
    ) throws -> T {
        let handle = try openSessionHandle(slot: slot, readWrite: readWrite)
        let session = Session(module: self, handle: handle, slot: slot)
        do {
            let result = try body(session)
            try closeSessionHandle(handle, slot: slot)
            return result
        } catch {
            _ = try? closeSessionHandle(handle, slot: slot)
            throw error
        }
    }
}

/// The string `load` passes in `CK_C_INITIALIZE_ARGS.pReserved`, checked and NUL-terminated.
/// Its `description` never shows the string: a vendor's arguments may name paths or options an
/// operator would rather not see in a log.
struct InitializeArguments: Sendable, CustomStringConvertible {
    private let bytes: [CChar]

    init(_ text: String) throws {
        guard !text.isEmpty else {
            throw PKCS11Error(
                code: .invalidArgument, function: .initialize, detail: "initialisation arguments are empty")
        }
        guard text.utf8.count <= PKCS11Module.maximumInitializeArgumentsByteCount else {
            throw PKCS11Error(
                code: .invalidArgument,
                function: .initialize,
                detail: "initialisation arguments of \(text.utf8.count) bytes are over "
                    + "\(PKCS11Module.maximumInitializeArgumentsByteCount)"
            )
        }
        guard !text.utf8.contains(0) else {
            throw PKCS11Error(
                code: .invalidArgument, function: .initialize, detail: "initialisation arguments hold a NUL byte")
        }
        bytes = text.utf8.map { CChar(bitPattern: $0) } + [0]
    }

    var description: String { "initialisation arguments (\(bytes.count - 1) bytes)" }

    /// True when the string names a `configdir` parameter (NSS's names are case-insensitive).
    var namesNSSConfigDirectory: Bool {
        String(decoding: bytes.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self).lowercased()
            .contains("configdir=")
    }

    /// Runs `body` with a pointer to the NUL-terminated string, or nil. Modules only read it,
    /// during `C_Initialize` (NSS copies what it keeps).
    static func withOptionalPointer<R>(
        _ arguments: InitializeArguments?,
        _ body: (UnsafeMutableRawPointer?) throws -> R
    ) rethrows -> R {
        guard let arguments else { return try body(nil) }
        var copy = arguments.bytes
        return try copy.withUnsafeMutableBytes { try body($0.baseAddress) }
    }
}

/// The module's function table and library handle.
final class FunctionTable: @unchecked Sendable {
    // @unchecked Sendable: both members are written once, in `init`, and only read afterwards.
    // The table itself belongs to the module, which was initialised with CKF_OS_LOCKING_OK and so
    // accepts calls from any thread.
    let list: UnsafeMutablePointer<CK_FUNCTION_LIST>
    /// The same table seen with its PKCS#11 3.0 members, when `C_GetInterface` returned a table
    /// of version 3.0 or later; nil for a 2.x table, which ends after `C_WaitForSlotEvent`.
    let list3: UnsafeMutablePointer<hsmgw_ck_function_list_3_0>?
    /// The version the table declares.
    let version: CK_VERSION
    private let module: hsmgw_p11_module

    init(module: hsmgw_p11_module) {
        self.module = module
        self.list = module.functions
        self.version = module.functions.pointee.version
        self.list3 =
            module.via_get_interface != 0 && version.major >= 3
            ? UnsafeMutableRawPointer(module.functions).assumingMemoryBound(to: hsmgw_ck_function_list_3_0.self)
            : nil
    }
}
