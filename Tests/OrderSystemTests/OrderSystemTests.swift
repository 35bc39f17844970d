import Herald
import OrderSystem
import Synchronization
import Testing

@Suite("Order system")
struct OrderSystemTests {
    @Test(arguments: OrderDemo.Topology.allCases)
    func everyOrderReachesTheRightFinalState(_ topology: OrderDemo.Topology) async throws {
        let options = OrderDemo.Options(
            orders: 300, seed: 7, failurePercent: 20, topology: topology, timeout: .seconds(60))
        let report = try await OrderDemo.run(options)
        let gateway = PaymentGateway(seed: 7, failurePercent: 20)
        let declined = (1...300).filter { gateway.declines(orderID($0)) }.count
        #expect(report.passed, "wrong: \(report.wrongOrders.prefix(5))")
        #expect(report.byStatus[.cancelled] == declined)
        #expect(report.byStatus[.completed] == 300 - declined)
        #expect(report.byStatus[.pending, default: 0] == 0)
        #expect(report.duplicateNotifications == 0)
        #expect(declined > 30 && declined < 90, "the seed gives a realistic share of failures")
        // Created, then paid → shipped → completed, or failed → cancelled.
        #expect(report.events == 300 + 3 * (300 - declined) + 2 * declined)
        #expect(report.timelines.count == 3)
    }

    @Test func theSagaCancelsAnUnpaidOrderAndRefundsALatePayment() async throws {
        let bus = EventBus(source: "orders", strategy: .immediate)
        let orders = OrdersService(bus: bus, saga: OrderSaga(paymentTimeout: .milliseconds(20)))
        let refunds = Recorder()
        bus.subscribe(RefundPayment.self, service: "payments") { refund, _ in refunds.add(refund.orderID) }
        try await orders.place(OrderCreated(orderID: "o-1", customer: "c", amountCents: 100, items: 1))
        #expect(try await orders.status(of: "o-1") == .pending)
        #expect(try await orders.reservedStock() == 1)
        try await Task.sleep(for: .milliseconds(30))
        try await orders.sagas.fireTimeouts()
        #expect(try await orders.status(of: "o-1") == .cancelled)
        #expect(try await orders.cancellationReason(of: "o-1") == "no payment in time")
        #expect(try await orders.reservedStock() == 0, "the stock reservation was released")
        // The payment arrives after all: the saga compensates with a refund addressed to payments.
        try await bus.publish(
            OrderPaid(orderID: "o-1", paymentID: "p-1", amountCents: 100), EventAttributes(correlationID: "o-1"))
        #expect(refunds.values == ["o-1"])
    }

    @Test func aRedeliveredOrderIsChargedOnce() async throws {
        let bus = EventBus(source: "payments", strategy: .immediate)
        let payments = PaymentsService(bus: bus, gateway: PaymentGateway(seed: 1, failurePercent: 0))
        let paid = Recorder()
        bus.subscribe(OrderPaid.self) { event, _ in paid.add(event.orderID) }
        let created = CloudEvent(
            OrderCreated(orderID: "o-9", customer: "c", amountCents: 5, items: 1), source: "orders")
        try await bus.publish(created)
        try await bus.publish(created)
        #expect(paid.values == ["o-9"])
        #expect(payments.charged == ["o-9"])
    }
}

final class Recorder: Sendable {
    private let storage = Mutex<[String]>([])
    func add(_ value: String) { storage.withLock { $0.append(value) } }
    var values: [String] { storage.withLock { $0 } }
}

func orderID(_ index: Int) -> String {
    let digits = String(index)
    return "order-" + String(repeating: "0", count: max(0, 5 - digits.count)) + digits
}
