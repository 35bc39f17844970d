import Foundation
import Herald
import HeraldPostgres
import Logging
import PostgresNIO
import Synchronization
import Testing

@Suite("PostgreSQL inbox", .timeLimit(.minutes(3)))
struct InboxTests {
    struct Crash: Error {}

    /// At-least-once delivery made exactly-once in effect: 200 events, each delivered 3 to 5 times, several
    /// deliveries of one event at once, and a quarter of the attempts failing after the effect was written (rolled
    /// back, so delivered again) → every event's effect is applied exactly once.
    @Test func effectsHappenOncePerEventUnderRepeatedAndConcurrentDeliveries() async throws {
        try await withTestDatabase { client, _ in
            try await client.query("CREATE TABLE balances (account text PRIMARY KEY, cents int8 NOT NULL)")
            try await client.query("INSERT INTO balances VALUES ('a', 0)")
            let inbox = Inbox(consumer: "ledger", logger: quiet)
            let events = (1...200).map { CloudEvent(Deposited(account: "a", sequence: $0), source: "bank") }
            let applied = Shared(0)
            try await withThrowingTaskGroup(of: Void.self) { group in
                for event in events {
                    for _ in 0..<Int.random(in: 3...5) {
                        group.addTask {
                            // Redelivered until it is handled, as a transport would after a failure.
                            while true {
                                do {
                                    let result: Void? = try await inbox.process(event, in: client) { connection in
                                        try await connection.query(
                                            "UPDATE balances SET cents = cents + \(try deposited(event).sequence) WHERE account = 'a'",
                                            logger: quiet)
                                        if Double.random(in: 0..<1) < 0.25 { throw Crash() }
                                    }
                                    if result != nil { applied.withLock { $0 += 1 } }
                                    return
                                } catch is Crash {
                                    continue
                                }
                            }
                        }
                    }
                }
                try await group.waitForAll()
            }
            let rows = try await client.query("SELECT cents FROM balances WHERE account = 'a'")
            var cents: Int64 = -1
            for try await value in rows.decode(Int64.self) { cents = value }
            #expect(cents == Int64((1...200).reduce(0, +)))
            #expect(applied.withLock { $0 } == 200)
            for event in events.prefix(3) {
                #expect(try await inbox.contains(event, in: client))
            }
            // Another consumer has its own record.
            let other = Inbox(consumer: "audit", logger: quiet)
            #expect(try await other.contains(events[0], in: client) == false)
        }
    }

    @Test func receiveInsideTheCallersTransactionIsUndoneByItsRollback() async throws {
        try await withTestDatabase { client, _ in
            let inbox = Inbox(consumer: "orders", logger: quiet)
            let event = CloudEvent(Deposited(account: "a", sequence: 1), source: "bank")
            _ = try? await client.withTransaction(logger: quiet) { connection in
                #expect(try await inbox.receive(event, on: connection))
                #expect(try await inbox.receive(event, on: connection) == false)
                throw Crash()
            }
            #expect(try await inbox.contains(event, in: client) == false)
            let received = try await client.withTransaction(logger: quiet) { connection in
                try await inbox.receive(event, on: connection)
            }
            #expect(received)
            #expect(try await inbox.contains(event, in: client))
        }
    }
}

@Suite("PostgreSQL saga store", .timeLimit(.minutes(3)))
struct PostgresSagaStoreTests {
    @Test func savesAreOptimisticAndStateOutlivesTheClient() async throws {
        try await withTestDatabase { client, url in
            let store = PostgresSagaStore(client: client)
            #expect(try await store.load(saga: "order", id: "o-1") == nil)
            let first = SagaRecord(
                saga: "order", id: "o-1", state: Array("created".utf8), version: 1,
                deadline: Timestamp(nanosecondsSinceEpoch: 1_000), finished: false)
            try await store.save(first)
            // A second writer that also read "absent" loses.
            await #expect(throws: SagaStoreError.self) { try await store.save(first) }
            var second = first
            second.version = 2
            second.state = Array("paid".utf8)
            second.deadline = Timestamp(nanosecondsSinceEpoch: 5_000)
            try await store.save(second)
            // A writer that read version 1 loses to the one that saved version 2.
            await #expect(throws: SagaStoreError.self) { try await store.save(second) }
            #expect(
                try await store.expired(saga: "order", at: Timestamp(nanosecondsSinceEpoch: 4_999), limit: 10).isEmpty)
            #expect(
                try await store.expired(saga: "order", at: Timestamp(nanosecondsSinceEpoch: 5_000), limit: 10) == [
                    second
                ])
            var finished = second
            finished.version = 3
            finished.finished = true
            try await store.save(finished)
            #expect(
                try await store.expired(saga: "order", at: Timestamp(nanosecondsSinceEpoch: 9_999), limit: 10).isEmpty)

            // Another client (a restarted service) sees the same instance.
            try await withClient(url) { other in
                let loaded = try await PostgresSagaStore(client: other).load(saga: "order", id: "o-1")
                #expect(loaded == finished)
            }
        }
    }
}
