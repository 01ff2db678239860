import KeyHierarchy
import PostgresNIO

// Principals, role bindings and API tokens (migration 2). A principal is read with its bindings
// in one statement: the principals (filtered and limited) left-joined to their bindings, rows
// ordered by name, scope and role, then folded into records.

extension PostgresTransaction {
    /// The principal columns of the joined rows, in the order `AccessRows` decodes them.
    static let principalColumns = "p.name, p.certificate_common_name, p.disabled, p.created_at, b.scope, b.role"
    static let tokenColumns = "id, principal, hash, description, created_at, expires_at, revoked_at"

    // MARK: Principals

    func insertPrincipal(_ principal: PrincipalRecord) async throws {
        try requireWritable("insertPrincipal")
        try await run(
            """
            INSERT INTO principals (name, certificate_common_name, disabled, created_at) \
            VALUES (\(principal.name.rawValue), \(principal.certificateCommonName?.rawValue), \
            \(principal.disabled), \(principal.createdAt.millisecondsSinceEpoch))
            """,
            "insertPrincipal"
        )
        guard !principal.roles.isEmpty else { return }
        let scopes = principal.roles.map(\.scope.rawValue)
        let roles = principal.roles.map(\.role.rawValue)
        try await run(
            """
            INSERT INTO role_bindings (principal, scope, role) \
            SELECT \(principal.name.rawValue), s, r FROM UNNEST(\(scopes)::text[], \(roles)::text[]) AS b (s, r) \
            ON CONFLICT DO NOTHING
            """,
            "insertPrincipal: roles"
        )
    }

    func principal(_ name: PrincipalName) async throws -> PrincipalRecord? {
        let rows = try await run(
            """
            SELECT \(unescaped: Self.principalColumns) FROM principals p \
            LEFT JOIN role_bindings b ON b.principal = p.name \
            WHERE p.name = \(name.rawValue) ORDER BY b.scope, b.role
            """,
            "principal"
        )
        return try AccessRows.principals(rows).first
    }

    func principal(certificateCommonName commonName: CertificateCommonName) async throws -> PrincipalRecord? {
        let rows = try await run(
            """
            SELECT \(unescaped: Self.principalColumns) FROM principals p \
            LEFT JOIN role_bindings b ON b.principal = p.name \
            WHERE p.certificate_common_name = \(commonName.rawValue) ORDER BY b.scope, b.role
            """,
            "principal(certificateCommonName:)"
        )
        return try AccessRows.principals(rows).first
    }

    func principals(after: PrincipalName?, limit: Int) async throws -> [PrincipalRecord] {
        let limit = Self.clamped(limit)
        let query: PostgresQuery =
            if let after {
                """
                SELECT \(unescaped: Self.principalColumns) FROM \
                (SELECT * FROM principals WHERE name > \(after.rawValue) ORDER BY name LIMIT \(limit)) p \
                LEFT JOIN role_bindings b ON b.principal = p.name ORDER BY p.name, b.scope, b.role
                """
            } else {
                """
                SELECT \(unescaped: Self.principalColumns) FROM \
                (SELECT * FROM principals ORDER BY name LIMIT \(limit)) p \
                LEFT JOIN role_bindings b ON b.principal = p.name ORDER BY p.name, b.scope, b.role
                """
            }
        return try AccessRows.principals(try await run(query, "principals"))
    }

    func countPrincipals() async throws -> Int64 {
        let result = try await run("SELECT count(*) FROM principals", "countPrincipals")
        return try PostgresKeyStore.decode(result.first, as: Int64.self, operation: "countPrincipals")
    }

    /// SHARE ROW EXCLUSIVE conflicts with itself and with the ROW EXCLUSIVE lock every INSERT
    /// takes, so two transactions that each check "no principal yet" run one after the other;
    /// plain reads go on.
    func lockPrincipals() async throws {
        try requireWritable("lockPrincipals")
        try await run("LOCK TABLE principals IN SHARE ROW EXCLUSIVE MODE", "lockPrincipals")
    }

    func setPrincipalDisabled(_ name: PrincipalName, _ disabled: Bool) async throws -> Bool {
        try requireWritable("setPrincipalDisabled")
        let result = try await run(
            "UPDATE principals SET disabled = \(disabled) WHERE name = \(name.rawValue)",
            "setPrincipalDisabled"
        )
        return (result.metadata.rows ?? 0) > 0
    }

    func insertRoleBinding(_ name: PrincipalName, _ binding: RoleBinding) async throws -> Bool {
        try requireWritable("insertRoleBinding")
        let result = try await run(
            """
            INSERT INTO role_bindings (principal, scope, role) \
            VALUES (\(name.rawValue), \(binding.scope.rawValue), \(binding.role.rawValue)) ON CONFLICT DO NOTHING
            """,
            "insertRoleBinding"
        )
        return (result.metadata.rows ?? 0) > 0
    }

    func deleteRoleBinding(_ name: PrincipalName, _ binding: RoleBinding) async throws -> Bool {
        try requireWritable("deleteRoleBinding")
        let result = try await run(
            """
            DELETE FROM role_bindings WHERE principal = \(name.rawValue) \
            AND scope = \(binding.scope.rawValue) AND role = \(binding.role.rawValue)
            """,
            "deleteRoleBinding"
        )
        return (result.metadata.rows ?? 0) > 0
    }

    // MARK: API tokens

    func insertAPIToken(_ token: APITokenRecord) async throws {
        try requireWritable("insertAPIToken")
        try await run(
            """
            INSERT INTO api_tokens (\(unescaped: Self.tokenColumns)) VALUES (\(token.id.rawValue), \
            \(token.principal.rawValue), \(ByteBuffer(bytes: token.hash)), \(token.description), \
            \(token.createdAt.millisecondsSinceEpoch), \(token.expiresAt?.millisecondsSinceEpoch), \
            \(token.revokedAt?.millisecondsSinceEpoch))
            """,
            "insertAPIToken"
        )
    }

    func apiToken(hash: [UInt8]) async throws -> APITokenRecord? {
        let result = try await run(
            "SELECT \(unescaped: Self.tokenColumns) FROM api_tokens WHERE hash = \(ByteBuffer(bytes: hash))",
            "apiToken(hash:)"
        )
        return try result.first.map { try AccessRows.token($0) }
    }

    func apiToken(_ id: APITokenID) async throws -> APITokenRecord? {
        let result = try await run(
            "SELECT \(unescaped: Self.tokenColumns) FROM api_tokens WHERE id = \(id.rawValue)",
            "apiToken"
        )
        return try result.first.map { try AccessRows.token($0) }
    }

    func apiTokens(principal: PrincipalName?, after: APITokenID?, limit: Int) async throws -> [APITokenRecord] {
        let limit = Self.clamped(limit)
        let columns = Self.tokenColumns
        let query: PostgresQuery =
            switch (principal, after) {
            case (nil, nil):
                "SELECT \(unescaped: columns) FROM api_tokens ORDER BY id LIMIT \(limit)"
            case (nil, let after?):
                "SELECT \(unescaped: columns) FROM api_tokens WHERE id > \(after.rawValue) ORDER BY id LIMIT \(limit)"
            case (let principal?, nil):
                """
                SELECT \(unescaped: columns) FROM api_tokens WHERE principal = \(principal.rawValue) \
                ORDER BY id LIMIT \(limit)
                """
            case (let principal?, let after?):
                """
                SELECT \(unescaped: columns) FROM api_tokens WHERE principal = \(principal.rawValue) \
                AND id > \(after.rawValue) ORDER BY id LIMIT \(limit)
                """
            }
        return try await run(query, "apiTokens").map(AccessRows.token)
    }

    func revokeAPIToken(_ id: APITokenID, at time: Timestamp) async throws -> Bool {
        try requireWritable("revokeAPIToken")
        let result = try await run(
            """
            UPDATE api_tokens SET revoked_at = \(time.millisecondsSinceEpoch) \
            WHERE id = \(id.rawValue) AND revoked_at IS NULL
            """,
            "revokeAPIToken"
        )
        return (result.metadata.rows ?? 0) > 0
    }
}

/// Decoders for the access-control rows. A value that does not parse is `.corrupt`.
enum AccessRows {
    /// Folds joined principal/binding rows (ordered by name) into records.
    static func principals(_ rows: some Sequence<PostgresRow>) throws -> [PrincipalRecord] {
        var records: [PrincipalRecord] = []
        for row in rows {
            let (name, commonName, disabled, created, scope, role) = try decodeRow(
                row,
                as: (String, String?, Bool, Int64, String?, String?).self,
                operation: "principals"
            )
            if records.last?.name.rawValue != name {
                records.append(
                    PrincipalRecord(
                        name: PrincipalName(trusted: name),
                        certificateCommonName: commonName.map(CertificateCommonName.init(trusted:)),
                        roles: [],
                        createdAt: Timestamp(millisecondsSinceEpoch: created),
                        disabled: disabled
                    )
                )
            }
            if let scope, let role {
                records[records.count - 1].roles.append(try binding(scope: scope, role: role))
            }
        }
        return records
    }

    private static func binding(scope: String, role: String) throws -> RoleBinding {
        guard let role = Role(rawValue: role) else {
            throw StorageError(.corrupt, "role_bindings.role holds an unknown value")
        }
        let parsed = scope == TenantScope.allMarker ? TenantScope.all : .tenant(TenantID(trusted: scope))
        return RoleBinding(scope: parsed, role: role)
    }

    static func token(_ row: PostgresRow) throws -> APITokenRecord {
        let (id, principal, hash, description, created, expires, revoked) = try decodeRow(
            row,
            as: (String, String, ByteBuffer, String, Int64, Int64?, Int64?).self,
            operation: "api_tokens"
        )
        guard hash.readableBytes == 32 else {
            throw StorageError(.corrupt, "api_tokens.hash is not 32 bytes")
        }
        return APITokenRecord(
            id: APITokenID(trusted: id),
            principal: PrincipalName(trusted: principal),
            hash: Array(hash.readableBytesView),
            description: description,
            createdAt: Timestamp(millisecondsSinceEpoch: created),
            expiresAt: expires.map(Timestamp.init(millisecondsSinceEpoch:)),
            revokedAt: revoked.map(Timestamp.init(millisecondsSinceEpoch:))
        )
    }
}
