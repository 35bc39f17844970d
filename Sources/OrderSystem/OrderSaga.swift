import Herald

/// The order saga, run by the orders service: created → paid → shipped → completed; payment failure (or no
/// payment in time) → cancelled. A payment that arrives after the cancellation is refunded (compensation).
public struct OrderSaga: Saga {
    public static let name = "order"
    public static let events: [any Event.Type] = [
        OrderCreated.self, OrderPaid.self, PaymentFailed.self, OrderShipped.self,
    ]

    public enum Step: String, Codable, Sendable {
        case awaitingPayment
        case awaitingShipment
        case completed
        case cancelled
    }

    public struct State: Codable, Sendable, Hashable {
        public var orderID: String
        public var step: Step
    }

    public let paymentTimeout: Duration
    public let shippingTimeout: Duration

    public init(paymentTimeout: Duration = .seconds(30), shippingTimeout: Duration = .seconds(60)) {
        self.paymentTimeout = paymentTimeout
        self.shippingTimeout = shippingTimeout
    }

    public func handle(_ event: DecodedEvent, state: State?, context: SagaContext) async throws
        -> SagaTransition<State>
    {
        guard case .known(let value, _) = event else { return .ignore }
        switch (value, state?.step) {
        case (let created as OrderCreated, nil):
            return .continue(State(orderID: created.orderID, step: .awaitingPayment), timeout: paymentTimeout)
        case (_ as OrderPaid, .awaitingPayment?):
            return .continue(State(orderID: state!.orderID, step: .awaitingShipment), timeout: shippingTimeout)
        case (let paid as OrderPaid, .cancelled?):
            // Paid after we gave up: compensate by refunding (a command addressed to payments).
            try await context.publish(
                RefundPayment(orderID: paid.orderID, paymentID: paid.paymentID), EventAttributes(recipient: "payments"))
            return .ignore
        case (let failed as PaymentFailed, .awaitingPayment?):
            try await context.publish(
                OrderCancelled(orderID: failed.orderID, reason: "payment failed: \(failed.reason)"))
            return .finish(State(orderID: failed.orderID, step: .cancelled))
        case (let shipped as OrderShipped, .awaitingShipment?):
            try await context.publish(OrderCompleted(orderID: shipped.orderID))
            return .finish(State(orderID: shipped.orderID, step: .completed))
        case (_, nil):
            // A later step arrived before this order's creation was handled (possible across processes without
            // per-key order): fail so the transport redelivers it after OrderCreated.
            throw SagaOutOfOrder(eventType: Swift.type(of: value).eventType)
        default:
            // A repeated or out-of-place event: the state already reflects it.
            return .ignore
        }
    }

    public func timedOut(state: State, context: SagaContext) async throws -> SagaTransition<State> {
        switch state.step {
        case .awaitingPayment:
            try await context.publish(OrderCancelled(orderID: state.orderID, reason: "no payment in time"))
            return .continue(State(orderID: state.orderID, step: .cancelled), timeout: nil)
        case .awaitingShipment:
            // Shipping is late: keep waiting, but the operator would be alerted here.
            return .continue(state, timeout: shippingTimeout)
        case .completed, .cancelled:
            return .ignore
        }
    }
}

/// An event for an order the saga has not seen created yet; redelivery will bring it again.
public struct SagaOutOfOrder: Error, Sendable, CustomStringConvertible {
    public let eventType: String
    public var description: String { "\(eventType) arrived before the order was created" }
}
