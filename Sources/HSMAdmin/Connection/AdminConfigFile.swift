import Foundation

/// The admin configuration file: `key = value` lines (keys as in `ConnectionSettingKey`), `#`
/// comments, blank lines. Relative paths are taken relative to the file's directory. It holds
/// no secret: the token stays in its own file (`token_file`).
///
/// ```
/// # ~/.config/hsm-admin/admin.conf
/// server = gateway.internal:7700
/// ca_file = ca.pem
/// token_file = /run/secrets/hsm-admin.token
/// ```
public struct AdminConfigFile: Sendable, Hashable {
    /// The largest configuration file read: a few settings fit in far less; this bounds input.
    public static let maximumByteCount = 64 * 1024
    /// The environment variable naming the file.
    public static let environmentVariable = "HSMGW_ADMIN_CONFIG"

    /// The file's path.
    public let path: String
    /// Its settings, as a layer below the flags and the environment.
    public let layer: SettingsLayer

    /// Parses `text`, the content of the file at `path`.
    public init(parsing text: String, path: String) throws(AdminError) {
        self.path = path
        let directory = (path as NSString).deletingLastPathComponent
        var layer = SettingsLayer(kind: .file)
        // "\r\n" is one Character in Swift: split on both line ends.
        let lines = text.split(omittingEmptySubsequences: false) { $0 == "\n" || $0 == "\r\n" }
        for (index, rawLine) in lines.enumerated() {
            let origin = "\(path):\(index + 1)"
            let line = rawLine.trimmingCharacters(in: .whitespaces.union(CharacterSet(charactersIn: "\r")))
            if line.isEmpty || line.hasPrefix("#") { continue }
            guard let equals = line.firstIndex(of: "=") else {
                throw AdminError(.configuration, "\(origin): expected `key = value`")
            }
            let name = line[..<equals].trimmingCharacters(in: .whitespaces)
            var value = line[line.index(after: equals)...].trimmingCharacters(in: .whitespaces)
            if value.count >= 2, value.hasPrefix("\""), value.hasSuffix("\"") {
                value = String(value.dropFirst().dropLast())
            }
            guard let key = ConnectionSettingKey(rawValue: name) else {
                let known = ConnectionSettingKey.allCases.map(\.rawValue).joined(separator: ", ")
                let hint = name == "token" ? " (the token belongs in its own file: token_file)" : ""
                throw AdminError(
                    .configuration,
                    "\(origin): unknown setting `\(name.sanitizedForTerminal)`\(hint); known: \(known)"
                )
            }
            guard layer.values[key] == nil else {
                throw AdminError(.configuration, "\(origin): `\(name)` is set twice")
            }
            guard !value.isEmpty else {
                throw AdminError(.configuration, "\(origin): `\(name)` has no value")
            }
            if key.isPath, !value.hasPrefix("/"), !directory.isEmpty {
                value = directory + "/" + value
            } else if key == .server, value.hasPrefix("unix:"), !value.hasPrefix("unix:/"), !directory.isEmpty {
                value = "unix:" + directory + "/" + value.dropFirst(5)
            }
            layer.values[key] = SettingValue(value, origin: origin)
        }
        self.layer = layer
    }

    /// Reads and parses the file at `path`.
    public static func load(path: String) throws(AdminError) -> AdminConfigFile {
        guard let handle = FileHandle(forReadingAtPath: path) else {
            throw AdminError(.configuration, "cannot open admin config file \(path)")
        }
        defer { try? handle.close() }
        let data: Data
        do {
            data = try handle.read(upToCount: maximumByteCount + 1) ?? Data()
        } catch {
            throw AdminError(.configuration, "cannot read admin config file \(path)")
        }
        guard data.count <= maximumByteCount else {
            throw AdminError(.configuration, "admin config file \(path) is larger than \(maximumByteCount) bytes")
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw AdminError(.configuration, "admin config file \(path) is not UTF-8")
        }
        return try AdminConfigFile(parsing: text, path: path)
    }

    /// Which file to read: `--admin-config`, else `HSMGW_ADMIN_CONFIG`, else
    /// `$XDG_CONFIG_HOME/hsm-admin/admin.conf` (or `~/.config/...`) when it exists; nil for none.
    public static func locate(
        flag: String?,
        environment: [String: String],
        fileExists: (String) -> Bool = { FileManager.default.fileExists(atPath: $0) }
    ) -> String? {
        if let flag { return flag }
        if let path = environment[environmentVariable], !path.isEmpty { return path }
        let base: String
        if let xdg = environment["XDG_CONFIG_HOME"], xdg.hasPrefix("/") {
            base = xdg
        } else if let home = environment["HOME"], home.hasPrefix("/") {
            base = home + "/.config"
        } else {
            return nil
        }
        let path = base + "/hsm-admin/admin.conf"
        return fileExists(path) ? path : nil
    }
}
