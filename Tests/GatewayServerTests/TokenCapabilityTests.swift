import Foundation
import GatewayServer
import ProcessTestSupport
import SoftHSMTestSupport
import Testing

/// A network HSM's shape: SoftHSM2 served by `p11-kit server`, the gateway loading p11-kit's client
/// module. Debian 12's p11-kit 0.24.1 cannot carry AES-GCM parameters over its protocol (and its
/// client module does not list CKM_AES_GCM), so the gateway must refuse to start on it, naming
/// what fails, instead of starting "ready" and answering every wrap with INTERNAL.
@Suite("A token that cannot do AES-GCM", .serialized)
struct TokenCapabilityTests {
    static let clientModule = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"

    @Test("hsm-gateway on p11-kit's client module refuses to start, naming AES-GCM (exit 69)")
    func gatewayRefusesATokenWithoutGCM() async throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/p11-kit"),
            FileManager.default.fileExists(atPath: Self.clientModule)
        else {
            Issue.record("p11-kit and p11-kit-modules are not installed (make deps installs them)")
            return
        }
        let root = try makeTemporaryDirectory("p11kit-gcm")
        try FileManager.default.createDirectory(atPath: root + "/tokens", withIntermediateDirectories: true)
        let conf = root + "/softhsm2.conf"
        try "directories.tokendir = \(root)/tokens\nobjectstore.backend = file\nlog.level = ERROR\n".write(
            toFile: conf, atomically: true, encoding: .utf8)
        let pin = "4242\(UInt16.random(in: 1000...9999))"
        let initialised = try ChildProcess.run(
            "/usr/bin/softhsm2-util",
            ["--init-token", "--free", "--label", "p11kit-gcm", "--pin", pin, "--so-pin", pin + "0"],
            environment: ["SOFTHSM2_CONF": conf])
        #expect(initialised.status == 0, "\(initialised)")
        let socket = root + "/p11kit.sock"
        let server = try SpawnedProcess(
            "/usr/bin/p11-kit",
            ["server", "-f", "--provider", SoftHSMFixture.modulePath, "-n", socket, "pkcs11:token=p11kit-gcm"],
            environment: ["SOFTHSM2_CONF": conf],
            outputPath: root + "/server.log"
        )
        defer { server.send(SIGKILL) }
        for _ in 0..<50 where !FileManager.default.fileExists(atPath: socket) {
            try await Task.sleep(for: .milliseconds(100))
        }
        try pin.write(toFile: root + "/user.pin", atomically: true, encoding: .utf8)
        chmod(root + "/user.pin", 0o600)
        try """
        hsm:
          module: \(Self.clientModule)
          token_label: p11kit-gcm
          pin:
            file: \(root)/user.pin
        store:
          sqlite:
            path: \(root)/gateway.sqlite
        listen: ["127.0.0.1:0"]
        metrics_listen: "off"
        """.write(toFile: root + "/gateway.yaml", atomically: true, encoding: .utf8)
        let gateway = try ChildProcess.run(
            PackagePaths.gatewayBinary, ["--config", root + "/gateway.yaml"],
            environment: ["P11_KIT_SERVER_ADDRESS": "unix:path=\(socket)"], timeout: .seconds(60))
        print("hsm-gateway on p11-kit: exit \(gateway.status): \(gateway.error.suffix(400))")
        #expect(gateway.status == 69, "\(gateway)")
        // p11-kit's client module does not list CKM_AES_GCM at all: refused before anything is
        // made on the token, naming the mechanism and the page.
        #expect(gateway.error.contains("does not list CKM_AES_GCM"), "\(gateway.error)")
        #expect(gateway.error.contains("docs/hsm/README.md"), "\(gateway.error)")
        #expect(!gateway.error.contains(pin))
    }
}
