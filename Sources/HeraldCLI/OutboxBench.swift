import ArgumentParser
import Foundation
import Herald
import HeraldPostgres
import Logging
import PostgresNIO
import Synchronization

/// What the transactional outbox costs and delivers, against a PostgreSQL server the caller names: writers'
/// transactions with one business row (the baseline) beside the same transactions plus one outbox event, alternated
/// in rounds; then how fast one relay drains what they wrote into a transport that acknowledges at once; then the
/// delay from commit to publication at a fixed rate. Runs in a schema of its own, dropped afterwards.
struct OutboxBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "outbox",
        abstract: "The PostgreSQL outbox: writer cost against plain transactions, relay throughput, commit → publish.")

    @Option(help: "PostgreSQL URL (postgres://USER[:PASSWORD]@HOST:PORT/DB); default HERALD_POSTGRES_URL.")
    var postgres: String?
    @Option(help: "Transactions per writer run.") var transactions = 4000
    @Option(help: "Concurrent writers.") var writers = 16
    @Option(help: "Bytes of data per event.") var size = 100
    @Option(help: "Rounds of baseline and outbox runs, alternated; medians are reported.") var rounds = 3
    @Option(help: "Transactions per second for the latency run.") var rate = 500
    @Option(name: .customLong("seconds"), help: "Seconds of the latency run.") var latencySeconds = 3
    @Flag(help: "Writers notify the relay of each commit (NOTIFY) instead of leaving it to its 25 ms poll.")
    var notify = false

    func run() async throws {
        guard let text = postgres ?? ProcessInfo.processInfo.environment["HERALD_POSTGRES_URL"],
            let url = PostgresURL(text)
        else { throw ValidationError("--postgres URL (or HERALD_POSTGRES_URL) is needed") }
        var logger = Logger(label: "herald.bench.outbox")
        logger.logLevel = .error
        let schema = "herald_bench_" + String(UInt64.random(in: 0...UInt64.max), radix: 36)
        var configuration = url.clientConfiguration
        configuration.options.additionalStartupParameters = [("search_path", schema)]
        configuration.options.maximumConnections = writers + 4
        var relayConfiguration = OutboxRelay.Configuration(postgres: try url.connectionConfiguration())
        relayConfiguration.postgres.options.additionalStartupParameters = [("search_path", schema)]
        var poolLogger = logger
        poolLogger.logLevel = .critical
        let client = PostgresClient(configuration: configuration, backgroundLogger: poolLogger)
        print(
            "herald bench outbox — \(url), \(writers) writers × \(transactions / writers) transactions per run, "
                + "\(size)-byte events, \(rounds) rounds, \(notify ? "writers notify" : "relay polls every 25 ms"); "
                + "server and client on this machine")
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { await client.run() }
            defer { group.cancelAll() }
            try await client.query(PostgresQuery(unsafeSQL: "CREATE SCHEMA \(schema)"), logger: logger)
            do {
                try await measure(client, relayConfiguration, logger)
            } catch let error as PSQLError {
                throw PostgresDemoError(message: String(reflecting: error))
            }
            try await client.query(PostgresQuery(unsafeSQL: "DROP SCHEMA \(schema) CASCADE"), logger: logger)
        }
    }

    private func measure(
        _ client: PostgresClient, _ relayConfiguration: OutboxRelay.Configuration, _ logger: Logger
    ) async throws {
        try await HeraldSchema.migrate(client, logger: logger)
        try await client.query(
            "CREATE TABLE bench_rows (id bigserial PRIMARY KEY, account text NOT NULL, amount int8 NOT NULL)",
            logger: logger)
        let payload = String(repeating: "x", count: max(0, size - 20))
        func event(_ number: Int) -> CloudEvent {
            var event = CloudEvent(
                source: "bench", type: "com.herald.bench.deposited",
                data: .bytes(Array("{\"n\":\(number),\"p\":\"\(payload)\"}".utf8)))
            event.partitionkey = "account-\(number % 64)"
            return event
        }
        /// One writer run: `transactions` transactions over `writers` connections; returns transactions/s.
        func writerRun(outbox: Bool) async throws -> Double {
            let started = ContinuousClock.now
            try await withThrowingTaskGroup(of: Void.self) { group in
                for writer in 0..<writers {
                    group.addTask {
                        for index in stride(from: writer, to: transactions, by: writers) {
                            try await client.withTransaction(logger: logger) { connection in
                                try await connection.query(
                                    "INSERT INTO bench_rows (account, amount) VALUES (\("account-\(index % 64)"), 1)",
                                    logger: logger)
                                if outbox {
                                    try await Outbox.append(
                                        [event(index)], to: "bench", on: connection, notify: notify, logger: logger)
                                }
                            }
                        }
                    }
                }
                try await group.waitForAll()
            }
            return Double(transactions) / seconds(ContinuousClock.now - started)
        }

        var baseline: [Double] = []
        var withOutbox: [Double] = []
        for round in 1...max(1, rounds) {
            baseline.append(try await writerRun(outbox: false))
            withOutbox.append(try await writerRun(outbox: true))
            print(
                "  round \(round): plain \(Int(baseline.last!)) tx/s, with outbox \(Int(withOutbox.last!)) tx/s "
                    + "= \(format(withOutbox.last! / baseline.last!, 2))×")
        }
        let plain = median(baseline)
        let outboxed = median(withOutbox)
        print("")
        print("writer transactions, one business row (baseline)   \(pad(String(Int(plain)), 8)) tx/s")
        print(
            "the same plus one outbox event                     \(pad(String(Int(outboxed)), 8)) tx/s  = "
                + "\(format(outboxed / plain, 2))× the baseline")

        // The relay drains what the outbox runs wrote.
        let waiting = try await Outbox.pendingCount(client, logger: logger)
        let sink = CountingTransport()
        let relay = OutboxRelay(configuration: relayConfiguration, transport: sink, logger: logger)
        let started = ContinuousClock.now
        let relaying = Task { try await relay.run() }
        while try await Outbox.pendingCount(client, logger: logger) > 0 {
            try await Task.sleep(for: .milliseconds(5))
        }
        let drained = seconds(ContinuousClock.now - started)
        print(
            "relay: \(waiting) committed events → transport     \(pad(String(Int(Double(waiting) / drained)), 8)) "
                + "events/s (one relay, \(relayConfiguration.batchSize) per round)")

        // Commit → published at a fixed rate, the relay running.
        let total = rate * latencySeconds
        let interval = 1.0 / Double(max(1, rate))
        let begin = ContinuousClock.now
        try await withThrowingTaskGroup(of: Void.self) { group in
            for index in 0..<total {
                let due = begin + .seconds(interval * Double(index))
                try await ContinuousClock().sleep(until: due)
                group.addTask {
                    let event = event(1_000_000 + index)
                    try await client.withTransaction(logger: logger) { connection in
                        try await connection.query(
                            "INSERT INTO bench_rows (account, amount) VALUES (\("account-\(index % 64)"), 1)",
                            logger: logger)
                        try await Outbox.append([event], to: "bench", on: connection, notify: notify, logger: logger)
                        sink.committing(event.id)
                    }
                }
            }
            try await group.waitForAll()
        }
        while sink.latencies.count < total && ContinuousClock.now - begin < .seconds(latencySeconds + 30) {
            try await Task.sleep(for: .milliseconds(10))
        }
        relaying.cancel()
        let latencies = sink.latencies.sorted()
        func percentile(_ p: Double) -> Double {
            guard !latencies.isEmpty else { return .nan }
            return Double(latencies[min(latencies.count - 1, Int(Double(latencies.count) * p))]) / 1e6
        }
        print(
            "commit → published at \(rate) tx/s for \(latencySeconds) s     p50 \(format(percentile(0.5), 2)) ms, "
                + "p99 \(format(percentile(0.99), 2)) ms, max \(format(percentile(1), 2)) ms "
                + "(\(latencies.count) of \(total))")
    }
}

/// A transport that acknowledges at once, and measures the time from a commit to the event's publication for the
/// events whose commit it was told of.
final class CountingTransport: EventTransport {
    private let state = Mutex<(count: Int, committing: [EventID: UInt64], latencies: [UInt64])>((0, [:], []))

    var capabilities: TransportCapabilities { [] }
    var latencies: [UInt64] { state.withLock { $0.latencies } }

    /// The transaction writing `id` is about to commit.
    func committing(_ id: EventID) {
        let now = monotonicNanoseconds()
        state.withLock { $0.committing[id] = now }
    }

    func publish(_ events: [CloudEvent], to topic: String) async throws -> [PublishAck] {
        let now = monotonicNanoseconds()
        let first = state.withLock { state -> Int in
            defer { state.count += events.count }
            for event in events {
                if let start = state.committing.removeValue(forKey: event.id) { state.latencies.append(now &- start) }
            }
            return state.count
        }
        return events.enumerated().map {
            PublishAck(id: $1.id, partition: 0, offset: Int64(first + $0), duplicate: false)
        }
    }

    func subscribe(topic: String, group: String, options: SubscribeOptions) async throws -> DeliveryStream {
        throw TransportError(.invalidRequest, "the bench transport only receives")
    }

    func shutdown() async {}
}
