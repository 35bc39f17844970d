import Herald
import Synchronization

/// Runs the order system end to end and checks that every order ended in the right state.
public enum OrderDemo {
    /// How the four services are connected.
    public enum Topology: String, Sendable, CaseIterable {
        /// One bus in one process; handlers call each other's events directly.
        case local
        /// Four buses (one per service) linked through an in-memory transport, as they would be across processes.
        case memory
    }

    public struct Options: Sendable {
        public var orders: Int
        public var seed: UInt64
        /// Percentage of orders whose payment is declined.
        public var failurePercent: Int
        public var topology: Topology
        /// How many orders' timelines to record.
        public var timelineOrders: Int
        /// Orders placed concurrently.
        public var concurrency: Int
        public var timeout: Duration

        public init(
            orders: Int = 1000, seed: UInt64 = 42, failurePercent: Int = 10, topology: Topology = .memory,
            timelineOrders: Int = 3, concurrency: Int = 64, timeout: Duration = .seconds(120)
        ) {
            self.orders = orders
            self.seed = seed
            self.failurePercent = failurePercent
            self.topology = topology
            self.timelineOrders = timelineOrders
            self.concurrency = concurrency
            self.timeout = timeout
        }
    }

    public struct TimelineEntry: Sendable, Hashable {
        /// Nanoseconds since the order was placed.
        public let offset: UInt64
        public let source: String
        public let type: String

        public init(offset: UInt64, source: String, type: String) {
            self.offset = offset
            self.source = source
            self.type = type
        }
    }

    public struct Report: Sendable {
        public let options: Options
        public let byStatus: [OrderStatus: Int]
        /// Orders whose final state or notification is not what their payment outcome calls for.
        public let wrongOrders: [String]
        public let missingNotifications: Int
        public let duplicateNotifications: Int
        /// Stock the orders service still holds reserved, when the demo can see it (nil when it runs elsewhere).
        public let reservedStockLeft: Int?
        public let expectedReservedStock: Int
        public let events: Int
        /// Deliveries the transport made again after a nack or an ack timeout (0 in process).
        public let redeliveries: Int
        public let elapsed: Duration
        public let latencyP50: Duration
        public let latencyP99: Duration
        public let timelines: [(orderID: String, status: OrderStatus?, entries: [TimelineEntry])]

        public init(
            options: Options, byStatus: [OrderStatus: Int], wrongOrders: [String], missingNotifications: Int,
            duplicateNotifications: Int, reservedStockLeft: Int?, expectedReservedStock: Int, events: Int,
            redeliveries: Int, elapsed: Duration, latencyP50: Duration, latencyP99: Duration,
            timelines: [(orderID: String, status: OrderStatus?, entries: [TimelineEntry])]
        ) {
            self.options = options
            self.byStatus = byStatus
            self.wrongOrders = wrongOrders
            self.missingNotifications = missingNotifications
            self.duplicateNotifications = duplicateNotifications
            self.reservedStockLeft = reservedStockLeft
            self.expectedReservedStock = expectedReservedStock
            self.events = events
            self.redeliveries = redeliveries
            self.elapsed = elapsed
            self.latencyP50 = latencyP50
            self.latencyP99 = latencyP99
            self.timelines = timelines
        }

        public var eventsPerSecond: Double {
            Double(events)
                / max(1e-9, Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18)
        }

        /// True only if every order reached the right final state, each customer was notified exactly once, and
        /// stock reservations match the completed orders.
        public var passed: Bool {
            wrongOrders.isEmpty && missingNotifications == 0 && duplicateNotifications == 0
                && (reservedStockLeft.map { $0 == expectedReservedStock } ?? true)
        }
    }

    public static func orderID(_ index: Int) -> String {
        let digits = String(index)
        return "order-" + String(repeating: "0", count: max(0, 5 - digits.count)) + digits
    }

    /// The bus of one service linked to a transport: its own consumer group (named after the service), per-order
    /// ordering, redelivery on failure. The same in every topology that crosses a transport.
    public static func makeServiceBus(_ service: String, transport: any EventTransport, topic: String = "orders")
        -> EventBus
    {
        // Many lanes: a handler that publishes waits for the transport's durable acknowledgement, so lanes, not
        // cores, bound how many orders move at once (each order's events stay in order on its lane).
        var configuration = EventBus.Configuration(
            source: service, strategy: .partitioned(lanes: 32, parkFailingKeys: false))
        var subscribe = SubscribeOptions(ackWait: .seconds(5), maxDeliveries: 20)
        subscribe.ordered = true
        configuration.transport = TransportLink(transport, topic: topic, options: subscribe)
        return EventBus(configuration: configuration)
    }

    /// Runs the demo. With `external`, the services' buses are linked through that transport (any
    /// `EventTransport`: NATS, the broker…) on a topic of their own, `orders.<run id>`, instead of the in-memory one.
    /// `book` and `sagaStore` are where the orders service keeps its orders and its sagas (memory by default).
    public static func run(
        _ options: Options, over external: (any EventTransport)? = nil, book: any OrderBook = InMemoryOrderBook(),
        sagaStore: any SagaStore = InMemorySagaStore()
    ) async throws -> Report {
        let gateway = PaymentGateway(seed: options.seed, failurePercent: options.failurePercent)
        let ids = (1...max(1, options.orders)).map(orderID)
        let traced = Set(ids.prefix(options.timelineOrders))
        let placedAt = Locked<[String: UInt64]>([:])
        let timeline = Locked<[String: [TimelineEntry]]>([:])
        let eventCount = Locked(0)
        let notified = Locked(0)

        // The services, on one bus or on four linked through a transport.
        let memory = InMemoryTransport()
        let transport: any EventTransport = external ?? memory
        let topic = external == nil ? "orders" : "orders.\(EventID().description.prefix(8))"
        func makeBus(_ service: String) -> EventBus {
            guard options.topology == .memory || external != nil else {
                return EventBus(
                    configuration: EventBus.Configuration(
                        source: service, strategy: .partitioned(lanes: 4, parkFailingKeys: false)))
            }
            return makeServiceBus(service, transport: transport, topic: topic)
        }
        let shared = makeBus("orders")
        let buses =
            options.topology == .local
            ? [shared]
            : [
                shared, makeBus(PaymentsService.name), makeBus(ShippingService.name),
                makeBus(NotificationsService.name), makeBus("audit"),
            ]
        let auditBus = buses.last!
        // The bus of the service at `index` in `buses` (every service shares the one bus when local).
        func bus(_ index: Int) -> EventBus { buses.count == 1 ? shared : buses[index] }
        let orders = OrdersService(bus: shared, sagaStore: sagaStore, book: book)
        // Payments and shipping live on through their subscriptions; the demo only reads orders and notifications.
        _ = PaymentsService(bus: bus(1), gateway: gateway)
        _ = ShippingService(bus: bus(2))
        let notifications = NotificationsService(bus: bus(3)) { _ in notified.withLock { $0 += 1 } }
        auditBus.subscribe(.all, name: "audit", priority: 100) { event, _ in
            eventCount.withLock { $0 += 1 }
            guard let orderID = event.subject, traced.contains(orderID) else { return }
            let now = monotonicNanoseconds()
            let start = placedAt.withLock { $0[orderID] } ?? now
            timeline.withLock {
                $0[orderID, default: []].append(
                    TimelineEntry(offset: now &- start, source: event.source, type: event.type))
            }
        }
        for bus in buses { try await bus.start() }

        // Place the orders, a bounded number at a time.
        let clock = ContinuousClock()
        let started = clock.now
        @Sendable func place(_ index: Int) async throws {
            let id = ids[index]
            placedAt.withLock { $0[id] = monotonicNanoseconds() }
            try await orders.place(
                OrderCreated(
                    orderID: id, customer: "customer-\(index % 97)", amountCents: 1000 + index % 500,
                    items: 1 + index % 3))
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            var next = 0
            while next < min(options.concurrency, ids.count) {
                let index = next
                group.addTask { try await place(index) }
                next += 1
            }
            while try await group.next() != nil {
                guard next < ids.count else { continue }
                let index = next
                group.addTask { try await place(index) }
                next += 1
            }
        }
        // Wait until every customer has heard how their order ended and the orders service has recorded it (or the
        // timeout), then until the transport has nothing left in flight, so the counts below are final.
        let deadline = clock.now + options.timeout
        func settled() async throws -> Bool {
            guard notified.withLock({ $0 }) >= ids.count else { return false }
            guard try await book.pendingCount() == 0 else { return false }
            guard options.topology == .memory, external == nil else { return true }
            return ["orders", "payments", "shipping", "notifications", "audit"].allSatisfy { group in
                guard let status = memory.groupStatus(topic: "orders", group: group) else { return true }
                return status.lag == 0 && status.pending == 0
            }
        }
        while try await !settled() && clock.now < deadline {
            try await Task.sleep(for: .milliseconds(1))
        }
        let elapsed = clock.now - started
        for bus in buses { await bus.drain() }
        let redelivered = ["orders", "payments", "shipping", "notifications", "audit"].reduce(0) {
            $0 + (memory.groupStatus(topic: "orders", group: $1)?.redelivered ?? 0)
        }
        // The audit log may still be catching up with the last events.
        for bus in buses { await bus.shutdown() }
        await transport.shutdown()

        // Check every order against its payment outcome.
        let statuses = try await orders.statuses()
        let sent = notifications.notifications
        var byStatus: [OrderStatus: Int] = [:]
        var wrong: [String] = []
        var latencies: [UInt64] = []
        let placed = placedAt.withLock { $0 }
        for id in ids {
            let expected: OrderStatus = gateway.declines(id) ? .cancelled : .completed
            let status = statuses[id] ?? .pending
            byStatus[status, default: 0] += 1
            if status != expected || (sent[id].map { $0.status != expected } ?? false) { wrong.append(id) }
            if let notification = sent[id], let start = placed[id] { latencies.append(notification.sentAt &- start) }
        }
        latencies.sort()
        func percentile(_ p: Double) -> Duration {
            guard !latencies.isEmpty else { return .zero }
            return .nanoseconds(Int64(latencies[min(latencies.count - 1, Int(Double(latencies.count) * p))]))
        }
        let traces = timeline.withLock { $0 }
        return Report(
            options: options, byStatus: byStatus, wrongOrders: wrong,
            missingNotifications: ids.count - sent.count, duplicateNotifications: notifications.duplicateNotifications,
            reservedStockLeft: try await orders.reservedStock(), expectedReservedStock: byStatus[.completed] ?? 0,
            events: eventCount.withLock { $0 }, redeliveries: redelivered, elapsed: elapsed,
            latencyP50: percentile(0.50),
            latencyP99: percentile(0.99),
            timelines: ids.prefix(options.timelineOrders).map { ($0, statuses[$0], traces[$0] ?? []) })
    }
}

/// A value behind a lock that closures can share.
final class Locked<Value: Sendable>: Sendable {
    private let mutex: Mutex<Value>
    init(_ value: Value) { mutex = Mutex(value) }
    func withLock<T>(_ body: (inout Value) -> T) -> T { mutex.withLock { body(&$0) } }
}
