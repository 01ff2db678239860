import GatewayWire

import struct Foundation.Data

/// A data key as the gateway returns it: its id, the master-key version that wraps it, the
/// wrapped copy, and, when asked for, the plaintext AES-256 key.
///
/// The plaintext is a `SensitiveBytes`: zeroed when the last reference goes, never printed.
public struct DataKey: Sendable, CustomStringConvertible {
    /// The key's id (lowercase UUID text): all a caller needs to store to decrypt later.
    public var id: String
    /// The tenant's master-key version that wraps it.
    public var masterKeyVersion: UInt32
    /// The wrapped key (the gateway keeps its own copy): from a generate, the stored copy; from a
    /// decrypt, the current stored copy (a rewrap replaces it).
    public var wrapped: [UInt8]
    /// The 32-byte key, when the call asked for it.
    public var plaintext: SensitiveBytes?

    /// A data key.
    public init(id: String, masterKeyVersion: UInt32, wrapped: [UInt8], plaintext: SensitiveBytes?) {
        self.id = id
        self.masterKeyVersion = masterKeyVersion
        self.wrapped = wrapped
        self.plaintext = plaintext
    }

    /// Takes the key out of a wire message and clears the message's copy of the plaintext (in
    /// place when the message is its buffer's only owner, so callers move the message out of its
    /// response first).
    init(taking message: inout Hsmgw_V1_DataKey) {
        self.id = message.id
        self.masterKeyVersion = message.masterKeyVersion
        self.wrapped = Array(message.wrapped)
        if message.plaintext.isEmpty {
            self.plaintext = nil
        } else {
            self.plaintext = SensitiveBytes(copying: message.plaintext)
            // Zeroes the message's buffer in place when the message holds it alone.
            message.plaintext.withUnsafeMutableBytes { zeroize($0) }
            message.plaintext = Data()
        }
    }

    public var description: String {
        "DataKey(id: \(id), masterKeyVersion: \(masterKeyVersion), plaintext: \(plaintext == nil ? "none" : "redacted"))"
    }
}

/// One data key to decrypt in a batch: its id and the context it was generated with.
public struct DataKeyReference: Sendable, Hashable {
    /// The data key's id.
    public var id: String
    /// The exact encryption context of its generation.
    public var context: [String: String]
    /// The wrapped copy kept from `DataKey.wrapped`, or empty. The gateway uses it only when it
    /// has no row for the key (a lost or restored database): protocol §9.3.
    public var wrapped: [UInt8]

    /// A reference to data key `id` under `context`, with the wrapped copy the caller kept, if
    /// any.
    public init(id: String, context: [String: String] = [:], wrapped: [UInt8] = []) {
        self.id = id
        self.context = context
        self.wrapped = wrapped
    }
}

/// The answer to `decrypt`: the plaintext (held as `SensitiveBytes`) and the data key used.
public struct DecryptedPayload: Sendable, CustomStringConvertible {
    /// The decrypted bytes.
    public var plaintext: SensitiveBytes
    /// The data key the ciphertext named.
    public var dataKeyID: String

    /// A decrypted payload.
    public init(plaintext: SensitiveBytes, dataKeyID: String) {
        self.plaintext = plaintext
        self.dataKeyID = dataKeyID
    }

    public var description: String { "DecryptedPayload(\(plaintext.count) bytes, dataKeyID: \(dataKeyID))" }
}

/// A role on one tenant (or `*` for every tenant): `admin`, `key-user` or `decrypt-only`.
public struct RoleBinding: Sendable, Hashable, CustomStringConvertible {
    /// The tenant id, or `*`.
    public var tenant: String
    /// The role name.
    public var role: String

    /// The role `role` on `tenant`.
    public init(tenant: String, role: String) {
        self.tenant = tenant
        self.role = role
    }

    var message: Hsmgw_V1_RoleBinding {
        var binding = Hsmgw_V1_RoleBinding()
        binding.tenant = tenant
        binding.role = role
        return binding
    }

    public var description: String { "\(role)@\(tenant)" }
}

/// A newly created API token: the only time the gateway reveals it.
public struct CreatedAPIToken: Sendable, CustomStringConvertible {
    /// The token's metadata (not secret).
    public var info: Hsmgw_V1_APITokenInfo
    /// The token; its description is redacted.
    public var token: APIToken

    /// A created token.
    public init(info: Hsmgw_V1_APITokenInfo, token: APIToken) {
        self.info = info
        self.token = token
    }

    public var description: String { "CreatedAPIToken(id: \(info.id), principal: \(info.principal), token: redacted)" }
}
