import DequeModule
import Logging
import Synchronization

/// The deliveries of one consumer group member, as an `AsyncSequence`.
///
/// Transports push into it from any thread; the consumer takes everything buffered in one lock round-trip, so
/// hand-off costs are paid per batch, not per event. Flow control is the transport's job (it pushes at most
/// `maxInFlight` unsettled deliveries). When the consumer stops iterating (its iterator is released or its task
/// cancelled), `onTermination` runs so the transport can give the member's unsettled deliveries to others.
public struct DeliveryStream: AsyncSequence, Sendable {
    public typealias Element = Delivery

    let buffer: DeliveryBuffer

    /// A stream and the handle a transport pushes into.
    public static func make(onTermination: @escaping @Sendable () -> Void = {}) -> (DeliveryStream, DeliveryBuffer) {
        let buffer = DeliveryBuffer(onTermination: onTermination)
        return (DeliveryStream(buffer: buffer), buffer)
    }

    public func makeAsyncIterator() -> Iterator {
        Iterator(box: IteratorBox(buffer: buffer))
    }

    public struct Iterator: AsyncIteratorProtocol {
        let box: IteratorBox

        public mutating func next() async throws -> Delivery? {
            try await box.next()
        }

        /// Whether `next()` would return at once (deliveries of the last batch remain): consumers that settle in
        /// batches settle when this turns false.
        public var hasBuffered: Bool { !box.local.isEmpty }
    }

    public final class IteratorBox: @unchecked Sendable {
        // Safe: an iterator is used by one task at a time, as AsyncIteratorProtocol requires.
        let buffer: DeliveryBuffer
        var local = Deque<Delivery>()

        init(buffer: DeliveryBuffer) {
            self.buffer = buffer
        }

        deinit { buffer.terminate() }

        func next() async throws -> Delivery? {
            if let delivery = local.popFirst() { return delivery }
            guard let batch = try await buffer.takeAll() else { return nil }
            local = batch
            return local.popFirst()
        }
    }
}

/// The producer side of a `DeliveryStream`.
public final class DeliveryBuffer: Sendable {
    struct State {
        var items = Deque<Delivery>()
        var waiter: CheckedContinuation<Deque<Delivery>?, any Error>?
        var finished = false
        var failure: (any Error)?
        var terminated = false
    }

    private let state = Mutex(State())
    private let onTermination: @Sendable () -> Void

    init(onTermination: @escaping @Sendable () -> Void) {
        self.onTermination = onTermination
    }

    /// Adds deliveries; returns false when the consumer is gone (the transport should take them back).
    @discardableResult
    public func push(_ deliveries: some Sequence<Delivery>) -> Bool {
        let (accepted, waiter, batch) = state.withLock {
            state -> (Bool, CheckedContinuation<Deque<Delivery>?, any Error>?, Deque<Delivery>?) in
            if state.terminated || state.finished { return (false, nil, nil) }
            state.items.append(contentsOf: deliveries)
            guard let waiter = state.waiter, !state.items.isEmpty else { return (true, nil, nil) }
            state.waiter = nil
            defer { state.items = Deque() }
            return (true, waiter, state.items)
        }
        waiter?.resume(returning: batch)
        return accepted
    }

    /// Ends the stream after what is buffered; with an error, the consumer's loop throws it.
    public func finish(throwing error: (any Error)? = nil) {
        let waiter = state.withLock { state -> CheckedContinuation<Deque<Delivery>?, any Error>? in
            state.finished = true
            state.failure = error
            defer { state.waiter = nil }
            return state.items.isEmpty ? state.waiter : nil
        }
        if let error { waiter?.resume(throwing: error) } else { waiter?.resume(returning: nil) }
    }

    /// Whether the consumer has gone away.
    public var isTerminated: Bool { state.withLock { $0.terminated } }

    func terminate() {
        let (first, waiter) = state.withLock { state -> (Bool, CheckedContinuation<Deque<Delivery>?, any Error>?) in
            let first = !state.terminated
            state.terminated = true
            defer { state.waiter = nil }
            return (first, state.waiter)
        }
        waiter?.resume(returning: nil)
        if first { onTermination() }
    }

    func takeAll() async throws -> Deque<Delivery>? {
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation {
                (continuation: CheckedContinuation<Deque<Delivery>?, any Error>) in
                enum Ready {
                    case batch(Deque<Delivery>)
                    case end
                    case fail(any Error)
                    case wait
                }
                let ready = state.withLock { state -> Ready in
                    if !state.items.isEmpty {
                        defer { state.items = Deque() }
                        return .batch(state.items)
                    }
                    if state.terminated { return .end }
                    if state.finished { return state.failure.map(Ready.fail) ?? .end }
                    state.waiter = continuation
                    return .wait
                }
                switch ready {
                case .batch(let batch): continuation.resume(returning: batch)
                case .end: continuation.resume(returning: nil)
                case .fail(let error): continuation.resume(throwing: error)
                case .wait: break
                }
            }
        } onCancel: {
            terminate()
        }
    }
}

/// Settles a transport delivery after the local handlers ran: ack on success, nack with backoff on failure.
final class DeliveryCompletion: WorkCompletion {
    let delivery: Delivery
    let backoff: [Duration]
    let settlements: SettlementBatcher

    init(delivery: Delivery, backoff: [Duration], settlements: SettlementBatcher) {
        self.delivery = delivery
        self.backoff = backoff
        self.settlements = settlements
    }

    func completed(_ outcome: HandlerRunOutcome) {
        settlements.settle(
            delivery, outcome.failures.isEmpty ? .ack : .nack(backoff.delay(forAttempt: delivery.attempt)))
    }
}

/// Sends the settlements of one transport link in batches: whatever accumulates while a batch is in flight goes in
/// the next one, so a busy consumer settles many deliveries per round trip, and settling never holds up the
/// workers that ran the handlers.
final class SettlementBatcher: Sendable {
    struct State {
        var pending: [(Delivery, Settlement)] = []
        var running = false
    }

    let transport: any EventTransport
    let logger: Logger
    private let state = Mutex(State())

    init(transport: any EventTransport, logger: Logger) {
        self.transport = transport
        self.logger = logger
    }

    func settle(_ delivery: Delivery, _ settlement: Settlement) {
        let start = state.withLock { state -> Bool in
            state.pending.append((delivery, settlement))
            if state.running { return false }
            state.running = true
            return true
        }
        if start { Task { await self.run() } }
    }

    private func run() async {
        while true {
            let batch = state.withLock { state -> [(Delivery, Settlement)]? in
                if state.pending.isEmpty {
                    state.running = false
                    return nil
                }
                defer { state.pending = [] }
                return state.pending
            }
            guard let batch else { return }
            // Acks go together; nacks together per delay (a handful of distinct backoffs).
            var groups: [Settlement: [Delivery]] = [:]
            for (delivery, settlement) in batch { groups[settlement, default: []].append(delivery) }
            for (settlement, deliveries) in groups {
                do {
                    let stale = try await transport.settle(deliveries, settlement)
                    for (delivery, flag) in zip(deliveries, stale) where flag {
                        logger.debug(
                            "a settlement was stale (the delivery was redelivered meanwhile)",
                            metadata: ["event.id": "\(delivery.event.id)"])
                    }
                } catch {
                    logger.warning(
                        "settling deliveries failed; they will be redelivered",
                        metadata: ["count": "\(deliveries.count)", "error": "\(error)"])
                }
            }
        }
    }
}
