import Herald
import Testing

// The README's example, kept compiling and working.
private struct ReadmeOrderCreated: Event {
    static let eventType = "com.example.order.created"
    var orderID: String
    var partitionKey: String? { orderID }
}

private struct ReadmeOrderPaid: Event {
    static let eventType = "com.example.order.paid"
    var orderID: String
}

@Suite("README example")
struct ReadmeExampleTests {
    @Test func theQuickExampleWorks() async throws {
        let bus = EventBus(source: "payments", strategy: .partitioned(lanes: 4, parkFailingKeys: false))
        let paid = Recorder<CloudEvent>()
        bus.subscribe(.type(ReadmeOrderPaid.eventType)) { event, _ in paid.append(event) }
        let subscription = bus.subscribe(
            ReadmeOrderCreated.self, priority: 10, middleware: [Retry(maxAttempts: 3), Deduplicate()]
        ) { order, context in
            try await context.publish(ReadmeOrderPaid(orderID: order.orderID))
        }
        let result = try await bus.publish(ReadmeOrderCreated(orderID: "o-1"))
        #expect(result.succeeded)
        try await bus.post(ReadmeOrderCreated(orderID: "o-2"))
        await bus.drain()
        subscription.cancel()
        await bus.shutdown()
        #expect(paid.count == 2)
        #expect(paid.all.first?.causationid == result.eventID.description)
    }

    @Test func theTransportExampleWorks() async throws {
        let transport: any EventTransport = InMemoryTransport()
        let bus = EventBus(
            configuration: .init(source: "payments", transport: TransportLink(transport, topic: "orders")))
        let seen = Recorder<String>()
        bus.subscribe(ReadmeOrderCreated.self) { order, _ in seen.append(order.orderID) }
        try await bus.start()
        try await bus.publish(ReadmeOrderCreated(orderID: "o-3"))
        try await eventually { seen.count == 1 }
        await bus.shutdown()
        await transport.shutdown()
    }
}
