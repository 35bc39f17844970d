import Foundation
import Herald
import HeraldPostgres
import Logging
import PostgresNIO
import Synchronization
import Testing

/// The outbox under faults: 8 writers commit many transactions on shared accounts (each transaction raises an
/// account's version and appends one event per step), 20% roll back, commits land out of id order (each waits a
/// random moment before committing), the transport fails 5% of publishes and is slow, two relays run at once and
/// one of them is killed every few tens of milliseconds and replaced.
/// Then: every committed event was published at least once, none from a rolled-back transaction, and per account
/// the first publication of each event comes in the order of the versions (1, 2, 3, … with none missing).
@Suite("PostgreSQL outbox under faults", .timeLimit(.minutes(5)))
struct OutboxFaultTests {
    struct Rollback: Error {}

    final class FaultState: Sendable {
        let committed = Mutex<[EventID: Deposited]>([:])
        let rolledBack = Mutex<Set<EventID>>([])
        let writersDone = Mutex(false)
        let relaysStarted = Mutex(0)
        let relayPublished = Mutex<[Int]>([])
    }

    @Test func committedEventsArePublishedInOrderPerAggregateAcrossRelayKills() async throws {
        try await withTestDatabase { client, url in
            let accounts = (0..<24).map { "account-\($0)" }
            try await client.query("CREATE TABLE accounts (account text PRIMARY KEY, version int8 NOT NULL)")
            for account in accounts {
                try await client.query("INSERT INTO accounts VALUES (\(account), 0)")
            }
            let state = FaultState()
            let transport = RecordingTransport(failureRate: 0.05, maxDelay: .milliseconds(2))
            let configuration = OutboxRelay.Configuration(
                postgres: try url.connectionConfiguration(), batchSize: 64, pollInterval: .milliseconds(50),
                retryDelay: .milliseconds(20))

            try await withThrowingTaskGroup(of: Void.self) { group in
                // Two relays at once; the chaos loop kills one at random and starts a replacement.
                group.addTask {
                    func start() -> (OutboxRelay, Task<Void, any Error>) {
                        let relay = OutboxRelay(configuration: configuration, transport: transport, logger: quiet)
                        state.relaysStarted.withLock { $0 += 1 }
                        return (relay, Task { try await relay.run() })
                    }
                    var relays = [start(), start()]
                    while !state.writersDone.withLock({ $0 }) {
                        try await Task.sleep(for: .milliseconds(Int.random(in: 20...120)))
                        let victim = Int.random(in: 0..<relays.count)
                        relays[victim].1.cancel()
                        let killed = relays[victim].0.stats.published
                        state.relayPublished.withLock { $0.append(killed) }
                        relays[victim] = start()
                    }
                    // Writers done: the survivors publish the rest.
                    let drained = try await eventually(timeout: .seconds(60)) {
                        try await Outbox.pendingCount(client) == 0
                    }
                    for (relay, task) in relays {
                        task.cancel()
                        _ = try? await task.value
                        let count = relay.stats.published
                        state.relayPublished.withLock { $0.append(count) }
                    }
                    #expect(drained, "the relays left events unpublished")
                }
                // 8 writers.
                try await withThrowingTaskGroup(of: Void.self) { writers in
                    for _ in 0..<8 {
                        writers.addTask {
                            for _ in 0..<120 {
                                let account = accounts.randomElement()!
                                let steps = Int.random(in: 1...3)
                                let rollback = Double.random(in: 0..<1) < 0.2
                                var events: [CloudEvent] = []
                                do {
                                    try await client.withTransaction(logger: quiet) { connection in
                                        let rows = try await connection.query(
                                            """
                                            UPDATE accounts SET version = version + \(steps) WHERE account = \(account)
                                            RETURNING version
                                            """, logger: quiet)
                                        var version = 0
                                        for try await value in rows.decode(Int64.self) { version = Int(value) }
                                        events = (version - steps + 1...version).map {
                                            CloudEvent(Deposited(account: account, sequence: $0), source: "writers")
                                        }
                                        try await Outbox.append(events, to: "accounts", on: connection)
                                        // Commit later than others that took higher ids.
                                        try await Task.sleep(for: .microseconds(Int.random(in: 0...3000)))
                                        if rollback { throw Rollback() }
                                    }
                                } catch let error as PostgresTransactionError where error.closureError is Rollback {
                                    state.rolledBack.withLock { set in for event in events { set.insert(event.id) } }
                                    continue
                                }
                                state.committed.withLock { map in
                                    for event in events { map[event.id] = try? deposited(event) }
                                }
                            }
                        }
                    }
                    try await writers.waitForAll()
                }
                state.writersDone.withLock { $0 = true }
                try await group.waitForAll()
            }

            let published = transport.published
            let publishedIDs = Set(published.map(\.event.id))
            let committedEvents = state.committed.withLock { $0 }
            let rolledBackIDs = state.rolledBack.withLock { $0 }
            #expect(committedEvents.count > 500)
            #expect(!rolledBackIDs.isEmpty)
            let missing = Set(committedEvents.keys).subtracting(publishedIDs)
            #expect(missing.isEmpty, "\(missing.count) committed events were never published")
            let ghosts = publishedIDs.intersection(rolledBackIDs)
            #expect(ghosts.isEmpty, "\(ghosts.count) events of rolled-back transactions were published")

            // Per account, the first publication of each event in version order, none missing.
            var seen: Set<EventID> = []
            var firstSequences: [String: [Int]] = [:]
            for record in published where seen.insert(record.event.id).inserted {
                let change = try deposited(record.event)
                firstSequences[change.account, default: []].append(change.sequence)
            }
            var versions: [String: Int] = [:]
            let rows = try await client.query("SELECT account, version FROM accounts")
            for try await (account, version) in rows.decode((String, Int64).self) { versions[account] = Int(version) }
            for account in accounts {
                let sequences = firstSequences[account] ?? []
                #expect(
                    sequences == Array(stride(from: 1, through: versions[account] ?? 0, by: 1)),
                    "\(account): published out of order or with a gap")
            }
            let restarts = state.relaysStarted.withLock { $0 }
            let duplicates = published.count - publishedIDs.count
            #expect(restarts > 5)
            // More than one relay instance published (the work moved as relays were killed).
            #expect(state.relayPublished.withLock { $0.filter { $0 > 0 }.count } > 1)
            print(
                "outbox fault test: \(committedEvents.count) committed events, \(rolledBackIDs.count) rolled back, "
                    + "\(published.count) publications (\(duplicates) repeats), \(restarts) relays started")
        }
    }
}
