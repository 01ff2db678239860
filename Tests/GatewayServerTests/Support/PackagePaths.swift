import Foundation

/// Paths of the package.
enum PackagePaths {
    /// The package root, found from this file.
    static let root: String = {
        var directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        while directory.path != "/" {
            if FileManager.default.fileExists(atPath: directory.appendingPathComponent("Package.swift").path) {
                return directory.path
            }
            directory.deleteLastPathComponent()
        }
        return FileManager.default.currentDirectoryPath
    }()

    /// The `hsm-gateway` executable: `HSMGW_TEST_GATEWAY_BINARY`, else the debug build.
    static var gatewayBinary: String {
        if let path = ProcessInfo.processInfo.environment["HSMGW_TEST_GATEWAY_BINARY"] { return path }
        return root + "/.build/debug/hsm-gateway"
    }
}
