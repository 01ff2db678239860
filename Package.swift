// swift-tools-version:6.1
import PackageDescription

// Layers, one direction: C shim → safe PKCS#11 wrapper → (later) domain core → adapters.
// Nothing depends on an executable target; executables are thin `main` files over libraries.
let package = Package(
    name: "hsm-gateway",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "PKCS11", targets: ["PKCS11"]),
        .library(name: "KeyHierarchy", targets: ["KeyHierarchy"]),
        .library(name: "GatewayClient", targets: ["GatewayClient"]),
        .executable(name: "hsm-gateway", targets: ["hsm-gateway"]),
        .executable(name: "hsm-admin", targets: ["hsm-admin"]),
        .executable(name: "hsm-bench", targets: ["hsm-bench"]),
        .executable(name: "hsmgw", targets: ["hsmgw"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-collections", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.2.2"),
        .package(url: "https://github.com/apple/swift-crypto", from: "4.5.2"),
        .package(url: "https://github.com/vapor/postgres-nio", from: "1.33.2"),
        .package(url: "https://github.com/vapor/sqlite-nio", from: "1.13.2"),
        .package(url: "https://github.com/apple/swift-protobuf", from: "1.39.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
    ],
    targets: [
        // The only C in the tree: PKCS#11 headers from p11-kit, dlopen and the entry points.
        .target(
            name: "CPKCS11Shim",
            cSettings: [.unsafeFlags(["-Wall", "-Wextra", "-Werror"])],
            linkerSettings: [.linkedLibrary("dl")]
        ),
        // Zeroed-on-release memory for PINs and key material; needs nothing else.
        .target(name: "SecretMemory"),
        // Shamir's secret sharing over GF(256) and the seal state machine: pure logic, no I/O, so
        // the gateway and hsm-admin share one implementation (docs/sealing.md).
        .target(
            name: "Sealing",
            dependencies: ["SecretMemory", .product(name: "Crypto", package: "swift-crypto")]
        ),
        // Safe Swift PKCS#11: no `CK_*` type in its public API.
        .target(
            name: "PKCS11",
            dependencies: [
                "CPKCS11Shim",
                "SecretMemory",
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The domain core: tenants, master-key versions, data keys, audit. It imports no NIO, no
        // database driver and no PKCS#11: it defines the ports (`MasterKeyToken`, `KeyRepository`)
        // that the adapters below implement.
        .target(
            name: "KeyHierarchy",
            dependencies: [
                "SecretMemory",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Adapter: master keys on a PKCS#11 token, through the session pool.
        .target(name: "PKCS11KeyToken", dependencies: ["KeyHierarchy", "PKCS11"]),
        // Adapter: the key repository on PostgreSQL (production, shared by several instances).
        .target(
            name: "PostgresKeyStore",
            dependencies: [
                "KeyHierarchy",
                .product(name: "PostgresNIO", package: "postgres-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Adapter: the key repository in one SQLite file (the embedded single-node default).
        .target(
            name: "SQLiteKeyStore",
            dependencies: [
                "KeyHierarchy",
                .product(name: "SQLiteNIO", package: "sqlite-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The wire protocol: an I/O-free frame decoder and encoder with named limits, the method
        // table, status codes, and the protobuf messages (generated once and committed; see
        // scripts/generate-protos.sh).
        .target(
            name: "GatewayWire",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ]
        ),
        // The server's transport: listeners (TLS, mTLS, plaintext on loopback), the connection
        // state machine (handshake, requests in flight, cancel, deadlines, keepalive, goaway),
        // per-tenant fair admission, and the HTTP endpoint for health and metrics. It knows no key
        // service: requests go to a `GatewayRequestHandler`.
        .target(
            name: "GatewayTransport",
            dependencies: [
                "GatewayWire",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        // The gateway server: configuration, authentication and authorisation, the dispatch of
        // every method to the key service, dev mode, and start-up.
        .target(
            name: "GatewayServer",
            dependencies: [
                "GatewayTransport",
                "GatewayWire",
                "GatewayConfig",
                "KeyHierarchy",
                "PKCS11",
                "PKCS11KeyToken",
                "PostgresKeyStore",
                "SQLiteKeyStore",
                "Sealing",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Yams", package: "Yams"),
            ]
        ),
        // The Swift client library: multiplexed connections, retries, TLS, and envelope
        // encryption. It never links the domain core or the server.
        .target(
            name: "GatewayClient",
            dependencies: [
                "GatewayWire",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Backup and restore of a store: one consistent snapshot to a checksummed file, loaded
        // into an empty database only after its audit log verified with the token.
        .target(
            name: "StoreBackup",
            dependencies: [
                "KeyHierarchy",
                "PostgresKeyStore",
                "SQLiteKeyStore",
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        // The gateway's configuration file and PIN sources.
        .target(
            name: "GatewayConfig",
            dependencies: ["PKCS11", .product(name: "Yams", package: "Yams")]
        ),
        // The operator CLI's commands, as a library so tests can drive them in-process.
        .target(
            name: "HSMAdmin",
            dependencies: [
                "PKCS11",
                "Sealing",
                "GatewayConfig",
                "GatewayClient",
                "GatewayWire",
                // backup and restore open the store and the token as the gateway does.
                "GatewayServer",
                "KeyHierarchy",
                "PKCS11KeyToken",
                "StoreBackup",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        .executableTarget(name: "hsm-admin", dependencies: ["HSMAdmin"]),
        // The data-plane CLI's commands (encrypt, decrypt, data keys, rewrap), as a library so
        // tests can drive them in-process. It reuses hsm-admin's connection settings, token files,
        // exit codes and output from HSMAdmin rather than repeating them.
        .target(
            name: "DataPlaneCLI",
            dependencies: [
                "HSMAdmin",
                "GatewayClient",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .executableTarget(name: "hsmgw", dependencies: ["DataPlaneCLI"]),
        .executableTarget(
            name: "hsm-gateway",
            dependencies: [
                "GatewayServer",
                "HSMAdmin",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .executableTarget(
            name: "hsm-bench",
            dependencies: [
                "PKCS11",
                "KeyHierarchy",
                "PKCS11KeyToken",
                "PostgresKeyStore",
                "SQLiteKeyStore",
                "GatewayConfig",
                "GatewayServer",
                "GatewayClient",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ]
        ),
        // One SoftHSM2 fixture per test process (C_Initialize and SOFTHSM2_CONF are process-wide),
        // shared by every test target.
        // It also builds and loads the tests' fault-injecting module (Tests/FaultInjection), which
        // forwards to SoftHSM2; the C file is compiled at run time, not by SwiftPM.
        .target(
            name: "SoftHSMTestSupport", dependencies: ["PKCS11", "ProcessTestSupport"], path: "Tests/SoftHSMTestSupport"
        ),
        .testTarget(
            name: "PKCS11Tests",
            dependencies: ["PKCS11", "SoftHSMTestSupport", "ProcessTestSupport"],
            resources: [.process("Resources")]
        ),
        // A throwaway PostgreSQL cluster per test process: initdb into a temporary directory,
        // loopback and a Unix socket, a free port.
        .target(name: "PostgresTestSupport", dependencies: ["ProcessTestSupport"], path: "Tests/PostgresTestSupport"),
        // Child processes (posix_spawn, not Foundation's Process), temporary directories and a
        // throwaway PKI made with the openssl CLI, for the tests that start servers and tools.
        .target(name: "ProcessTestSupport", path: "Tests/ProcessTestSupport"),
        // One `hsm-gateway --dev` child process per test process, for the CLIs' end-to-end tests.
        .target(
            name: "DevGatewayTestSupport", dependencies: ["ProcessTestSupport"], path: "Tests/DevGatewayTestSupport"
        ),
        // The hex blocks of docs/*.md, for golden-byte tests of what the code builds.
        .target(name: "DocumentTestSupport", path: "Tests/DocumentTestSupport"),
        .testTarget(name: "GatewayConfigTests", dependencies: ["GatewayConfig"]),
        .testTarget(
            name: "GatewayTransportTests",
            dependencies: [
                "GatewayTransport",
                "GatewayWire",
                "DocumentTestSupport",
                "ProcessTestSupport",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOTestUtils", package: "swift-nio"),
            ]
        ),
        // The client without the real server: envelope format, retry policy, and connections against
        // a small raw-frame server on loopback.
        .testTarget(
            name: "GatewayClientTests",
            dependencies: [
                "GatewayClient",
                "GatewayWire",
                "DocumentTestSupport",
                "ProcessTestSupport",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ]
        ),
        // End to end over loopback: the server with a real SoftHSM2 token and both stores, the
        // client, TLS and mTLS, malformed input, auth, deadlines, drain.
        .testTarget(
            name: "GatewayServerTests",
            dependencies: [
                "GatewayServer",
                // hsm-config/ examples are loaded by both the gateway's and preflight's readers.
                "GatewayConfig",
                "HSMAdmin",
                "GatewayTransport",
                "GatewayClient",
                "GatewayWire",
                "KeyHierarchy",
                "PKCS11",
                "SoftHSMTestSupport",
                "PostgresTestSupport",
                "ProcessTestSupport",
                "Sealing",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ]
        ),
        .testTarget(
            name: "GatewayWireTests",
            dependencies: [
                "GatewayWire",
                "DocumentTestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOTestUtils", package: "swift-nio"),
            ]
        ),
        // Pure unit tests of the domain's logic (encodings, state rules, audit chain).
        .testTarget(
            name: "KeyHierarchyTests",
            dependencies: ["KeyHierarchy", "DocumentTestSupport", .product(name: "Crypto", package: "swift-crypto")]
        ),
        // One conformance suite, run against both stores, on a real SoftHSM2 token.
        .testTarget(
            name: "KeyStoreConformanceTests",
            dependencies: [
                "KeyHierarchy",
                "PKCS11KeyToken",
                "PostgresKeyStore",
                "SQLiteKeyStore",
                "StoreBackup",
                "PKCS11",
                "SoftHSMTestSupport",
                "PostgresTestSupport",
                "ProcessTestSupport",
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        // Pure unit tests of secret sharing and the seal state machine.
        .testTarget(name: "SealingTests", dependencies: ["Sealing", "SecretMemory"]),
        .testTarget(
            name: "HSMAdminTests",
            dependencies: [
                "HSMAdmin", "GatewayConfig", "GatewayClient", "GatewayWire", "PKCS11", "SoftHSMTestSupport",
                "ProcessTestSupport", "DevGatewayTestSupport", "Sealing",
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        // hsmgw against a real `hsm-gateway --dev`: round trips with the Swift library both ways,
        // tampering, limits, data keys, rewrap, and the executable's memory on a large input.
        .testTarget(
            name: "DataPlaneCLITests",
            dependencies: [
                "DataPlaneCLI", "HSMAdmin", "GatewayClient", "ProcessTestSupport", "DevGatewayTestSupport",
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
