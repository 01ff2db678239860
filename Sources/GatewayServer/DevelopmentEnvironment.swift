import Foundation
import GatewayConfig
import PKCS11

/// `hsm-gateway --dev`: a SoftHSM2 token, its configuration and PIN files, and a SQLite file, all
/// under one data directory, with plaintext on loopback. Created on the first start, reused on
/// later ones. The layout is the one `hsm-config/dev-token.sh` makes, so both can share a
/// directory:
///
/// ```
/// <data-dir>/softhsm2.conf    SoftHSM2's configuration (token directory below)
/// <data-dir>/tokens/          SoftHSM2's token files
/// <data-dir>/user.pin         user PIN, 32 hex characters, mode 0600
/// <data-dir>/so.pin           security officer PIN, same format
/// <data-dir>/gateway.sqlite   the key store
/// <data-dir>/admin.token      the first admin's API token, mode 0600 (first start only)
/// ```
///
/// Never for production: the PIN sits next to the token, and the transport is plaintext.
public struct DevelopmentEnvironment: Sendable {
    /// The default data directory, relative to the working directory.
    public static let defaultDataDirectory = ".hsm-dev"
    /// The dev token's label (the one `dev-token.sh` uses).
    public static let tokenLabel = "hsmgw-dev"
    /// Where SoftHSM2's module is looked for, in order, after `HSMGW_DEV_PKCS11_MODULE`.
    public static let moduleCandidates = [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib64/pkcs11/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
        "/opt/homebrew/lib/softhsm/libsofthsm2.so",
    ]
    /// Random bytes in each dev PIN (shown as 32 hex characters).
    static let pinByteCount = 16

    /// The data directory, absolute.
    public let dataDirectory: String

    /// Resolves `dataDirectory` against the working directory.
    public init(dataDirectory: String = Self.defaultDataDirectory) {
        let absolute =
            dataDirectory.hasPrefix("/")
            ? dataDirectory : FileManager.default.currentDirectoryPath + "/" + dataDirectory
        self.dataDirectory = URL(fileURLWithPath: absolute).standardizedFileURL.path
    }

    /// SoftHSM2's configuration, pointing at `tokenDirectory`.
    public var softHSM2ConfigPath: String { dataDirectory + "/softhsm2.conf" }
    /// SoftHSM2's token files.
    public var tokenDirectory: String { dataDirectory + "/tokens" }
    /// The user PIN (32 hex characters, mode 0600).
    public var userPINPath: String { dataDirectory + "/user.pin" }
    /// The security officer PIN (same format).
    public var securityOfficerPINPath: String { dataDirectory + "/so.pin" }
    /// The SQLite key store.
    public var storePath: String { dataDirectory + "/gateway.sqlite" }
    /// The first admin's token, written on the first start.
    public var adminTokenPath: String { dataDirectory + "/admin.token" }

    /// The SoftHSM2 module: `HSMGW_DEV_PKCS11_MODULE`, else the first candidate that exists.
    public static func findModule(
        environment: [String: String] = ProcessInfo.processInfo.environment
    ) throws(ConfigurationError) -> String {
        if let path = environment["HSMGW_DEV_PKCS11_MODULE"], !path.isEmpty { return path }
        guard let found = moduleCandidates.first(where: { FileManager.default.fileExists(atPath: $0) }) else {
            throw ConfigurationError(
                "--dev needs SoftHSM2 (Debian/Ubuntu: apt-get install softhsm2; macOS: brew install softhsm); "
                    + "none found at \(moduleCandidates.joined(separator: ", ")); set HSMGW_DEV_PKCS11_MODULE"
            )
        }
        return found
    }

    /// Creates the directories, SoftHSM2's configuration and the PIN files when missing (all
    /// private to this user), and returns the gateway configuration for them. The token itself is
    /// created by the server once the module is loaded (`ensureToken`).
    public func prepare(
        listen: ListenAddress,
        metricsListen: ListenAddress?,
        environment: [String: String] = ProcessInfo.processInfo.environment
    ) throws(ConfigurationError) -> GatewayConfiguration {
        guard listen.isLoopbackOrLocal, metricsListen?.isLoopbackOrLocal ?? true else {
            throw ConfigurationError(
                "--dev serves plaintext: --listen and --metrics-listen must be loopback addresses or Unix sockets")
        }
        let module = try Self.findModule(environment: environment)
        do {
            try makePrivateDirectory(dataDirectory)
            try makePrivateDirectory(tokenDirectory)
            try writeSoftHSM2ConfigIfChanged()
            try createPINFileIfMissing(userPINPath)
            try createPINFileIfMissing(securityOfficerPINPath)
        } catch let error as ConfigurationError {
            throw error
        } catch {
            throw ConfigurationError("--dev: cannot prepare \(dataDirectory): \(error)")
        }
        var hsm = HSMSettings(modulePath: module, tokenLabel: Self.tokenLabel, pin: .file(userPINPath))
        hsm.softHSM2ConfigPath = softHSM2ConfigPath
        hsm.maximumSessions = 8
        var configuration = GatewayConfiguration(hsm: hsm, store: .sqlite(path: storePath))
        configuration.listen = [listen]
        configuration.metricsListen = metricsListen
        configuration.instanceID = "dev"
        try configuration.validate()
        return configuration
    }

    /// Initialises the dev token on SoftHSM2's free slot when no token has its label (first
    /// start), with the PINs from the PIN files. Returns whether it created the token.
    @discardableResult
    public func ensureToken(module: PKCS11Module) throws -> Bool {
        if (try? module.slot(tokenLabel: Self.tokenLabel)) != nil { return false }
        let userPIN = try PINSource.file(userPINPath).read()
        let securityOfficerPIN = try PINSource.file(securityOfficerPINPath).read()
        let free = try module.uninitializedTokenSlot()
        try module.initToken(slot: free, securityOfficerPIN: securityOfficerPIN, label: Self.tokenLabel)
        // SoftHSM2 gives the initialised token a new slot id: find it again by label.
        let slot = try module.slot(tokenLabel: Self.tokenLabel)
        try module.withSession(slot: slot) { session in
            try session.login(.securityOfficer, pin: securityOfficerPIN)
            try session.initPIN(userPIN)
            try session.logout()
        }
        return true
    }

    private func makePrivateDirectory(_ path: String) throws {
        try FileManager.default.createDirectory(
            atPath: path, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        // An existing directory keeps its mode unless we tighten it: the token lives here.
        guard chmod(path, 0o700) == 0 else {
            throw ConfigurationError("--dev: cannot chmod 700 \(path): \(String(cString: strerror(errno)))")
        }
    }

    private func writeSoftHSM2ConfigIfChanged() throws {
        let rendered = """
            # SoftHSM2 configuration for the hsm-gateway --dev token (written by hsm-gateway).
            directories.tokendir = \(tokenDirectory)
            objectstore.backend = file
            log.level = ERROR
            slots.removable = false

            """
        if let existing = try? String(contentsOfFile: softHSM2ConfigPath, encoding: .utf8),
            existing.contains("directories.tokendir = \(tokenDirectory)\n")
        {
            return  // Ours or dev-token.sh's: both point at the same token directory.
        }
        try writePrivateFile(softHSM2ConfigPath, Data(rendered.utf8), replace: true)
    }

    private func createPINFileIfMissing(_ path: String) throws {
        guard !FileManager.default.fileExists(atPath: path) else { return }
        var generator = SystemRandomNumberGenerator()
        let pin = (0..<Self.pinByteCount).map { _ in
            let byte = UInt8.random(in: 0...255, using: &generator)
            return String(byte, radix: 16).count == 1 ? "0" + String(byte, radix: 16) : String(byte, radix: 16)
        }.joined()
        try writePrivateFile(path, Data(pin.utf8), replace: false)
    }
}

/// Writes `data` to `path` with mode 0600: to a temporary file in the same directory, then renamed
/// (so a reader never sees half a file). Without `replace`, refuses an existing file.
func writePrivateFile(_ path: String, _ data: Data, replace: Bool) throws {
    let directory = (path as NSString).deletingLastPathComponent
    let temporary = "\(directory.isEmpty ? "." : directory)/.\((path as NSString).lastPathComponent).\(getpid()).tmp"
    let descriptor = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
    guard descriptor >= 0 else {
        throw ConfigurationError("cannot create \(temporary): \(String(cString: strerror(errno)))")
    }
    var failure: String?
    data.withUnsafeBytes { bytes in
        var written = 0
        while written < bytes.count {
            let count = write(descriptor, bytes.baseAddress! + written, bytes.count - written)
            if count < 0 {
                if errno == EINTR { continue }
                failure = String(cString: strerror(errno))
                return
            }
            written += count
        }
    }
    if failure == nil, fsync(descriptor) != 0 { failure = String(cString: strerror(errno)) }
    close(descriptor)
    if let failure {
        unlink(temporary)
        throw ConfigurationError("cannot write \(path): \(failure)")
    }
    if replace {
        guard rename(temporary, path) == 0 else {
            let message = String(cString: strerror(errno))
            unlink(temporary)
            throw ConfigurationError("cannot write \(path): \(message)")
        }
    } else {
        // link fails with EEXIST instead of replacing: two starts cannot both win.
        let linked = link(temporary, path)
        let linkError = errno
        unlink(temporary)
        guard linked == 0 else {
            throw ConfigurationError("cannot create \(path): \(String(cString: strerror(linkError)))")
        }
    }
}
