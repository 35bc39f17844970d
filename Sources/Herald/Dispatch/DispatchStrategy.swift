/// How a bus (or one subscription) schedules the events posted to it.
///
/// `publish` always waits for every handler; the strategy decides *when and where* each posted event runs.
/// See docs/STRATEGIES.md for when to choose which.
public enum DispatchStrategy: Sendable, Hashable {
    /// Handlers run inline in the caller's task, before `post` returns. Lowest latency, no queue.
    case immediate
    /// One bounded FIFO queue drained by N workers in batches. Highest throughput; no order across workers.
    case fifo(workers: Int)
    /// Higher `EventAttributes.priority` first (FIFO among equals), N workers.
    case priority(workers: Int)
    /// Reorders by event `time` within a lateness bound: an event is released once the watermark (latest time
    /// seen minus `lateness`) passes it, or after waiting `maxHold` of real time. One worker, so release order
    /// is handling order. An event older than one already released is late and handled per `latePolicy`.
    case eventTime(lateness: Duration, maxHold: Duration, latePolicy: LateEventPolicy)
    /// One worker, strict global order: an event's handlers finish before the next event starts.
    case sequential
    /// N lanes by `partitionkey` hash: per-key order, parallel across keys. With `parkFailingKeys`, a key whose
    /// event fails is parked (its later events held) while other keys flow, until resumed or discarded.
    case partitioned(lanes: Int, parkFailingKeys: Bool)
    /// N workers, each with its own queue; each event goes to the worker with the fewest queued and running.
    case leastLoaded(workers: Int)
}

/// What the event-time strategy does with an event older than one it already released.
public enum LateEventPolicy: Sendable, Hashable {
    /// Handle it at once, out of order.
    case deliver
    /// Send it to the dead-letter sink with reason "late", without running handlers.
    case deadLetter
}

/// What `post` does when the queue is full.
public enum BackPressure: Sendable, Hashable {
    /// Wait for space.
    case suspend
    /// Throw `EventBusError.queueFull` at once.
    case reject
}

/// Errors from the bus itself (handler failures are reported in `PublishResult`, never thrown).
public struct EventBusError: Error, Hashable, Sendable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        let name: String
        public var description: String { name }
        /// The queue is at capacity and the back-pressure policy is `.reject`; retry later.
        public static let queueFull = Code(name: "queueFull")
        /// The bus is shutting down and accepts no new work.
        public static let shutDown = Code(name: "shutDown")
        /// The configuration is invalid.
        public static let invalidConfiguration = Code(name: "invalidConfiguration")
    }

    public let code: Code
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "EventBusError.\(code): \(message)" }
}
