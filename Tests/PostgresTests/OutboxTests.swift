import Foundation
import Herald
import HeraldPostgres
import Logging
import PostgresNIO
import Synchronization
import Testing

/// One change to an aggregate: its `sequence` is the aggregate's version after the change (1, 2, 3, … per
/// aggregate, in the order the changes committed).
struct Deposited: Event, Hashable {
    static let eventType = "test.account.deposited"
    let account: String
    let sequence: Int
    var partitionKey: String? { account }
}

func deposited(_ event: CloudEvent) throws -> Deposited {
    try JSONDecoder().decode(Deposited.self, from: Data(try event.data.encoded() ?? []))
}

let quiet: Logger = {
    var logger = Logger(label: "test.outbox")
    logger.logLevel = .critical
    return logger
}()

@Suite("PostgreSQL outbox and relay", .timeLimit(.minutes(5)))
struct OutboxTests {
    @Test func committedEventsArePublishedAndRolledBackOnesNever() async throws {
        try await withTestDatabase { client, url in
            let kept = CloudEvent(Deposited(account: "a", sequence: 1), source: "test")
            let dropped = CloudEvent(Deposited(account: "a", sequence: 2), source: "test")
            try await client.withTransaction(logger: quiet) { connection in
                try await Outbox.append([kept], to: "accounts", on: connection)
            }
            struct Rollback: Error {}
            await #expect(throws: (any Error).self) {
                try await client.withTransaction(logger: quiet) { connection in
                    try await Outbox.append([dropped], to: "accounts", on: connection)
                    throw Rollback()
                }
            }
            #expect(try await Outbox.pendingCount(client) == 1)

            let transport = RecordingTransport()
            let relay = try startRelay(url, transport)
            defer { relay.task.cancel() }
            #expect(await eventually { transport.published.count == 1 })
            #expect(try await eventually { try await Outbox.pendingCount(client) == 0 })
            #expect(transport.published.map(\.event.id) == [kept.id])
            #expect(transport.published.first?.topic == "accounts")
            #expect(transport.published.first?.event.partitionkey == "a")

            // A later commit, notified, is published too.
            let later = CloudEvent(Deposited(account: "b", sequence: 1), source: "test")
            try await client.withTransaction(logger: quiet) {
                try await Outbox.append([later], to: "accounts", on: $0, notify: true)
            }
            #expect(await eventually { transport.published.count == 2 })
            #expect(transport.published.map(\.event.id) == [kept.id, later.id])
        }
    }

    /// The sequence-gap problem: a transaction takes id N, another takes N+1 and commits first, the relay
    /// publishes N+1 — a relay that polled `id > last published` would now skip N forever when it commits.
    @Test func aTransactionThatCommitsLateIsNotSkipped() async throws {
        try await withTestDatabase { client, url in
            let transport = RecordingTransport()
            let relay = try startRelay(url, transport)
            defer { relay.task.cancel() }

            let early = CloudEvent(Deposited(account: "slow", sequence: 1), source: "test")
            let late = CloudEvent(Deposited(account: "fast", sequence: 1), source: "test")
            try await withThrowingTaskGroup(of: Void.self) { group in
                let earlyAppended = AsyncStream<Void>.makeStream()
                group.addTask {
                    try await client.withTransaction(logger: quiet) { connection in
                        try await Outbox.append([early], to: "accounts", on: connection)  // takes the lower id
                        earlyAppended.continuation.yield()
                        // Held open until the later transaction has committed and been published.
                        #expect(await eventually { transport.published.count == 1 })
                    }
                }
                var iterator = earlyAppended.stream.makeAsyncIterator()
                await iterator.next()
                try await client.withTransaction(logger: quiet) { connection in
                    try await Outbox.append([late], to: "accounts", on: connection)
                }
                try await group.waitForAll()
            }
            #expect(await eventually { transport.published.count == 2 })
            #expect(transport.published.map(\.event.id) == [late.id, early.id])
            let ids = try await client.query("SELECT id FROM herald_outbox ORDER BY id").decode(Int64.self)
            var rows: [Int64] = []
            for try await id in ids { rows.append(id) }
            #expect(rows.count == 2)
        }
    }

    @Test func anEventTheTransportRefusesIsKeptWithTheReasonAndTheRestGoOn() async throws {
        try await withTestDatabase { client, url in
            let good = CloudEvent(Deposited(account: "a", sequence: 1), source: "test")
            let refused = CloudEvent(
                id: EventID(), source: "test", type: "test.refused", data: .bytes(Array("{}".utf8)))
            let after = CloudEvent(Deposited(account: "a", sequence: 2), source: "test")
            try await client.withTransaction(logger: quiet) { connection in
                try await Outbox.append([good, refused, after], to: "accounts", on: connection)
            }
            let transport = RecordingTransport(refusedType: "test.refused")
            let relay = try startRelay(url, transport)
            defer { relay.task.cancel() }
            #expect(await eventually { transport.published.count == 2 })
            #expect(transport.published.map(\.event.id) == [good.id, after.id])
            #expect(await eventually { relay.relay.stats.rejected == 1 })
            let rows = try await client.query("SELECT rejected FROM herald_outbox WHERE rejected IS NOT NULL")
            var reasons: [String] = []
            for try await reason in rows.decode(String.self) { reasons.append(reason) }
            #expect(reasons == ["test.refused is refused"])
            #expect(try await Outbox.pendingCount(client) == 0)
        }
    }

    @Test func anInvalidEventIsRefusedAtAppendAndNothingIsWritten() async throws {
        try await withTestDatabase { client, _ in
            let valid = CloudEvent(Deposited(account: "a", sequence: 1), source: "test")
            let invalid = CloudEvent(id: EventID(), source: "", type: "test.invalid")
            let error = await #expect(throws: PostgresTransactionError.self) {
                try await client.withTransaction(logger: quiet) { connection in
                    try await Outbox.append([valid, invalid], to: "accounts", on: connection)
                }
            }
            #expect(error?.closureError is CloudEventError)
            let pending = try await Outbox.pendingCount(client)
            #expect(pending == 0)
        }
    }
}

@Suite("PostgreSQL outbox: one aggregate, concurrent writers", .timeLimit(.minutes(3)))
struct OutboxAggregateLockTests {
    /// Two transactions append to one aggregate without any business lock between them: the second waits for the
    /// first to commit, so its row gets the higher id and the relay publishes the two in commit order.
    @Test func aSecondWriterOfAnAggregateWaitsForTheFirstToCommit() async throws {
        try await withTestDatabase { client, url in
            let first = CloudEvent(Deposited(account: "shared", sequence: 1), source: "test")
            let second = CloudEvent(Deposited(account: "shared", sequence: 2), source: "test")
            let secondAppended = Shared(false)
            try await withThrowingTaskGroup(of: Void.self) { group in
                let firstAppended = AsyncStream<Void>.makeStream()
                group.addTask {
                    try await client.withTransaction(logger: quiet) { connection in
                        try await Outbox.append([first], to: "accounts", on: connection)
                        firstAppended.continuation.yield()
                        try await Task.sleep(for: .milliseconds(300))
                        // The second writer is still waiting for this transaction's aggregate lock.
                        #expect(secondAppended.withLock { $0 } == false)
                    }
                }
                var iterator = firstAppended.stream.makeAsyncIterator()
                await iterator.next()
                group.addTask {
                    try await client.withTransaction(logger: quiet) { connection in
                        try await Outbox.append([second], to: "accounts", on: connection)
                        secondAppended.withLock { $0 = true }
                    }
                }
                try await group.waitForAll()
            }
            let transport = RecordingTransport()
            let relay = try startRelay(url, transport)
            defer { relay.task.cancel() }
            #expect(await eventually { transport.published.count == 2 })
            #expect(transport.published.map(\.event.id) == [first.id, second.id])
        }
    }
}

@Suite("PostgreSQL outbox: relays share the slots", .timeLimit(.minutes(3)))
struct OutboxRelayBalanceTests {
    /// A writer's open transaction holds aggregate locks in the same lock space; a lone relay still counts one relay
    /// and takes every slot.
    @Test func aWritersAggregateLocksAreNotCountedAsRelays() async throws {
        try await withTestDatabase { client, url in
            let transport = RecordingTransport()
            let open = CloudEvent(Deposited(account: "held-open", sequence: 1), source: "test")
            try await withThrowingTaskGroup(of: Void.self) { group in
                let appended = AsyncStream<Void>.makeStream()
                let release = AsyncStream<Void>.makeStream()
                group.addTask {
                    try await client.withTransaction(logger: quiet) { connection in
                        try await Outbox.append([open], to: "accounts", on: connection)
                        appended.continuation.yield()
                        var waiting = release.stream.makeAsyncIterator()
                        await waiting.next()
                    }
                }
                var iterator = appended.stream.makeAsyncIterator()
                await iterator.next()
                let relay = try startRelay(url, transport)
                #expect(await eventually { relay.relay.stats.slots == Outbox.slots }, "\(relay.relay.stats.slots)")
                release.continuation.yield()
                try await group.waitForAll()
                #expect(await eventually { transport.published.count == 1 })
                relay.task.cancel()
            }
        }
    }

    /// Two relays split the 16 slots (8 each); a third makes it 6/6/4 at most; when relays stop, the survivors
    /// take their slots over.
    @Test func relaysShareTheSlotsAndTheSurvivorTakesThemAll() async throws {
        try await withTestDatabase { client, url in
            let transport = RecordingTransport()
            let first = try startRelay(url, transport)
            defer { first.task.cancel() }
            #expect(await eventually { first.relay.stats.slots == Outbox.slots })
            let second = try startRelay(url, transport)
            defer { second.task.cancel() }
            #expect(
                await eventually { first.relay.stats.slots == 8 && second.relay.stats.slots == 8 },
                "\(first.relay.stats.slots) + \(second.relay.stats.slots)")
            let third = try startRelay(url, transport)
            #expect(
                await eventually {
                    let slots = [first, second, third].map(\.relay.stats.slots)
                    return slots.reduce(0, +) == Outbox.slots && slots.allSatisfy { $0 > 0 && $0 <= 6 }
                }, "\([first, second, third].map(\.relay.stats.slots))")
            // Every slot is published by someone: events on all of them arrive.
            let events = (0..<64).map { CloudEvent(Deposited(account: "account-\($0)", sequence: 1), source: "test") }
            try await client.withTransaction(logger: quiet) { try await Outbox.append(events, to: "accounts", on: $0) }
            #expect(await eventually { transport.published.count == 64 })

            third.task.cancel()
            second.task.cancel()
            #expect(await eventually { first.relay.stats.slots == Outbox.slots }, "\(first.relay.stats.slots)")
        }
    }
}
