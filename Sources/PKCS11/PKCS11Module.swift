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
public final class PKCS11Module: Sendable {
    /// The path the module was loaded from.
    public let path: String
    /// True when the table came from `C_GetInterface` (PKCS#11 3.0), false for `C_GetFunctionList`.
    public let loadedViaGetInterface: Bool
    /// False when another component of this process had initialised the module already.
    public let ownsInitialization: Bool

    let functions: FunctionTable
    private let processID: pid_t
    private let finalized = Atomic<Bool>(false)
    /// Sessions opened through this instance and not yet closed, per slot.
    private let openSessions = Mutex<[UInt: Int]>([:])

    private init(path: String, functions: FunctionTable, viaGetInterface: Bool, ownsInitialization: Bool) {
        self.path = path
        self.functions = functions
        self.loadedViaGetInterface = viaGetInterface
        self.ownsInitialization = ownsInitialization
        self.processID = getpid()
    }

    /// Loads and initialises the module at `path`.
    ///
    /// - Throws: `PKCS11Error` with code `moduleNotFound` (no such file), `moduleNotLoadable`
    ///   (not a shared library), `missingEntryPoint` (a library, but not PKCS#11),
    ///   `entryPointFailed`, or `functionFailed` from `C_Initialize`.
    public static func load(path: String) throws -> PKCS11Module {
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

        guard let initialize = table.list.pointee.C_Initialize else {
            throw PKCS11Error(code: .functionNotSupported, function: .initialize, detail: path)
        }
        var arguments = CK_C_INITIALIZE_ARGS()
        arguments.flags = CK_FLAGS(CKF_OS_LOCKING_OK)
        let rv = withUnsafeMutablePointer(to: &arguments) { initialize(UnsafeMutableRawPointer($0)) }
        let owns: Bool
        switch rv {
        case CK_RV(CKR_OK): owns = true
        case CK_RV(CKR_CRYPTOKI_ALREADY_INITIALIZED): owns = false
        default: throw PKCS11Error.failed(.initialize, rv)
        }
        return PKCS11Module(
            path: path,
            functions: table,
            viaGetInterface: module.via_get_interface != 0,
            ownsInitialization: owns
        )
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
            let open = openSessions.values.reduce(0, +)
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
    public var openSessionCount: Int { openSessions.withLock { $0.values.reduce(0, +) } }

    /// Sessions opened through this instance on `slot` and not closed yet.
    public func openSessionCount(slot: SlotID) -> Int { openSessions.withLock { $0[slot.rawValue] ?? 0 } }

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
    /// non-OK codes).
    @inline(__always)
    func callReturningCode<F>(
        _ function: PKCS11Function,
        _ keyPath: KeyPath<CK_FUNCTION_LIST, F?>,
        _ invoke: (F) throws -> CK_RV
    ) throws -> CK_RV {
        try invoke(try entry(function, keyPath))
    }

    /// Calls the entry point and throws the mapped error unless it returns `CKR_OK`.
    @inline(__always)
    func call<F>(
        _ function: PKCS11Function,
        _ keyPath: KeyPath<CK_FUNCTION_LIST, F?>,
        _ invoke: (F) throws -> CK_RV
    ) throws {
        let rv = try invoke(try entry(function, keyPath))
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
        openSessions.withLock { $0[slot.rawValue, default: 0] += 1 }
        return handle
    }

    /// Closes a session. A handle the module no longer knows (closed underneath us, e.g. by
    /// `closeAllSessions` or a token removal) counts as closed.
    func closeSessionHandle(_ handle: CK_SESSION_HANDLE, slot: SlotID) throws {
        let rv = try callReturningCode(.closeSession, \.C_CloseSession) { $0(handle) }
        switch rv {
        case CK_RV(CKR_OK):
            openSessions.withLock { openSessions in
                if let open = openSessions[slot.rawValue], open > 0 {
                    openSessions[slot.rawValue] = open - 1
                }
            }
        case CK_RV(CKR_SESSION_HANDLE_INVALID), CK_RV(CKR_SESSION_CLOSED), CK_RV(CKR_DEVICE_REMOVED),
            CK_RV(CKR_TOKEN_NOT_PRESENT):
            // Already gone; `closeAllSessions` or the token removal did the accounting.
            return
        default:
            throw PKCS11Error.failed(.closeSession, rv)
        }
    }

    /// `C_CloseAllSessions`: closes every session this process has on `slot` (the token also
    /// forgets the login state). Session pools notice on next use and open new sessions.
    public func closeAllSessions(slot: SlotID) throws {
        try call(.closeAllSessions, \.C_CloseAllSessions) { $0(slot.rawValue) }
        openSessions.withLock { $0[slot.rawValue] = 0 }
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
            try? closeSessionHandle(handle, slot: slot)
            throw error
        }
    }
}

/// The module's function table and library handle.
final class FunctionTable: @unchecked Sendable {
    // @unchecked Sendable: both members are written once, in `init`, and only read afterwards.
    // The table itself belongs to the module, which was initialised with CKF_OS_LOCKING_OK and so
    // accepts calls from any thread.
    let list: UnsafeMutablePointer<CK_FUNCTION_LIST>
    private let module: hsmgw_p11_module

    init(module: hsmgw_p11_module) {
        self.module = module
        self.list = module.functions
    }
}
