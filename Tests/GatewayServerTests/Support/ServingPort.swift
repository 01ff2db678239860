import Foundation
import ProcessTestSupport

extension SpawnedProcess {
    /// The log line of a configured `hsm-gateway` that serves (`listen=127.0.0.1:PORT … serving`).
    static let servingLine = #"listen=127\.0\.0\.1:(\d+) .*serving"#
    /// The banner of `hsm-gateway --dev`.
    static let devServingLine = #"serving plaintext on 127\.0\.0\.1:(\d+)"#

    /// The port an `hsm-gateway` child serves on, read from the log line `pattern` captures it
    /// in. A child that is not serving within 60 s is killed, and the error carries its output.
    func servingPort(_ pattern: String = servingLine, name: String = "hsm-gateway") async throws -> Int {
        guard let portText = await waitForOutput(pattern, timeout: .seconds(60)), let port = Int(portText) else {
            send(SIGKILL)
            throw TestSetupError("\(name) did not start: \(output())")
        }
        return port
    }
}
