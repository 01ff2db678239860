import GatewayWire
import NIOCore
import SwiftProtobuf

import struct Foundation.Data

// Connection and data-key methods (numbers 1, 2 and 10 to 21). Every method takes an optional
// `deadline`: how long the call, retries included, may take (nil: the configuration's default).
extension GatewayClient {
    /// Method 1, Hello. The client runs the handshake itself on every new connection; this
    /// returns the server's answer on a pool connection (opening one if none is open): the
    /// server's version and instance, this client's principal and roles, and the limits.
    public func hello() async throws(GatewayError) -> Hsmgw_V1_HelloResponse {
        let connection = try await poolConnection()
        guard let response = connection.helloResponse else {
            throw .notSent(.unavailable, reason: GatewayError.LocalReason.notSent, "the connection has no handshake")
        }
        return response
    }

    /// Method 2, ServerInfo: health and identity of the server.
    public func serverInfo(deadline: Duration? = nil) async throws(GatewayError) -> Hsmgw_V1_ServerInfoResponse {
        try await call(method: .serverInfo, request: Hsmgw_V1_ServerInfoRequest(), deadline: deadline)
    }

    /// Method 10, GenerateDataKey: a new AES-256 data key for `tenant`, bound to `context`.
    ///
    /// - Parameters:
    ///   - tenant: The tenant id.
    ///   - context: The encryption context; the same map is needed to decrypt the key. Not secret.
    ///   - includePlaintext: Whether to return the plaintext key (false: id and wrapped copy only).
    ///   - idempotencyKey: Makes a retry return the first call's key; with it, the client retries
    ///     after `UNAVAILABLE`.
    ///   - deadline: How long the call may take.
    public func generateDataKey(
        tenant: String,
        context: [String: String] = [:],
        includePlaintext: Bool = true,
        idempotencyKey: String? = nil,
        deadline: Duration? = nil
    ) async throws(GatewayError) -> DataKey {
        var request = Hsmgw_V1_GenerateDataKeyRequest()
        request.tenant = tenant
        request.encryptionContext = context
        request.includePlaintext = includePlaintext
        request.idempotencyKey = idempotencyKey ?? ""
        var response: Hsmgw_V1_GenerateDataKeyResponse = try await sensitiveCall(
            .generateDataKey,
            request,
            hasIdempotencyKey: idempotencyKey != nil,
            deadline: deadline
        )
        // Moved out so the key's buffer has one owner and is zeroed in place.
        var key = response.key
        response.clearKey()
        return DataKey(taking: &key)
    }

    /// Method 11, GenerateDataKeys: 1 to 1,000 data keys with one context, in one transaction.
    public func generateDataKeys(
        tenant: String,
        count: Int,
        context: [String: String] = [:],
        includePlaintext: Bool = true,
        idempotencyKey: String? = nil,
        deadline: Duration? = nil
    ) async throws(GatewayError) -> [DataKey] {
        var request = Hsmgw_V1_GenerateDataKeysRequest()
        request.tenant = tenant
        request.count = UInt32(clamping: max(count, 0))
        request.encryptionContext = context
        request.includePlaintext = includePlaintext
        request.idempotencyKey = idempotencyKey ?? ""
        var response: Hsmgw_V1_GenerateDataKeysResponse = try await sensitiveCall(
            .generateDataKeys,
            request,
            hasIdempotencyKey: idempotencyKey != nil,
            deadline: deadline
        )
        return response.keys.indices.map { DataKey(taking: &response.keys[$0]) }
    }

    /// Method 12, DecryptDataKey: the plaintext of data key `id`, given the exact context of its
    /// generation (a different context fails with `INVALID_ARGUMENT`, `DECRYPTION_FAILED`).
    ///
    /// `wrapped`, the `DataKey.wrapped` copy kept from the generation, lets the gateway decrypt
    /// the key when it has no row for it (a lost or restored database, protocol §9.3); `id` may
    /// then be empty.
    public func decryptDataKey(
        tenant: String,
        id: String,
        context: [String: String] = [:],
        wrapped: [UInt8] = [],
        deadline: Duration? = nil
    ) async throws(GatewayError) -> DataKey {
        var request = Hsmgw_V1_DecryptDataKeyRequest()
        request.tenant = tenant
        request.id = id
        request.encryptionContext = context
        request.wrapped = Data(wrapped)
        var response: Hsmgw_V1_DecryptDataKeyResponse = try await sensitiveCall(
            .decryptDataKey,
            request,
            hasIdempotencyKey: false,
            deadline: deadline
        )
        // Moved out so the key's buffer has one owner and is zeroed in place.
        var key = response.key
        response.clearKey()
        return DataKey(taking: &key)
    }

    /// Method 13, DecryptDataKeys: 1 to 1,000 keys; each entry succeeds or fails alone, in
    /// request order.
    public func decryptDataKeys(
        tenant: String,
        keys: [DataKeyReference],
        deadline: Duration? = nil
    ) async throws(GatewayError) -> [Result<DataKey, GatewayError>] {
        var request = Hsmgw_V1_DecryptDataKeysRequest()
        request.tenant = tenant
        request.keys = keys.map { reference in
            var message = Hsmgw_V1_DataKeyReference()
            message.id = reference.id
            message.encryptionContext = reference.context
            message.wrapped = Data(reference.wrapped)
            return message
        }
        var response: Hsmgw_V1_DecryptDataKeysResponse = try await sensitiveCall(
            .decryptDataKeys,
            request,
            hasIdempotencyKey: false,
            deadline: deadline
        )
        return response.results.indices.map { index -> Result<DataKey, GatewayError> in
            switch response.results[index].result {
            case .key(var key):
                response.results[index].result = nil
                return .success(DataKey(taking: &key))
            case .error(let status):
                return .failure(GatewayError(status: status, headerStatus: status.statusCode))
            case nil:
                return .failure(
                    GatewayError(
                        local: .internalError,
                        reason: GatewayError.LocalReason.malformedResponse,
                        message: "result \(index) holds neither a key nor an error",
                        transmission: .maybeProcessed
                    )
                )
            }
        }
    }

    /// Method 14, Encrypt: encrypts up to 64 KiB inside the gateway under stored data key
    /// `dataKeyID`. For more, use `EnvelopeEncryptor`.
    public func encrypt(
        tenant: String,
        dataKeyID: String,
        plaintext: [UInt8],
        context: [String: String] = [:],
        deadline: Duration? = nil
    ) async throws(GatewayError) -> [UInt8] {
        var request = Hsmgw_V1_EncryptRequest()
        request.tenant = tenant
        request.dataKeyID = dataKeyID
        request.plaintext = Data(plaintext)
        request.encryptionContext = context
        let response: Hsmgw_V1_EncryptResponse = try await call(method: .encrypt, request: request, deadline: deadline)
        return Array(response.ciphertext)
    }

    /// Method 15, Decrypt: decrypts a ciphertext of `encrypt`, given the same context.
    public func decrypt(
        tenant: String,
        ciphertext: [UInt8],
        context: [String: String] = [:],
        deadline: Duration? = nil
    ) async throws(GatewayError) -> DecryptedPayload {
        var request = Hsmgw_V1_DecryptRequest()
        request.tenant = tenant
        request.ciphertext = Data(ciphertext)
        request.encryptionContext = context
        var response: Hsmgw_V1_DecryptResponse = try await sensitiveCall(
            .decrypt,
            request,
            hasIdempotencyKey: false,
            deadline: deadline
        )
        let plaintext = SensitiveBytes(copying: response.plaintext)
        response.plaintext.withUnsafeMutableBytes { zeroize($0) }
        return DecryptedPayload(plaintext: plaintext, dataKeyID: response.dataKeyID)
    }

    /// Method 16, RewrapDataKey: rewraps data key `id` under the tenant's primary master key.
    public func rewrapDataKey(
        tenant: String,
        id: String,
        context: [String: String] = [:],
        deadline: Duration? = nil
    ) async throws(GatewayError) -> Hsmgw_V1_DataKeyInfo {
        var request = Hsmgw_V1_RewrapDataKeyRequest()
        request.tenant = tenant
        request.id = id
        request.encryptionContext = context
        let response: Hsmgw_V1_RewrapDataKeyResponse = try await call(
            method: .rewrapDataKey,
            request: request,
            deadline: deadline
        )
        return response.key
    }

    /// Method 17, GetDataKey: a data key's metadata (never the key).
    public func getDataKey(tenant: String, id: String, deadline: Duration? = nil) async throws(GatewayError)
        -> Hsmgw_V1_DataKeyInfo
    {
        var request = Hsmgw_V1_GetDataKeyRequest()
        request.tenant = tenant
        request.id = id
        let response: Hsmgw_V1_GetDataKeyResponse = try await call(
            method: .getDataKey, request: request, deadline: deadline)
        return response.key
    }

    /// Method 18, ListDataKeys: one page of a tenant's data keys, by id.
    ///
    /// - Parameters:
    ///   - state: "", "enabled", "disabled" or "destroyed".
    ///   - pageSize: 1 to 1,000; 0 for the server's default (100).
    ///   - pageToken: The previous page's `nextPageToken`; empty for the first page.
    public func listDataKeys(
        tenant: String,
        state: String = "",
        pageSize: Int = 0,
        pageToken: String = "",
        deadline: Duration? = nil
    ) async throws(GatewayError) -> Hsmgw_V1_ListDataKeysResponse {
        var request = Hsmgw_V1_ListDataKeysRequest()
        request.tenant = tenant
        request.state = state
        request.pageSize = UInt32(clamping: max(pageSize, 0))
        request.pageToken = pageToken
        return try await call(method: .listDataKeys, request: request, deadline: deadline)
    }

    /// Method 19, DisableDataKey.
    public func disableDataKey(tenant: String, id: String, deadline: Duration? = nil) async throws(GatewayError)
        -> Hsmgw_V1_DataKeyInfo
    {
        try await dataKeyState(.disableDataKey, tenant: tenant, id: id, deadline: deadline)
    }

    /// Method 20, EnableDataKey.
    public func enableDataKey(tenant: String, id: String, deadline: Duration? = nil) async throws(GatewayError)
        -> Hsmgw_V1_DataKeyInfo
    {
        try await dataKeyState(.enableDataKey, tenant: tenant, id: id, deadline: deadline)
    }

    /// Method 21, DestroyDataKey: everything encrypted under the key becomes unreadable.
    public func destroyDataKey(tenant: String, id: String, deadline: Duration? = nil) async throws(GatewayError)
        -> Hsmgw_V1_DataKeyInfo
    {
        try await dataKeyState(.destroyDataKey, tenant: tenant, id: id, deadline: deadline)
    }

    private func dataKeyState(_ method: Method, tenant: String, id: String, deadline: Duration?)
        async throws(GatewayError) -> Hsmgw_V1_DataKeyInfo
    {
        var request = Hsmgw_V1_DataKeyStateRequest()
        request.tenant = tenant
        request.id = id
        let response: Hsmgw_V1_DataKeyStateResponse = try await call(
            method: method, request: request, deadline: deadline)
        return response.key
    }

    /// A call whose response holds secrets: the received payload is zeroed after decoding (in
    /// place when nothing else shares its storage).
    func sensitiveCall<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message>(
        _ method: Method,
        _ request: Request,
        hasIdempotencyKey: Bool,
        deadline: Duration?
    ) async throws(GatewayError) -> Response {
        var payload = try await callPayload(
            method: method,
            payload: request.wirePayload(),
            hasIdempotencyKey: hasIdempotencyKey,
            deadline: deadline
        )
        defer { payload.withUnsafeMutableReadableBytes { zeroize($0) } }
        return try GatewayConnection.decode(Response.self, from: payload, method: method)
    }
}
