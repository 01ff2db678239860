import Foundation
import GatewayConfig
import KeyHierarchy
import Logging
import PKCS11
import PKCS11KeyToken
import PostgresKeyStore
import SQLiteKeyStore

/// What to start: a validated configuration and, for `--dev`, its data directory.
public struct GatewayLaunch: Sendable {
    /// The validated configuration.
    public var configuration: GatewayConfiguration
    /// Set in development mode: the token is created when missing, and the first admin's token
    /// is printed and written to `<data-dir>/admin.token`.
    public var development: DevelopmentEnvironment?
    /// Reported in Hello and ServerInfo (the executable passes its version).
    public var serverVersion: String
    /// The wall-clock time credential checks compare token expiry with: the system's; tests
    /// pass a clock they move, instead of waiting for a token to expire.
    public var wallClock: @Sendable () -> Timestamp = { .now() }

    /// A launch of `configuration`; `development` for `--dev`.
    public init(
        configuration: GatewayConfiguration,
        development: DevelopmentEnvironment? = nil,
        serverVersion: String = "unknown"
    ) {
        self.configuration = configuration
        self.development = development
        self.serverVersion = serverVersion
    }
}

/// The first admin principal's name, made on an empty database.
let bootstrapAdminName = "admin"

extension GatewayServerApp {
    /// Loads the module (unless given), creates the dev token when needed, opens the session
    /// pool (logging in once, so a wrong PIN fails here) and the store (applying migrations).
    static func openDependencies(
        _ launch: GatewayLaunch,
        module givenModule: PKCS11Module?,
        logger: Logger
    ) async throws(GatewayStartupError) -> (
        module: PKCS11Module, ownsModule: Bool, pool: SessionPool, token: PKCS11KeyToken, store: any KeyRepository
    ) {
        let settings = launch.configuration.hsm
        let module: PKCS11Module
        if let givenModule {
            module = givenModule
        } else {
            if let conf = settings.softHSM2ConfigPath {
                // SoftHSM2 reads it once, in C_Initialize.
                setenv("SOFTHSM2_CONF", conf, 1)
            }
            do {
                module = try PKCS11Module.load(
                    path: settings.modulePath, initializeArguments: settings.initializeArguments)
            } catch {
                throw GatewayStartupError(.token, "hsm.module: cannot load \(settings.modulePath): \(error)")
            }
        }
        if let development = launch.development {
            do {
                if try development.ensureToken(module: module) {
                    logger.notice(
                        "created the dev token",
                        metadata: [
                            "label": "\(DevelopmentEnvironment.tokenLabel)", "data-dir": "\(development.dataDirectory)",
                        ]
                    )
                }
            } catch {
                throw GatewayStartupError(.token, "--dev: cannot create the SoftHSM2 token: \(error)")
            }
        }
        var poolConfiguration = SessionPoolConfiguration()
        poolConfiguration.maximumSessions = settings.maximumSessions
        poolConfiguration.acquireTimeout = settings.acquireTimeout
        if case .shamir = settings.unseal {
            // Sealed: no PIN, no session, no login until operators give their shares; the token
            // is checked as below once unsealed (SealController).
            let pool: SessionPool
            do {
                pool = try await SessionPool.sealed(
                    module: module, tokenLabel: settings.tokenLabel, configuration: poolConfiguration,
                    logger: logger.with(label: "hsm-gateway.pkcs11.pool"))
            } catch {
                throw GatewayStartupError(.token, "hsm.token_label \(settings.tokenLabel): \(error)")
            }
            do {
                let store = try await openStore(launch.configuration.store, logger: logger)
                return (
                    module, givenModule == nil, pool, PKCS11KeyToken(pool: pool, ivSource: settings.gcmIV), store
                )
            } catch {
                await pool.shutdown()
                throw error
            }
        }
        let pin: SecretBytes
        do {
            pin = try settings.pin.read()
        } catch {
            throw GatewayStartupError(.configuration, "hsm.pin: \(error)")
        }
        let pool: SessionPool
        do {
            pool = try await SessionPool(
                module: module,
                tokenLabel: settings.tokenLabel,
                pin: pin,
                configuration: poolConfiguration,
                logger: logger.with(label: "hsm-gateway.pkcs11.pool")
            )
        } catch let error as PKCS11Error where error.code == .loginRefused {
            throw GatewayStartupError(
                .login,
                "hsm.pin: the token \(settings.tokenLabel) refused the user PIN "
                    + "(\(error.returnValue.map(\.name) ?? "C_Login failed")); one login was attempted and no "
                    + "other will be: correct the PIN and start again"
            )
        } catch {
            throw GatewayStartupError(
                .token, "hsm.token_label \(settings.tokenLabel): cannot open a logged-in session: \(error)")
        }
        // The token must do what the gateway needs, the way real calls do it; a token that cannot
        // (no AES-GCM, say) is refused here, naming what failed, instead of serving INTERNAL later.
        // A token without AES-GCM is refused before anything is made on it, naming the mechanism:
        // every master-key wrap is AES-GCM and no fallback is built in (docs/hsm/README.md).
        if let slot = try? module.slot(tokenLabel: settings.tokenLabel),
            let mechanisms = try? module.mechanisms(slot),
            !mechanisms.contains(where: { $0.mechanism == .aesGCM })
        {
            await pool.shutdown()
            throw GatewayStartupError(
                .token,
                "hsm.token_label \(settings.tokenLabel): the token does not list CKM_AES_GCM (C_GetMechanismList), "
                    + "which the gateway needs for every master-key wrap; no fallback is built in: see "
                    + "docs/hsm/README.md and run hsm-admin preflight"
            )
        }
        let token = PKCS11KeyToken(pool: pool, ivSource: settings.gcmIV)
        do {
            try await token.prepareProbeKey()
            try await token.checkHealth()
        } catch {
            await pool.shutdown()
            throw GatewayStartupError(
                .token,
                "hsm.token_label \(settings.tokenLabel): the token cannot do what the gateway needs "
                    + "(an AES-GCM round trip under a key made by the master-key policy, hsm.gcm_iv: "
                    + "\(settings.gcmIV)): \(error.detail)\(Self.gcmIVAdvice(error.detail, settings.gcmIV))"
            )
        }
        do {
            let store = try await openStore(
                launch.configuration.store,
                applicationName: BackgroundLease.holderID(instanceID: launch.configuration.instanceID),
                logger: logger)
            return (module, givenModule == nil, pool, token, store)
        } catch {
            await pool.shutdown()
            throw error
        }
    }

    /// What to change when the start-up round trip failed the way a mismatched `hsm.gcm_iv` fails:
    /// an HSM in FIPS mode refuses an IV chosen by the caller (`CKR_MECHANISM_PARAM_INVALID` from
    /// `C_EncryptInit`), and a module that takes caller IVs does not generate one.
    static func gcmIVAdvice(_ detail: String, _ source: GCMIVSource) -> String {
        if source == .gateway, detail.contains("C_EncryptInit"), detail.contains("CKR_MECHANISM_PARAM_INVALID") {
            return "; this HSM refuses IVs chosen by the caller (FIPS mode): set hsm.gcm_iv: token "
                + "(docs/hsm/README.md)"
        }
        // (A 16-byte IV appended by old Luna firmware is also ivNotGenerated; its detail says what to do.)
        if source == .token, detail.contains("IV buffer as given") {
            return "; this module takes IVs from the caller: set hsm.gcm_iv: gateway (docs/hsm/README.md)"
        }
        if source == .message, detail.contains("C_MessageEncryptInit") {
            return "; this module has no PKCS#11 3.0 message-based encryption: set hsm.gcm_iv: gateway, or token "
                + "for an HSM that generates IVs in C_Encrypt (docs/hsm/README.md)"
        }
        if !detail.contains("CKM_AES_GCM"), detail.contains("CKR_MECHANISM_INVALID") {
            return "; the token has no usable CKM_AES_GCM, which the gateway requires (docs/hsm/README.md)"
        }
        return ""
    }

    package static func openStore(_ settings: StoreSettings, applicationName: String? = nil, logger: Logger)
        async throws(GatewayStartupError)
        -> any KeyRepository
    {
        switch settings {
        case .sqlite(let path):
            do {
                return try await SQLiteKeyStore.open(path: path, logger: logger.with(label: "hsm-gateway.sqlite"))
            } catch {
                throw GatewayStartupError(.store, "store.sqlite.path \(path): cannot open: \(error)")
            }
        case .postgres(let postgres):
            var password: String?
            if let file = postgres.passwordFile {
                do {
                    // The PIN reader's rules fit a password file: owner-only mode, one newline dropped.
                    let secret = try PINSource.file(file).read()
                    password = secret.withUnsafeBytes { String(decoding: $0, as: UTF8.self) }
                } catch {
                    throw GatewayStartupError(.configuration, "store.postgres.password_file: \(error)")
                }
            }
            var configuration = PostgresKeyStoreConfiguration(
                host: postgres.host,
                port: postgres.port,
                unixSocketPath: postgres.unixSocketPath,
                username: postgres.user,
                password: password,
                database: postgres.database,
                maximumConnections: postgres.maximumConnections,
                tls: postgres.tls,
                failoverServers: postgres.failoverServers,
                standbyDurability: postgres.standbyDurability
            )
            configuration.applicationName = applicationName
            do {
                return try await PostgresKeyStore.open(
                    configuration, logger: logger.with(label: "hsm-gateway.postgres"))
            } catch {
                let target = postgres.unixSocketPath.map { "unix:\($0)" } ?? "\(postgres.host):\(postgres.port)"
                throw GatewayStartupError(.store, "store.postgres \(target) database \(postgres.database): \(error)")
            }
        }
    }

    /// Creates the first admin on an empty database. Development: always, printed once and written
    /// to `<data-dir>/admin.token`. Production: only with `auth.bootstrap_token_file`, written
    /// there (never logged). Returns the new token, or nil when principals already existed.
    static func bootstrap(
        _ launch: GatewayLaunch,
        service: KeyService,
        logger: Logger
    ) async throws(GatewayStartupError) -> String? {
        let name = PrincipalName(trusted: bootstrapAdminName)
        if let development = launch.development {
            let created: (principal: PrincipalRecord, token: String)?
            do {
                created = try await service.bootstrapAdmin(name: name, request: .system("bootstrap"))
            } catch {
                throw GatewayStartupError(.bootstrap, "cannot create the first admin: \(error)")
            }
            guard let created else { return nil }
            do {
                try writePrivateFile(development.adminTokenPath, Data(created.token.utf8), replace: true)
            } catch {
                throw GatewayStartupError(.bootstrap, "cannot write \(development.adminTokenPath): \(error)")
            }
            return created.token
        }
        let empty: Bool
        do {
            empty = try await service.listPrincipals(PageRequest(limit: 1)).items.isEmpty
        } catch {
            throw GatewayStartupError(.store, "cannot read principals: \(error)")
        }
        guard empty else { return nil }
        guard let path = launch.configuration.auth.bootstrapTokenFile else {
            logger.warning(
                "no principal exists, so nobody can connect; set auth.bootstrap_token_file to create the first admin"
            )
            return nil
        }
        guard !FileManager.default.fileExists(atPath: path) else {
            throw GatewayStartupError(
                .bootstrap,
                "auth.bootstrap_token_file \(path) exists but the database has no principal; it is never "
                    + "overwritten: move it away (it belongs to another database)"
            )
        }
        let created: (principal: PrincipalRecord, token: String)?
        do {
            created = try await service.bootstrapAdmin(name: name, request: .system("bootstrap"))
        } catch {
            throw GatewayStartupError(.bootstrap, "cannot create the first admin: \(error)")
        }
        guard let created else { return nil }  // another instance won the race
        do {
            try writePrivateFile(path, Data(created.token.utf8), replace: false)
        } catch {
            throw GatewayStartupError(
                .bootstrap,
                "created the admin principal but cannot write its token to auth.bootstrap_token_file: \(error); "
                    + "the token is lost: start again on an empty database"
            )
        }
        logger.notice(
            "created the first admin principal; its API token is in auth.bootstrap_token_file",
            metadata: ["principal": "\(bootstrapAdminName)", "file": "\(path)"]
        )
        return created.token
    }
}

extension Logger {
    /// This logger's level and metadata under another label.
    func with(label: String) -> Logger {
        var logger = Logger(label: label)
        logger.logLevel = logLevel
        for (key, value) in handler.metadata { logger[metadataKey: key] = value }
        return logger
    }
}
