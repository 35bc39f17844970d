import Herald
import Synchronization

/// Where the orders service keeps its orders. In memory by default; a database-backed book (PostgreSQL with the
/// transactional outbox, in `herald demo --postgres`) records an order and the event announcing it in one
/// transaction.
public protocol OrderBook: Sendable {
    /// Records a new pending order — reserving its stock — and publishes `created` (its `OrderCreated` envelope)
    /// on `bus`'s transport link, or on `bus` itself when it has none. Placing an order again changes nothing.
    func place(_ order: OrderCreated, announcing created: CloudEvent, on bus: EventBus) async throws
    /// Records how an order ended: completed, or cancelled (releasing its stock once) with the reason. `event` is
    /// the event that says so; a repeated delivery of it changes nothing.
    func finish(_ orderID: String, as status: OrderStatus, reason: String?, event: CloudEvent) async throws
    func status(of orderID: String) async throws -> OrderStatus?
    /// Every order's status.
    func statuses() async throws -> [String: OrderStatus]
    /// Orders still pending.
    func pendingCount() async throws -> Int
    /// Stock reserved for orders that are not cancelled.
    func reservedStock() async throws -> Int
    func cancellationReason(of orderID: String) async throws -> String?
}

/// Orders in this process's memory.
public final class InMemoryOrderBook: OrderBook {
    private struct Book {
        var status: [String: OrderStatus] = [:]
        var reservedStock = 0
        var reasons: [String: String] = [:]
    }
    private let book = Mutex(Book())

    public init() {}

    public func place(_ order: OrderCreated, announcing created: CloudEvent, on bus: EventBus) async throws {
        let new = book.withLock { book -> Bool in
            guard book.status[order.orderID] == nil else { return false }
            book.status[order.orderID] = .pending
            book.reservedStock += 1
            return true
        }
        if new { try await bus.publish(created) }
    }

    public func finish(_ orderID: String, as status: OrderStatus, reason: String?, event: CloudEvent) async throws {
        book.withLock { book in
            // Compensation: a cancelled order releases the stock reserved when it was created, once.
            if status == .cancelled, book.status[orderID] == .pending { book.reservedStock -= 1 }
            book.status[orderID] = status
            if let reason { book.reasons[orderID] = reason }
        }
    }

    public func status(of orderID: String) async throws -> OrderStatus? { book.withLock { $0.status[orderID] } }
    public func statuses() async throws -> [String: OrderStatus] { book.withLock { $0.status } }
    public func pendingCount() async throws -> Int {
        book.withLock { $0.status.values.count(where: { $0 == .pending }) }
    }
    public func reservedStock() async throws -> Int { book.withLock { $0.reservedStock } }
    public func cancellationReason(of orderID: String) async throws -> String? {
        book.withLock { $0.reasons[orderID] }
    }
}
