import Herald
import HeraldNATS
import HeraldTesting
import Testing

@Suite("NATS: redelivery backoff", .timeLimit(.minutes(2)))
struct NATSBackoffTests {
    /// A delivery not acknowledged within the ack wait comes back after the ack wait plus that attempt's backoff
    /// (`SubscribeOptions.backoff`, carried as JetStream's consumer `backoff`), and a nack without a delay still
    /// redelivers at once. Only lower bounds on time are checked: a slow machine makes gaps longer, never shorter.
    @Test func anUnacknowledgedDeliveryComesBackAfterTheAckWaitAndItsBackoff() async throws {
        try await withNATSServer { servers in
            let transport = NATSTransport(configuration: .init(servers: servers))
            defer { Task { await transport.shutdown() } }
            let topic = "backoff.\(EventID())"
            var options = SubscribeOptions(
                start: .earliest, ackWait: .milliseconds(300), maxDeliveries: 10,
                backoff: [.milliseconds(900), .milliseconds(100)])
            options.maxInFlight = 8
            let stream = try await transport.subscribe(topic: topic, group: "g", options: options)
            _ = try await transport.publish([CloudEvent(source: "test", type: "t")], to: topic)
            var deliveries = stream.makeAsyncIterator()
            let clock = ContinuousClock()

            let first = try #require(try await deliveries.next())
            let firstAt = clock.now
            #expect(first.attempt == 1)
            // Not acked: back after 300 ms + 900 ms.
            let second = try #require(try await deliveries.next())
            let secondGap = clock.now - firstAt
            #expect(second.attempt == 2)
            // The server's clock starts when it sends attempt 1; this one when the test reads it, which on a loaded
            // machine can be 100 ms later. Without the backoff the gap would be at most the 300 ms ack wait.
            #expect(secondGap >= .milliseconds(800), "redelivered after \(secondGap), before ack wait + backoff")
            // A nack without a delay is redelivered at once, whatever the backoff.
            try await second.nack()
            let third = try #require(try await deliveries.next())
            #expect(third.attempt == 3)
            try await third.ack()
        }
    }
}
