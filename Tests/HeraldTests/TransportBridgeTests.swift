import Herald
import Testing

@Suite("A bus linked to a transport")
struct TransportBridgeTests {
    func link(_ transport: InMemoryTransport, _ service: String, maxDeliveries: Int = 5) -> EventBus {
        // Failed handlers nack (redelivery after the 10 ms backoff); the ack wait is long so a loaded machine
        // never adds a redelivery of its own to the counts these tests check.
        let options = SubscribeOptions(
            ackWait: .seconds(30), maxDeliveries: maxDeliveries, backoff: [.milliseconds(10)])
        return EventBus(
            configuration: .init(
                source: service, strategy: .fifo(workers: 2),
                transport: TransportLink(
                    transport, topic: "events", options: options, redeliveryBackoff: [.milliseconds(10)])))
    }

    @Test func eventsCrossFromOneServiceToAnotherTyped() async throws {
        let transport = InMemoryTransport()
        let producer = link(transport, "producer")
        let consumer = link(transport, "consumer")
        let seen = Recorder<Ping>()
        consumer.subscribe(Ping.self) { ping, _ in seen.append(ping) }
        try await producer.start()
        try await consumer.start()
        let result = try await producer.publish(Ping(number: 7, key: "k"))
        #expect(result.acknowledgement != nil)
        try await eventually { seen.count == 1 }
        #expect(seen.all == [Ping(number: 7, key: "k")])
        await producer.shutdown()
        await consumer.shutdown()
        await transport.shutdown()
    }

    @Test func aFailedHandlerIsRedeliveredUntilItSucceeds() async throws {
        let transport = InMemoryTransport()
        let producer = link(transport, "producer")
        let consumer = link(transport, "consumer")
        let attempts = Recorder<Int>()
        consumer.subscribe(Ping.self) { ping, _ in
            attempts.append(ping.number)
            if attempts.count < 3 { throw TestFailure() }
        }
        try await consumer.start()
        try await producer.post(Ping(number: 1))
        try await eventually { attempts.count == 3 }
        try await eventually { transport.groupStatus(topic: "events", group: "consumer")?.pending == 0 }
        #expect(transport.groupStatus(topic: "events", group: "consumer")?.redelivered == 2)
        #expect(transport.events(in: "events.dlq").isEmpty)
        await consumer.shutdown()
        await transport.shutdown()
    }

    @Test func aDeliveryIsAckedOnlyWhenHandlersOnEveryStrategySucceeded() async throws {
        let transport = InMemoryTransport()
        let consumer = link(transport, "consumer")
        let shared = Recorder<Int>()
        let own = Recorder<Int>()
        consumer.subscribe(Ping.self) { ping, _ in shared.append(ping.number) }
        // This one runs on a strategy of its own and fails the first time: the delivery must come again.
        consumer.subscribe(Ping.self, strategy: .sequential) { ping, _ in
            own.append(ping.number)
            if own.count == 1 { throw TestFailure() }
        }
        try await consumer.start()
        _ = try await transport.publish([CloudEvent(Ping(number: 4), source: "p")], to: "events")
        try await eventually { own.count == 2 }
        try await eventually { transport.groupStatus(topic: "events", group: "consumer")?.pending == 0 }
        #expect(shared.all == [4, 4])
        #expect(transport.groupStatus(topic: "events", group: "consumer")?.redelivered == 1)
        await consumer.shutdown()
        await transport.shutdown()
    }

    @Test func aPoisonEventEndsInTheDeadLetterTopicOnce() async throws {
        let transport = InMemoryTransport()
        let producer = link(transport, "producer")
        let consumer = link(transport, "consumer", maxDeliveries: 3)
        let attempts = Recorder<Int>()
        consumer.subscribe(Ping.self) { ping, _ in
            attempts.append(ping.number)
            throw TestFailure()
        }
        try await consumer.start()
        try await producer.publish(Ping(number: 1))
        try await eventually { transport.events(in: "events.dlq").count == 1 }
        try await Task.sleep(for: .milliseconds(100))
        #expect(attempts.count == 3)
        let letter = try #require(transport.events(in: "events.dlq").first)
        #expect(letter.extensions["deliveryattempts"] == .integer(3))
        #expect(letter.extensions["deadlettergroup"] == .string("consumer"))
        await consumer.shutdown()
        await transport.shutdown()
    }

    @Test func responsesFromRemoteHandlersCarryCausation() async throws {
        let transport = InMemoryTransport()
        let a = link(transport, "a")
        let b = link(transport, "b")
        b.subscribe(Ping.self) { ping, context in try await context.publish(Pong(number: ping.number)) }
        let pongs = Recorder<CloudEvent>()
        a.subscribe(.type(Pong.eventType)) { event, _ in pongs.append(event) }
        try await a.start()
        try await b.start()
        let sent = try await a.publish(Ping(number: 3), EventAttributes(correlationID: "conversation-1"))
        try await eventually { pongs.count == 1 }
        let pong = pongs.all[0]
        #expect(pong.source == "b")
        #expect(pong.causationid == sent.eventID.description)
        #expect(pong.correlationid == "conversation-1")
        await a.shutdown()
        await b.shutdown()
        await transport.shutdown()
    }

    @Test func anUndecodableEventIsTerminatedNotRetried() async throws {
        let transport = InMemoryTransport()
        let consumer = link(transport, "consumer")
        consumer.subscribe(Ping.self) { _, _ in }
        try await consumer.start()
        let bad = CloudEvent(source: "x", type: Ping.eventType, data: .bytes(Array(#"{"number":"nope"}"#.utf8)))
        _ = try await transport.publish([bad], to: "events")
        try await eventually { transport.events(in: "events.dlq").count == 1 }
        let letter = try #require(transport.events(in: "events.dlq").first)
        #expect(letter.extensions["deadletterreason"]?.description.contains("terminated") == true)
        await consumer.shutdown()
        await transport.shutdown()
    }
}
