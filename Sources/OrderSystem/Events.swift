import Herald

// The order system's contract: the only thing its services share. Type names are stable wire names.

/// An event about one order: keyed and subject-ed by its order id, so each order's events keep their order and
/// its timeline can be followed.
public protocol OrderEvent: Event {
    var orderID: String { get }
}

extension OrderEvent {
    public var partitionKey: String? { orderID }
    public var subject: String? { orderID }
}

/// A customer placed an order; stock is reserved for it.
public struct OrderCreated: OrderEvent, Hashable {
    public static let eventType = "com.herald.orders.order.created"
    public var orderID: String
    public var customer: String
    public var amountCents: Int
    public var items: Int

    public init(orderID: String, customer: String, amountCents: Int, items: Int) {
        self.orderID = orderID
        self.customer = customer
        self.amountCents = amountCents
        self.items = items
    }
}

/// The payment for an order went through.
public struct OrderPaid: OrderEvent, Hashable {
    public static let eventType = "com.herald.orders.order.paid"
    public var orderID: String
    public var paymentID: String
    public var amountCents: Int

    public init(orderID: String, paymentID: String, amountCents: Int) {
        self.orderID = orderID
        self.paymentID = paymentID
        self.amountCents = amountCents
    }
}

/// The payment for an order was declined.
public struct PaymentFailed: OrderEvent, Hashable {
    public static let eventType = "com.herald.orders.payment.failed"
    public var orderID: String
    public var reason: String

    public init(orderID: String, reason: String) {
        self.orderID = orderID
        self.reason = reason
    }
}

/// The order left the warehouse.
public struct OrderShipped: OrderEvent, Hashable {
    public static let eventType = "com.herald.orders.order.shipped"
    public var orderID: String
    public var trackingNumber: String

    public init(orderID: String, trackingNumber: String) {
        self.orderID = orderID
        self.trackingNumber = trackingNumber
    }
}

/// The order is done: paid and shipped.
public struct OrderCompleted: OrderEvent, Hashable {
    public static let eventType = "com.herald.orders.order.completed"
    public var orderID: String

    public init(orderID: String) {
        self.orderID = orderID
    }
}

/// The order was cancelled; its stock reservation is released (compensation).
public struct OrderCancelled: OrderEvent, Hashable {
    public static let eventType = "com.herald.orders.order.cancelled"
    public var orderID: String
    public var reason: String

    public init(orderID: String, reason: String) {
        self.orderID = orderID
        self.reason = reason
    }
}

/// A command to the payments service (addressed with `recipient`): refund a payment that arrived for an order
/// that was already cancelled (compensation).
public struct RefundPayment: OrderEvent, Hashable {
    public static let eventType = "com.herald.orders.payment.refund"
    public var orderID: String
    public var paymentID: String

    public init(orderID: String, paymentID: String) {
        self.orderID = orderID
        self.paymentID = paymentID
    }
}

/// A command to the orders service (addressed with `recipient`): a customer wants to place this order. Lets a
/// storefront in another process (or language) place orders through the event stream alone.
public struct PlaceOrder: OrderEvent, Hashable {
    public static let eventType = "com.herald.orders.order.place"
    public var order: OrderCreated
    public var orderID: String { order.orderID }

    public init(_ order: OrderCreated) {
        self.order = order
    }
}

/// The notifications service told the customer how their order ended (published once per notification sent).
public struct CustomerNotified: OrderEvent, Hashable {
    public static let eventType = "com.herald.notifications.customer.notified"
    public var orderID: String
    public var status: OrderStatus

    public init(orderID: String, status: OrderStatus) {
        self.orderID = orderID
        self.status = status
    }
}

/// The final state an order can reach.
public enum OrderStatus: String, Codable, Sendable, CaseIterable {
    case pending
    case completed
    case cancelled
}
