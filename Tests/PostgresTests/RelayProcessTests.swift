import Foundation
import Herald
import HeraldBroker
import HeraldClient
import HeraldPostgres
import HeraldTesting
import Logging
import PostgresNIO
import Testing

/// `herald relay` as a process of its own, killed with SIGKILL again and again while writers commit (and roll back)
/// transactions, publishing to a real broker over TCP. Afterwards the broker's topic holds every committed event
/// exactly once (the relay republishes what it had not marked; the broker drops the repeats by (source, id)), none
/// from a rolled-back transaction, each account's events in version order.
@Suite("herald relay killed with SIGKILL", .serialized, .timeLimit(.minutes(4)))
struct RelayProcessTests {
    struct Rollback: Error {}

    @Test func aRelayProcessKilledRepeatedlyLosesNothingCommitted() async throws {
        let executable = ChildProcess.heraldExecutable
        #expect(
            FileManager.default.isExecutableFile(atPath: executable),
            "the herald executable is built next to the tests (swift build --build-tests)")
        try await withTestDatabase { client, url in
            // The broker, in this process, fsync before ack.
            let directory = NSTemporaryDirectory() + "herald-relay-test-\(UUID().uuidString)"
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let engine = try Broker(
                configuration: BrokerConfiguration(dataDirectory: directory, fsync: .always), logger: quiet)
            let server = BrokerServer(broker: engine, port: 0, logger: quiet)
            let port = try await server.start()
            let ticker = Task { try? await engine.run() }
            let broker = BrokerTransport(host: "127.0.0.1", port: port, clientName: "relay-test")
            _ = try await broker.admin(
                "topics.create",
                arguments: Array(try JSONSerialization.data(withJSONObject: ["name": "accounts", "partitions": 4])))

            let accounts = (0..<12).map { "account-\($0)" }
            try await client.query("CREATE TABLE accounts (account text PRIMARY KEY, version int8 NOT NULL)")
            for account in accounts { try await client.query("INSERT INTO accounts VALUES (\(account), 0)") }
            let committed = Shared<[EventID: Deposited]>([:])
            let rolledBack = Shared<Set<EventID>>([])
            let relay = ChildProcess(
                executable: executable,
                arguments: [
                    "relay", "--postgres", url.description, "--broker", "127.0.0.1:\(port)", "--poll-ms", "10",
                    "--log-level", "error",
                ], quiet: true)
            try relay.start()
            var kills = 0
            try await withThrowingTaskGroup(of: Void.self) { group in
                for _ in 0..<4 {
                    group.addTask {
                        for _ in 0..<100 {
                            let account = accounts.randomElement()!
                            let rollback = Double.random(in: 0..<1) < 0.2
                            var events: [CloudEvent] = []
                            do {
                                try await client.withTransaction(logger: quiet) { connection in
                                    let rows = try await connection.query(
                                        "UPDATE accounts SET version = version + 2 WHERE account = \(account) RETURNING version",
                                        logger: quiet)
                                    var version = 0
                                    for try await value in rows.decode(Int64.self) { version = Int(value) }
                                    events = [version - 1, version].map {
                                        CloudEvent(Deposited(account: account, sequence: $0), source: "writers")
                                    }
                                    try await Outbox.append(events, to: "accounts", on: connection)
                                    try await Task.sleep(for: .microseconds(Int.random(in: 0...5000)))
                                    if rollback { throw Rollback() }
                                }
                            } catch let error as PostgresTransactionError where error.closureError is Rollback {
                                rolledBack.withLock { set in for event in events { set.insert(event.id) } }
                                continue
                            }
                            committed.withLock { map in
                                for event in events { map[event.id] = try? deposited(event) }
                            }
                        }
                    }
                }
                // SIGKILL the relay at random moments while the writers run, and start it again.
                for _ in 0..<6 {
                    try await Task.sleep(for: .milliseconds(Int.random(in: 150...400)))
                    relay.kill9()
                    kills += 1
                    try relay.start()
                }
                try await group.waitForAll()
            }
            let drained = try await eventually(timeout: .seconds(60)) { try await Outbox.pendingCount(client) == 0 }
            #expect(drained, "the relay left events unpublished")
            relay.stop()

            // Read the whole topic back.
            let expected = committed.withLock { $0 }
            let forbidden = rolledBack.withLock { $0 }
            var options = SubscribeOptions(start: .earliest)
            options.ordered = true
            let stream = try await broker.subscribe(topic: "accounts", group: "check", options: options)
            var received: [CloudEvent] = []
            let reader = Task {
                var received: [CloudEvent] = []
                for try await delivery in stream {
                    received.append(delivery.event)
                    try await delivery.ack()
                    if received.count >= expected.count { break }
                }
                return received
            }
            // Events that never come end the read after 30 s: the transport shuts down, which ends its streams.
            let timeout = Task {
                try await Task.sleep(for: .seconds(30))
                await broker.shutdown()
            }
            received = (try? await reader.value) ?? []
            timeout.cancel()
            // Nothing more than the committed events is in the topic.
            let info = engine.topic("accounts")
            let stored = info.map { zip($0.endOffsets, $0.startOffsets).reduce(0) { $0 + Int($1.0 - $1.1) } } ?? -1
            await broker.shutdown()
            ticker.cancel()
            await server.stop()
            engine.close()

            let ids = received.map(\.id)
            #expect(Set(ids) == Set(expected.keys), "the topic does not hold exactly the committed events")
            #expect(ids.count == Set(ids).count, "an event was delivered twice")
            #expect(stored == expected.count, "the topic holds \(stored) events for \(expected.count) committed")
            #expect(Set(ids).isDisjoint(with: forbidden))
            var sequences: [String: [Int]] = [:]
            for event in received {
                let change = try deposited(event)
                sequences[change.account, default: []].append(change.sequence)
            }
            for (account, values) in sequences {
                #expect(values == values.sorted(), "\(account) out of order")
            }
            #expect(kills == 6)
            print(
                "relay process test: \(expected.count) committed events, \(forbidden.count) rolled back, \(kills) "
                    + "SIGKILLs; \(stored) events in the topic")
        }
    }
}
