import Foundation
import Herald
import HeraldBroker
import HeraldTesting
import HeraldWire
import Synchronization
import Testing

@Suite("Broker engine")
struct BrokerEngineTests {
    func openBroker(_ directory: String, configure: (inout BrokerConfiguration) -> Void = { _ in }) throws -> Broker {
        var configuration = BrokerConfiguration(dataDirectory: directory, defaultPartitions: 2)
        configure(&configuration)
        return try Broker(configuration: configuration)
    }

    @Test func aDuplicateWithinTheWindowReturnsTheOriginalPositionEvenAfterARestart() async throws {
        let directory = TestBroker.temporaryDirectory()
        let event = sampleEvent(1)
        var broker = try openBroker(directory)
        let first = try await broker.publish(topic: "orders", events: [wire(event)])
        let again = try await broker.publish(topic: "orders", events: [wire(event), wire(event)])
        #expect(again.allSatisfy { $0.duplicate && $0.offset == first[0].offset && $0.partition == first[0].partition })
        broker.close()
        broker = try openBroker(directory)
        let afterRestart = try await broker.publish(topic: "orders", events: [wire(event)])
        #expect(afterRestart[0].duplicate, "the dedup table survives a restart")
        #expect(afterRestart[0].offset == first[0].offset)
        var otherSource = event
        otherSource.source = "another-producer"
        let other = try await broker.publish(topic: "orders", events: [wire(otherSource)])
        #expect(!other[0].duplicate, "dedup is by (source, id)")
        #expect(broker.topic("orders")!.endOffsets.reduce(0, +) == 2)
        broker.close()
        broker = try openBroker(directory) { $0.dedupWindow = .milliseconds(1) }
        try await Task.sleep(for: .milliseconds(5))
        let outside = try await broker.publish(topic: "orders", events: [wire(event)])
        #expect(!outside[0].duplicate, "outside the window an id may be used again")
    }

    @Test func invalidEventsAreRefusedWithTheReasonAndNothingIsStored() async throws {
        let broker = try openBroker(TestBroker.temporaryDirectory()) { $0.maxEventBytes = 1000 }
        var bad = wire(sampleEvent(1))
        bad.headers[bad.headers.count - 1] ^= 0xFF
        await #expect(throws: BrokerError.self) {
            try await broker.publish(topic: "t", events: [wire(sampleEvent(0)), bad])
        }
        do {
            _ = try await broker.publish(topic: "t", events: [WireEvent(headers: [0, 0, 0], data: [])])
        } catch {
            #expect(error.code == .invalidEvent)
            #expect(error.message.contains("specversion"))
        }
        let big = WireEvent(headers: wire(sampleEvent(2)).headers, data: Array(repeating: 0, count: 2000))
        await #expect(throws: BrokerError.self) { try await broker.publish(topic: "t", events: [big]) }
        await #expect(throws: BrokerError.self) {
            try await broker.publish(topic: "../etc", events: [wire(sampleEvent(3))])
        }
        #expect((broker.topic("t")?.endOffsets.reduce(0, +) ?? 0) == 0)
    }

    @Test func acknowledgedEventsStayAcknowledgedAcrossARestart() async throws {
        let directory = TestBroker.temporaryDirectory()
        var broker = try openBroker(directory)
        let events = (0..<40).map { sampleEvent($0) }
        _ = try await broker.publish(topic: "t", events: events.map(wire))
        let member = CollectingMember()
        let id = try broker.subscribe(subscription("t"), member: member)
        let delivered = try await member.take(atLeast: 40, ticking: broker)
        #expect(delivered.count == 40)
        let acked = delivered.filter { $0.offset % 3 != 0 }
        let stale = broker.settle(
            member: id,
            acked.map { SettleItem(settlement: .ack, partition: $0.partition, offset: $0.offset, attempt: $0.attempt) })
        #expect(stale.allSatisfy { !$0 })
        broker.tick()
        broker.close()
        broker = try openBroker(directory)
        let again = CollectingMember()
        _ = try broker.subscribe(subscription("t"), member: again)
        let redelivered = try await again.take(atLeast: 40 - acked.count, ticking: broker)
        try await Task.sleep(for: .milliseconds(50))
        let extra = again.take()
        let expected = Set(delivered.filter { $0.offset % 3 == 0 }.map { "\($0.partition)/\($0.offset)" })
        #expect(Set(redelivered.map { "\($0.partition)/\($0.offset)" }) == expected)
        #expect(extra.isEmpty, "acknowledged events are not delivered again")
    }

    /// Random acks, nacks, terminations, ignored deliveries (ack timeouts) and stale acks against one group; checks
    /// the outcome against a model: each event ends acked or dead-lettered exactly once, attempts count up by one,
    /// dead letters carry the attempts and the reason, stale acks are refused and never applied.
    @Test(arguments: [1, 2, 3])
    func settlementFollowsTheModel(seed: UInt64) async throws {
        var random = SplitMix(seed: seed)
        let broker = try openBroker(TestBroker.temporaryDirectory()) { $0.fsync = .none }
        let events = (0..<150).map { sampleEvent($0, key: "k\($0 % 5)") }
        _ = try await broker.publish(topic: "model", events: events.map(wire))
        let member = CollectingMember()
        let maxDeliveries = 3
        let id = try broker.subscribe(
            // A small credit keeps each batch short, so the test settles well within the ack wait on a busy machine.
            subscription("model", ackWait: 600, maxDeliveries: UInt32(maxDeliveries), backoff: [5], maxInFlight: 16),
            member: member)
        enum Outcome { case acked, deadLettered }
        var attempts: [Int64: Int] = [:]
        var outcomes: [Int64: Outcome] = [:]
        var expectDead: [Int64: Int] = [:]
        var races = 0
        let idOf = Dictionary(uniqueKeysWithValues: events.map { ($0.id.description, $0) })
        let deadline = ContinuousClock.now + .seconds(20)
        func key(_ d: WireDelivery) -> Int64 { Int64(d.partition) << 40 | d.offset }
        while outcomes.count + expectDead.count < events.count, ContinuousClock.now < deadline {
            broker.tick()
            let batch = member.take()
            let latest = Dictionary(batch.map { (key($0), $0.attempt) }, uniquingKeysWith: max)
            for delivery in batch {
                let position = key(delivery)
                if delivery.attempt < latest[position]! {
                    // Redelivered within this batch (the ack wait passed while the test was busy): superseded.
                    attempts[position] = Int(delivery.attempt)
                    #expect(
                        broker.settle(
                            member: id,
                            [
                                SettleItem(
                                    settlement: .ack, partition: delivery.partition, offset: delivery.offset,
                                    attempt: delivery.attempt)
                            ])[0], "a superseded attempt cannot be acked")
                    continue
                }
                #expect(outcomes[position] == nil, "nothing is delivered after it was acked")
                #expect(Int(delivery.attempt) == (attempts[position] ?? 0) + 1, "attempts count up by one")
                attempts[position] = Int(delivery.attempt)
                #expect(idOf[try BinaryEvent.summary(delivery.event.headers).id] != nil)
                func settle(_ settlement: WireSettlement, attempt: UInt32? = nil) -> Bool {
                    broker.settle(
                        member: id,
                        [
                            SettleItem(
                                settlement: settlement, partition: delivery.partition, offset: delivery.offset,
                                attempt: attempt ?? delivery.attempt)
                        ])[0]
                }
                if delivery.attempt > 1 {
                    #expect(settle(.ack, attempt: delivery.attempt - 1), "an ack of an earlier attempt is stale")
                }
                // A settlement that comes back stale lost a race with the ack wait (a busy machine): the broker
                // treated the delivery as timed out, and so does the model.
                let last = Int(delivery.attempt) >= maxDeliveries
                func timedOut() {
                    races += 1
                    if last { expectDead[position] = Int(delivery.attempt) }
                }
                switch random.next() % 100 {
                case 0..<50:
                    if settle(.ack) { timedOut() } else { outcomes[position] = .acked }
                case 50..<70:
                    if settle(.nack(delayMilliseconds: 1)) {
                        timedOut()
                    } else if last {
                        expectDead[position] = Int(delivery.attempt)
                    }
                case 70..<75:
                    if settle(.terminate(reason: "bad order")) {
                        timedOut()
                    } else {
                        expectDead[position] = Int(delivery.attempt)
                    }
                default:
                    // Ignored: the ack wait expires and it comes again, or is dead-lettered at the last attempt.
                    if last { expectDead[position] = Int(delivery.attempt) }
                }
            }
            try await Task.sleep(for: .milliseconds(3))
        }
        #expect(outcomes.count + expectDead.count == events.count, "every event reached an outcome")
        #expect(races < events.count / 2, "settlements were refused only in races with the ack wait (\(races))")
        // The last ignored deliveries are dead-lettered when their ack wait expires.
        let settled = ContinuousClock.now + .seconds(5)
        while broker.groups(topic: "model")[0].pending > 0, ContinuousClock.now < settled {
            broker.tick()
            try await Task.sleep(for: .milliseconds(5))
        }
        broker.tick()
        let letters = try broker.deadLetters(topic: "model", limit: 1000)
        #expect(letters.count == expectDead.count, "each dead letter is written exactly once")
        #expect(Set(letters.map(\.id)).count == letters.count)
        for letter in letters {
            #expect(letter.extensions["deadlettergroup"] == .string("g"))
            guard case .string(let reason)? = letter.extensions["deadletterreason"] else {
                Issue.record("no reason")
                continue
            }
            #expect(!reason.isEmpty)
            guard case .integer(let count)? = letter.extensions["deliveryattempts"] else {
                Issue.record("no attempts")
                continue
            }
            #expect(reason.hasPrefix("terminated") || Int(count) == maxDeliveries)
        }
        let info = broker.groups(topic: "model")[0]
        #expect(info.pending == 0 && info.lag == 0)
        #expect(info.deadLettered == expectDead.count && info.acked == outcomes.count)
        #expect(member.take().isEmpty, "nothing more is delivered")
    }

    @Test func orderedGroupsHaveOneEventInFlightPerKeyInOffsetOrder() async throws {
        let broker = try openBroker(TestBroker.temporaryDirectory()) { $0.defaultPartitions = 1 }
        let events = (0..<60).map { sampleEvent($0, key: "key-\($0 % 4)") }
        _ = try await broker.publish(topic: "ordered", events: events.map(wire))
        let member = CollectingMember()
        let id = try broker.subscribe(subscription("ordered", ordered: true), member: member)
        var seen: [String] = []
        var handled = 0
        let deadline = ContinuousClock.now + .seconds(10)
        while handled < 60, ContinuousClock.now < deadline {
            broker.tick()
            let batch = member.take()
            let keys = try batch.map { try #require(try BinaryEvent.decode($0.event).partitionkey) }
            #expect(Set(keys).count == keys.count, "never two events of one key in flight")
            seen += try batch.map { try BinaryEvent.decode($0.event).id.description }
            _ = broker.settle(
                member: id,
                batch.map {
                    SettleItem(settlement: .ack, partition: $0.partition, offset: $0.offset, attempt: $0.attempt)
                })
            handled += batch.count
        }
        for key in 0..<4 {
            let expected = events.filter { $0.partitionkey == "key-\(key)" }.map(\.id.description)
            #expect(seen.filter { expected.contains($0) } == expected, "key-\(key) in publish order")
        }
    }

    @Test func aConsumerThatDoesNotSettleHoldsAtMostItsCredit() async throws {
        let broker = try openBroker(TestBroker.temporaryDirectory()) { $0.fsync = .none }
        _ = try await broker.publish(topic: "flood", events: (0..<3000).map { wire(sampleEvent($0)) })
        let member = CollectingMember()
        _ = try broker.subscribe(subscription("flood", maxInFlight: 25), member: member)
        let received = try await member.take(atLeast: 25, ticking: broker)
        for _ in 0..<10 { broker.tick() }
        #expect(received.count + member.take().count == 25)
        #expect(broker.inFlight(topic: "flood", group: "g") == 25)
        member.accepting.store(false, ordering: .relaxed)
        #expect(broker.groups(topic: "flood")[0].lag == 2975, "the rest waits in the log, not in memory")
    }

    @Test func deadLettersCanBeListedAndReplayedOnce() async throws {
        let broker = try openBroker(TestBroker.temporaryDirectory())
        _ = try await broker.publish(topic: "pay", events: [wire(sampleEvent(1)), wire(sampleEvent(2))])
        let member = CollectingMember()
        let id = try broker.subscribe(subscription("pay"), member: member)
        let first = try await member.take(atLeast: 2, ticking: broker)
        _ = broker.settle(
            member: id,
            first.map {
                SettleItem(
                    settlement: .terminate(reason: "card declined"), partition: $0.partition, offset: $0.offset,
                    attempt: 1)
            })
        try await Task.sleep(for: .milliseconds(20))
        let letters = try broker.deadLetters(topic: "pay")
        #expect(letters.count == 2)
        #expect(letters.allSatisfy { $0.extensions["deadletterreason"] == .string("terminated: card declined") })
        #expect(try await broker.replayDeadLetters(topic: "pay") == 2)
        #expect(try await broker.replayDeadLetters(topic: "pay") == 0, "each dead letter is replayed once")
        let replayed = try await member.take(atLeast: 2, ticking: broker)
        #expect(replayed.count == 2)
        let decoded = try replayed.map { try BinaryEvent.decode($0.event) }
        #expect(Set(decoded.map(\.id)) == Set(letters.map(\.id)), "the same events come back")
        #expect(decoded.allSatisfy { $0.extensions["deadletterreason"] == nil })
        // Replayed events that fail again get letters of their own (and can be replayed again).
        _ = broker.settle(
            member: id,
            replayed.map {
                SettleItem(
                    settlement: .terminate(reason: "still declined"), partition: $0.partition, offset: $0.offset,
                    attempt: $0.attempt)
            })
        try await Task.sleep(for: .milliseconds(20))
        let again = try broker.deadLetters(topic: "pay")
        #expect(again.count == 4)
        #expect(
            again.suffix(2).allSatisfy { $0.extensions["deadletterreason"] == .string("terminated: still declined") })
        #expect(try await broker.replayDeadLetters(topic: "pay") == 2)
    }

    @Test func topicsAndGroupsPersistAndCanBeDeleted() async throws {
        let directory = TestBroker.temporaryDirectory()
        var broker = try openBroker(directory)
        try broker.createTopic("a", partitions: 3, retention: TopicRetention(maxAge: .seconds(60), maxBytes: nil))
        #expect(throws: BrokerError.self) { try broker.createTopic("a", partitions: 5) }
        _ = try broker.subscribe(subscription("a", "g1"), member: CollectingMember())
        try broker.configureTopic("a", retention: TopicRetention(maxAge: .seconds(7200), maxBytes: 1 << 20))
        broker.close()
        broker = try openBroker(directory)
        #expect(broker.topic("a")?.partitions == 3)
        #expect(broker.topic("a")?.retentionSeconds == 7200 && broker.topic("a")?.retentionBytes == 1 << 20)
        #expect(broker.groups(topic: "a").map(\.group) == ["g1"])
        try broker.deleteGroup(topic: "a", group: "g1")
        try broker.deleteTopic("a")
        broker.close()
        broker = try openBroker(directory)
        #expect(broker.topic("a") == nil)
        #expect(!FileManager.default.fileExists(atPath: directory + "/topics/a"))
    }
}

@Suite("Broker metadata journal")
struct JournalCompactionTests {
    @Test func aCompactedJournalRecoversTheSameGroupsAndSettlements() async throws {
        let directory = TestBroker.temporaryDirectory()
        var configuration = BrokerConfiguration(dataDirectory: directory, defaultPartitions: 2)
        configuration.journalCompactionBytes = 2048
        var broker = try Broker(configuration: configuration)
        _ = try await broker.publish(topic: "t", events: (0..<300).map { wire(sampleEvent($0)) })
        let member = CollectingMember()
        let id = try broker.subscribe(subscription("t"), member: member)
        let delivered = try await member.take(atLeast: 300, ticking: broker)
        // Ack all but every tenth, one at a time, so the journal grows past the limit many times.
        for delivery in delivered where delivery.offset % 10 != 0 {
            _ = broker.settle(
                member: id,
                [SettleItem(settlement: .ack, partition: delivery.partition, offset: delivery.offset, attempt: 1)])
            broker.tick()
        }
        let journalBytes = try FileManager.default.contentsOfDirectory(atPath: directory + "/_meta").reduce(0) {
            $0 + ((try? FileManager.default.attributesOfItem(atPath: directory + "/_meta/" + $1)[.size] as? Int) ?? 0)
        }
        #expect(journalBytes < 16_384, "the journal was compacted (\(journalBytes) bytes)")
        broker.close()
        broker = try Broker(configuration: configuration)
        let again = CollectingMember()
        _ = try broker.subscribe(subscription("t"), member: again)
        let redelivered = try await again.take(atLeast: 30, ticking: broker)
        try await Task.sleep(for: .milliseconds(30))
        broker.tick()
        let all = redelivered + again.take()
        #expect(Set(all.map(\.offset)) == Set(delivered.filter { $0.offset % 10 == 0 }.map(\.offset)))
        #expect(all.count == 30, "only the unacknowledged come back")
    }
}

@Suite("Broker fsync policies")
struct FsyncPolicyTests {
    @Test func alwaysAcknowledgesOnlyWhatIsDurable() async throws {
        let broker = try Broker(
            configuration: BrokerConfiguration(dataDirectory: TestBroker.temporaryDirectory(), fsync: .always))
        let acks = try await broker.publish(topic: "t", events: (0..<50).map { wire(sampleEvent($0)) })
        let info = try #require(broker.topic("t"))
        for ack in acks { #expect(info.durableOffsets[Int(ack.partition)] > ack.offset) }
    }

    @Test func intervalSyncsWithinTheInterval() async throws {
        let broker = try Broker(
            configuration: BrokerConfiguration(
                dataDirectory: TestBroker.temporaryDirectory(), fsync: .interval(.milliseconds(20)),
                defaultPartitions: 1))
        _ = try await broker.publish(topic: "t", events: (0..<50).map { wire(sampleEvent($0)) })
        #expect(try #require(broker.topic("t")).durableOffsets == [0], "acknowledged before the sync")
        let deadline = ContinuousClock.now + .seconds(5)
        while try #require(broker.topic("t")).durableOffsets != [50], ContinuousClock.now < deadline {
            broker.tick()
            try await Task.sleep(for: .milliseconds(5))
        }
        #expect(try #require(broker.topic("t")).durableOffsets == [50], "synced by the interval")
    }
}

@Suite("Broker data directory")
struct DataDirectoryTests {
    @Test func twoBrokersCannotShareADataDirectory() throws {
        let directory = TestBroker.temporaryDirectory()
        let first = try Broker(configuration: BrokerConfiguration(dataDirectory: directory))
        do {
            _ = try Broker(configuration: BrokerConfiguration(dataDirectory: directory))
            Issue.record("a second broker on the same directory is refused")
        } catch {
            #expect(error.code == .storage && error.message.contains("another broker is using"))
        }
        first.close()
        let second = try Broker(configuration: BrokerConfiguration(dataDirectory: directory))
        second.close()
    }
}

@Suite("Broker admission and start positions")
struct AdmissionTests {
    @Test func overloadIsARetryableRefusalAndNothingRefusedIsStored() async throws {
        let broker = try Broker(
            configuration: BrokerConfiguration(
                dataDirectory: TestBroker.temporaryDirectory(), defaultPartitions: 1, maxPendingPublishes: 1))
        let outcomes = try await withThrowingTaskGroup(of: (WireEvent, Bool).self) { group in
            for index in 0..<200 {
                group.addTask {
                    let event = wire(sampleEvent(index))
                    do {
                        _ = try await broker.publish(topic: "busy", events: [event])
                        return (event, true)
                    } catch {
                        #expect((error as? BrokerError)?.code == .unavailable, "overload is the retryable refusal")
                        return (event, false)
                    }
                }
            }
            var outcomes: [(WireEvent, Bool)] = []
            for try await outcome in group { outcomes.append(outcome) }
            return outcomes
        }
        let accepted = outcomes.filter(\.1).count
        #expect(accepted < 200, "some publishes were refused while one was in flight")
        #expect(broker.topic("busy")!.endOffsets == [Int64(accepted)], "refused batches were not written")
        // Retried one at a time, every refused event gets in.
        for (event, ok) in outcomes where !ok { _ = try await broker.publish(topic: "busy", events: [event]) }
        #expect(broker.topic("busy")!.endOffsets == [200])
    }

    @Test func groupsStartWhereTheyAreTold() async throws {
        let broker = try Broker(
            configuration: BrokerConfiguration(dataDirectory: TestBroker.temporaryDirectory(), defaultPartitions: 1))
        _ = try await broker.publish(topic: "t", events: (0..<10).map { wire(sampleEvent($0)) })
        try await Task.sleep(for: .milliseconds(20))
        let middle = Int64(wallClockMilliseconds())
        try await Task.sleep(for: .milliseconds(20))
        _ = try await broker.publish(topic: "t", events: (10..<15).map { wire(sampleEvent($0)) })
        for (group, start, first) in [
            ("earliest", WireStart.earliest, Int64(0)), ("offset", .offset(7), 7), ("time", .time(middle), 10),
            ("latest", .latest, 15),
        ] {
            let member = CollectingMember()
            _ = try broker.subscribe(subscription("t", group, start: start), member: member)
            if first == 15 {
                _ = try await broker.publish(topic: "t", events: [wire(sampleEvent(15))])
            }
            let got = try await member.take(atLeast: 1, ticking: broker)
            #expect(got.first?.offset == first, "\(group) starts at \(first)")
        }
    }
}

func wallClockMilliseconds() -> UInt64 { UInt64(Date().timeIntervalSince1970 * 1000) }

@Suite("Broker retention")
struct BrokerRetentionTests {
    @Test func retentionDropsOldSegmentsAndMovesLaggingGroupsUp() async throws {
        var configuration = BrokerConfiguration(
            dataDirectory: TestBroker.temporaryDirectory(), fsync: .none, defaultPartitions: 1)
        configuration.segmentBytes = 16 << 10
        let broker = try Broker(configuration: configuration)
        try broker.createTopic("old", partitions: 1, retention: TopicRetention(maxAge: nil, maxBytes: 64 << 10))
        let lagging = CollectingMember()
        lagging.accepting.store(false, ordering: .relaxed)
        _ = try broker.subscribe(subscription("old", "lagging"), member: lagging)
        for start in stride(from: 0, to: 2000, by: 100) {
            _ = try await broker.publish(topic: "old", events: (start..<(start + 100)).map { wire(sampleEvent($0)) })
        }
        // A new retention setting is applied on the next tick.
        try broker.configureTopic("old", retention: TopicRetention(maxAge: nil, maxBytes: 64 << 10))
        broker.tick()
        let info = try #require(broker.topic("old"))
        #expect(info.startOffsets[0] > 0, "old segments were deleted")
        #expect(info.bytes <= (64 << 10) + (16 << 10) + 4096, "the partition is within its size limit")
        #expect(broker.groups(topic: "old")[0].lag <= 2000 - info.startOffsets[0], "the lagging group moved up")
        lagging.accepting.store(true, ordering: .relaxed)
        let first = try await lagging.take(atLeast: 1, ticking: broker)
        #expect(first.first?.offset == info.startOffsets[0], "it resumes at the new start")
    }
}
