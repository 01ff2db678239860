import Foundation
import PKCS11

/// A SoftHSM2 token made for one benchmark run: its own `softhsm2.conf` and token directory in
/// a temporary directory (set before the module is loaded), initialised with fixed PINs.
struct ThrowawayToken {
    let directory: URL
    let module: PKCS11Module
    let label: String
    let slot: SlotID
    let pin = SecretBytes(utf8: "bench-user-pin")

    init(module path: String, label: String) throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("hsm-bench-\(getpid())")
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
