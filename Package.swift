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
        .library(name: "HeraldAuth", targets: ["HeraldAuth"]),
        .library(name: "HeraldEncryption", targets: ["HeraldEncryption"]),
        .library(name: "HeraldHTTP", targets: ["HeraldHTTP"]),
        .library(name: "HeraldNATS", targets: ["HeraldNATS"]),
        .library(name: "HeraldPostgres", targets: ["HeraldPostgres"]),
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
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-nio-extras", from: "1.35.2"),
        .package(url: "https://github.com/apple/swift-http-types", from: "1.8.0"),
        .package(url: "https://github.com/apple/swift-crypto", from: "4.5.2"),
        .package(url: "https://github.com/vapor/jwt-kit", from: "5.8.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1", traits: []),
        .package(url: "https://github.com/vapor/postgres-nio", from: "1.33.2"),
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
        // Who may do what: static bearer tokens and JWTs whose claims grant publish/subscribe/admin on topic
        // patterns. One decision path for every interface (TCP, HTTP, admin). No NIO.
        .target(
            name: "HeraldAuth",
            dependencies: [
                .product(name: "JWTKit", package: "jwt-kit"),
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        // End-to-end payload encryption: a transport decorator that seals event data with AES-GCM. No NIO.
        .target(
            name: "HeraldEncryption",
            dependencies: ["Herald", .product(name: "Crypto", package: "swift-crypto")]
        ),
        // The broker: topics, partitions, consumer groups, dedup, dead letters on the log; its TCP server.
        .target(
            name: "HeraldBroker",
            dependencies: [
                "Herald", "HeraldLog", "HeraldWire", "HeraldAuth",
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
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
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "DequeModule", package: "swift-collections"),
            ]
        ),
        // The broker's HTTP and CloudEvents API (Hummingbird), push delivery, Prometheus metrics, and a small
        // HTTP/1.1 client for push and for services that speak only HTTP.
        .target(
            name: "HeraldHTTP",
            dependencies: [
                "Herald", "HeraldWire", "HeraldBroker", "HeraldAuth",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdCore", package: "hummingbird"),
                .product(name: "HummingbirdTLS", package: "hummingbird"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOHTTPTypes", package: "swift-nio-extras"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
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
                "HeraldHTTP",
                "HeraldAuth",
                "HeraldEncryption",
                "HeraldNATS",
                "HeraldPostgres",
                .product(name: "PostgresNIO", package: "postgres-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Hummingbird", package: "hummingbird"),
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
                .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        // NATS on SwiftNIO: the core protocol (a parser state machine), request/reply, reconnect; the JetStream
        // API; `NATSTransport`.
        .target(
            name: "HeraldNATS",
            dependencies: [
                "Herald",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "NATSTests",
            dependencies: [
                "Herald", "HeraldTesting", "HeraldNATS", .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ]
        ),
        // PostgreSQL (postgres-nio): the transactional outbox and its relay, the inbox, a durable saga store.
        .target(
            name: "HeraldPostgres",
            dependencies: [
                "Herald",
                .product(name: "PostgresNIO", package: "postgres-nio"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .testTarget(
            name: "PostgresTests",
            dependencies: [
                "Herald", "HeraldTesting", "HeraldPostgres", "HeraldBroker", "HeraldClient",
                .product(name: "PostgresNIO", package: "postgres-nio"),
            ]
        ),
        .testTarget(
            name: "HTTPTests",
            dependencies: [
                "Herald", "HeraldTesting", "HeraldWire", "HeraldBroker", "HeraldClient", "HeraldHTTP", "HeraldAuth",
                "HeraldEncryption", "OrderSystem",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "JWTKit", package: "jwt-kit"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "Hummingbird", package: "hummingbird"),
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
