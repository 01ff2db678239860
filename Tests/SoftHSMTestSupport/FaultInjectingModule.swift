import Foundation
import PKCS11
import ProcessTestSupport
import Synchronization

/// The fault-injecting PKCS#11 module of the tests (`Tests/FaultInjection/hsmgw_fault_pkcs11.c`),
/// compiled once per test process and loaded over the process's SoftHSM2.
///
/// It forwards every call to SoftHSM2 and injects what the control file says (the language is
/// documented at the top of the C file): `setRules("C_Decrypt rv=CKR_BUFFER_TOO_SMALL count=1")`.
/// Every call appends a line to a trace file, so a test counts real calls, e.g. `C_Login`
/// attempts, with `calls(of:since:)`. Child processes (a gateway under test) load the same
/// library with `environment(control:trace:)`.
public final class FaultInjectingModule: Sendable {
    /// The compiled module.
    public let libraryPath: String
    /// The control file this process's instance reads.
    public let controlPath: String
    /// The trace file this process's instance appends to.
    public let tracePath: String
    /// The module as loaded in this process (SoftHSM2 underneath is the fixture's, already
    /// initialised, so this instance does not own `C_Initialize`).
    public let module: PKCS11Module

    /// The C source, found next to this file's folder.
    public static let sourcePath = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("FaultInjection/hsmgw_fault_pkcs11.c").path

    /// The process-wide instance; requires (and sets up) the SoftHSM2 fixture first.
    public static func shared() throws -> FaultInjectingModule {
        try sharedResult.get()
    }

    private static let sharedResult: Result<FaultInjectingModule, any Error> = Result {
        try FaultInjectingModule(fixture: SoftHSMFixture.shared())
    }

    private let ruleWrites = Mutex(0)

    private init(fixture: SoftHSMFixture) throws {
        let directory = (fixture.directory as NSString).appendingPathComponent("fault-injection")
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        libraryPath = try Self.compile(into: directory)
        controlPath = (directory as NSString).appendingPathComponent("control")
        tracePath = (directory as NSString).appendingPathComponent("trace")
        // Read by the module's first C_GetFunctionList, that is by the load below.
        setenv("HSMGW_FAULT_MODULE", SoftHSMFixture.modulePath, 1)
        setenv("HSMGW_FAULT_CONTROL", controlPath, 1)
        setenv("HSMGW_FAULT_TRACE", tracePath, 1)
        module = try PKCS11Module.load(path: libraryPath)
    }

    /// Compiles the module into `directory` with the first C compiler found: `$CC`, `cc`, `gcc`,
    /// `clang` on `PATH`, or the `clang` that ships next to `swift` in every Swift toolchain.
    public static func compile(into directory: String) throws -> String {
        let output = (directory as NSString).appendingPathComponent("libhsmgw_fault_pkcs11.so")
        guard let compiler = findCompiler() else {
            throw FixtureError("no C compiler found ($CC, cc, gcc, clang) to build \(sourcePath)")
        }
        let result = try ChildProcess.run(
            compiler,
            [
                "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden", "-o", output,
                sourcePath, "-ldl", "-lpthread",
            ],
            timeout: .seconds(120)
        )
        guard result.status == 0 else {
            throw FixtureError("compiling \(sourcePath) with \(compiler) failed: \(result)")
        }
        return output
    }

    private static func findCompiler() -> String? {
        let environment = ProcessInfo.processInfo.environment
        let path = (environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":").map(String.init)
        func onPath(_ name: String) -> String? {
            if name.contains("/") { return FileManager.default.isExecutableFile(atPath: name) ? name : nil }
            return path.map { ($0 as NSString).appendingPathComponent(name) }
                .first { FileManager.default.isExecutableFile(atPath: $0) }
        }
        var candidates = [environment["CC"]].compactMap { $0 } + ["cc", "gcc", "clang"]
        if let swift = onPath("swift") {
            let resolved = (try? FileManager.default.destinationOfSymbolicLink(atPath: swift)) ?? swift
            let directory = ((resolved.hasPrefix("/") ? resolved : swift) as NSString).deletingLastPathComponent
            candidates.append((directory as NSString).appendingPathComponent("clang"))
        }
        return candidates.lazy.compactMap(onPath).first
    }

    /// Replaces the rules (atomically: a new file renamed over the old one, so the module never
    /// reads half a file). Counters start again.
    public func setRules(_ rules: String) throws {
        let generation = ruleWrites.withLock { value -> Int in
            value += 1
            return value
        }
        let temporary = controlPath + ".\(generation).tmp"
        try (rules + "\n").write(toFile: temporary, atomically: false, encoding: .utf8)
        guard rename(temporary, controlPath) == 0 else {
            throw FixtureError("cannot rename \(temporary) to \(controlPath): errno \(errno)")
        }
    }

    /// Removes every rule: calls go straight through again.
    public func clearRules() throws {
        try setRules("# no faults")
    }

    /// The trace's current length: pass it to `calls(of:since:)` to count what happens after.
    public func traceMark() -> Int {
        Self.traceLength(tracePath)
    }

    /// One traced call.
    public struct Call: Hashable, Sendable {
        /// The return value the caller saw.
        public let returnValue: PKCS11ReturnValue
        /// True when the module injected it instead of calling SoftHSM2.
        public let injected: Bool

        /// A call as the trace records it.
        public init(returnValue: PKCS11ReturnValue, injected: Bool) {
            self.returnValue = returnValue
            self.injected = injected
        }
    }

    /// The calls of `function` traced after `mark` (in `trace`, or this process's trace).
    public func calls(of function: String, since mark: Int = 0, trace: String? = nil) -> [Call] {
        Self.calls(of: function, since: mark, tracePath: trace ?? tracePath)
    }

    /// Sessions the real module opened after `mark` less those it closed (forwarded
    /// `C_OpenSession` and `C_CloseSession` calls that succeeded): zero when every session opened
    /// since then was really closed, whatever the caller's own bookkeeping says. Injected answers
    /// never reach the real module, so a close that failed that way leaves its session open.
    public func realSessionBalance(since mark: Int) -> Int {
        let opened = calls(of: "C_OpenSession", since: mark).count { !$0.injected && $0.returnValue == .ok }
        let closed = calls(of: "C_CloseSession", since: mark).count { !$0.injected && $0.returnValue == .ok }
        return opened - closed
    }

    /// How many calls of any function were traced after `mark`.
    public func callCount(since mark: Int) -> Int {
        guard let data = FileManager.default.contents(atPath: tracePath), data.count > mark else { return 0 }
        return data.dropFirst(mark).count { $0 == UInt8(ascii: "\n") }
    }

    /// The calls of `function` in the trace at `tracePath` after `mark`.
    public static func calls(of function: String, since mark: Int = 0, tracePath: String) -> [Call] {
        guard let data = FileManager.default.contents(atPath: tracePath), data.count > mark else { return [] }
        let text = String(decoding: data.dropFirst(mark), as: UTF8.self)
        return text.split(separator: "\n").compactMap { line -> Call? in
            let fields = line.split(separator: " ")
            guard fields.count >= 2, fields[0] == function, fields[1].hasPrefix("rv=0x"),
                let value = UInt(fields[1].dropFirst(5), radix: 16)
            else { return nil }
            return Call(returnValue: PKCS11ReturnValue(rawValue: value), injected: fields.contains("injected"))
        }
    }

    static func traceLength(_ path: String) -> Int {
        var status = stat()
        return stat(path, &status) == 0 ? Int(status.st_size) : 0
    }

    /// The environment a child process needs to load this module (`libraryPath`) over SoftHSM2,
    /// with its own control and trace files.
    public func environment(control: String, trace: String) -> [String: String] {
        ["HSMGW_FAULT_MODULE": SoftHSMFixture.modulePath, "HSMGW_FAULT_CONTROL": control, "HSMGW_FAULT_TRACE": trace]
    }
}
