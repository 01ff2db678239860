import KeyHierarchy
import SQLiteNIO

// Principals, role bindings and API tokens (migration 2). A principal is read with its bindings
// in one statement: the principals (filtered and limited) left-joined to their bindings, rows
// ordered by name, scope and role, then folded into records.

extension SQL {
    // MARK: Principals

    static let principalColumns = """
        p.name AS name, p.certificate_common_name AS certificate_common_name, p.disabled AS disabled, \
        p.created_at AS created_at, b.scope AS scope, b.role AS role
        """
    static let insertPrincipal =
        "INSERT INTO principals (name, certificate_common_name, disabled, created_at) VALUES (?, ?, ?, ?)"
    static func insertRoleBindings(rows: Int) -> String {
        "INSERT INTO role_bindings (principal, scope, role) VALUES "
            + repeatElement("(?, ?, ?)", count: rows).joined(separator: ", ") + " ON CONFLICT DO NOTHING"
    }
    static let principalByName = """
        SELECT \(principalColumns) FROM principals p LEFT JOIN role_bindings b ON b.principal = p.name
        WHERE p.name = ? ORDER BY b.scope, b.role
        """
    static let principalByCommonName = """
        SELECT \(principalColumns) FROM principals p LEFT JOIN role_bindings b ON b.principal = p.name
        WHERE p.certificate_common_name = ? ORDER BY b.scope, b.role
        """
    /// Binds: [after], limit.
    static func principals(after: Bool) -> String {
        "SELECT \(principalColumns) FROM (SELECT * FROM principals"
            + (after ? " WHERE name > ?" : "")
            + " ORDER BY name LIMIT ?) p LEFT JOIN role_bindings b ON b.principal = p.name"
            + " ORDER BY p.name, b.scope, b.role"
    }
    static let countPrincipals = "SELECT count(*) AS n FROM principals"
    static let setPrincipalDisabled = "UPDATE principals SET disabled = ? WHERE name = ? RETURNING 1 AS changed"
    static let insertRoleBinding = """
        INSERT INTO role_bindings (principal, scope, role) VALUES (?, ?, ?) ON CONFLICT DO NOTHING
        RETURNING 1 AS changed
        """
    static let deleteRoleBinding =
        "DELETE FROM role_bindings WHERE principal = ? AND scope = ? AND role = ? RETURNING 1 AS changed"

    // MARK: API tokens

    static let tokenColumns = "id, principal, hash, description, created_at, expires_at, revoked_at"
    static let insertAPIToken = "INSERT INTO api_tokens (\(tokenColumns)) VALUES (?, ?, ?, ?, ?, ?, ?)"
    static let apiTokenByHash = "SELECT \(tokenColumns) FROM api_tokens WHERE hash = ?"
    static let apiTokenByID = "SELECT \(tokenColumns) FROM api_tokens WHERE id = ?"
    /// Binds: [principal], [after], limit.
    static func apiTokens(principal: Bool, after: Bool) -> String {
        let conditions = (principal ? ["principal = ?"] : []) + (after ? ["id > ?"] : [])
        return "SELECT \(tokenColumns) FROM api_tokens"
            + (conditions.isEmpty ? "" : " WHERE " + conditions.joined(separator: " AND "))
            + " ORDER BY id LIMIT ?"
    }
    static let revokeAPIToken =
        "UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL RETURNING 1 AS changed"
}

extension SQLiteTransaction {
    // MARK: Principals

    func insertPrincipal(_ principal: PrincipalRecord) async throws {
        try await write(
            "insertPrincipal",
            SQL.insertPrincipal,
            [
                .text(principal.name.rawValue), .text(principal.certificateCommonName?.rawValue),
                .int(principal.disabled ? 1 : 0), .time(principal.createdAt),
            ]
        )
        guard !principal.roles.isEmpty else { return }
        var binds: [SQLiteData] = []
        binds.reserveCapacity(principal.roles.count * 3)
        for binding in principal.roles {
            binds += [.text(principal.name.rawValue), .text(binding.scope.rawValue), .text(binding.role.rawValue)]
        }
        try await write("insertPrincipal: roles", SQL.insertRoleBindings(rows: principal.roles.count), binds)
    }

    func principal(_ name: PrincipalName) async throws -> PrincipalRecord? {
        try PrincipalRecord.fold(try await run("principal", SQL.principalByName, [.text(name.rawValue)])).first
    }

    func principal(certificateCommonName commonName: CertificateCommonName) async throws -> PrincipalRecord? {
        let rows = try await run(
            "principal(certificateCommonName:)", SQL.principalByCommonName, [.text(commonName.rawValue)])
        return try PrincipalRecord.fold(rows).first
    }

    func principals(after: PrincipalName?, limit: Int) async throws -> [PrincipalRecord] {
        let limit = Self.clamped(limit)
        guard limit > 0 else { return [] }
        var binds: [SQLiteData] = []
        if let after { binds.append(.text(after.rawValue)) }
        binds.append(.int(limit))
        return try PrincipalRecord.fold(try await run("principals", SQL.principals(after: after != nil), binds))
    }

    func countPrincipals() async throws -> Int64 {
        guard let row = try await run("countPrincipals", SQL.countPrincipals).first else {
            throw StorageError(.other, "countPrincipals: count returned no row")
        }
        return try RowReader(row: row, table: "principals").int64("n")
    }

    func lockPrincipals() async throws {
        // Nothing to lock: the writer connection is exclusive for the whole transaction.
        guard writable else {
            throw StorageError(.other, "lockPrincipals: a write inside read(); use transaction()")
        }
    }

    func setPrincipalDisabled(_ name: PrincipalName, _ disabled: Bool) async throws -> Bool {
        let rows = try await write(
            "setPrincipalDisabled", SQL.setPrincipalDisabled, [.int(disabled ? 1 : 0), .text(name.rawValue)])
        return !rows.isEmpty
    }

    func insertRoleBinding(_ name: PrincipalName, _ binding: RoleBinding) async throws -> Bool {
        let rows = try await write(
            "insertRoleBinding",
            SQL.insertRoleBinding,
            [.text(name.rawValue), .text(binding.scope.rawValue), .text(binding.role.rawValue)]
        )
        return !rows.isEmpty
    }

    func deleteRoleBinding(_ name: PrincipalName, _ binding: RoleBinding) async throws -> Bool {
        let rows = try await write(
            "deleteRoleBinding",
            SQL.deleteRoleBinding,
            [.text(name.rawValue), .text(binding.scope.rawValue), .text(binding.role.rawValue)]
        )
        return !rows.isEmpty
    }

    // MARK: API tokens

    func insertAPIToken(_ token: APITokenRecord) async throws {
        try await write(
            "insertAPIToken",
            SQL.insertAPIToken,
            [
                .text(token.id.rawValue), .text(token.principal.rawValue), .bytes(token.hash),
                .text(token.description), .time(token.createdAt), .time(token.expiresAt), .time(token.revokedAt),
            ]
        )
    }

    func apiToken(hash: [UInt8]) async throws -> APITokenRecord? {
        try await run("apiToken(hash:)", SQL.apiTokenByHash, [.bytes(hash)]).first.map(APITokenRecord.init(row:))
    }

    func apiToken(_ id: APITokenID) async throws -> APITokenRecord? {
        try await run("apiToken", SQL.apiTokenByID, [.text(id.rawValue)]).first.map(APITokenRecord.init(row:))
    }

    func apiTokens(principal: PrincipalName?, after: APITokenID?, limit: Int) async throws -> [APITokenRecord] {
        let limit = Self.clamped(limit)
        guard limit > 0 else { return [] }
        var binds: [SQLiteData] = []
        if let principal { binds.append(.text(principal.rawValue)) }
        if let after { binds.append(.text(after.rawValue)) }
        binds.append(.int(limit))
        return try await run("apiTokens", SQL.apiTokens(principal: principal != nil, after: after != nil), binds)
            .map(APITokenRecord.init(row:))
    }

    func revokeAPIToken(_ id: APITokenID, at time: Timestamp) async throws -> Bool {
        let rows = try await write("revokeAPIToken", SQL.revokeAPIToken, [.time(time), .text(id.rawValue)])
        return !rows.isEmpty
    }
}

extension PrincipalRecord {
    /// Folds joined principal/binding rows (ordered by name) into records.
    static func fold(_ rows: [SQLiteRow]) throws -> [PrincipalRecord] {
        var records: [PrincipalRecord] = []
        for row in rows {
            let r = RowReader(row: row, table: "principals")
            let name = try r.text("name")
            if records.last?.name.rawValue != name {
                let disabled = try r.int("disabled")
                guard disabled == 0 || disabled == 1 else {
                    throw StorageError(.corrupt, "principals.disabled: not 0 or 1")
                }
                records.append(
                    PrincipalRecord(
                        name: PrincipalName(trusted: name),
                        certificateCommonName: try r.optionalText("certificate_common_name")
                            .map(CertificateCommonName.init(trusted:)),
                        roles: [],
                        createdAt: try r.time("created_at"),
                        disabled: disabled == 1
                    )
                )
            }
            let bindings = RowReader(row: row, table: "role_bindings")
            if let scope = try bindings.optionalText("scope") {
                guard let role = Role(rawValue: try bindings.text("role")) else {
                    throw StorageError(.corrupt, "role_bindings.role: unknown value")
                }
                let parsed = scope == TenantScope.allMarker ? TenantScope.all : .tenant(TenantID(trusted: scope))
                records[records.count - 1].roles.append(RoleBinding(scope: parsed, role: role))
            }
        }
        return records
    }
}

extension APITokenRecord {
    init(row: SQLiteRow) throws {
        let r = RowReader(row: row, table: "api_tokens")
        self.init(
            id: APITokenID(trusted: try r.text("id")),
            principal: PrincipalName(trusted: try r.text("principal")),
            hash: try r.hash("hash"),
            description: try r.text("description"),
            createdAt: try r.time("created_at"),
            expiresAt: try r.optionalTime("expires_at"),
            revokedAt: try r.optionalTime("revoked_at")
        )
    }
}
