import Herald
import Synchronization

/// The orders service: takes orders (reserving stock), runs the order saga, and keeps each order's final state in
/// its order book.
public final class OrdersService: Sendable {
    public static let name = "orders"

    public let bus: EventBus
    public let sagas: SagaManager<OrderSaga>
    public let book: any OrderBook

    public init(
        bus: EventBus, sagaStore: any SagaStore = InMemorySagaStore(), saga: OrderSaga = OrderSaga(),
        book: any OrderBook = InMemoryOrderBook()
    ) {
        self.bus = bus
        self.book = book
        self.sagas = SagaManager(saga, store: sagaStore, bus: bus)
        sagas.start(service: OrdersService.name)
        let dedup = Deduplicate()
        bus.subscribe(PlaceOrder.self, name: "orders.place", service: OrdersService.name, middleware: [dedup]) {
            [self] command, context in
            try await self.place(command.order, from: context)
        }
        bus.subscribe(OrderCompleted.self, name: "orders.completed", service: OrdersService.name, middleware: [dedup]) {
            event, context in
            try await book.finish(event.orderID, as: .completed, reason: nil, event: context.event)
        }
        bus.subscribe(OrderCancelled.self, name: "orders.cancelled", service: OrdersService.name, middleware: [dedup]) {
            event, context in
            try await book.finish(event.orderID, as: .cancelled, reason: event.reason, event: context.event)
        }
    }

    /// Places an order: records it (reserving stock) and publishes `OrderCreated`, which starts the order's
    /// conversation.
    /// - Parameter context: the command being handled, when there is one: `OrderCreated` then continues its trace.
    public func place(_ order: OrderCreated, from context: EventContext? = nil) async throws {
        let attributes = EventAttributes(correlationID: order.orderID)
        let created =
            context?.response(order, attributes) ?? CloudEvent(order, source: bus.source, attributes: attributes)
        try await book.place(order, announcing: created, on: bus)
    }

    public func status(of orderID: String) async throws -> OrderStatus? { try await book.status(of: orderID) }
    public func statuses() async throws -> [String: OrderStatus] { try await book.statuses() }
    /// Stock reserved for orders that are not cancelled.
    public func reservedStock() async throws -> Int { try await book.reservedStock() }
    public func cancellationReason(of orderID: String) async throws -> String? {
        try await book.cancellationReason(of: orderID)
    }
}

/// Decides payments deterministically from a seed, so a run's failures are known in advance.
public struct PaymentGateway: Sendable {
    public let seed: UInt64
    /// Percentage of orders whose payment is declined.
    public let failurePercent: Int

    public init(seed: UInt64, failurePercent: Int) {
        self.seed = seed
        self.failurePercent = failurePercent
    }

    public func declines(_ orderID: String) -> Bool {
        var hash = PartitionHash.fnv1a(orderID) ^ (seed &* 0x9E37_79B9_7F4A_7C15)
        hash ^= hash >> 33
        hash = hash &* 0xff51_afd7_ed55_8ccd
        hash ^= hash >> 33
        return Int(hash % 100) < failurePercent
    }
}

/// The payments service: charges each created order, and refunds on request.
public final class PaymentsService: Sendable {
    public static let name = "payments"
    public let bus: EventBus
    public let gateway: PaymentGateway
    private let ledger = Mutex<(charged: Set<String>, refunded: Set<String>)>(([], []))

    public init(bus: EventBus, gateway: PaymentGateway) {
        self.bus = bus
        self.gateway = gateway
        // Idempotent consumer: a redelivered OrderCreated must not charge twice.
        let dedup = Deduplicate()
        bus.subscribe(OrderCreated.self, name: "payments.charge", service: PaymentsService.name, middleware: [dedup]) {
            [self] order, context in
            if gateway.declines(order.orderID) {
                try await context.publish(PaymentFailed(orderID: order.orderID, reason: "card declined"))
            } else {
                self.ledger.withLock { _ = $0.charged.insert(order.orderID) }
                try await context.publish(
                    OrderPaid(orderID: order.orderID, paymentID: "pay-\(order.orderID)", amountCents: order.amountCents)
                )
            }
        }
        bus.subscribe(RefundPayment.self, name: "payments.refund", service: PaymentsService.name, middleware: [dedup]) {
            [self] refund, _ in
            self.ledger.withLock { _ = $0.refunded.insert(refund.orderID) }
        }
    }

    public var charged: Set<String> { ledger.withLock { $0.charged } }
    public var refunded: Set<String> { ledger.withLock { $0.refunded } }
}

/// The shipping service: ships every paid order.
public final class ShippingService: Sendable {
    public static let name = "shipping"
    public let bus: EventBus
    private let shipped = Mutex<Set<String>>([])

    public init(bus: EventBus) {
        self.bus = bus
        let dedup = Deduplicate()
        bus.subscribe(OrderPaid.self, name: "shipping.ship", service: ShippingService.name, middleware: [dedup]) {
            [self] paid, context in
            self.shipped.withLock { _ = $0.insert(paid.orderID) }
            try await context.publish(OrderShipped(orderID: paid.orderID, trackingNumber: "TRK-\(paid.orderID)"))
        }
    }

    public var shippedOrders: Set<String> { shipped.withLock { $0 } }
}

/// The notifications service: tells the customer how each order ended, once per order.
public final class NotificationsService: Sendable {
    public static let name = "notifications"

    public struct Notification: Sendable, Hashable {
        public let orderID: String
        public let status: OrderStatus
        /// Monotonic nanoseconds when it was sent (for end-to-end latency).
        public let sentAt: UInt64
    }

    public let bus: EventBus
    private let sent = Mutex<[String: Notification]>([:])
    private let duplicates = Mutex(0)
    private let onNotify: @Sendable (Notification) -> Void

    /// - Parameter announce: also publish `CustomerNotified` for each notification sent (so other processes can
    ///   follow what customers were told).
    public init(
        bus: EventBus, announce: Bool = false, onNotify: @escaping @Sendable (Notification) -> Void = { _ in }
    ) {
        self.bus = bus
        self.onNotify = onNotify
        let dedup = Deduplicate()
        bus.subscribe(
            OrderCompleted.self, name: "notifications.completed", service: NotificationsService.name,
            middleware: [dedup]
        ) { [self] event, context in
            if self.notify(event.orderID, .completed), announce {
                try await context.publish(CustomerNotified(orderID: event.orderID, status: .completed))
            }
        }
        bus.subscribe(
            OrderCancelled.self, name: "notifications.cancelled", service: NotificationsService.name,
            middleware: [dedup]
        ) { [self] event, context in
            if self.notify(event.orderID, .cancelled), announce {
                try await context.publish(CustomerNotified(orderID: event.orderID, status: .cancelled))
            }
        }
    }

    /// Sends a notification unless this order's customer was already told; returns whether it was sent.
    private func notify(_ orderID: String, _ status: OrderStatus) -> Bool {
        let notification = Notification(orderID: orderID, status: status, sentAt: monotonicNanoseconds())
        let first = sent.withLock { sent -> Bool in
            guard sent[orderID] == nil else { return false }
            sent[orderID] = notification
            return true
        }
        if first { onNotify(notification) } else { duplicates.withLock { $0 += 1 } }
        return first
    }

    public var notifications: [String: Notification] { sent.withLock { $0 } }
    /// Notifications that would have reached a customer twice.
    public var duplicateNotifications: Int { duplicates.withLock { $0 } }
}

/// The order system's services by name, for hosting one per process.
public enum OrderServices {
    public static let names = [
        OrdersService.name, PaymentsService.name, ShippingService.name, NotificationsService.name,
    ]

    /// Starts the named service's handlers on `bus`; returns the service object (keep it alive).
    public static func start(_ name: String, on bus: EventBus, gateway: PaymentGateway) -> (any Sendable)? {
        switch name {
        case OrdersService.name: return OrdersService(bus: bus)
        case PaymentsService.name: return PaymentsService(bus: bus, gateway: gateway)
        case ShippingService.name: return ShippingService(bus: bus)
        case NotificationsService.name: return NotificationsService(bus: bus, announce: true)
        default: return nil
        }
    }
}
