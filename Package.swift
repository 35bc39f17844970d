// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "herald",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "Herald", targets: ["Herald"]),
        .library(name: "HeraldTesting", targets: ["HeraldTesting"]),
        .library(name: "OrderSystem", targets: ["OrderSystem"]),
        .library(name: "HeraldLog", targets: ["HeraldLog"]),
        .library(name: "HeraldWire", targets: ["HeraldWire"]),
        .library(name: "HeraldBroker", targets: ["HeraldBroker"]),
        .library(name: "HeraldClient", targets: ["HeraldClient"]),
        .executable(name: "herald", targets: ["HeraldCLI"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-collections", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-distributed-tracing", from: "1.7.3"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.3"),
    ],
    targets: [
        // The core: events, CloudEvents codec, the bus, strategies, middleware, sagas, the transport seam.
        // No NIO and no I/O here.
        .target(
            name: "Herald",
            dependencies: [
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        // CRC-32C for log records (SSE 4.2 when the CPU has it).
        .target(name: "CHeraldCRC32C"),
        // The durable log: segment files, record framing with CRC-32C, recovery, retention, group commit.
        // POSIX file I/O only.
        .target(
            name: "HeraldLog",
            dependencies: ["CHeraldCRC32C", .product(name: "DequeModule", package: "swift-collections")]
        ),
        // The TCP protocol: frames, messages, the binary event encoding, and the connection state machines.
        .target(name: "HeraldWire", dependencies: ["Herald", .product(name: "NIOCore", package: "swift-nio")]),
        // The broker: topics, partitions, consumer groups, dedup, dead letters on the log; its TCP server.
        .target(
            name: "HeraldBroker",
            dependencies: [
                "Herald", "HeraldLog", "HeraldWire",
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        // The client: an EventTransport over the broker's TCP protocol.
        .target(
            name: "HeraldClient",
            dependencies: [
                "Herald", "HeraldWire",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "DequeModule", package: "swift-collections"),
            ]
        ),
        // The shared transport conformance suite and test doubles users need too.
        .target(name: "HeraldTesting", dependencies: ["Herald"]),
        // The reference application: orders, payments, shipping, notifications.
        .target(name: "OrderSystem", dependencies: ["Herald"]),
        .executableTarget(
            name: "HeraldCLI",
            dependencies: [
                "Herald",
                "OrderSystem",
                "HeraldBroker",
                "HeraldClient",
                "HeraldWire",
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(
            name: "HeraldTests",
            dependencies: [
                "Herald", "HeraldTesting",
                .product(name: "InMemoryTracing", package: "swift-distributed-tracing"),
                .product(name: "MetricsTestKit", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .testTarget(
            name: "BrokerTests",
            dependencies: [
                "Herald", "HeraldTesting", "HeraldLog", "HeraldWire", "HeraldBroker", "HeraldClient",
                .product(name: "NIOCore", package: "swift-nio"),
            ]
        ),
        .testTarget(name: "OrderSystemTests", dependencies: ["OrderSystem", "Herald", "HeraldTesting"]),
    ]
)

for target in package.targets where target.type != .system && target.name != "CHeraldCRC32C" {
    var settings = target.swiftSettings ?? []
    settings.append(.enableUpcomingFeature("ExistentialAny"))
    settings.append(.enableUpcomingFeature("MemberImportVisibility"))
    target.swiftSettings = settings
}
