import Foundation
import PKCS11

/// A token made for one benchmark run in a temporary directory, initialised with fixed PINs.
/// SoftHSM2: its own `softhsm2.conf` and token directory (set before the module is loaded).
/// NSS's softoken (a module file named `libsoftokn3*`): a new key database, passed to
/// `C_Initialize` as NSS's library parameters (`initializeArguments`).
struct ThrowawayToken {
    let directory: URL
    let module: PKCS11Module
    let label: String
    let slot: SlotID
    let pin = SecretBytes(utf8: "bench-user-pin")
    /// What the gateway under benchmark passes as `hsm.initialize_args`; nil for SoftHSM2.
    let initializeArguments: String?

    init(module path: String, label: String) throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("hsm-bench-\(getpid())")
        if (path as NSString).lastPathComponent.hasPrefix("libsoftokn3") {
            let database = directory.appendingPathComponent("nss")
            try FileManager.default.createDirectory(
                at: database, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            let arguments = try NSSSoftoken.initializeArguments(databaseDirectory: database.path, tokenLabel: label)
            module = try PKCS11Module.load(path: path, initializeArguments: arguments)
            initializeArguments = arguments
            self.label = label
            // A new NSS database has no security-officer PIN: an empty login sets the user PIN.
            // The database's token is NSS's slot 2 (slot 1 is its storage-less crypto slot).
            let databaseSlot = SlotID(rawValue: 2)
            try module.withSession(slot: databaseSlot) { [pin] session in
                try session.login(.securityOfficer, pin: SecretBytes(utf8: ""))
                try session.initPIN(pin)
                try session.logout()
            }
            slot = try module.slot(tokenLabel: label)
            return
        }
        initializeArguments = nil
        let tokens = directory.appendingPathComponent("tokens")
        try FileManager.default.createDirectory(at: tokens, withIntermediateDirectories: true)
        let conf = directory.appendingPathComponent("softhsm2.conf")
        try "directories.tokendir = \(tokens.path)\nobjectstore.backend = file\nlog.level = ERROR\n"
            .write(to: conf, atomically: true, encoding: .utf8)
        setenv("SOFTHSM2_CONF", conf.path, 1)
        module = try PKCS11Module.load(path: path)
        self.label = label
        let free = try module.uninitializedTokenSlot()
        let securityOfficerPIN = SecretBytes(utf8: "bench-so-pin")
        try module.initToken(slot: free, securityOfficerPIN: securityOfficerPIN, label: label)
        slot = try module.slot(tokenLabel: label)
        try module.withSession(slot: slot) { [pin] session in
            try session.login(.securityOfficer, pin: securityOfficerPIN)
            try session.initPIN(pin)
            try session.logout()
        }
    }

    func remove() {
        try? FileManager.default.removeItem(at: directory)
    }
}
