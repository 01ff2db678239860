import ArgumentParser
import Foundation
import GatewayClient
import GatewayConfig
import GatewayServer
import Logging
import NIOCore
import Synchronization

/// GenerateDataKey and DecryptDataKey through the Swift client and the wire protocol, TLS on, at
/// several concurrency levels: the gateway runs in this process (one `GatewayServerApp` on
/// 127.0.0.1, port chosen by the system) on a throwaway SoftHSM2 token and a throwaway store.
struct WireBenchmark: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "wire",
        abstract: "GenerateDataKey / DecryptDataKey ops/s through the client, over TLS on loopback."
    )

    @OptionGroup var gatewayOptions: BenchGatewayOptions

    @Option(help: "Seconds per measurement (1 to 600).")
    var seconds: Double = 5

    @Option(help: "Concurrent requests, comma-separated (each 1 to 1024).")
    var concurrency = "16,64"

    @Option(help: "Client connections in the pool (1 to 16).")
    var connections = 2

    var levels: [Int] { concurrency.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) } }

    func validate() throws {
        guard (1...600).contains(seconds) else { throw ValidationError("--seconds must be from 1 to 600") }
        guard !levels.isEmpty, levels.allSatisfy({ (1...1024).contains($0) }) else {
            throw ValidationError("--concurrency must list numbers from 1 to 1024")
        }
        guard (1...16).contains(connections) else { throw ValidationError("--connections must be from 1 to 16") }
    }

    func run() async throws {
        let gateway = try await BenchGateway.start(gatewayOptions, label: "hsm-bench-wire")
        defer { gateway.stop() }
        let client = try gateway.client(connections: connections)
        _ = try await client.createTenant("bench")
        let context = ["service": "bench"]
        print(
            "\(gatewayOptions.summary)   client connections: \(connections)   \(seconds) s per figure"
        )
        let duration = Duration.milliseconds(Int(seconds * 1000))
        let ids = Mutex<[String]>([])
        for level in levels {
            let generate = try await LoadMeasurement.run(duration, tasks: level) {
                let key = try await client.generateDataKey(tenant: "bench", context: context, includePlaintext: true)
                ids.withLock { if $0.count < 200_000 { $0.append(key.id) } }
            }
            generate.report("GenerateDataKey", concurrency: level)
            let keys = ids.withLock { $0 }
            let decrypt = try await LoadMeasurement.run(duration, tasks: level) {
                let id = keys[Int.random(in: 0..<keys.count)]
                _ = try await client.decryptDataKey(tenant: "bench", id: id, context: context)
            }
            decrypt.report("DecryptDataKey", concurrency: level)
        }
        await client.shutdown()
        await gateway.shutdown()
    }
}

/// A CA and a server certificate for `localhost` / 127.0.0.1, made with the `openssl` CLI.
struct BenchCertificates {
    let directory: String
    var caCertificate: String { directory + "/ca.crt" }
    var serverCertificate: String { directory + "/server.crt" }
    var serverKey: String { directory + "/server.key" }

    init(directory: String) throws {
        self.directory = directory
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let d = directory
        let commands = [
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout '\(d)/ca.key'"
                + " -out '\(d)/ca.crt' -days 2 -subj '/CN=hsm-bench CA'"
                + " -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign",
            "openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout '\(d)/server.key'"
                + " -out '\(d)/server.csr' -subj '/CN=localhost'",
            "printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > '\(d)/server.ext'",
            "openssl x509 -req -in '\(d)/server.csr' -CA '\(d)/ca.crt' -CAkey '\(d)/ca.key' -CAcreateserial"
                + " -out '\(d)/server.crt' -days 2 -extfile '\(d)/server.ext'",
            "chmod 600 '\(d)/server.key' '\(d)/ca.key'",
        ]
        _ = try KeysBenchmark.shell(["-c", "(" + commands.joined(separator: " && ") + ") 2>/dev/null"])
    }
}
