import DevGatewayTestSupport
import Foundation
import ProcessTestSupport
import SoftHSMTestSupport
import Testing

/// The whole sealing path with the built executables: `hsm-gateway --dev` makes a token, a store
/// and an admin; `hsm-admin operator init` changes the PIN and writes shares; the gateway starts
/// sealed from a configuration with `hsm.unseal: shamir`; `operator unseal`, `status` and
/// `operator seal` drive it.
@Suite("hsm-admin operator unseal and seal against a sealed hsm-gateway process", .serialized)
struct OperatorUnsealProcessTests {
    let root: String
    let gateway: String
    let adminExecutable: String

    init() throws {
        root = try makeTemporaryDirectory("operator-unseal")
        gateway = try DevGatewayProcess.builtExecutable("hsm-gateway")
        adminExecutable = try DevGatewayProcess.builtExecutable("hsm-admin")
    }

    var data: String { root + "/.hsm-dev" }

    /// Starts `hsm-gateway` with `arguments` and waits until `port` accepts connections (and
    /// `file`, when given, exists).
    func start(_ arguments: [String], port: Int, waitingFor file: String? = nil) throws -> pid_t {
        let pid = try SpawnedProcess(
            gateway, arguments, environment: ["PATH": "/usr/bin:/bin", "HOME": root],
            inheritEnvironment: false, outputPath: root + "/gateway.log", append: true
        ).pid
        let deadline = ContinuousClock.now + DevGatewayProcess.startTimeout
        while ContinuousClock.now < deadline {
            guard ChildProcess.isRunning(pid) else {
                let log = (try? String(contentsOfFile: root + "/gateway.log", encoding: .utf8)) ?? ""
                throw TestSetupError("hsm-gateway exited:\n\(log)")
            }
            if file.map(FileManager.default.fileExists) ?? true, DevGatewayProcess.canConnect(port: port) {
                return pid
            }
            usleep(100_000)
        }
        ChildProcess.stop(pid)
        throw TestSetupError("hsm-gateway did not serve within \(DevGatewayProcess.startTimeout)")
    }

    func admin(_ arguments: [String], port: Int) throws -> ChildProcess.Result {
        try ChildProcess.run(
            adminExecutable, arguments,
            environment: [
                "PATH": "/usr/bin:/bin", "HOME": root, "HSMGW_SERVER": "127.0.0.1:\(port)",
                "HSMGW_TOKEN_FILE": data + "/admin.token", "SOFTHSM2_CONF": data + "/softhsm2.conf",
            ],
            inheritEnvironment: false)
    }

    @Test("init, sealed start, status, unseal with 3 of 5 share files, a duplicate refused, seal, unseal again")
    func unsealAndSeal() throws {
        // 1. A dev start makes the token, the SQLite store and the admin token; then it stops.
        let devPort = try DevGatewayProcess.freePort()
        let dev = try start(
            ["--dev", "--data-dir", data, "--listen", "127.0.0.1:\(devPort)", "--metrics-listen", "off"],
            port: devPort, waitingFor: data + "/admin.token")
        ChildProcess.stop(dev)

        // 2. operator init: a new PIN nobody sees, five share files.
        let module = SoftHSMFixture.modulePath
        let shares = root + "/shares"
        try FileManager.default.createDirectory(atPath: shares, withIntermediateDirectories: false)
        let initialized = try admin(
            [
                "operator", "init", "--module", module, "--token", "hsmgw-dev", "--pin-file", data + "/user.pin",
                "--check-file", root + "/seal-check.json", "--share-dir", shares,
            ], port: devPort)
        #expect(initialized.status == 0, "\(initialized)")
        #expect(initialized.output.isEmpty, "shares went to files, not to standard output")

        // 3. The gateway starts sealed from its configuration.
        let port = try DevGatewayProcess.freePort()
        let configuration = root + "/gateway.yaml"
        try """
        listen: ["127.0.0.1:\(port)"]
        metrics_listen: "off"
        hsm:
          module: \(module)
          token_label: hsmgw-dev
          softhsm2_conf: \(data)/softhsm2.conf
          unseal: shamir
          unseal_check_file: \(root)/seal-check.json
        store:
          kind: sqlite
          sqlite:
            path: \(data)/gateway.sqlite
        """.write(toFile: configuration, atomically: true, encoding: .utf8)
        let sealed = try start(["--config", configuration], port: port)
        defer { ChildProcess.stop(sealed) }
        let log = try String(contentsOfFile: root + "/gateway.log", encoding: .utf8)
        #expect(log.contains("hsm.unseal is shamir"), "the start-up log names the mode")

        var status = try admin(["status"], port: port)
        #expect(status.status == 1, "\(status)")
        #expect(status.output.contains("YES: 0 of 3 shares given (5 exist)"), "\(status)")
        let refused = try admin(["tenant", "create", "acme"], port: port)
        #expect(refused.status == 69 && refused.error.contains("SEALED"), "\(refused)")

        // 4. Three operators, one share file each; a duplicate is refused.
        var given = try admin(["operator", "unseal", "--share-file", shares + "/share-2.txt"], port: port)
        #expect(given.status == 0 && given.output.contains("1 of 3"), "\(given)")
        given = try admin(["operator", "unseal", "--share-file", shares + "/share-2.txt"], port: port)
        #expect(given.status == 65 && given.error.contains("SHARE_REFUSED"), "\(given)")
        for number in [5, 1] {
            given = try admin(["operator", "unseal", "--share-file", shares + "/share-\(number).txt"], port: port)
            #expect(given.status == 0, "\(given)")
        }
        #expect(given.output.contains("no (shamir, 3 of 5)"), "\(given)")
        status = try admin(["status"], port: port)
        #expect(status.status == 0, "\(status)")
        let created = try admin(["tenant", "create", "acme"], port: port)
        #expect(created.status == 0, "\(created)")

        // 5. Seal, then key operations are refused; another three shares unseal again.
        let sealedAgain = try admin(["operator", "seal"], port: port)
        #expect(sealedAgain.status == 0 && sealedAgain.output.contains("YES: 0 of 3"), "\(sealedAgain)")
        #expect(try admin(["tenant", "show", "acme"], port: port).status == 69)
        for number in [3, 4, 2] {
            given = try admin(["operator", "unseal", "--share-file", shares + "/share-\(number).txt"], port: port)
            #expect(given.status == 0, "\(given)")
        }
        #expect(try admin(["tenant", "show", "acme"], port: port).status == 0)

        // 6. rekey to two shares encrypted to two operators' openssl keys; seal; each operator
        // unseals with their own private key.
        let newShares = root + "/new-shares"
        try FileManager.default.createDirectory(atPath: newShares, withIntermediateDirectories: false)
        for number in 1...2 {
            let key = root + "/operator-\(number).key"
            #expect(
                try ChildProcess.run(
                    "/usr/bin/openssl", ["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key]
                ).status == 0)
            #expect(
                try ChildProcess.run("/usr/bin/openssl", ["ec", "-in", key, "-pubout", "-out", key + ".pub"]).status
                    == 0)
            chmod(key, 0o600)
        }
        let rekeyed = try admin(
            [
                "operator", "rekey", "--check-file", root + "/seal-check.json", "--share-file", shares + "/share-1.txt",
                "--share-file", shares + "/share-4.txt", "--share-file", shares + "/share-5.txt", "--shares", "2",
                "--threshold", "2", "--share-dir", newShares, "--recipient", root + "/operator-1.key.pub",
                "--recipient", root + "/operator-2.key.pub",
            ], port: port)
        #expect(rekeyed.status == 0, "\(rekeyed)")
        #expect(try admin(["operator", "seal"], port: port).status == 0)
        given = try admin(["operator", "unseal", "--share-file", shares + "/share-1.txt"], port: port)
        #expect(given.status == 65, "the old shares no longer work: \(given)")
        given = try admin(
            [
                "operator", "unseal", "--share-file", newShares + "/share-1.hpke", "--identity",
                root + "/operator-2.key",
            ],
            port: port)
        #expect(given.status == 64, "another operator's key does not open it: \(given)")
        for number in 1...2 {
            given = try admin(
                [
                    "operator", "unseal", "--share-file", newShares + "/share-\(number).hpke", "--identity",
                    root + "/operator-\(number).key",
                ], port: port)
            #expect(given.status == 0, "\(given)")
        }
        #expect(try admin(["tenant", "show", "acme"], port: port).status == 0)
        // No share and no PIN in the gateway's log.
        let finalLog = try String(contentsOfFile: root + "/gateway.log", encoding: .utf8)
        for number in 1...5 {
            let share = try String(contentsOfFile: shares + "/share-\(number).txt", encoding: .utf8)
                .trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(!finalLog.contains(share))
        }
    }
}
