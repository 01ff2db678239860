import Foundation
import GatewayTransport
import GatewayWire
import KeyHierarchy

extension GatewayHandler {
    /// Parses a data key id.
    func dataKeyID(_ text: String) throws -> DataKeyID {
        try DataKeyID(text)
    }

    /// An idempotency key from the wire: "" means none.
    func idempotencyKey(_ text: String) throws -> String? {
        guard !text.isEmpty else { return nil }
        guard text.utf8.count <= ServerLimits.maxIdempotencyKeyBytes else {
            throw RequestFailure(
                .invalidArgument, "idempotency_key must be at most \(ServerLimits.maxIdempotencyKeyBytes) bytes")
        }
        return text
    }

    /// A page size from the wire: 0 means 100.
    func pageSize(_ value: UInt32) throws -> Int {
        guard value != 0 else { return 100 }
        guard value <= UInt32(ServerLimits.maxPageSize) else {
            throw RequestFailure(.invalidArgument, "page_size must be at most \(ServerLimits.maxPageSize)")
        }
        return Int(value)
    }

    func generateDataKey(_ request: TenantRequest<Hsmgw_V1_GenerateDataKeyRequest>) async throws -> OutgoingResponse {
        let (message, tenant, call) = (request.message, request.tenant, request.call)
        let context = try EncryptionContext(message.encryptionContext)
        let idempotencyKey = try idempotencyKey(message.idempotencyKey)
        let key = try await service.generateDataKey(
            tenant,
            context: context,
            includePlaintext: message.includePlaintext,
            idempotencyKey: idempotencyKey,
            request: call.context
        )
        var response = Hsmgw_V1_GenerateDataKeyResponse()
        response.key = WireMapping.dataKey(
            id: key.id, version: key.version, wrapped: key.wrapped, plaintext: key.plaintext)
        return WireMapping.ok(response)
    }

    func generateDataKeys(_ request: TenantRequest<Hsmgw_V1_GenerateDataKeysRequest>) async throws -> OutgoingResponse {
        let (message, tenant, call) = (request.message, request.tenant, request.call)
        let context = try EncryptionContext(message.encryptionContext)
        let idempotencyKey = try idempotencyKey(message.idempotencyKey)
        guard message.count >= 1, message.count <= UInt32(ServerLimits.maxBatchKeys) else {
            throw RequestFailure(.invalidArgument, "count must be 1 to \(ServerLimits.maxBatchKeys)")
        }
        let keys = try await service.generateDataKeys(
            tenant,
            count: Int(message.count),
            context: context,
            includePlaintext: message.includePlaintext,
            idempotencyKey: idempotencyKey,
            request: call.context
        )
        var response = Hsmgw_V1_GenerateDataKeysResponse()
        response.keys = keys.map {
            WireMapping.dataKey(id: $0.id, version: $0.version, wrapped: $0.wrapped, plaintext: $0.plaintext)
        }
        return WireMapping.ok(response)
    }

    /// The key a decrypt entry names and the blob its caller kept, if any (protocol §9.3): `id`
    /// may be empty when `wrapped` is given, since the blob names its key.
    func dataKeyReference(id: String, wrapped: Data) throws -> (DataKeyID, WrappedDataKey?) {
        guard !wrapped.isEmpty else { return (try dataKeyID(id), nil) }
        // The only accepted size: a wrapped data key is fixed-size.
        guard wrapped.count == WrappedDataKey.encodedByteCount, let blob = WrappedDataKey(encoded: [UInt8](wrapped))
        else {
            throw RequestFailure(
                .invalidArgument, "wrapped must be a \(WrappedDataKey.encodedByteCount)-byte wrapped data key")
        }
        // A non-empty id that differs from the blob's is refused by the key service, as a blob
        // moved to another key is (`DECRYPTION_FAILED`).
        return (id.isEmpty ? blob.dataKeyID : try dataKeyID(id), blob)
    }

    func decryptDataKey(_ request: TenantRequest<Hsmgw_V1_DecryptDataKeyRequest>) async throws -> OutgoingResponse {
        let (message, tenant, call) = (request.message, request.tenant, request.call)
        let (id, wrapped) = try dataKeyReference(id: message.id, wrapped: message.wrapped)
        let context = try EncryptionContext(message.encryptionContext)
        let key = try await service.decryptDataKey(
            tenant, id: id, context: context, wrapped: wrapped, request: call.context)
        var response = Hsmgw_V1_DecryptDataKeyResponse()
        response.key = WireMapping.dataKey(
            id: key.id, version: key.version, wrapped: key.wrapped, plaintext: key.plaintext)
        return WireMapping.ok(response)
    }

    func decryptDataKeys(_ request: TenantRequest<Hsmgw_V1_DecryptDataKeysRequest>) async throws -> OutgoingResponse {
        let (message, tenant, call) = (request.message, request.tenant, request.call)
        guard !message.keys.isEmpty, message.keys.count <= ServerLimits.maxBatchKeys else {
            throw RequestFailure(.invalidArgument, "keys must hold 1 to \(ServerLimits.maxBatchKeys) entries")
        }
        var requests: [DataKeyRequest] = []
        requests.reserveCapacity(message.keys.count)
        for (index, entry) in message.keys.enumerated() {
            do {
                let (id, wrapped) = try dataKeyReference(id: entry.id, wrapped: entry.wrapped)
                requests.append(
                    DataKeyRequest(id: id, context: try EncryptionContext(entry.encryptionContext), wrapped: wrapped)
                )
            } catch let error as KeyServiceError {
                throw RequestFailure(.invalidArgument, "keys[\(index)]: \(error.message)")
            } catch let error as RequestFailure {
                throw RequestFailure(.invalidArgument, "keys[\(index)]: \(error.message)")
            }
        }
        let results = try await service.decryptDataKeys(tenant, requests, request: call.context)
        var response = Hsmgw_V1_DecryptDataKeysResponse()
        response.results = results.map { result in
            var entry = Hsmgw_V1_DecryptDataKeysResult()
            switch result {
            case .success(let key):
                entry.key = WireMapping.dataKey(
                    id: key.id, version: key.version, wrapped: key.wrapped, plaintext: key.plaintext)
            case .failure(let error):
                entry.error = RequestFailure(error).statusMessage
            }
            return entry
        }
        return WireMapping.ok(response)
    }

    func encrypt(_ request: TenantRequest<Hsmgw_V1_EncryptRequest>) async throws -> OutgoingResponse {
        let (message, tenant, call) = (request.message, request.tenant, request.call)
        let id = try dataKeyID(message.dataKeyID)
        let context = try EncryptionContext(message.encryptionContext)
        guard message.plaintext.count <= ServerLimits.maxEncryptPlaintextBytes else {
            throw RequestFailure(
                .invalidArgument, "plaintext must be at most \(ServerLimits.maxEncryptPlaintextBytes) bytes")
        }
        let ciphertext = try await service.encrypt(
            tenant, dataKey: id, plaintext: [UInt8](message.plaintext), context: context, request: call.context)
        var response = Hsmgw_V1_EncryptResponse()
        response.ciphertext = Data(ciphertext)
        return WireMapping.ok(response)
    }

    func decrypt(_ request: TenantRequest<Hsmgw_V1_DecryptRequest>) async throws -> OutgoingResponse {
        let (message, tenant, call) = (request.message, request.tenant, request.call)
        let context = try EncryptionContext(message.encryptionContext)
        guard message.ciphertext.count <= PayloadCiphertext.maximumCiphertextByteCount else {
            throw RequestFailure(
                .invalidArgument,
                "ciphertext must be at most \(PayloadCiphertext.maximumCiphertextByteCount) bytes"
            )
        }
        let ciphertext = [UInt8](message.ciphertext)
        let plaintext = try await service.decrypt(
            tenant, ciphertext: ciphertext, context: context, request: call.context)
        var response = Hsmgw_V1_DecryptResponse()
        response.plaintext = Data(plaintext)
        // It parsed, or decrypt would have failed.
        response.dataKeyID = (try? PayloadCiphertext(encoded: ciphertext))?.dataKeyID.description ?? ""
        return WireMapping.ok(response)
    }

    func rewrapDataKey(_ request: TenantRequest<Hsmgw_V1_RewrapDataKeyRequest>) async throws -> OutgoingResponse {
        let (message, tenant, call) = (request.message, request.tenant, request.call)
        let id = try dataKeyID(message.id)
        let context = try EncryptionContext(message.encryptionContext)
        let record = try await service.rewrapDataKey(tenant, id: id, context: context, request: call.context)
        var response = Hsmgw_V1_RewrapDataKeyResponse()
        response.key = WireMapping.dataKeyInfo(record)
        return WireMapping.ok(response)
    }

    func getDataKey(_ request: TenantRequest<Hsmgw_V1_GetDataKeyRequest>) async throws -> OutgoingResponse {
        let (message, tenant) = (request.message, request.tenant)
        let id = try dataKeyID(message.id)
        var response = Hsmgw_V1_GetDataKeyResponse()
        response.key = WireMapping.dataKeyInfo(try await service.dataKey(tenant, id: id))
        return WireMapping.ok(response)
    }

    func listDataKeys(_ request: TenantRequest<Hsmgw_V1_ListDataKeysRequest>) async throws -> OutgoingResponse {
        let (message, tenant) = (request.message, request.tenant)
        var state: DataKeyState?
        if !message.state.isEmpty {
            guard let parsed = DataKeyState(rawValue: message.state) else {
                throw RequestFailure(.invalidArgument, "state must be empty, enabled, disabled or destroyed")
            }
            state = parsed
        }
        let page = PageRequest(
            after: message.pageToken.isEmpty ? nil : message.pageToken, limit: try pageSize(message.pageSize))
        if let after = page.after { _ = try dataKeyID(after) }
        let listed = try await service.listDataKeys(tenant, state: state, page: page)
        var response = Hsmgw_V1_ListDataKeysResponse()
        response.keys = listed.items.map(WireMapping.dataKeyInfo)
        response.nextPageToken = listed.nextPage ?? ""
        return WireMapping.ok(response)
    }

    func setDataKeyState(_ request: TenantRequest<Hsmgw_V1_DataKeyStateRequest>) async throws -> OutgoingResponse {
        let (message, tenant, call) = (request.message, request.tenant, request.call)
        let id = try dataKeyID(message.id)
        let method = call.request.method
        let record: DataKeyRecord
        switch method {
        case .disableDataKey: record = try await service.disableDataKey(tenant, id: id, request: call.context)
        case .enableDataKey: record = try await service.enableDataKey(tenant, id: id, request: call.context)
        default: record = try await service.destroyDataKey(tenant, id: id, request: call.context)
        }
        var response = Hsmgw_V1_DataKeyStateResponse()
        response.key = WireMapping.dataKeyInfo(record)
        return WireMapping.ok(response)
    }
}
