from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class APITokenInfo(_message.Message):
    __slots__ = ["created_at_ms", "description", "expires_at_ms", "id", "principal", "revoked_at_ms"]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    created_at_ms: int
    description: str
    expires_at_ms: int
    id: str
    principal: str
    revoked_at_ms: int
    def __init__(self, id: _Optional[str] = ..., principal: _Optional[str] = ..., description: _Optional[str] = ..., created_at_ms: _Optional[int] = ..., expires_at_ms: _Optional[int] = ..., revoked_at_ms: _Optional[int] = ...) -> None: ...

class AuditRecordInfo(_message.Message):
    __slots__ = ["detail", "hash", "key_ids", "operation", "outcome", "previous_hash", "principal", "request_id", "sequence", "tenant", "time_ms"]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_HASH_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    detail: str
    hash: bytes
    key_ids: _containers.RepeatedScalarFieldContainer[str]
    operation: str
    outcome: str
    previous_hash: bytes
    principal: str
    request_id: str
    sequence: int
    tenant: str
    time_ms: int
    def __init__(self, sequence: _Optional[int] = ..., time_ms: _Optional[int] = ..., principal: _Optional[str] = ..., tenant: _Optional[str] = ..., operation: _Optional[str] = ..., key_ids: _Optional[_Iterable[str]] = ..., outcome: _Optional[str] = ..., request_id: _Optional[str] = ..., detail: _Optional[str] = ..., previous_hash: _Optional[bytes] = ..., hash: _Optional[bytes] = ...) -> None: ...

class CreateAPITokenRequest(_message.Message):
    __slots__ = ["description", "principal", "ttl_seconds"]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    description: str
    principal: str
    ttl_seconds: int
    def __init__(self, principal: _Optional[str] = ..., description: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class CreateAPITokenResponse(_message.Message):
    __slots__ = ["info", "token"]
    INFO_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    info: APITokenInfo
    token: str
    def __init__(self, info: _Optional[_Union[APITokenInfo, _Mapping]] = ..., token: _Optional[str] = ...) -> None: ...

class CreatePrincipalRequest(_message.Message):
    __slots__ = ["certificate_common_name", "name", "roles"]
    CERTIFICATE_COMMON_NAME_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    certificate_common_name: str
    name: str
    roles: _containers.RepeatedCompositeFieldContainer[RoleBinding]
    def __init__(self, name: _Optional[str] = ..., certificate_common_name: _Optional[str] = ..., roles: _Optional[_Iterable[_Union[RoleBinding, _Mapping]]] = ...) -> None: ...

class CreateTenantRequest(_message.Message):
    __slots__ = ["idempotency_key", "tenant"]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    idempotency_key: str
    tenant: str
    def __init__(self, tenant: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class CreateTenantResponse(_message.Message):
    __slots__ = ["tenant"]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: TenantInfo
    def __init__(self, tenant: _Optional[_Union[TenantInfo, _Mapping]] = ...) -> None: ...

class DataKey(_message.Message):
    __slots__ = ["id", "master_key_version", "plaintext", "wrapped"]
    ID_FIELD_NUMBER: _ClassVar[int]
    MASTER_KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PLAINTEXT_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_FIELD_NUMBER: _ClassVar[int]
    id: str
    master_key_version: int
    plaintext: bytes
    wrapped: bytes
    def __init__(self, id: _Optional[str] = ..., master_key_version: _Optional[int] = ..., wrapped: _Optional[bytes] = ..., plaintext: _Optional[bytes] = ...) -> None: ...

class DataKeyInfo(_message.Message):
    __slots__ = ["created_at_ms", "encryptions", "id", "master_key_version", "state", "tenant", "updated_at_ms"]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTIONS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    MASTER_KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    created_at_ms: int
    encryptions: int
    id: str
    master_key_version: int
    state: str
    tenant: str
    updated_at_ms: int
    def __init__(self, tenant: _Optional[str] = ..., id: _Optional[str] = ..., master_key_version: _Optional[int] = ..., state: _Optional[str] = ..., encryptions: _Optional[int] = ..., created_at_ms: _Optional[int] = ..., updated_at_ms: _Optional[int] = ...) -> None: ...

class DataKeyReference(_message.Message):
    __slots__ = ["encryption_context", "id", "wrapped"]
    class EncryptionContextEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ENCRYPTION_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_FIELD_NUMBER: _ClassVar[int]
    encryption_context: _containers.ScalarMap[str, str]
    id: str
    wrapped: bytes
    def __init__(self, id: _Optional[str] = ..., encryption_context: _Optional[_Mapping[str, str]] = ..., wrapped: _Optional[bytes] = ...) -> None: ...

class DataKeyStateRequest(_message.Message):
    __slots__ = ["id", "tenant"]
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    id: str
    tenant: str
    def __init__(self, tenant: _Optional[str] = ..., id: _Optional[str] = ...) -> None: ...

class DataKeyStateResponse(_message.Message):
    __slots__ = ["key"]
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: DataKeyInfo
    def __init__(self, key: _Optional[_Union[DataKeyInfo, _Mapping]] = ...) -> None: ...

class DecryptDataKeyRequest(_message.Message):
    __slots__ = ["encryption_context", "id", "tenant", "wrapped"]
    class EncryptionContextEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ENCRYPTION_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_FIELD_NUMBER: _ClassVar[int]
    encryption_context: _containers.ScalarMap[str, str]
    id: str
    tenant: str
    wrapped: bytes
    def __init__(self, tenant: _Optional[str] = ..., id: _Optional[str] = ..., encryption_context: _Optional[_Mapping[str, str]] = ..., wrapped: _Optional[bytes] = ...) -> None: ...

class DecryptDataKeyResponse(_message.Message):
    __slots__ = ["key"]
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: DataKey
    def __init__(self, key: _Optional[_Union[DataKey, _Mapping]] = ...) -> None: ...

class DecryptDataKeysRequest(_message.Message):
    __slots__ = ["keys", "tenant"]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[DataKeyReference]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ..., keys: _Optional[_Iterable[_Union[DataKeyReference, _Mapping]]] = ...) -> None: ...

class DecryptDataKeysResponse(_message.Message):
    __slots__ = ["results"]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[DecryptDataKeysResult]
    def __init__(self, results: _Optional[_Iterable[_Union[DecryptDataKeysResult, _Mapping]]] = ...) -> None: ...

class DecryptDataKeysResult(_message.Message):
    __slots__ = ["error", "key"]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    error: Status
    key: DataKey
    def __init__(self, key: _Optional[_Union[DataKey, _Mapping]] = ..., error: _Optional[_Union[Status, _Mapping]] = ...) -> None: ...

class DecryptRequest(_message.Message):
    __slots__ = ["ciphertext", "encryption_context", "tenant"]
    class EncryptionContextEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ciphertext: bytes
    encryption_context: _containers.ScalarMap[str, str]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ..., ciphertext: _Optional[bytes] = ..., encryption_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DecryptResponse(_message.Message):
    __slots__ = ["data_key_id", "plaintext"]
    DATA_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PLAINTEXT_FIELD_NUMBER: _ClassVar[int]
    data_key_id: str
    plaintext: bytes
    def __init__(self, plaintext: _Optional[bytes] = ..., data_key_id: _Optional[str] = ...) -> None: ...

class EncryptRequest(_message.Message):
    __slots__ = ["data_key_id", "encryption_context", "plaintext", "tenant"]
    class EncryptionContextEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DATA_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PLAINTEXT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    data_key_id: str
    encryption_context: _containers.ScalarMap[str, str]
    plaintext: bytes
    tenant: str
    def __init__(self, tenant: _Optional[str] = ..., data_key_id: _Optional[str] = ..., plaintext: _Optional[bytes] = ..., encryption_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class EncryptResponse(_message.Message):
    __slots__ = ["ciphertext"]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    ciphertext: bytes
    def __init__(self, ciphertext: _Optional[bytes] = ...) -> None: ...

class GenerateDataKeyRequest(_message.Message):
    __slots__ = ["encryption_context", "idempotency_key", "include_plaintext", "tenant"]
    class EncryptionContextEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ENCRYPTION_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PLAINTEXT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    encryption_context: _containers.ScalarMap[str, str]
    idempotency_key: str
    include_plaintext: bool
    tenant: str
    def __init__(self, tenant: _Optional[str] = ..., encryption_context: _Optional[_Mapping[str, str]] = ..., include_plaintext: bool = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class GenerateDataKeyResponse(_message.Message):
    __slots__ = ["key"]
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: DataKey
    def __init__(self, key: _Optional[_Union[DataKey, _Mapping]] = ...) -> None: ...

class GenerateDataKeysRequest(_message.Message):
    __slots__ = ["count", "encryption_context", "idempotency_key", "include_plaintext", "tenant"]
    class EncryptionContextEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    COUNT_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PLAINTEXT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    count: int
    encryption_context: _containers.ScalarMap[str, str]
    idempotency_key: str
    include_plaintext: bool
    tenant: str
    def __init__(self, tenant: _Optional[str] = ..., count: _Optional[int] = ..., encryption_context: _Optional[_Mapping[str, str]] = ..., include_plaintext: bool = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class GenerateDataKeysResponse(_message.Message):
    __slots__ = ["keys"]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[DataKey]
    def __init__(self, keys: _Optional[_Iterable[_Union[DataKey, _Mapping]]] = ...) -> None: ...

class GetDataKeyRequest(_message.Message):
    __slots__ = ["id", "tenant"]
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    id: str
    tenant: str
    def __init__(self, tenant: _Optional[str] = ..., id: _Optional[str] = ...) -> None: ...

class GetDataKeyResponse(_message.Message):
    __slots__ = ["key"]
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: DataKeyInfo
    def __init__(self, key: _Optional[_Union[DataKeyInfo, _Mapping]] = ...) -> None: ...

class GetTenantRequest(_message.Message):
    __slots__ = ["tenant"]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class GetTenantResponse(_message.Message):
    __slots__ = ["tenant"]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: TenantInfo
    def __init__(self, tenant: _Optional[_Union[TenantInfo, _Mapping]] = ...) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ["api_token", "client_name"]
    API_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    api_token: str
    client_name: str
    def __init__(self, api_token: _Optional[str] = ..., client_name: _Optional[str] = ...) -> None: ...

class HelloResponse(_message.Message):
    __slots__ = ["instance_id", "keepalive_seconds", "max_frame_bytes", "max_requests_in_flight", "principal", "roles", "server_version"]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    KEEPALIVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUESTS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    keepalive_seconds: int
    max_frame_bytes: int
    max_requests_in_flight: int
    principal: str
    roles: _containers.RepeatedCompositeFieldContainer[RoleBinding]
    server_version: str
    def __init__(self, server_version: _Optional[str] = ..., instance_id: _Optional[str] = ..., principal: _Optional[str] = ..., max_frame_bytes: _Optional[int] = ..., max_requests_in_flight: _Optional[int] = ..., keepalive_seconds: _Optional[int] = ..., roles: _Optional[_Iterable[_Union[RoleBinding, _Mapping]]] = ...) -> None: ...

class ListAPITokensRequest(_message.Message):
    __slots__ = ["principal"]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    principal: str
    def __init__(self, principal: _Optional[str] = ...) -> None: ...

class ListAPITokensResponse(_message.Message):
    __slots__ = ["tokens"]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[APITokenInfo]
    def __init__(self, tokens: _Optional[_Iterable[_Union[APITokenInfo, _Mapping]]] = ...) -> None: ...

class ListAuditRecordsRequest(_message.Message):
    __slots__ = ["after", "limit"]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    after: int
    limit: int
    def __init__(self, after: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ListAuditRecordsResponse(_message.Message):
    __slots__ = ["records"]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[AuditRecordInfo]
    def __init__(self, records: _Optional[_Iterable[_Union[AuditRecordInfo, _Mapping]]] = ...) -> None: ...

class ListDataKeysRequest(_message.Message):
    __slots__ = ["page_size", "page_token", "state", "tenant"]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    state: str
    tenant: str
    def __init__(self, tenant: _Optional[str] = ..., state: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDataKeysResponse(_message.Message):
    __slots__ = ["keys", "next_page_token"]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[DataKeyInfo]
    next_page_token: str
    def __init__(self, keys: _Optional[_Iterable[_Union[DataKeyInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListMasterKeysRequest(_message.Message):
    __slots__ = ["tenant"]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class ListMasterKeysResponse(_message.Message):
    __slots__ = ["versions"]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[MasterKeyInfo]
    def __init__(self, versions: _Optional[_Iterable[_Union[MasterKeyInfo, _Mapping]]] = ...) -> None: ...

class ListPrincipalsRequest(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class ListPrincipalsResponse(_message.Message):
    __slots__ = ["principals"]
    PRINCIPALS_FIELD_NUMBER: _ClassVar[int]
    principals: _containers.RepeatedCompositeFieldContainer[PrincipalInfo]
    def __init__(self, principals: _Optional[_Iterable[_Union[PrincipalInfo, _Mapping]]] = ...) -> None: ...

class ListTenantsRequest(_message.Message):
    __slots__ = ["page_size", "page_token"]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTenantsResponse(_message.Message):
    __slots__ = ["next_page_token", "tenants"]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    next_page_token: str
    tenants: _containers.RepeatedCompositeFieldContainer[TenantInfo]
    def __init__(self, tenants: _Optional[_Iterable[_Union[TenantInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class MasterKeyInfo(_message.Message):
    __slots__ = ["created_at_ms", "destroy_after_ms", "destroyed_at_ms", "invocations_reserved", "primary", "state", "tenant", "updated_at_ms", "version"]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    DESTROYED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    DESTROY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    INVOCATIONS_RESERVED_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    created_at_ms: int
    destroy_after_ms: int
    destroyed_at_ms: int
    invocations_reserved: int
    primary: bool
    state: str
    tenant: str
    updated_at_ms: int
    version: int
    def __init__(self, tenant: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[str] = ..., primary: bool = ..., invocations_reserved: _Optional[int] = ..., created_at_ms: _Optional[int] = ..., updated_at_ms: _Optional[int] = ..., destroy_after_ms: _Optional[int] = ..., destroyed_at_ms: _Optional[int] = ...) -> None: ...

class MasterKeyResponse(_message.Message):
    __slots__ = ["version"]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: MasterKeyInfo
    def __init__(self, version: _Optional[_Union[MasterKeyInfo, _Mapping]] = ...) -> None: ...

class MasterKeyVersionRequest(_message.Message):
    __slots__ = ["state", "tenant", "version", "waiting_period_days"]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WAITING_PERIOD_DAYS_FIELD_NUMBER: _ClassVar[int]
    state: str
    tenant: str
    version: int
    waiting_period_days: int
    def __init__(self, tenant: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[str] = ..., waiting_period_days: _Optional[int] = ...) -> None: ...

class PrincipalInfo(_message.Message):
    __slots__ = ["certificate_common_name", "created_at_ms", "disabled", "name", "roles"]
    CERTIFICATE_COMMON_NAME_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    DISABLED_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    certificate_common_name: str
    created_at_ms: int
    disabled: bool
    name: str
    roles: _containers.RepeatedCompositeFieldContainer[RoleBinding]
    def __init__(self, name: _Optional[str] = ..., certificate_common_name: _Optional[str] = ..., roles: _Optional[_Iterable[_Union[RoleBinding, _Mapping]]] = ..., created_at_ms: _Optional[int] = ..., disabled: bool = ...) -> None: ...

class PrincipalResponse(_message.Message):
    __slots__ = ["principal"]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    principal: PrincipalInfo
    def __init__(self, principal: _Optional[_Union[PrincipalInfo, _Mapping]] = ...) -> None: ...

class RevokeAPITokenRequest(_message.Message):
    __slots__ = ["id"]
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RevokeAPITokenResponse(_message.Message):
    __slots__ = ["info"]
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: APITokenInfo
    def __init__(self, info: _Optional[_Union[APITokenInfo, _Mapping]] = ...) -> None: ...

class RewrapDataKeyRequest(_message.Message):
    __slots__ = ["encryption_context", "id", "tenant"]
    class EncryptionContextEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ENCRYPTION_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    encryption_context: _containers.ScalarMap[str, str]
    id: str
    tenant: str
    def __init__(self, tenant: _Optional[str] = ..., id: _Optional[str] = ..., encryption_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RewrapDataKeyResponse(_message.Message):
    __slots__ = ["key"]
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: DataKeyInfo
    def __init__(self, key: _Optional[_Union[DataKeyInfo, _Mapping]] = ...) -> None: ...

class RewrapJobInfo(_message.Message):
    __slots__ = ["moved", "started_at_ms", "state", "target_version", "tenant", "total", "updated_at_ms"]
    MOVED_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TARGET_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    moved: int
    started_at_ms: int
    state: str
    target_version: int
    tenant: str
    total: int
    updated_at_ms: int
    def __init__(self, tenant: _Optional[str] = ..., target_version: _Optional[int] = ..., state: _Optional[str] = ..., moved: _Optional[int] = ..., total: _Optional[int] = ..., started_at_ms: _Optional[int] = ..., updated_at_ms: _Optional[int] = ...) -> None: ...

class RewrapJobRequest(_message.Message):
    __slots__ = ["tenant"]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class RewrapJobResponse(_message.Message):
    __slots__ = ["job"]
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: RewrapJobInfo
    def __init__(self, job: _Optional[_Union[RewrapJobInfo, _Mapping]] = ...) -> None: ...

class RoleBinding(_message.Message):
    __slots__ = ["role", "tenant"]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    role: str
    tenant: str
    def __init__(self, tenant: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class RoleRequest(_message.Message):
    __slots__ = ["principal", "role"]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    principal: str
    role: RoleBinding
    def __init__(self, principal: _Optional[str] = ..., role: _Optional[_Union[RoleBinding, _Mapping]] = ...) -> None: ...

class RotateMasterKeyRequest(_message.Message):
    __slots__ = ["activate", "idempotency_key", "tenant"]
    ACTIVATE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    activate: bool
    idempotency_key: str
    tenant: str
    def __init__(self, tenant: _Optional[str] = ..., activate: bool = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class SealProgress(_message.Message):
    __slots__ = ["mode", "sealed", "share_count", "submitted", "threshold"]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    SHARE_COUNT_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    mode: str
    sealed: bool
    share_count: int
    submitted: int
    threshold: int
    def __init__(self, mode: _Optional[str] = ..., sealed: bool = ..., submitted: _Optional[int] = ..., threshold: _Optional[int] = ..., share_count: _Optional[int] = ...) -> None: ...

class SealRequest(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class SealResponse(_message.Message):
    __slots__ = ["progress"]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    progress: SealProgress
    def __init__(self, progress: _Optional[_Union[SealProgress, _Mapping]] = ...) -> None: ...

class ServerInfoRequest(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class ServerInfoResponse(_message.Message):
    __slots__ = ["instance_id", "open_connections", "principal", "ready", "seal", "sealed", "server_version", "store", "store_reachable", "token_reachable", "uptime_seconds"]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    OPEN_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    SEAL_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    STORE_REACHABLE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_REACHABLE_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    open_connections: int
    principal: str
    ready: bool
    seal: SealProgress
    sealed: bool
    server_version: str
    store: str
    store_reachable: bool
    token_reachable: bool
    uptime_seconds: int
    def __init__(self, server_version: _Optional[str] = ..., instance_id: _Optional[str] = ..., store: _Optional[str] = ..., ready: bool = ..., sealed: bool = ..., token_reachable: bool = ..., store_reachable: bool = ..., uptime_seconds: _Optional[int] = ..., open_connections: _Optional[int] = ..., principal: _Optional[str] = ..., seal: _Optional[_Union[SealProgress, _Mapping]] = ...) -> None: ...

class ShredTenantRequest(_message.Message):
    __slots__ = ["confirm", "tenant"]
    CONFIRM_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    confirm: str
    tenant: str
    def __init__(self, tenant: _Optional[str] = ..., confirm: _Optional[str] = ...) -> None: ...

class ShredTenantResponse(_message.Message):
    __slots__ = ["audit_sequence", "deleted_data_keys", "destroyed_master_key_versions", "shredded_at_ms", "tenant"]
    AUDIT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DELETED_DATA_KEYS_FIELD_NUMBER: _ClassVar[int]
    DESTROYED_MASTER_KEY_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    SHREDDED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    audit_sequence: int
    deleted_data_keys: int
    destroyed_master_key_versions: _containers.RepeatedScalarFieldContainer[int]
    shredded_at_ms: int
    tenant: str
    def __init__(self, tenant: _Optional[str] = ..., destroyed_master_key_versions: _Optional[_Iterable[int]] = ..., deleted_data_keys: _Optional[int] = ..., shredded_at_ms: _Optional[int] = ..., audit_sequence: _Optional[int] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ["code", "message", "reason"]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    reason: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class TenantInfo(_message.Message):
    __slots__ = ["created_at_ms", "id", "primary_master_key_version", "state", "updated_at_ms"]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_MASTER_KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    created_at_ms: int
    id: str
    primary_master_key_version: int
    state: str
    updated_at_ms: int
    def __init__(self, id: _Optional[str] = ..., state: _Optional[str] = ..., primary_master_key_version: _Optional[int] = ..., created_at_ms: _Optional[int] = ..., updated_at_ms: _Optional[int] = ...) -> None: ...

class TenantStateRequest(_message.Message):
    __slots__ = ["tenant"]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class TenantStateResponse(_message.Message):
    __slots__ = ["tenant"]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: TenantInfo
    def __init__(self, tenant: _Optional[_Union[TenantInfo, _Mapping]] = ...) -> None: ...

class UnsealResetRequest(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class UnsealResetResponse(_message.Message):
    __slots__ = ["discarded", "progress"]
    DISCARDED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    discarded: bool
    progress: SealProgress
    def __init__(self, progress: _Optional[_Union[SealProgress, _Mapping]] = ..., discarded: bool = ...) -> None: ...

class UnsealSubmitShareRequest(_message.Message):
    __slots__ = ["share"]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    share: bytes
    def __init__(self, share: _Optional[bytes] = ...) -> None: ...

class UnsealSubmitShareResponse(_message.Message):
    __slots__ = ["progress"]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    progress: SealProgress
    def __init__(self, progress: _Optional[_Union[SealProgress, _Mapping]] = ...) -> None: ...

class VerifyAuditLogRequest(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class VerifyAuditLogResponse(_message.Message):
    __slots__ = ["anchored_through", "checkpoints_checked", "head_hash", "head_sequence", "intact", "problem", "problem_kind", "problem_sequence", "records_checked"]
    ANCHORED_THROUGH_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    HEAD_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    INTACT_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_KIND_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    RECORDS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    anchored_through: int
    checkpoints_checked: int
    head_hash: bytes
    head_sequence: int
    intact: bool
    problem: str
    problem_kind: str
    problem_sequence: int
    records_checked: int
    def __init__(self, intact: bool = ..., records_checked: _Optional[int] = ..., head_sequence: _Optional[int] = ..., head_hash: _Optional[bytes] = ..., problem_sequence: _Optional[int] = ..., problem: _Optional[str] = ..., checkpoints_checked: _Optional[int] = ..., anchored_through: _Optional[int] = ..., problem_kind: _Optional[str] = ...) -> None: ...
