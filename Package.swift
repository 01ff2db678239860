// swift-tools-version:6.1
import PackageDescription

// Layers, one direction: C shim → safe PKCS#11 wrapper → (later) domain core → adapters.
// Nothing depends on an executable target; executables are thin `main` files over libraries.
let package = Package(
    name: "hsm-gateway",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "PKCS11", targets: ["PKCS11"]),
        .executable(name: "hsm-gateway", targets: ["hsm-gateway"]),
        .executable(name: "hsm-admin", targets: ["hsm-admin"]),
        .executable(name: "hsm-bench", targets: ["hsm-bench"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-collections", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.2.2"),
    ],
    targets: [
        // The only C in the tree: PKCS#11 headers from p11-kit, dlopen and the entry points.
        .target(
            name: "CPKCS11Shim",
            cSettings: [.unsafeFlags(["-Wall", "-Wextra", "-Werror"])],
            linkerSettings: [.linkedLibrary("dl")]
        ),
        // Safe Swift PKCS#11: no `CK_*` type in its public API.
        .target(
            name: "PKCS11",
            dependencies: [
                "CPKCS11Shim",
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "Logging", package: "swift-log"),
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
                "GatewayConfig",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .executableTarget(name: "hsm-admin", dependencies: ["HSMAdmin"]),
        .executableTarget(
            name: "hsm-gateway",
            dependencies: ["HSMAdmin", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        .executableTarget(
            name: "hsm-bench",
            dependencies: [
                "PKCS11",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // One SoftHSM2 fixture per test process (C_Initialize and SOFTHSM2_CONF are process-wide),
        // shared by every test target.
        .target(name: "SoftHSMTestSupport", dependencies: ["PKCS11"], path: "Tests/SoftHSMTestSupport"),
        .testTarget(
            name: "PKCS11Tests",
            dependencies: ["PKCS11", "SoftHSMTestSupport"],
            resources: [.process("Resources")]
        ),
        .testTarget(name: "GatewayConfigTests", dependencies: ["GatewayConfig"]),
        .testTarget(
            name: "HSMAdminTests", dependencies: ["HSMAdmin", "GatewayConfig", "PKCS11", "SoftHSMTestSupport"]),
    ],
    swiftLanguageModes: [.v6]
)
