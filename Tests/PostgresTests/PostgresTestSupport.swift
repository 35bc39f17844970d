import Foundation
import Herald
import HeraldPostgres
import Logging
import PostgresNIO
import Synchronization
import Testing

/// Runs `body` with a client on a database of its own (created on the server scripts/test started, migrated, and
/// dropped afterwards), so tests running at once do not see each other's outbox rows.
func withTestDatabase(_ body: (PostgresClient, PostgresURL) async throws -> Void) async throws {
    guard let base = ProcessInfo.processInfo.environment["HERALD_POSTGRES_URL"], let server = PostgresURL(base) else {
        Issue.record(
            "HERALD_POSTGRES_URL is not set: scripts/test starts a PostgreSQL server; by hand: eval $(scripts/start-postgres DIR)"
        )
        return
    }
    let name = "herald_test_" + String(UInt64.random(in: 0...UInt64.max), radix: 36)
    try await withClient(server) { admin in
        try await admin.query(PostgresQuery(unsafeSQL: "CREATE DATABASE \(name)"))
    }
    var url = server
    url.database = name
    do {
        try await withClient(url) { client in
            try await HeraldSchema.migrate(client)
            try await body(client, url)
        }
    } catch {
        try? await withClient(server) {
            try await $0.query(PostgresQuery(unsafeSQL: "DROP DATABASE \(name) WITH (FORCE)"))
        }
        throw error
    }
    try await withClient(server) { try await $0.query(PostgresQuery(unsafeSQL: "DROP DATABASE \(name) WITH (FORCE)")) }
}

/// A running pool of connections for `body`'s time.
func withClient(_ url: PostgresURL, _ body: (PostgresClient) async throws -> Void) async throws {
    var logger = Logger(label: "test.pg")
    // The pool logs a warning when it is used a moment before `run()` has started in the task beside.
    logger.logLevel = .error
    let client = PostgresClient(configuration: url.clientConfiguration, backgroundLogger: logger)
    try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { await client.run() }
        do {
            try await body(client)
        } catch {
            group.cancelAll()
            throw error
        }
        group.cancelAll()
    }
}

/// A transport that records every event published to it, in order, and can be slow or fail on purpose.
final class RecordingTransport: EventTransport {
    struct Published: Sendable {
        let topic: String
        let event: CloudEvent
    }

    private let log = Mutex<[Published]>([])
    /// Probability that a publish fails (before anything is recorded) with `unavailable`.
    let failureRate: Double
    /// Longest random delay between recording a publish and acknowledging it.
    let maxDelay: Duration
    /// Events with this type are refused for good (`invalidRequest`).
    let refusedType: String?

    init(failureRate: Double = 0, maxDelay: Duration = .zero, refusedType: String? = nil) {
        self.failureRate = failureRate
        self.maxDelay = maxDelay
        self.refusedType = refusedType
    }

    var capabilities: TransportCapabilities { [] }

    var published: [Published] { log.withLock { $0 } }

    func publish(_ events: [CloudEvent], to topic: String) async throws -> [PublishAck] {
        if Double.random(in: 0..<1) < failureRate { throw TransportError(.unavailable, "failing on purpose") }
        if let refusedType, events.contains(where: { $0.type == refusedType }) {
            throw TransportError(.invalidRequest, "\(refusedType) is refused")
        }
        let acks = log.withLock { log in
            events.map { event in
                log.append(Published(topic: topic, event: event))
                return PublishAck(id: event.id, partition: 0, offset: Int64(log.count - 1), duplicate: false)
            }
        }
        // The events are in; the acknowledgement takes a while (a relay killed meanwhile never marks them).
        if maxDelay > .zero {
            try await Task.sleep(for: maxDelay * Double.random(in: 0...1))
        }
        return acks
    }

    func subscribe(topic: String, group: String, options: SubscribeOptions) async throws -> DeliveryStream {
        throw TransportError(.invalidRequest, "a recording transport has no subscribers")
    }

    func shutdown() async {}
}

/// Waits until `condition` holds (checked every 20 ms) or `timeout` passes; returns whether it held.
func eventually(timeout: Duration = .seconds(30), _ condition: () async throws -> Bool) async rethrows -> Bool {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if try await condition() { return true }
        try? await Task.sleep(for: .milliseconds(20))
    }
    return try await condition()
}

/// A value behind a lock that concurrent tasks share.
final class Shared<Value: Sendable>: Sendable {
    private let mutex: Mutex<Value>
    init(_ value: Value) { mutex = Mutex(value) }
    func withLock<T>(_ body: (inout Value) -> T) -> T { mutex.withLock { body(&$0) } }
}

/// A relay running in a task of its own (cancel the task to stop it, as a crash would: its connection closes).
func startRelay(_ url: PostgresURL, _ transport: any EventTransport) throws -> (
    relay: OutboxRelay, task: Task<Void, any Error>
) {
    let relay = OutboxRelay(
        configuration: .init(postgres: try url.connectionConfiguration()), transport: transport, logger: quiet)
    return (relay, Task { try await relay.run() })
}
