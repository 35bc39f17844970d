import Foundation
import Herald
import HeraldBroker
import HeraldClient
import HeraldHTTP
import HeraldTesting
import OrderSystem
import Testing

/// The order system with its four services as plain HTTP services (push groups in, the HTTP API out): orders
/// complete, and the W3C trace context placed on the order reaches the customer notification through all four.
@Suite("Order system over HTTP", .timeLimit(.minutes(2))) struct OrderSystemOverHTTPTests {
    @Test func ordersCompleteAndOneTraceFollowsEachOrder() async throws {
        let server = try await HTTPTestBroker()
        defer { Task { await server.stop() } }
        _ = try server.broker.createTopic("orders", partitions: 4)
        var buses: [EventBus] = []
        var services: [(any Sendable)?] = []
        var transports: [HTTPTransport] = []
        for name in OrderServices.names {
            let transport = HTTPTransport(configuration: .init(broker: server.base))
            let bus = OrderDemo.makeServiceBus(name, transport: transport)
            services.append(OrderServices.start(name, on: bus, gateway: PaymentGateway(seed: 1, failurePercent: 0)))
            try await bus.start()
            buses.append(bus)
            transports.append(transport)
        }
        // The storefront and the auditor use the TCP client.
        let storefront = BrokerTransport(host: "127.0.0.1", port: server.tcpPort, clientName: "storefront")
        let audit = try await storefront.subscribe(topic: "orders", group: "audit", options: SubscribeOptions())
        let traceparents = (1...5).map { "00-\(String(format: "%032x", $0))-00f067aa0ba902b7-01" }
        for (index, traceparent) in traceparents.enumerated() {
            var order = CloudEvent(
                PlaceOrder(OrderCreated(orderID: "o-\(index)", customer: "c", amountCents: 100, items: 1)),
                source: "storefront")
            order.traceparent = traceparent
            _ = try await storefront.publish([order], to: "orders")
        }
        var notified: [String: String] = [:]
        var iterator = audit.makeAsyncIterator()
        while notified.count < traceparents.count {
            guard let delivery = try await TransportConformance.nextWithin(&iterator, .seconds(30)) else { break }
            if delivery.event.type == CustomerNotified.eventType {
                notified[delivery.event.traceparent?.split(separator: "-")[1].description ?? "none"] =
                    delivery.event.source
            }
            try await delivery.ack()
        }
        #expect(
            Set(notified.keys) == Set(traceparents.map { String($0.split(separator: "-")[1]) }),
            "each order's notification carries the order's trace id")
        #expect(notified.values.allSatisfy { $0 == "notifications" })
        for bus in buses { await bus.shutdown() }
        for transport in transports { await transport.shutdown() }
        await storefront.shutdown()
        withExtendedLifetime(services) {}
    }
}
