import Herald
import Synchronization

/// The shared conformance suite every `EventTransport` must pass. Each check is bounded in time and throws a
/// `ConformanceFailure` that names the broken guarantee.
///
/// ```swift
/// @Test(arguments: TransportConformance.checks)
/// func conformance(check: TransportConformance.Check) async throws {
///     try await check.run(makeTransport: { InMemoryTransport() })
/// }
/// ```
/// Checks for capabilities a transport does not declare are skipped by `run` (they pass trivially) — only the
/// guarantees the transport claims are held against it.
public enum TransportConformance {
    public struct Check: Sendable, CustomStringConvertible {
        public let name: String
        public let requires: TransportCapabilities
        let body: @Sendable (any EventTransport, String) async throws -> Void

        public var description: String { name }

        /// Runs the check against a fresh transport on a fresh topic, then shuts the transport down.
        public func run(makeTransport: @Sendable () async throws -> any EventTransport) async throws {
            let transport = try await makeTransport()
            defer { Task { await transport.shutdown() } }
            guard transport.capabilities.isSuperset(of: requires) else { return }
            let topic = "conformance.\(name.filter { $0.isLetter || $0.isNumber }).\(EventID())"
            try await withDeadline(.seconds(30), name: name) { try await body(transport, topic) }
        }
    }

    /// Fast redelivery settings so checks finish quickly.
    public static let quick = SubscribeOptions(
        start: .earliest, ackWait: .milliseconds(300), maxDeliveries: 3, backoff: [.milliseconds(20)],
        ordered: false, maxInFlight: 64)

    /// The same with a long ack wait, for checks that must not see ack-wait redeliveries on a busy machine.
    public static let relaxed: SubscribeOptions = {
        var options = quick
        options.ackWait = .seconds(10)
        return options
    }()

    public static let checks: [Check] = [
        Check(name: "publish acknowledges each event in order", requires: []) { transport, topic in
            let events = (0..<10).map { sample($0) }
            let acks = try await transport.publish(events, to: topic)
            try expect(acks.count == 10, "10 acks for 10 events, got \(acks.count)")
            try expect(acks.map(\.id) == events.map(\.id), "acks are in the batch's order")
            try expect(Set(acks.map { "\($0.partition)/\($0.offset)" }).count == 10, "each event has its own position")
            try expect(acks.allSatisfy { !$0.duplicate }, "no ack is a duplicate")
        },
        Check(name: "a group receives every event with its attributes intact", requires: []) { transport, topic in
            var event = sample(1)
            event.subject = "order-1"
            event.correlationid = "corr-1"
            event.causationid = "cause-1"
            event.recipient = "payments"
            event.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            event.extensions["tenant"] = .string("acme")
            event.extensions["retries"] = .integer(3)
            event.datacontenttype = "application/octet-stream"
            event.data = .bytes([0, 1, 2, 255])
            _ = try await transport.publish([event], to: topic)
            let stream = try await transport.subscribe(topic: topic, group: "g", options: relaxed)
            let received = try await collect(stream, count: 1).first!
            try await received.ack()
            let got = received.event
            try expect(got.id == event.id && got.source == event.source && got.type == event.type, "id, source, type")
            try expect(got.time == event.time, "time survives (\(String(describing: got.time)))")
            try expect(got.subject == "order-1" && got.correlationid == "corr-1" && got.causationid == "cause-1", "ids")
            try expect(got.recipient == "payments" && got.traceparent == event.traceparent, "recipient, traceparent")
            try expect(got.extensions["tenant"] == .string("acme"), "string extension")
            try expect(got.extensions["retries"] == .integer(3), "integer extension")
            guard case .bytes(let bytes) = got.data else { throw ConformanceFailure("binary data is lost") }
            try expect(bytes == [0, 1, 2, 255], "binary data intact")
            try expect(received.attempt == 1, "first delivery is attempt 1")
        },
        Check(name: "every group gets every event; members of one group share them", requires: [.competingConsumers]) {
            transport, topic in
            let a1 = try await transport.subscribe(topic: topic, group: "a", options: relaxed)
            let a2 = try await transport.subscribe(topic: topic, group: "a", options: relaxed)
            let b = try await transport.subscribe(topic: topic, group: "b", options: relaxed)
            let events = (0..<40).map { sample($0) }
            _ = try await transport.publish(events, to: topic)
            let groupB = try await collect(b, count: 40)
            for delivery in groupB { try await delivery.ack() }
            try expect(Set(groupB.map(\.event.id)) == Set(events.map(\.id)), "group b got all 40")
            let shared = try await collectAcking([a1, a2], total: 40)
            try expect(Set(shared.map(\.event.id)) == Set(events.map(\.id)), "group a got all 40 between its members")
        },
        Check(name: "an unacknowledged delivery is redelivered after the ack wait", requires: []) { transport, topic in
            _ = try await transport.publish([sample(1)], to: topic)
            let stream = try await transport.subscribe(topic: topic, group: "g", options: quick)
            var iterator = stream.makeAsyncIterator()
            let first = try await iterator.next()!
            let second = try await iterator.next()!
            try expect(second.event.id == first.event.id, "the same event comes again")
            try expect(second.attempt == 2, "with attempt 2, got \(second.attempt)")
            try await second.ack()
        },
        Check(name: "nack with delay redelivers after the delay", requires: [.delayedRedelivery]) { transport, topic in
            _ = try await transport.publish([sample(1)], to: topic)
            let stream = try await transport.subscribe(topic: topic, group: "g", options: relaxed)
            var iterator = stream.makeAsyncIterator()
            let first = try await iterator.next()!
            let clock = ContinuousClock()
            let start = clock.now
            try await first.nack(delay: .milliseconds(150))
            let second = try await iterator.next()!
            let waited = clock.now - start
            try expect(second.attempt == 2, "attempt 2 after a nack")
            try expect(waited >= .milliseconds(140), "not redelivered before the delay (waited \(waited))")
            try await second.ack()
        },
        Check(name: "an acknowledged event is not delivered again", requires: []) { transport, topic in
            _ = try await transport.publish([sample(1), sample(2)], to: topic)
            let stream = try await transport.subscribe(topic: topic, group: "g", options: relaxed)
            var iterator = stream.makeAsyncIterator()
            for _ in 0..<2 { try await iterator.next()!.ack() }
            let extra = try await nextWithin(&iterator, .milliseconds(700))
            try expect(extra == nil, "nothing after both were acked, got \(String(describing: extra?.event.id))")
        },
        Check(name: "a stale ack is rejected", requires: []) { transport, topic in
            _ = try await transport.publish([sample(1)], to: topic)
            let stream = try await transport.subscribe(topic: topic, group: "g", options: quick)
            var iterator = stream.makeAsyncIterator()
            let first = try await iterator.next()!
            let second = try await iterator.next()!  // attempt 2 after the ack wait
            do {
                try await first.ack()
                throw ConformanceFailure("an ack for attempt 1 was accepted after attempt 2 was delivered")
            } catch let error as TransportError {
                try expect(error.code == .staleAck, "stale ack error, got \(error)")
            }
            try await second.ack()
            do {
                try await second.ack()
                throw ConformanceFailure("a second ack of the same delivery was accepted")
            } catch let error as TransportError {
                try expect(error.code == .staleAck, "double ack is stale, got \(error)")
            }
        },
        Check(name: "after max deliveries an event is dead-lettered once, with the reason", requires: [.deadLetters]) {
            transport, topic in
            _ = try await transport.publish([sample(7)], to: topic)
            let stream = try await transport.subscribe(topic: topic, group: "g", options: relaxed)
            var iterator = stream.makeAsyncIterator()
            for attempt in 1...3 {
                let delivery = try await iterator.next()!
                try expect(delivery.attempt == attempt, "attempt \(attempt)")
                try await delivery.nack(delay: .zero)
            }
            let dlq = try await transport.subscribe(topic: topic + ".dlq", group: "inspect", options: relaxed)
            var letters = dlq.makeAsyncIterator()
            let letter = try await letters.next()!
            try await letter.ack()
            try expect(letter.event.id == sample(7).id, "the dead letter is the event")
            try expect(letter.event.extensions["deadletterreason"] != nil, "the dead letter says why")
            try expect(letter.event.extensions["deliveryattempts"] == .integer(3), "and after how many attempts")
            let more = try await nextWithin(&letters, .milliseconds(500))
            try expect(more == nil, "dead-lettered exactly once")
            let again = try await nextWithin(&iterator, .milliseconds(500))
            try expect(again == nil, "not delivered again after dead-lettering")
        },
        Check(name: "terminate stops redelivery and dead-letters", requires: [.deadLetters]) { transport, topic in
            _ = try await transport.publish([sample(3)], to: topic)
            let stream = try await transport.subscribe(topic: topic, group: "g", options: relaxed)
            var iterator = stream.makeAsyncIterator()
            try await iterator.next()!.terminate(reason: "poison")
            let again = try await nextWithin(&iterator, .milliseconds(600))
            try expect(again == nil, "a terminated event is not redelivered")
            let dlq = try await transport.subscribe(topic: topic + ".dlq", group: "inspect", options: relaxed)
            var letters = dlq.makeAsyncIterator()
            let letter = try await letters.next()!
            try expect(letter.event.extensions["deadletterreason"]?.description.contains("poison") == true, "reason")
        },
        Check(
            name: "a republished (source, id) is acknowledged as a duplicate and delivered once",
            requires: [.deduplication]
        ) { transport, topic in
            let event = sample(5)
            let first = try await transport.publish([event], to: topic)
            let second = try await transport.publish([event], to: topic)
            try expect(second[0].duplicate, "the second publish is flagged duplicate")
            try expect(
                second[0].partition == first[0].partition && second[0].offset == first[0].offset,
                "the duplicate returns the original position")
            let stream = try await transport.subscribe(topic: topic, group: "g", options: relaxed)
            var iterator = stream.makeAsyncIterator()
            try await iterator.next()!.ack()
            let extra = try await nextWithin(&iterator, .milliseconds(400))
            try expect(extra == nil, "delivered once")
        },
        Check(name: "ordered mode keeps per-key order through nacks and redelivery", requires: [.orderingPerKey]) {
            transport, topic in
            var events: [CloudEvent] = []
            for index in 0..<30 {
                var event = sample(index)
                event.partitionkey = "key-\(index % 3)"
                events.append(event)
            }
            _ = try await transport.publish(events, to: topic)
            var options = relaxed
            options.ordered = true
            options.maxDeliveries = 10
            let stream = try await transport.subscribe(topic: topic, group: "g", options: options)
            var handled: [String: [Int]] = [:]
            var nacked = Set<EventID>()
            var iterator = stream.makeAsyncIterator()
            while handled.values.map(\.count).reduce(0, +) < 30 {
                let delivery = try await iterator.next()!
                let number = Int(delivery.event.subject!)!
                // Every third event fails once; its key must not move on meanwhile.
                if number % 3 == 0 && !nacked.contains(delivery.event.id) {
                    nacked.insert(delivery.event.id)
                    try await delivery.nack(delay: .milliseconds(10))
                    continue
                }
                handled[delivery.event.partitionkey!, default: []].append(number)
                try await delivery.ack()
            }
            for (key, numbers) in handled {
                try expect(numbers == numbers.sorted(), "key \(key) handled in order: \(numbers)")
            }
        },
        Check(name: "a member that leaves: its unsettled deliveries go to the others", requires: []) {
            transport, topic in
            _ = try await transport.publish((0..<5).map { sample($0) }, to: topic)
            // Room for a slow machine: the remaining member's acks must not lose a race with the ack wait until
            // the events run out of attempts.
            var options = quick
            options.ackWait = .seconds(1)
            options.maxDeliveries = 10
            var leaving: DeliveryStream? = try await transport.subscribe(topic: topic, group: "g", options: options)
            do {
                var iterator = leaving!.makeAsyncIterator()
                _ = try await iterator.next()
            }
            leaving = nil
            _ = leaving
            let staying = try await transport.subscribe(topic: topic, group: "g", options: options)
            let got = try await collectAcking([staying], total: 5)
            try expect(Set(got.map(\.event.id)).count == 5, "all five arrive at the remaining member")
        },
    ]

    // MARK: Helpers

    /// A small JSON event numbered `index`, with a deterministic id so duplicates can be made on purpose.
    public static func sample(_ index: Int) -> CloudEvent {
        var event = CloudEvent(
            id: EventID("conformance-\(index)"), source: "conformance", type: "com.herald.conformance.sample",
            time: Timestamp(nanosecondsSinceEpoch: 1_700_000_000_123_456_000 + Int64(index) * 1000),
            data: .bytes(Array("{\"n\":\(index)}".utf8)))
        event.datacontenttype = "application/json"
        event.subject = String(index)
        return event
    }

    static func collect(_ stream: DeliveryStream, count: Int) async throws -> [Delivery] {
        var result: [Delivery] = []
        for try await delivery in stream {
            result.append(delivery)
            if result.count == count { break }
        }
        try expect(result.count == count, "expected \(count) deliveries, got \(result.count)")
        return result
    }

    static func collectAcking(_ streams: [DeliveryStream], total: Int) async throws -> [Delivery] {
        try await withThrowingTaskGroup(of: [Delivery].self) { group in
            let counter = Counter()
            for stream in streams {
                group.addTask {
                    var got: [Delivery] = []
                    var iterator = stream.makeAsyncIterator()
                    while counter.value < total, let delivery = try await nextWithin(&iterator, .seconds(5)) {
                        do {
                            try await delivery.ack()
                        } catch let error as TransportError where error.code == .staleAck {
                            continue  // redelivered meanwhile (at-least-once): the later delivery counts
                        }
                        got.append(delivery)
                        counter.add()
                    }
                    return got
                }
            }
            var all: [Delivery] = []
            for try await part in group { all += part }
            return all
        }
    }

    /// The next delivery, or nil if none arrives within `limit`.
    public static func nextWithin(_ iterator: inout DeliveryStream.Iterator, _ limit: Duration) async throws
        -> Delivery?
    {
        let box = IteratorHolder(iterator)
        let result = try await withThrowingTaskGroup(of: Delivery?.self) { group in
            group.addTask { try await box.next() }
            group.addTask {
                try await Task.sleep(for: limit)
                return nil
            }
            let first = try await group.next()!
            group.cancelAll()
            return first
        }
        return result
    }
}

/// A check failed: the message names the guarantee.
public struct ConformanceFailure: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

func expect(_ condition: Bool, _ message: @autoclosure () -> String) throws {
    if !condition { throw ConformanceFailure(message()) }
}

/// Runs `body`, failing with a named error if it takes longer than `limit`.
public func withDeadline<T: Sendable>(
    _ limit: Duration, name: String, _ body: @escaping @Sendable () async throws -> T
) async throws -> T {
    try await withThrowingTaskGroup(of: T?.self) { group in
        group.addTask { try await body() }
        group.addTask {
            try await Task.sleep(for: limit)
            return nil
        }
        defer { group.cancelAll() }
        guard let value = try await group.next()! else {
            throw ConformanceFailure("'\(name)' did not finish within \(limit)")
        }
        return value
    }
}

final class Counter: Sendable {
    private let count = Mutex(0)
    var value: Int { count.withLock { $0 } }
    func add() { count.withLock { $0 += 1 } }
}

final class IteratorHolder: @unchecked Sendable {
    // Safe: the iterator is used by one task at a time (the holder's caller awaits it).
    var iterator: DeliveryStream.Iterator
    init(_ iterator: DeliveryStream.Iterator) { self.iterator = iterator }
    func next() async throws -> Delivery? { try await iterator.next() }
}
