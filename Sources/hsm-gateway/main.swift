import ArgumentParser
import HSMAdmin

/// The gateway server. The PKCS#11 layer, configuration and preflight exist; the key service
/// and the network server arrive in the following issues. Until then this executable says so
/// honestly instead of pretending to serve.
struct HSMGateway: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hsm-gateway",
        abstract: "Serve HSM-held keys to backend services (the server is not built yet).",
        version: HSMGatewayVersion.current
    )

    @Option(help: "Gateway configuration file (YAML).")
    var config: String?

    func run() throws {
        print("hsm-gateway \(HSMGatewayVersion.current): the server is not implemented yet.")
        print("Check a token with: hsm-admin preflight --config FILE")
        throw ExitCode(69)  // EX_UNAVAILABLE
    }
}

HSMGateway.main()
